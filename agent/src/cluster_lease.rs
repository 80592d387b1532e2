//! The VMM side of self-fencing: every clustered VM's VMM gets a write lease, the
//! node's own fencing deadline as an absolute time on the host's `CLOCK_MONOTONIC`
//! (`vm.create`'s `write_lease`, then `PUT vm.lease` after each renewal of the node's
//! cluster lease). A VMM past its deadline refuses every disk write and pauses, even
//! if vireod cannot kill it (vireod stopped, hung or slower to wake than its VMMs).
//!
//! Renewals are pushed by their own task, so a slow VMM never delays vireod's own
//! fencing loop. Only a deadline still in the future is pushed: a vireod that wakes up
//! after its deadline has nothing to push and kills its VMs instead.

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

/// Starts the task that pushes each new deadline to the VMMs: as soon as a renewal
/// moves it (`deadlines`, on the node loop's clock, converted with `clock`), not at the
/// next turn of the node's loop, which store calls and VM starts can hold up. Send it
/// the VMs that run under the node's lease.
pub fn spawn_pusher(
    sup: Arc<Supervisor>,
    mut deadlines: watch::Receiver<Option<Duration>>,
    clock: MonotonicBase,
    on: &tokio::runtime::Handle,
) -> watch::Sender<Vec<String>> {
    let (tx, mut vms) = watch::channel(Vec::<String>::new());
    // Kills go back to vireod's own runtime (the supervisor's).
    let main = tokio::runtime::Handle::current();
    on.spawn(async move {
        loop {
            tokio::select! {
                changed = deadlines.changed() => if changed.is_err() { return },
                changed = vms.changed() => if changed.is_err() { return },
            }
            let Some(deadline) = *deadlines.borrow_and_update() else {
                continue;
            };
            let deadline_ns = clock.at(deadline);
            let running = vms.borrow_and_update().clone();
            for vm in &running {
                // Only a deadline still ahead is worth sending (an older one changes
                // nothing in the VMM; a passed one means this node is fenced).
                if deadline_ns <= monotonic_ns() {
                    break;
                }
                push(&sup, vm, deadline_ns, &main).await;
            }
        }
    });
    tx
}

/// One renewal. A VMM whose lease already expired (it refused writes and paused)
/// is killed: this node still owns the VM, so its loop starts it again, with a
/// fresh token and lease.
async fn push(sup: &Arc<Supervisor>, vm: &str, deadline_ns: u64, main: &tokio::runtime::Handle) {
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
        Ok(r) if r.ok() => debug!(vm, deadline_ns, "write lease renewed"),
        Ok(r) if r.status == 409 => {
            warn!(vm, error = %r.error_message(), "the VMM's write lease expired: killing it (it starts again while this node owns it)");
            let (sup, vm) = (sup.clone(), vm.to_string());
            main.spawn(async move {
                if let Err(e) = sup.kill(&vm).await {
                    warn!(vm, error = %e, "cannot kill");
                }
            });
        }
        // Not created yet (404), or busy: the next renewal tries again.
        Ok(r) => {
            debug!(vm, status = r.status, error = %r.error_message(), "write lease not renewed")
        }
        Err(e) => debug!(vm, error = %e, "write lease not renewed"),
    }
}
