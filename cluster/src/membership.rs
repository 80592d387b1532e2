//! A node's membership: its lease, and the self-fencing decision taken on the node's own
//! monotonic clock.
//!
//! The lease is renewed every [`Timing::renew_every`]. The node counts a renewal from
//! the moment it *sent* the request (the store started the new TTL later than that), so
//! its deadline `sent + ttl − margin` is always before the store can expire the lease.
//! Past the deadline the node runs no clustered VM, whatever the store says; a leader
//! change that extends the lease (etcd issue 9888) cannot make it run longer.

use std::collections::BTreeMap;
use std::time::Duration;

use tracing::{info, warn};

use crate::keys::{self, NodeRecord, OwnerRecord};
use crate::store::{ClusterStore, LeaseId, Revision, StoreError, StoreResult};

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
    clock: FenceClock,
    last_renew_try: Option<Duration>,
    running: BTreeMap<String, Revision>,
}

impl<S: ClusterStore> NodeAgent<S> {
    pub fn new(store: S, record: NodeRecord, timing: Timing) -> Self {
        NodeAgent {
            store,
            record,
            clock: FenceClock::new(&timing),
            timing,
            lease: None,
            last_renew_try: None,
            running: BTreeMap::new(),
        }
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
        self.clock.fenced(now)
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
        self.clock.renewed(now);
        self.last_renew_try = Some(now);
        info!(node = %self.record.name, lease = format_args!("{lease:#x}"), "joined the cluster");
        Ok(())
    }

    async fn renew(&mut self, now: Duration) {
        let Some(lease) = self.lease else { return };
        if self
            .last_renew_try
            .is_some_and(|t| now < t + self.timing.renew_every)
        {
            return;
        }
        self.last_renew_try = Some(now);
        match self.store.lease_keepalive(lease).await {
            Ok(_) => self.clock.renewed(now),
            Err(StoreError::LeaseGone(_)) => {
                warn!(node = %self.record.name, "lease gone: fenced; joining again");
                self.lease = None;
                self.clock.lost();
            }
            Err(e) => warn!(node = %self.record.name, error = %e, "lease renewal failed"),
        }
    }

    /// The VMs the store says this incarnation owns, with their tokens.
    async fn owned(&self, lease: LeaseId) -> StoreResult<BTreeMap<String, Revision>> {
        let (owners, _) = self.store.get_prefix(keys::OWNERS).await?;
        Ok(owners
            .into_iter()
            .filter_map(|kv| {
                let vm = keys::name_of(keys::OWNERS, &kv.key)?.to_string();
                match keys::decode::<OwnerRecord>(&kv.value)? {
                    OwnerRecord::Node { node, lease: l }
                        if node == self.record.name && l == lease =>
                    {
                        Some((vm, kv.mod_revision))
                    }
                    _ => None,
                }
            })
            .collect())
    }

    /// One turn at local monotonic time `now`: fence if the deadline passed, renew (or
    /// join again), and reconcile the running VMs with the ownership keys.
    pub async fn step(&mut self, now: Duration) -> Reconcile {
        // Fencing first, before any store round trip can delay it.
        if self.clock.fenced(now) && !self.running.is_empty() {
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
            Some(l) if !self.clock.fenced(now) => l,
            _ => return self.stop_all(),
        };
        let owned = match self.owned(lease).await {
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

    /// Leaves the cluster: stops owning (the caller has stopped the VMs) and revokes the
    /// lease so that failover starts at once.
    pub async fn leave(&mut self) -> StoreResult<()> {
        self.running.clear();
        if let Some(lease) = self.lease.take() {
            self.clock.lost();
            self.store.lease_revoke(lease).await?;
        }
        Ok(())
    }
}
