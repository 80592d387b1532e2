//! A node's membership: its lease, and the self-fencing decision taken on the node's own
//! monotonic clock.
//!
//! The lease is renewed every [`Timing::renew_every`]. The node counts a renewal from
//! the moment it *sent* the request (the store started the new TTL later than that), so
//! its deadline `sent + ttl − margin` is always before the store can expire the lease.
//! Past the deadline the node runs no clustered VM, whatever the store says; a leader
//! change that extends the lease (etcd issue 9888) cannot make it run longer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vireo_util::sync::lock;

use tracing::{debug, info, warn};

use crate::keys::{self, NodeRecord, OwnerRecord};
use crate::store::{ClusterStore, LeaseId, Revision, StoreError, StoreResult, WatchEvent};

/// The cluster's clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// The lease TTL (etcd's minimum: 2 s).
    pub ttl: Duration,
    /// How often a node renews its lease.
    pub renew_every: Duration,
    /// A node stops its VMs this long before its lease could expire.
    pub fence_margin: Duration,
    /// Others act on a dead node's VMs only this long after its lease is gone.
    pub dead_margin: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            ttl: Duration::from_secs(2),
            renew_every: Duration::from_millis(500),
            fence_margin: Duration::from_millis(500),
            dead_margin: Duration::from_millis(1000),
        }
    }
}

/// The self-fencing deadline, on the node's own monotonic clock.
#[derive(Clone, Copy, Debug)]
pub struct FenceClock {
    ttl: Duration,
    margin: Duration,
    last_renewal_sent: Option<Duration>,
}

impl FenceClock {
    pub fn new(timing: &Timing) -> Self {
        FenceClock {
            ttl: timing.ttl,
            margin: timing.fence_margin,
            last_renewal_sent: None,
        }
    }

    /// A grant or renewal sent at `sent_at` succeeded.
    pub fn renewed(&mut self, sent_at: Duration) {
        if self.last_renewal_sent.is_none_or(|t| sent_at > t) {
            self.last_renewal_sent = Some(sent_at);
        }
    }

    /// The lease is gone: fenced from now on until a new lease.
    pub fn lost(&mut self) {
        self.last_renewal_sent = None;
    }

    /// When the node must have stopped its clustered VMs.
    pub fn deadline(&self) -> Option<Duration> {
        self.last_renewal_sent
            .map(|t| (t + self.ttl).saturating_sub(self.margin))
    }

    /// "I may no longer run my clustered VMs."
    pub fn fenced(&self, now: Duration) -> bool {
        self.deadline().is_none_or(|d| now >= d)
    }
}

/// What the node must do to its VMs now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconcile {
    /// VMs to start, with their fencing tokens.
    pub start: Vec<(String, Revision)>,
    /// VMs to stop (kill: no time for a graceful shutdown when fencing).
    pub stop: Vec<String>,
}

/// One node's membership agent. Drive it with [`NodeAgent::step`] on the node's
/// monotonic clock; apply the [`Reconcile`] it returns and report what runs.
pub struct NodeAgent<S> {
    store: S,
    record: NodeRecord,
    timing: Timing,
    lease: Option<LeaseId>,
    /// Shared with the renewal task, when renewals run in one.
    clock: Arc<Mutex<FenceClock>>,
    /// The fencing deadline after every change (renewal, loss), for whoever must
    /// follow it without waiting for a turn of the node's loop (the VMMs' write leases).
    deadlines: Arc<DeadlineTx>,
    last_renew_try: Option<Duration>,
    running: BTreeMap<String, Revision>,
    /// This node's ownership records, kept by a watch after one read.
    owners: Option<OwnersView>,
    renewals: Renewals<S>,
}

/// Where the lease is renewed.
enum Renewals<S> {
    /// In [`NodeAgent::step`] (simulated time: the model test drives every clock).
    InStep,
    /// In a task of their own on real time since `t0` (vireod): the loop's other
    /// store calls (the VMs this node owns, the failover controller, each up to the
    /// store's request timeout) and its VM starts never delay a renewal.
    Task {
        t0: Instant,
        /// The store connection and the runtime the renewals use.
        store: S,
        on: tokio::runtime::Handle,
        current: Option<RenewalTask>,
    },
}

/// A running renewal task of one lease; it ends when dropped or when the lease is
/// gone.
struct RenewalTask {
    lease: LeaseId,
    gone: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<()>,
}

