//! [`HookedStore`]: a store that forwards every call to another and first runs a hook
//! whenever a watch is opened or a transaction sent. Tests race a write or a
//! compaction against a watch's start (the watch then finds its start revision gone),
//! or a concurrent writer against a read-then-write decision (its transaction then
//! loses), on the simulated store and on etcd alike.

use std::future::Future;
use std::time::Duration;

use crate::store::{
    ClusterStore, KeyValue, LeaseId, Revision, StoreResult, Txn, TxnOutcome, Watch,
};

/// What runs before calls of a [`HookedStore`]; each hook does nothing unless
/// implemented, and an error of a hook is the call's.
pub trait Hooks: Send + Sync {
    /// Before each [`ClusterStore::watch_prefix`].
    fn before_watch(&self) -> impl Future<Output = StoreResult<()>> + Send {
        async { Ok(()) }
    }
    /// Before each [`ClusterStore::txn`], with the transaction about to be sent.
    fn before_txn(&self, txn: &Txn) -> impl Future<Output = StoreResult<()>> + Send {
        let _ = txn;
        async { Ok(()) }
    }
}

/// `inner`, with `hook`'s [`Hooks`] run before watches and transactions.
#[derive(Clone)]
pub struct HookedStore<S, H> {
    pub inner: S,
    pub hook: H,
}

impl<S: ClusterStore, H: Hooks> ClusterStore for HookedStore<S, H> {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        self.inner.get(key).await
    }

    async fn current_revision(&self) -> StoreResult<Revision> {
        self.inner.current_revision().await
    }

    async fn get_prefix(&self, prefix: &str) -> StoreResult<(Vec<KeyValue>, Revision)> {
        self.inner.get_prefix(prefix).await
    }

    async fn get_prefix_at(
        &self,
        prefix: &str,
        revision: Revision,
    ) -> StoreResult<(Vec<KeyValue>, Revision)> {
        self.inner.get_prefix_at(prefix, revision).await
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> StoreResult<Revision> {
        self.inner.put(key, value, lease).await
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        self.inner.delete(key).await
    }

    async fn txn(&self, txn: Txn) -> StoreResult<TxnOutcome> {
        self.hook.before_txn(&txn).await?;
        self.inner.txn(txn).await
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        self.inner.lease_grant(ttl).await
    }

    async fn lease_keepalive(&self, lease: LeaseId) -> StoreResult<()> {
        self.inner.lease_keepalive(lease).await
    }

    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        self.inner.lease_revoke(lease).await
    }

    async fn watch_prefix(&self, prefix: &str, from: Revision) -> StoreResult<Watch> {
        self.hook.before_watch().await?;
        self.inner.watch_prefix(prefix, from).await
    }
}
