//! A [`ClusterStore`] that counts what goes through it: the bench's counters (etcd
//! transactions, range reads and the keys and bytes they returned, renewals).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cluster::store::{KeyValue, LeaseId, Revision, StoreResult, Txn, TxnOutcome, Watch};
use cluster::ClusterStore;

/// Counters shared by every connection of a fleet.
#[derive(Debug, Default)]
pub struct Counters {
    txns: AtomicU64,
    txns_failed: AtomicU64,
    ranges: AtomicU64,
    range_keys: AtomicU64,
    range_bytes: AtomicU64,
    gets: AtomicU64,
    puts: AtomicU64,
    keepalives: AtomicU64,
    revisions: AtomicU64,
    watches: AtomicU64,
}

/// The counters' values at one moment; subtract two for what happened between.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Transactions sent, and those whose comparisons did not hold.
    pub txns: u64,
    pub txns_failed: u64,
    /// Prefix (range) reads, the keys and the value bytes they returned.
    pub ranges: u64,
    pub range_keys: u64,
    pub range_bytes: u64,
    pub gets: u64,
    pub puts: u64,
    pub keepalives: u64,
    /// Revision checks (a read of no key).
    pub revisions: u64,
    /// Watches opened.
    pub watches: u64,
}

impl std::ops::Sub for Counts {
    type Output = Counts;
    fn sub(self, o: Counts) -> Counts {
        Counts {
            txns: self.txns - o.txns,
            txns_failed: self.txns_failed - o.txns_failed,
            ranges: self.ranges - o.ranges,
            range_keys: self.range_keys - o.range_keys,
            range_bytes: self.range_bytes - o.range_bytes,
            gets: self.gets - o.gets,
            puts: self.puts - o.puts,
            keepalives: self.keepalives - o.keepalives,
            revisions: self.revisions - o.revisions,
            watches: self.watches - o.watches,
        }
    }
}

impl Counters {
    pub fn now(&self) -> Counts {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            txns: r(&self.txns),
            txns_failed: r(&self.txns_failed),
            ranges: r(&self.ranges),
            range_keys: r(&self.range_keys),
            range_bytes: r(&self.range_bytes),
            gets: r(&self.gets),
            puts: r(&self.puts),
            keepalives: r(&self.keepalives),
            revisions: r(&self.revisions),
            watches: r(&self.watches),
        }
    }
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// `S` with every call counted in shared [`Counters`].
#[derive(Clone)]
pub struct Counted<S> {
    pub inner: S,
    pub counters: Arc<Counters>,
}

impl<S: ClusterStore> ClusterStore for Counted<S> {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        bump(&self.counters.gets, 1);
        self.inner.get(key).await
    }

    async fn current_revision(&self) -> StoreResult<Revision> {
        bump(&self.counters.revisions, 1);
        self.inner.current_revision().await
    }

    async fn get_prefix(&self, prefix: &str) -> StoreResult<(Vec<KeyValue>, Revision)> {
        bump(&self.counters.ranges, 1);
        let r = self.inner.get_prefix(prefix).await?;
        bump(&self.counters.range_keys, r.0.len() as u64);
        let bytes: usize = r.0.iter().map(|kv| kv.value.len()).sum();
        bump(&self.counters.range_bytes, bytes as u64);
        Ok(r)
    }

    async fn get_prefix_at(
        &self,
        prefix: &str,
        revision: Revision,
    ) -> StoreResult<(Vec<KeyValue>, Revision)> {
        bump(&self.counters.ranges, 1);
        let r = self.inner.get_prefix_at(prefix, revision).await?;
        bump(&self.counters.range_keys, r.0.len() as u64);
        let bytes: usize = r.0.iter().map(|kv| kv.value.len()).sum();
        bump(&self.counters.range_bytes, bytes as u64);
        Ok(r)
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> StoreResult<Revision> {
        bump(&self.counters.puts, 1);
        self.inner.put(key, value, lease).await
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        self.inner.delete(key).await
    }

    async fn txn(&self, txn: Txn) -> StoreResult<TxnOutcome> {
        bump(&self.counters.txns, 1);
        let r = self.inner.txn(txn).await?;
        if !r.succeeded {
            bump(&self.counters.txns_failed, 1);
        }
        Ok(r)
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        self.inner.lease_grant(ttl).await
    }

    async fn lease_keepalive(&self, lease: LeaseId) -> StoreResult<()> {
        bump(&self.counters.keepalives, 1);
        self.inner.lease_keepalive(lease).await
    }

    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        self.inner.lease_revoke(lease).await
    }

    async fn watch_prefix(&self, prefix: &str, from: Revision) -> StoreResult<Watch> {
        bump(&self.counters.watches, 1);
        self.inner.watch_prefix(prefix, from).await
    }
}