impl Drop for RenewalTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl<S: ClusterStore + Clone + Send + Sync + 'static> NodeAgent<S> {
    pub fn new(store: S, record: NodeRecord, timing: Timing) -> Self {
        NodeAgent {
            store,
            record,
            clock: Arc::new(Mutex::new(FenceClock::new(&timing))),
            deadlines: Arc::new(tokio::sync::watch::channel(None).0),
            timing,
            lease: None,
            last_renew_try: None,
            running: BTreeMap::new(),
            owners: None,
            renewals: Renewals::InStep,
        }
    }

    /// Renews the lease in a task of its own on `on` through `store` (a connection of
    /// that runtime), counting time as `t0.elapsed()`: [`NodeAgent::step`] must then be
    /// driven with the same clock.
    pub fn renew_in_a_task(mut self, t0: Instant, store: S, on: tokio::runtime::Handle) -> Self {
        self.renewals = Renewals::Task {
            t0,
            store,
            on,
            current: None,
        };
        self
    }

    pub fn name(&self) -> &str {
        &self.record.name
    }

    pub fn lease(&self) -> Option<LeaseId> {
        self.lease
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Whether the node's own clock says it may no longer run clustered VMs.
    pub fn fenced(&self, now: Duration) -> bool {
        lock(&self.clock).fenced(now)
    }

    /// When the node must have stopped its clustered VMs (None: no lease), on the
    /// clock `step` is driven with: what the VMMs' write leases are set to.
    pub fn fence_deadline(&self) -> Option<Duration> {
        lock(&self.clock).deadline()
    }

    /// Follows [`NodeAgent::fence_deadline`] as renewals move it.
    pub fn deadlines(&self) -> tokio::sync::watch::Receiver<Option<Duration>> {
        self.deadlines.subscribe()
    }

    /// Moves the shared clock and tells the deadline's followers.
    fn clock_changed(&self, change: impl FnOnce(&mut FenceClock)) {
        clock_changed(&self.clock, &self.deadlines, change);
    }

    /// The VMs this agent believes run here, with their tokens.
    pub fn running(&self) -> &BTreeMap<String, Revision> {
        &self.running
    }

    /// Registers the node with a new lease (a new incarnation).
    async fn join(&mut self, now: Duration) -> StoreResult<()> {
        let lease = self.store.lease_grant(self.timing.ttl).await?;
        self.store
            .put(
                &keys::node_key(&self.record.name),
                keys::encode(&self.record),
                lease,
            )
            .await?;
        self.lease = Some(lease);
        self.clock_changed(|c| c.renewed(now));
        self.last_renew_try = Some(now);
        info!(node = %self.record.name, lease = format_args!("{lease:#x}"), "joined the cluster");
        Ok(())
    }

    async fn renew(&mut self, now: Duration) {
        let Some(lease) = self.lease else { return };
        if let Renewals::Task {
            t0,
            store,
            on,
            current,
        } = &mut self.renewals
        {
            match current {
                Some(task) if task.lease == lease => {
                    if task.gone.load(Ordering::Acquire) {
                        *current = None;
                        self.lease_gone();
                    }
                }
                _ => {
                    *current = Some(spawn_renewals(
                        (store.clone(), on),
                        lease,
                        *t0,
                        &self.timing,
                        (&self.clock, &self.deadlines),
                        &self.record.name,
                    ))
                }
            }
            return;
        }
        if self
            .last_renew_try
            .is_some_and(|t| now < t + self.timing.renew_every)
        {
            return;
        }
        self.last_renew_try = Some(now);
        match self.store.lease_keepalive(lease).await {
            Ok(_) => self.clock_changed(|c| c.renewed(now)),
            Err(StoreError::LeaseGone(_)) => self.lease_gone(),
            Err(e) => {
                // Try again on the next turn, not a whole period later: after an etcd
                // leader election the first renewal that gets through is what keeps
                // this node from fencing itself for nothing.
                self.last_renew_try = None;
                warn!(node = %self.record.name, error = %e, "lease renewal failed");
            }
        }
    }

    fn lease_gone(&mut self) {
        warn!(node = %self.record.name, "lease gone: fenced; joining again");
        self.lease = None;
        self.clock_changed(FenceClock::lost);
    }

    /// The VMs the store says this incarnation owns, with their tokens: from one read
    /// of every ownership record, then kept by a watch of them; read again when the
    /// watch ends, and every [`OWNERS_READ_EVERY`] whatever it says.
    async fn owned(
        &mut self,
        lease: LeaseId,
        now: Duration,
    ) -> StoreResult<BTreeMap<String, Revision>> {
        let fresh = self
            .owners
            .as_mut()
            .is_some_and(|v| now < v.read_when + OWNERS_READ_EVERY && v.follow(&self.record.name));
        if !fresh {
            self.owners = None;
            let (records, read_at) = self.store.get_prefix(keys::OWNERS).await?;
            let watch = self.store.watch_prefix(keys::OWNERS, read_at + 1).await?;
            let mut view = OwnersView {
                read_when: now,
                mine: BTreeMap::new(),
                watch,
            };
            for kv in records {
                view.record(
                    &self.record.name,
                    &kv.key,
                    Some((&kv.value, kv.mod_revision)),
                );
            }
            self.owners = Some(view);
        }
        Ok(self
            .owners
            .iter()
            .flat_map(|v| &v.mine)
            .filter(|(_, (l, _))| *l == lease)
            .map(|(vm, (_, token))| (vm.clone(), *token))
            .collect())
    }

    /// One turn at local monotonic time `now`: fence if the deadline passed, renew (or
    /// join again), and reconcile the running VMs with the ownership keys.
    pub async fn step(&mut self, now: Duration) -> Reconcile {
        // Fencing first, before any store round trip can delay it.
        if self.fenced(now) && !self.running.is_empty() {
            warn!(node = %self.record.name, "self-fencing: stopping every clustered VM");
            return self.stop_all();
        }
        if self.lease.is_none() {
            if let Err(e) = self.join(now).await {
                warn!(node = %self.record.name, error = %e, "cannot join the cluster");
            }
        } else {
            self.renew(now).await;
        }
        let lease = match self.lease {
            Some(l) if !self.fenced(now) => l,
            _ => return self.stop_all(),
        };
        let owned = match self.owned(lease, now).await {
            Ok(o) => o,
            // Unreachable: keep what runs until the deadline says otherwise.
            Err(_) => return Reconcile::default(),
        };
        let mut r = Reconcile::default();
        for vm in self.running.keys() {
            if !owned.contains_key(vm) {
                r.stop.push(vm.clone());
            }
        }
        for (vm, token) in &owned {
            if !self.running.contains_key(vm) {
                r.start.push((vm.clone(), *token));
            }
        }
        // Oldest ownership first: the controller places High before Medium before Low,
        // so token order is priority order within one failover.
        r.start.sort_by_key(|(_, token)| *token);
        for vm in &r.stop {
            self.running.remove(vm);
        }
        for (vm, token) in &r.start {
            self.running.insert(vm.clone(), *token);
        }
        r
    }

    fn stop_all(&mut self) -> Reconcile {
        let stop: Vec<String> = std::mem::take(&mut self.running).into_keys().collect();
        Reconcile {
            start: vec![],
            stop,
        }
    }

    /// A VM stopped by itself (crashed, or the guest powered off): forget it so the next
    /// step starts it again if this node still owns it.
    pub fn exited(&mut self, vm: &str) {
        self.running.remove(vm);
    }

    /// Leaves the cluster on purpose (the caller has stopped the VMs): the incarnation
    /// is marked as leaving ([`crate::admin::record_graceful_leave`]: no departure
    /// towards quarantine), then [`NodeAgent::leave`]. A mark that cannot be written
    /// does not keep the node from leaving (its departure then counts).
    pub async fn leave_gracefully(&mut self) -> StoreResult<()> {
        if let Some(lease) = self.lease {
            match crate::admin::record_graceful_leave(&self.store, &self.record.name, lease).await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(node = %self.record.name, "the graceful leave was not recorded (the admin record kept changing)")
                }
                Err(e) => {
                    warn!(node = %self.record.name, error = %e, "the graceful leave was not recorded")
                }
            }
        }
        self.leave().await
    }

    /// Leaves the cluster: stops owning (the caller has stopped the VMs) and revokes the
    /// lease so that failover starts at once.
    pub async fn leave(&mut self) -> StoreResult<()> {
        self.running.clear();
        if let Some(lease) = self.lease.take() {
            if let Renewals::Task { current, .. } = &mut self.renewals {
                *current = None;
            }
            self.clock_changed(FenceClock::lost);
            self.store.lease_revoke(lease).await?;
        }
        Ok(())
    }
}

