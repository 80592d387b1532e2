//! The cluster's store behind a trait: a key-value store with revisions, compare-and-swap
//! transactions, leases and prefix watches — exactly the part of etcd's model the cluster
//! relies on. [`crate::EtcdStore`] is the real one, [`crate::SimStore`] the simulated one
//! that fault-schedule tests drive with a simulated clock.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;

/// A store revision (etcd's `mod_revision`/header revision). Revisions only grow.
pub type Revision = i64;

/// A lease id; `0` is "no lease" in etcd's encoding and never a granted lease.
pub type LeaseId = i64;

/// One key with its value and metadata, as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the last write to this key.
    pub mod_revision: Revision,
    /// The revision at which this key was created (since its last deletion).
    pub create_revision: Revision,
    /// The lease the key is attached to, `0` for none.
    pub lease: LeaseId,
}

/// How a [`Compare`] compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Equal,
    NotEqual,
}

/// One condition of a transaction. As in etcd, a missing key compares as a key whose
/// revisions and lease are all `0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` (0: the key is absent).
    ModRevision {
        key: String,
        op: CmpOp,
        revision: Revision,
    },
    /// The lease the key is attached to (0: absent or no lease).
    Lease {
        key: String,
        op: CmpOp,
        lease: LeaseId,
    },
}

/// One write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    Delete {
        key: String,
    },
}

/// `if all(when) { then } else { otherwise }`, atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub when: Vec<Compare>,
    pub then: Vec<Op>,
    pub otherwise: Vec<Op>,
}

/// What a transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether every comparison held (and `then` ran).
    pub succeeded: bool,
    /// The store's revision after the transaction: the `mod_revision` of every key the
    /// transaction wrote.
    pub revision: Revision,
}

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String, revision: Revision },
}

/// The events of one prefix watch, in revision order. Ends (`None`) when the store
/// cancels the watch (connection lost, or its start revision compacted): the watcher
/// re-reads and watches again.
///
/// Events arrive in batches that each hold every event of the revisions they cover
/// (one etcd watch response; one write of the simulated store): a watcher that applies
/// whole batches never shows half of a transaction.
pub struct Watch {
    pub(crate) events: mpsc::UnboundedReceiver<Vec<WatchEvent>>,
    /// Events of a batch taken by [`Watch::next`] and not returned yet.
    pub(crate) pending: VecDeque<WatchEvent>,
}

impl Watch {
    pub(crate) fn new(events: mpsc::UnboundedReceiver<Vec<WatchEvent>>) -> Self {
        Watch {
            events,
            pending: VecDeque::new(),
        }
    }

    /// The next change, or `None` when the watch ended.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            self.pending.extend(self.events.recv().await?);
        }
    }

    /// The next whole batch (see the type's doc), or `None` when the watch ended.
    pub async fn next_batch(&mut self) -> Option<Vec<WatchEvent>> {
        if !self.pending.is_empty() {
            return Some(self.pending.drain(..).collect());
        }
        self.events.recv().await
    }

    /// A change already delivered, without waiting.
    pub fn try_next(&mut self) -> Option<WatchEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            self.pending.extend(self.events.try_recv().ok()?);
        }
    }

    /// Every change delivered so far, without waiting; `None` once the watch ended
    /// (whatever it delivered before is dropped: the watcher reads again).
    pub fn delivered(&mut self) -> Option<Vec<WatchEvent>> {
        let mut out: Vec<WatchEvent> = self.pending.drain(..).collect();
        loop {
            match self.events.try_recv() {
                Ok(batch) => out.extend(batch),
                Err(mpsc::error::TryRecvError::Empty) => return Some(out),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
            }
        }
    }
}

/// Errors of a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cluster store unreachable: {0}")]
    Unavailable(String),
    #[error("lease {0:#x} is gone (expired or revoked)")]
    LeaseGone(LeaseId),
    #[error("cluster store refused the request: {0}")]
    Refused(String),
    #[error("key {key} holds a value that is not valid UTF-8")]
    BadKey { key: String },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The store the cluster runs on. Every future is `Send`, so a store can be used from
/// tasks of a multi-threaded runtime.
pub trait ClusterStore: Send + Sync {
    /// One key, or `None`.
    fn get(&self, key: &str) -> impl Future<Output = StoreResult<Option<KeyValue>>> + Send;

    /// The store's current revision, read without any key: a cheap way to learn that
    /// nothing changed since a read at this revision (every write, a lease expiry's
    /// deletions included, makes it grow; renewals do not).
    fn current_revision(&self) -> impl Future<Output = StoreResult<Revision>> + Send;

    /// Every key under `prefix`, sorted by key, and the store revision they were read at.
    fn get_prefix(
        &self,
        prefix: &str,
    ) -> impl Future<Output = StoreResult<(Vec<KeyValue>, Revision)>> + Send;

    /// Every key under `prefix` as it was at `revision` (0: now), and that revision: a
    /// read of several prefixes at the first one's revision is one consistent read. A
    /// compacted revision is [`StoreError::Refused`].
    fn get_prefix_at(
        &self,
        prefix: &str,
        revision: Revision,
    ) -> impl Future<Output = StoreResult<(Vec<KeyValue>, Revision)>> + Send;

    /// Writes one key (attached to `lease` unless it is 0); returns its new revision.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> impl Future<Output = StoreResult<Revision>> + Send;

    /// Deletes one key; returns whether it existed.
    fn delete(&self, key: &str) -> impl Future<Output = StoreResult<bool>> + Send;

    /// Runs a compare-and-swap transaction.
    fn txn(&self, txn: Txn) -> impl Future<Output = StoreResult<TxnOutcome>> + Send;

    /// Grants a lease of `ttl` (etcd counts whole seconds; its minimum is 2 s).
    fn lease_grant(&self, ttl: Duration) -> impl Future<Output = StoreResult<LeaseId>> + Send;

    /// Renews a lease once (for its full TTL). A lease that is gone answers
    /// [`StoreError::LeaseGone`].
    fn lease_keepalive(&self, lease: LeaseId) -> impl Future<Output = StoreResult<()>> + Send;

    /// Revokes a lease: every key attached to it is deleted.
    fn lease_revoke(&self, lease: LeaseId) -> impl Future<Output = StoreResult<()>> + Send;

    /// Watches every key under `prefix`, from revision `from` (0: from now).
    fn watch_prefix(
        &self,
        prefix: &str,
        from: Revision,
    ) -> impl Future<Output = StoreResult<Watch>> + Send;
}
