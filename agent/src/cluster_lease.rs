//! The VMM side of self-fencing: every clustered VM's VMM gets a write lease, the
//! node's own fencing deadline as an absolute time on the host's `CLOCK_MONOTONIC`
//! (`vm.create`'s `write_lease`, then `PUT vm.lease` after each renewal of the node's
//! cluster lease). A VMM past its deadline refuses every disk write and pauses, even
//! if vireod cannot kill it (vireod stopped, hung or slower to wake than its VMMs).
//!
//! Renewals are pushed by their own task, so a slow VMM never delays vireod's own
//! fencing loop. Only a deadline still in the future is pushed: a vireod that wakes up
//! after its deadline has nothing to push and kills its VMs instead.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, warn};

use crate::supervisor::Supervisor;

/// How long one renewal may take before the VMM's answer is given up (the next
/// renewal comes 500 ms later anyway).
const PUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Nanoseconds on `CLOCK_MONOTONIC`, the clock `Instant` counts on and every process
/// of the host shares.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Converts the node loop's clock (time since `t0`) to `CLOCK_MONOTONIC`.
#[derive(Clone, Copy, Debug)]
pub struct MonotonicBase {
    /// `CLOCK_MONOTONIC` read just *before* `t0` was taken: every converted deadline
    /// is at or before the true one, never after.
    base_ns: u64,
    pub t0: Instant,
}

impl MonotonicBase {
    pub fn now() -> Self {
        let base_ns = monotonic_ns();
        MonotonicBase {
            base_ns,
            t0: Instant::now(),
        }
    }