/// How often a node reads every ownership record again although its watch of them
/// runs (a watch that stalls without ending would otherwise hide new ownerships).
pub const OWNERS_READ_EVERY: Duration = Duration::from_secs(60);

/// A node's ownership records: VM → the lease named and the key's revision (its
/// fencing token), for this node's name. Every node reading every record every turn
/// was O(nodes × VMs) keys per turn: 64 nodes × 4,000 VMs at 100 ms turns is 2.5 M
/// keys/s, more than etcd serves; a watch sends each change once to each node.
struct OwnersView {
    read_when: Duration,
    mine: BTreeMap<String, (LeaseId, Revision)>,
    watch: crate::store::Watch,
}

impl OwnersView {
    /// Applies what the watch delivered; false when it ended.
    fn follow(&mut self, node: &str) -> bool {
        let Some(events) = self.watch.delivered() else {
            return false;
        };
        for event in events {
            match event {
                WatchEvent::Put(kv) => {
                    self.record(node, &kv.key, Some((&kv.value, kv.mod_revision)));
                }
                WatchEvent::Delete { key, .. } => self.record(node, &key, None),
            }
        }
        true
    }

    /// One ownership record as it is now (`None`: deleted).
    fn record(&mut self, node: &str, key: &str, value: Option<(&[u8], Revision)>) {
        let Some(vm) = keys::name_of(keys::OWNERS, key) else {
            return;
        };
        match value.and_then(|(v, rev)| Some((keys::decode::<OwnerRecord>(v)?, rev))) {
            Some((OwnerRecord::Node { node: n, lease }, rev)) if n == node => {
                self.mine.insert(vm.to_string(), (lease, rev));
            }
            _ => {
                self.mine.remove(vm);
            }
        }
    }
}

