//! [`SimStore`]: an in-memory store with etcd's semantics (revisions, compare-and-swap
//! transactions, leases whose keys vanish at expiry, prefix watches) and a simulated
//! clock. A test advances the clock, cuts a client off (partition) and extends every
//! lease the way an etcd leader change does (etcd issue 9888), so fault schedules run
//! thousands of times in seconds with no real time involved.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::store::{
    ClusterStore, CmpOp, Compare, KeyValue, LeaseId, Op, Revision, StoreError, StoreResult, Txn,
    TxnOutcome, Watch, WatchEvent,
};

#[derive(Debug)]
struct SimLease {
    ttl: Duration,
    expires: Duration,
}

#[derive(Default)]
struct SimState {
    now: Duration,
    revision: Revision,
    next_lease: LeaseId,
    keys: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, SimLease>,
    /// Each watch: its prefix, its channel and its client's reachability (a watch of
    /// a client cut off ends, as a real watch stream does).
    watchers: Vec<(
        String,
        mpsc::UnboundedSender<Vec<WatchEvent>>,
        Arc<AtomicBool>,
    )>,
    /// The events of the write in progress, sent to the watchers as one batch by
    /// [`SimState::flush`] (a transaction's events arrive together, as etcd's do).
    outbox: Vec<WatchEvent>,
}

impl SimState {
    fn notify(&mut self, event: WatchEvent) {
        self.outbox.push(event);
    }

    /// Sends the write's events to each watcher whose prefix they are under.
    fn flush(&mut self) {
        let events = std::mem::take(&mut self.outbox);
        if events.is_empty() {
            return;
        }
        let key = |e: &WatchEvent| match e {
            WatchEvent::Put(kv) => kv.key.clone(),
            WatchEvent::Delete { key, .. } => key.clone(),
        };
        self.watchers.retain(|(prefix, tx, reachable)| {
            if !reachable.load(Ordering::SeqCst) {
                return false;
            }
            let batch: Vec<WatchEvent> = events
                .iter()
                .filter(|e| key(e).starts_with(prefix.as_str()))
                .cloned()
                .collect();
            batch.is_empty() || tx.send(batch).is_ok()
        });
    }

    fn put_at(&mut self, key: &str, value: Vec<u8>, lease: LeaseId, revision: Revision) {
        let create_revision = self
            .keys
            .get(key)
            .map(|kv| kv.create_revision)
            .unwrap_or(revision);
        let kv = KeyValue {
            key: key.to_string(),
            value,
            mod_revision: revision,
            create_revision,
            lease,
        };
        self.keys.insert(key.to_string(), kv.clone());
        self.notify(WatchEvent::Put(kv));
    }

    fn delete_at(&mut self, key: &str, revision: Revision) -> bool {
        if self.keys.remove(key).is_some() {
            self.notify(WatchEvent::Delete {
                key: key.to_string(),
                revision,
            });
            true
        } else {
            false
        }
    }

    fn holds(&self, cmp: &Compare) -> bool {
        let (key, op, want, field): (&str, CmpOp, i64, fn(&KeyValue) -> i64) = match cmp {
            Compare::ModRevision { key, op, revision } => {
                (key, *op, *revision, |kv| kv.mod_revision)
            }
            Compare::Lease { key, op, lease } => (key, *op, *lease, |kv| kv.lease),
        };
        let have = self.keys.get(key).map(field).unwrap_or(0);
        match op {
            CmpOp::Equal => have == want,
            CmpOp::NotEqual => have != want,
        }
    }

    fn lease_alive(&self, lease: LeaseId) -> bool {
        lease == 0 || self.leases.contains_key(&lease)
    }

    /// Removes one lease and every key attached to it, in one revision.
    fn drop_lease(&mut self, lease: LeaseId) {
        if self.leases.remove(&lease).is_none() {
            return;
        }
        let doomed: Vec<String> = self
            .keys
            .values()
            .filter(|kv| kv.lease == lease)
            .map(|kv| kv.key.clone())
            .collect();
        if doomed.is_empty() {
            return;
        }
        self.revision += 1;
        let revision = self.revision;
        for key in doomed {
            self.delete_at(&key, revision);
        }
        self.flush();
    }

    fn expire(&mut self) {
        let now = self.now;
        let mut expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        expired.sort_unstable();
        for lease in expired {
            self.drop_lease(lease);
        }
    }
}

/// The simulated store. Clone it to share the state; [`SimStore::client`] gives each
/// node its own handle that a test can cut off.
#[derive(Clone, Default)]
pub struct SimStore {
    state: Arc<Mutex<SimState>>,
    reachable: Arc<AtomicBool>,
}

impl SimStore {
    pub fn new() -> Self {
        let store = Self::default();
        store.reachable.store(true, Ordering::SeqCst);
        store
    }