    /// `at` (time since `t0`) on `CLOCK_MONOTONIC`.
    pub fn at(&self, at: Duration) -> u64 {
        self.base_ns
            .saturating_add(u64::try_from(at.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// How soon a VMM that has not taken the current deadline yet (its socket not up
/// while it starts, or busy) is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(50);

/// Starts the task that pushes each new deadline to the VMMs: as soon as a renewal
/// moves it (`deadlines`, on the node loop's clock, converted with `clock`), not at the
/// next turn of the node's loop, which store calls and VM starts can hold up. Send it
/// the VMs that run under the node's lease, a VM being started included: the
/// deadline its VMM was created with was taken before the start, which can take
/// longer than that deadline is ahead (a loaded host, the inventory's commits), so a
/// VMM that has not taken the current deadline is tried again every [`RETRY_AFTER`]
/// until its API answers, not only at the next renewal.
pub fn spawn_pusher(
    sup: Arc<Supervisor>,
    deadlines: watch::Receiver<Option<Duration>>,
    clock: MonotonicBase,
    on: &tokio::runtime::Handle,
) -> watch::Sender<Vec<String>> {
    let (tx, mut vms) = watch::channel(Vec::<String>::new());
    // Kills go back to vireod's own runtime (the supervisor's).
    let main = tokio::runtime::Handle::current();
    on.spawn(async move {
        // One task per VMM: a VMM that does not answer (starting, receiving a
        // migration, stopped) holds up only its own renewals. (One loop over all of
        // them waited up to PUSH_TIMEOUT on such a VMM at each renewal, and a VMM
        // behind it in the list went past its deadline: killed, started again.)
        let mut tasks: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            let running = vms.borrow_and_update().clone();
            tasks.retain(|vm, task| {
                let keep = running.contains(vm);
                if !keep {
                    task.abort();
                }
                keep
            });
            for vm in running {
                if let std::collections::hash_map::Entry::Vacant(slot) = tasks.entry(vm) {
                    let task = tokio::spawn(push_loop(
                        sup.clone(),
                        slot.key().clone(),
                        deadlines.clone(),
                        clock,
                        main.clone(),
                    ));
                    slot.insert(task);
                }
            }
            if vms.changed().await.is_err() {
                for task in tasks.values() {
                    task.abort();
                }
                return;
            }
        }
    });
    tx
}

/// Sends each new deadline to the VMM running `vm`, and one it has not taken yet
/// again every [`RETRY_AFTER`], until aborted (the VM left the node's lease).
async fn push_loop(
    sup: Arc<Supervisor>,
    vm: String,
    mut deadlines: watch::Receiver<Option<Duration>>,
    clock: MonotonicBase,
    main: tokio::runtime::Handle,
) {
    let mut taken = Taken::default();
    // The VMM (by pid) whose API thread was raised (see `vmm_priority`).
    let mut raised: Option<i32> = None;
    loop {
        let deadline = *deadlines.borrow_and_update();
        let mut pending = false;
        // Only a deadline still ahead is worth sending (an older one changes nothing
        // in the VMM; a passed one means this node is fenced).
        if let Some(deadline_ns) = deadline
            .map(|d| clock.at(d))
            .filter(|ns| *ns > monotonic_ns())
        {
            // The VMM now running `vm` (a restarted VM is a new VMM).
            let pid = sup.get(&vm).ok().and_then(|s| s.pid);
            if let Some(pid) = pid.filter(|p| raised != Some(*p)) {
                match crate::vmm_priority::raise_api_thread(pid) {
                    Ok(true) => {
                        debug!(
                            vm,
                            pid, "the VMM's API thread answers renewals at real-time priority"
                        );
                        raised = Some(pid);
                    }
                    Ok(false) => pending = true, // Starting: no API thread yet.
                    Err(e) => {
                        warn!(vm, pid, error = %e, "cannot raise the VMM's API thread: under CPU saturation its renewals can come late");
                        raised = Some(pid);
                    }
                }
            }
            match pid {
                None => pending = true,
                Some(pid) if taken.has(pid, deadline_ns) => {}
                Some(pid) => match push(&sup, &vm, deadline_ns, &main).await {
                    Pushed::Taken => taken.set(pid, deadline_ns),
                    // Killed: nothing more to send to this VMM.
                    Pushed::Expired => taken.set(pid, u64::MAX),
                    Pushed::NotYet => pending = true,
                },
            }
        }
        tokio::select! {
            changed = deadlines.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RETRY_AFTER), if pending => {}
        }
    }
}

/// The deadline a VM's VMM (by pid) has taken.
#[derive(Default)]
struct Taken(Option<(i32, u64)>);

impl Taken {
    fn has(&self, pid: i32, deadline_ns: u64) -> bool {
        self.0.is_some_and(|(p, d)| p == pid && d >= deadline_ns)
    }

    fn set(&mut self, pid: i32, deadline_ns: u64) {
        self.0 = Some((pid, deadline_ns));
    }
}

/// What became of one renewal.
enum Pushed {
    Taken,
    /// The VMM's lease had expired: it is being killed.
    Expired,
    /// Not reached (starting, busy): try again.
    NotYet,
}

/// One renewal. A VMM whose lease already expired (it refused writes and paused)
/// is killed: this node still owns the VM, so its loop starts it again, with a
/// fresh token and lease.
async fn push(
    sup: &Arc<Supervisor>,
    vm: &str,
    deadline_ns: u64,
    main: &tokio::runtime::Handle,
) -> Pushed {
    let body = serde_json::json!({ "deadline_monotonic_ns": deadline_ns }).to_string();
    let r = crate::client::request(
        &sup.socket_path(vm),
        "PUT",
        "/api/v1/vm.lease",
        Some(body.into_bytes()),
        PUSH_TIMEOUT,
    )
    .await;
    match r {
        Ok(r) if r.ok() => {
            debug!(vm, deadline_ns, "write lease renewed");
            Pushed::Taken
        }
        Ok(r) if r.status == 409 => {
            warn!(vm, error = %r.error_message(), "the VMM's write lease expired: killing it (it starts again while this node owns it)");
            let (sup, vm) = (sup.clone(), vm.to_string());
            main.spawn(async move {
                if let Err(e) = sup.kill(&vm).await {
                    warn!(vm, error = %e, "cannot kill");
                }
            });
            Pushed::Expired
        }
        // Not created yet (404), or busy.
        Ok(r) => {
            debug!(vm, status = r.status, error = %r.error_message(), "write lease not renewed");
            Pushed::NotYet
        }
        Err(e) => {
            debug!(vm, error = %e, "write lease not renewed");
            Pushed::NotYet
        }
    }
}