/// Renews `lease` every [`Timing::renew_every`] (a failed renewal again after
/// [`RETRY_AFTER`]), each success moving `clock` to when it was sent, until the lease
/// is gone.
fn spawn_renewals<S: ClusterStore + Clone + Send + Sync + 'static>(
    (store, on): (S, &tokio::runtime::Handle),
    lease: LeaseId,
    t0: Instant,
    timing: &Timing,
    (clock, deadlines): (&Arc<Mutex<FenceClock>>, &Arc<DeadlineTx>),
    node: &str,
) -> RenewalTask {
    let gone = Arc::new(AtomicBool::new(false));
    let deadlines = deadlines.clone();
    let (every, clock, node, flag) = (
        timing.renew_every,
        clock.clone(),
        node.to_string(),
        gone.clone(),
    );
    let handle = on.spawn(async move {
        loop {
            let sent = t0.elapsed();
            let wait = match store.lease_keepalive(lease).await {
                Ok(_) => {
                    clock_changed(&clock, &deadlines, |c| c.renewed(sent));
                    debug!(
                        node,
                        took_ms = (t0.elapsed() - sent).as_millis(),
                        "lease renewed"
                    );
                    every
                }
                Err(StoreError::LeaseGone(_)) => {
                    flag.store(true, Ordering::Release);
                    return;
                }
                Err(e) => {
                    warn!(node, error = %e, "lease renewal failed");
                    RETRY_AFTER
                }
            };
            // The next renewal `wait` after this one was *sent* (a slow answer does not
            // push the next one later).
            let next = sent + wait;
            tokio::time::sleep(next.saturating_sub(t0.elapsed())).await;
        }
    });
    RenewalTask {
        lease,
        gone,
        handle,
    }
}

type DeadlineTx = tokio::sync::watch::Sender<Option<Duration>>;

fn clock_changed(
    clock: &Mutex<FenceClock>,
    deadlines: &DeadlineTx,
    change: impl FnOnce(&mut FenceClock),
) {
    let deadline = {
        let mut c = lock(clock);
        change(&mut c);
        c.deadline()
    };
    deadlines.send_if_modified(|d| {
        let changed = *d != deadline;
        *d = deadline;
        changed
    });
}

/// After a failed renewal, the next try comes this soon: after an etcd leader election
/// the first renewal that gets through is what keeps the node from fencing itself for
/// nothing.
const RETRY_AFTER: Duration = Duration::from_millis(100);