    /// A handle on the same store with its own reachability (one per simulated node).
    pub fn client(&self) -> SimStore {
        SimStore {
            state: Arc::clone(&self.state),
            reachable: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Cuts this handle off (`false`: every request fails as unreachable) or heals it.
    pub fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::SeqCst);
        if !reachable {
            let mine = &self.reachable;
            self.lock()
                .watchers
                .retain(|(_, _, r)| !Arc::ptr_eq(r, mine));
        }
    }

    /// The store's own clock.
    pub fn now(&self) -> Duration {
        self.lock().now
    }

    /// Moves the store's clock forward to `now`; leases that ran out expire and their
    /// keys are deleted.
    pub fn advance_to(&self, now: Duration) {
        let mut s = self.lock();
        if now > s.now {
            s.now = now;
        }
        s.expire();
    }

    /// What an etcd leader change does to leases: every lease's remaining time is
    /// refreshed to its full TTL (etcd issue 9888), so leases live longer than their
    /// holders' last renewal plus TTL.
    pub fn leader_change(&self) {
        let mut s = self.lock();
        let now = s.now;
        for lease in s.leases.values_mut() {
            lease.expires = now + lease.ttl;
        }
    }

    /// The current revision.
    pub fn revision(&self) -> Revision {
        self.lock().revision
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock is a test failure already; keep the state.
        vireo_util::sync::lock(&self.state)
    }

    fn reach(&self) -> StoreResult<MutexGuard<'_, SimState>> {
        if !self.reachable.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("simulated partition".into()));
        }
        Ok(self.lock())
    }
}

impl ClusterStore for SimStore {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        let s = self.reach()?;
        Ok(s.keys.get(key).cloned())
    }

    async fn current_revision(&self) -> StoreResult<Revision> {
        Ok(self.reach()?.revision)
    }

    async fn get_prefix(&self, prefix: &str) -> StoreResult<(Vec<KeyValue>, Revision)> {
        let s = self.reach()?;
        let kvs = s
            .keys
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok((kvs, s.revision))
    }

    /// The simulated store keeps no history: only the current revision can be read.
    async fn get_prefix_at(
        &self,
        prefix: &str,
        revision: Revision,
    ) -> StoreResult<(Vec<KeyValue>, Revision)> {
        let now = self.reach()?.revision;
        if revision != 0 && revision != now {
            return Err(StoreError::Refused(format!(
                "the simulated store keeps no history: revision {revision} is not now ({now})"
            )));
        }
        self.get_prefix(prefix).await
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> StoreResult<Revision> {
        let mut s = self.reach()?;
        if !s.lease_alive(lease) {
            return Err(StoreError::LeaseGone(lease));
        }
        s.revision += 1;
        let revision = s.revision;
        s.put_at(key, value, lease, revision);
        s.flush();
        Ok(revision)
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        let mut s = self.reach()?;
        if !s.keys.contains_key(key) {
            return Ok(false);
        }
        s.revision += 1;
        let revision = s.revision;
        let deleted = s.delete_at(key, revision);
        s.flush();
        Ok(deleted)
    }

    async fn txn(&self, txn: Txn) -> StoreResult<TxnOutcome> {
        let mut s = self.reach()?;
        let succeeded = txn.when.iter().all(|c| s.holds(c));
        let ops = if succeeded { txn.then } else { txn.otherwise };
        for op in &ops {
            if let Op::Put { lease, .. } = op {
                if !s.lease_alive(*lease) {
                    return Err(StoreError::LeaseGone(*lease));
                }
            }
        }
        let writes = ops.iter().any(|op| match op {
            Op::Put { .. } => true,
            Op::Delete { key } => s.keys.contains_key(key),
        });
        if writes {
            s.revision += 1;
        }
        let revision = s.revision;
        for op in ops {
            match op {
                Op::Put { key, value, lease } => s.put_at(&key, value, lease, revision),
                Op::Delete { key } => {
                    s.delete_at(&key, revision);
                }
            }
        }
        s.flush();
        Ok(TxnOutcome {
            succeeded,
            revision,
        })
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        let mut s = self.reach()?;
        s.next_lease += 1;
        let id = 0x1000 + s.next_lease;
        let expires = s.now + ttl;
        s.leases.insert(id, SimLease { ttl, expires });
        Ok(id)
    }

    async fn lease_keepalive(&self, lease: LeaseId) -> StoreResult<()> {
        let mut s = self.reach()?;
        let now = s.now;
        match s.leases.get_mut(&lease) {
            Some(l) if l.expires > now => {
                l.expires = now + l.ttl;
                Ok(())
            }
            _ => Err(StoreError::LeaseGone(lease)),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        let mut s = self.reach()?;
        s.drop_lease(lease);
        Ok(())
    }

    async fn watch_prefix(&self, prefix: &str, from: Revision) -> StoreResult<Watch> {
        let mut s = self.reach()?;
        if from != 0 && from <= s.revision {
            return Err(StoreError::Refused(format!(
                "the simulated store keeps no history: watch from {from} is in the past (now {})",
                s.revision
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        s.watchers
            .push((prefix.to_string(), tx, Arc::clone(&self.reachable)));
        Ok(Watch::new(rx))
    }
}
