//! [`EtcdStore`]: the [`ClusterStore`] on a real etcd cluster (v3 API over gRPC,
//! the `etcd-client` crate).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions, EventType,
    GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, TxnOp, WatchOptions,
};
use tokio::sync::{mpsc, Mutex};
use tracing::{debug, warn};

use crate::store::{
    ClusterStore, CmpOp, Compare, KeyValue, LeaseId, Op, Revision, StoreError, StoreResult, Txn,
    TxnOutcome, Watch, WatchEvent,
};

/// How long one request may take before the store counts as unreachable. Shorter than
/// the lease renewal period, so a hung renewal is retried before the lease is at risk.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(400);

/// A connection to an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    keepers: Arc<Mutex<Keepers>>,
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    match e {
        // etcd answers a request it refuses (as opposed to one it cannot serve) with a
        // message of its own: "requested lease not found", "mvcc: required revision has
        // been compacted", ...
        etcd_client::Error::GRpcStatus(status)
            if status.message().contains("not found") || status.message().contains("mvcc:") =>
        {
            StoreError::Refused(status.message().to_string())
        }
        other => StoreError::Unavailable(other.to_string()),
    }
}

async fn timed<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> StoreResult<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => r.map_err(unavailable),
        Err(_) => Err(StoreError::Unavailable(format!(
            "{what}: no answer within {REQUEST_TIMEOUT:?}"
        ))),
    }
}

fn key_value(kv: &etcd_client::KeyValue) -> StoreResult<KeyValue> {
    let key = kv.key_str().map_err(|_| StoreError::BadKey {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
    })?;
    Ok(KeyValue {
        key: key.to_string(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        create_revision: kv.create_revision(),
        lease: kv.lease(),
    })
}

fn compare(c: Compare) -> EtcdCompare {
    let op = |op| match op {
        CmpOp::Equal => CompareOp::Equal,
        CmpOp::NotEqual => CompareOp::NotEqual,
    };
    match c {
        Compare::ModRevision {
            key,
            op: o,
            revision,
        } => EtcdCompare::mod_revision(key, op(o), revision),
        Compare::Lease { key, op: o, lease } => EtcdCompare::lease(key, op(o), lease),
    }
}

fn txn_op(o: Op) -> TxnOp {
    match o {
        Op::Put { key, value, lease } => {
            let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            TxnOp::put(key, value, opts)
        }
        Op::Delete { key } => TxnOp::delete(key, None::<DeleteOptions>),
    }
}

impl EtcdStore {
    /// Connects to the cluster's endpoints (`http://host:port`, tried in turn).
    pub async fn connect(endpoints: &[String]) -> StoreResult<Self> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(1), Duration::from_millis(500));
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", endpoints.join(","))))?;
        Ok(Self {
            client,
            keepers: Arc::default(),
        })
    }
}

type Keepers = HashMap<LeaseId, (LeaseKeeper, LeaseKeepAliveStream)>;

/// One renewal of lease `id` on its keepalive stream (opened on first use).
async fn renew(client: &Client, keepers: &mut Keepers, id: LeaseId) -> StoreResult<Duration> {
    if let std::collections::hash_map::Entry::Vacant(slot) = keepers.entry(id) {
        let mut lease = client.lease_client();
        let pair = timed("lease keepalive stream", lease.keep_alive(id)).await?;
        slot.insert(pair);
    }
    let Some((keeper, stream)) = keepers.get_mut(&id) else {
        return Err(StoreError::Unavailable(
            "lease keepalive stream lost".into(),
        ));
    };
    let renewed = async {
        keeper.keep_alive().await?;
        stream.message().await
    };
    match timed("lease keepalive", renewed).await? {
        Some(resp) if resp.ttl() > 0 => {
            Ok(Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0)))
        }
        Some(_) => Err(StoreError::LeaseGone(id)),
        None => Err(StoreError::Unavailable(
            "lease keepalive stream ended".into(),
        )),
    }
}

impl ClusterStore for EtcdStore {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        let mut kv = self.client.kv_client();
        let resp = timed("get", kv.get(key, None)).await?;
        resp.kvs().first().map(key_value).transpose()
    }

    async fn get_prefix(&self, prefix: &str) -> StoreResult<(Vec<KeyValue>, Revision)> {
        let mut kv = self.client.kv_client();
        let resp = timed(
            "get prefix",
            kv.get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let kvs = resp
            .kvs()
            .iter()
            .map(key_value)
            .collect::<StoreResult<_>>()?;
        Ok((kvs, revision))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> StoreResult<Revision> {
        let mut kv = self.client.kv_client();
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let resp = timed("put", kv.put(key, value, opts))
            .await
            .map_err(|e| match e {
                StoreError::Refused(m) if m.contains("lease not found") => {
                    StoreError::LeaseGone(lease)
                }
                e => e,
            })?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        let mut kv = self.client.kv_client();
        let resp = timed("delete", kv.delete(key, None)).await?;
        Ok(resp.deleted() > 0)
    }

    async fn txn(&self, txn: Txn) -> StoreResult<TxnOutcome> {
        let lease = txn
            .then
            .iter()
            .chain(&txn.otherwise)
            .find_map(|o| match o {
                Op::Put { lease, .. } if *lease != 0 => Some(*lease),
                _ => None,
            })
            .unwrap_or(0);
        let t = etcd_client::Txn::new()
            .when(txn.when.into_iter().map(compare).collect::<Vec<_>>())
            .and_then(txn.then.into_iter().map(txn_op).collect::<Vec<_>>())
            .or_else(txn.otherwise.into_iter().map(txn_op).collect::<Vec<_>>());
        let mut kv = self.client.kv_client();
        let resp = timed("txn", kv.txn(t)).await.map_err(|e| match e {
            StoreError::Refused(m) if m.contains("lease not found") => StoreError::LeaseGone(lease),
            e => e,
        })?;
        Ok(TxnOutcome {
            succeeded: resp.succeeded(),
            revision: resp.header().map(|h| h.revision()).unwrap_or(0),
        })
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        let mut lease = self.client.lease_client();
        let secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let resp = timed("lease grant", lease.grant(secs, None)).await?;
        Ok(resp.id())
    }

    async fn lease_keepalive(&self, id: LeaseId) -> StoreResult<Duration> {
        let mut keepers = self.keepers.lock().await;
        let renewed = renew(&self.client, &mut keepers, id).await;
        if renewed.is_err() {
            // A stream that missed an answer may deliver it late: start afresh.
            keepers.remove(&id);
        }
        renewed.map_err(|e| match e {
            // The client reports a lease etcd no longer has as its own error ("lease
            // keep alive error: lease not found": when it opens the stream, whose first
            // answer is a renewal, as on a later one), not as etcd's status: the lease
            // expired (e.g. while this node was cut off).
            StoreError::Unavailable(m) | StoreError::Refused(m)
                if m.contains("lease not found") =>
            {
                StoreError::LeaseGone(id)
            }
            e => e,
        })
    }

    async fn lease_revoke(&self, id: LeaseId) -> StoreResult<()> {
        self.keepers.lock().await.remove(&id);
        let mut lease = self.client.lease_client();
        match timed("lease revoke", lease.revoke(id)).await {
            Ok(_) => Ok(()),
            Err(StoreError::Refused(m)) if m.contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch_prefix(&self, prefix: &str, from: Revision) -> StoreResult<Watch> {
        let mut opts = WatchOptions::new().with_prefix();
        if from != 0 {
            opts = opts.with_start_revision(from);
        }
        let mut watch = self.client.watch_client();
        let (watcher, mut stream) = timed("watch", watch.watch(prefix, Some(opts))).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let _watcher = watcher; // dropping it would cancel the watch
            loop {
                let resp = match stream.message().await {
                    Ok(Some(resp)) => resp,
                    Ok(None) => break,
                    Err(e) => {
                        warn!(%prefix, error = %e, "cluster watch ended");
                        break;
                    }
                };
                if resp.canceled() {
                    debug!(%prefix, reason = resp.cancel_reason(), "cluster watch canceled");
                    break;
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Ok(kv) = key_value(kv) else { continue };
                    let event = match ev.event_type() {
                        EventType::Put => WatchEvent::Put(kv),
                        EventType::Delete => WatchEvent::Delete {
                            key: kv.key,
                            revision: kv.mod_revision,
                        },
                    };
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Watch { events: rx })
    }
}
