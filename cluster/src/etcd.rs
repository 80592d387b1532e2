//! [`EtcdStore`]: the [`ClusterStore`] on a real etcd cluster (v3 API over gRPC,
//! the `etcd-client` crate), one connection per member (see [`crate::endpoints`]):
//! requests go to one member at a time, and a member that is unreachable or has no
//! leader is left for a healthy one.
//!
//! Whoever can write to etcd defines the VMs every node runs (their disks, kernels,
//! networks), so a node reaches it over mutual TLS ([`EtcdTls`]: `https://` endpoints,
//! the host's certificate presented to an etcd started with `--client-cert-auth`).
//! Clear `http://` is for a test bench only, and must be asked for by the caller.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions,
    EventType, GetOptions, Identity, PutOptions, TlsOptions, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::endpoints::Endpoints;

use crate::store::{
    ClusterStore, CmpOp, Compare, KeyValue, LeaseId, Op, Revision, StoreError, StoreResult, Txn,
    TxnOutcome, Watch, WatchEvent,
};

/// How long one request may take before the store counts as unreachable. Shorter than
/// the lease renewal period, so a hung renewal is retried before the lease is at risk.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(400);

/// Most keys one prefix read asks for at once. Unpaged, a read of every VM definition
/// outgrows gRPC's 4 MiB message limit with the cluster (the client refuses the
/// answer: "decoded message length too large"; ~5,700 VMs of 730 bytes), and the
/// controller of every node fails every pass.
const PAGE_KEYS: i64 = 1000;

/// The largest answer the client accepts: a page of [`PAGE_KEYS`] values of 64 KiB.
const MAX_ANSWER: usize = 64 << 20;

/// The end of the range of every key that starts with `prefix` (etcd's prefix end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// How often each member's health is probed (its status: an answer, with a leader).
const PROBE_PERIOD: Duration = Duration::from_millis(300);

/// A connection to an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Each member's endpoint and its own client.
    members: Vec<(String, Client)>,
    endpoints: Endpoints,
    /// How long one request may take ([`REQUEST_TIMEOUT`] for a node).
    request_timeout: Duration,
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
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> StoreResult<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(unavailable),
        Err(_) => Err(StoreError::Unavailable(format!(
            "{what}: no answer within {limit:?}"
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

/// How a node proves itself to etcd and recognises its members: the cluster's CA and
/// this host's certificate and key (PEM). Every member's certificate must name the
/// address the node dials (an IP or DNS SAN).
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdTls { .. }") // Never the key.
    }
}

impl EtcdTls {
    /// Reads the three PEM files.
    pub fn from_files(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<Self, String> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        Ok(Self {
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        })
    }
}

/// How a node reaches etcd: over mutual TLS, or in clear when its caller asked for it.
#[derive(Clone, Debug)]
pub enum EtcdSecurity {
    Tls(EtcdTls),
    /// `http://` endpoints (a test bench on loopback): anyone who reaches etcd then
    /// controls every node's VMs.
    Insecure,
}

/// Checks that every endpoint's scheme matches `security`: `https://` with TLS,
/// `http://` only when asked for in clear.
pub fn check_endpoints(endpoints: &[String], security: &EtcdSecurity) -> Result<(), String> {
    if endpoints.is_empty() {
        return Err("no etcd endpoint given".into());
    }
    for ep in endpoints {
        match (ep.split_once("://").map(|(s, _)| s), security) {
            (Some("https"), EtcdSecurity::Tls(_)) | (Some("http"), EtcdSecurity::Insecure) => {}
            (Some("http"), EtcdSecurity::Tls(_)) => {
                return Err(format!(
                    "{ep}: etcd in clear; the node's identity is given, so the endpoints must be https://"
                ))
            }
            (Some("https"), EtcdSecurity::Insecure) => {
                return Err(format!(
                    "{ep}: https:// needs the host's identity (--tls-cert, --tls-key, --tls-ca)"
                ))
            }
            _ => return Err(format!("{ep}: expected https://HOST:PORT")),
        }
    }
    Ok(())
}

impl EtcdStore {
    /// Connects to the cluster's members (`https://host:port` with [`EtcdTls`], or
    /// `http://` when [`EtcdSecurity::Insecure`]): one client each, connecting lazily,
    /// and a task probing their health while the store lives.
    pub async fn connect(endpoints: &[String], security: &EtcdSecurity) -> StoreResult<Self> {
        Self::connect_with_timeout(endpoints, security, REQUEST_TIMEOUT).await
    }

    /// [`EtcdStore::connect`] with requests allowed `request_timeout` (a node's store
    /// keeps [`REQUEST_TIMEOUT`], shorter than a lease renewal period; an operator's
    /// tool or a test's own client may wait longer for a busy etcd).
    pub async fn connect_with_timeout(
        endpoints: &[String],
        security: &EtcdSecurity,
        request_timeout: Duration,
    ) -> StoreResult<Self> {
        check_endpoints(endpoints, security).map_err(StoreError::Unavailable)?;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(1), Duration::from_millis(500))
            // A member cut off from its quorum answers "no leader" at once instead of
            // holding the request until it times out.
            .with_require_leader(true);
        if let EtcdSecurity::Tls(tls) = security {
            opts = opts.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                    .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem)),
            );
        }
        let mut members = Vec::with_capacity(endpoints.len());
        for ep in endpoints {
            let client = Client::connect([ep], Some(opts.clone()))
                .await
                .map_err(|e| StoreError::Unavailable(format!("{ep}: {e}")))?;
            members.push((ep.clone(), client));
        }
        let inner = Arc::new(Inner {
            endpoints: Endpoints::new(members.len()),
            members,
            request_timeout,
        });
        for i in 0..inner.members.len() {
            tokio::spawn(probe(Arc::downgrade(&inner), i));
        }
        Ok(Self { inner })
    }

    /// The member in use and its client.
    fn client(&self) -> (usize, Client) {
        let i = self.inner.endpoints.current();
        (i, self.inner.members[i].1.clone())
    }

    /// Member `i` did not answer (or has no leader): use another from now on.
    fn failed(&self, i: usize, error: &StoreError) {
        let before = self.inner.endpoints.current();
        let now = self.inner.endpoints.failed(i);
        if before == i && now != i {
            info!(
                from = %self.inner.members[i].0,
                to = %self.inner.members[now].0,
                %error,
                "etcd member unreachable: switching to another"
            );
        }
    }

    /// One request to the member in use, bounded by [`REQUEST_TIMEOUT`].
    async fn call<T, Fut>(&self, what: &str, request: impl FnOnce(Client) -> Fut) -> StoreResult<T>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let (i, client) = self.client();
        let r = timed(what, self.inner.request_timeout, request(client)).await;
        if let Err(e @ StoreError::Unavailable(_)) = &r {
            self.failed(i, e);
        }
        r
    }

    /// A read (idempotent): one request as [`EtcdStore::call`], asked again of the next
    /// member when the one in use did not answer, each member at most once. A member
    /// that is busy or cut off costs one [`REQUEST_TIMEOUT`], not the caller's request.
    async fn read<T, Fut>(&self, what: &str, request: impl Fn(Client) -> Fut) -> StoreResult<T>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut asked = 0;
        loop {
            let (i, client) = self.client();
            let r = timed(what, self.inner.request_timeout, request(client)).await;
            let Err(e @ StoreError::Unavailable(_)) = &r else {
                return r;
            };
            self.failed(i, e);
            asked += 1;
            if asked >= self.inner.members.len() || self.inner.endpoints.current() == i {
                return r;
            }
            debug!(what, error = %e, "read asked again of another etcd member");
        }
    }
}

/// Probes member `i` every [`PROBE_PERIOD`] until the store is dropped.
async fn probe(inner: Weak<Inner>, i: usize) {
    loop {
        tokio::time::sleep(PROBE_PERIOD).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut m = inner.members[i].1.maintenance_client();
        let healthy = matches!(
            tokio::time::timeout(REQUEST_TIMEOUT, m.status()).await,
            Ok(Ok(status)) if status.leader() != 0
        );
        if inner.endpoints.is_healthy(i) != healthy {
            debug!(member = %inner.members[i].0, healthy, "etcd member probed");
        }
        inner.endpoints.set_healthy(i, healthy);
    }
}

/// etcd's "lease not found" (as its status, or as the client's own keepalive error)
/// is [`StoreError::LeaseGone`].
fn lease_gone(lease: LeaseId) -> impl Fn(StoreError) -> StoreError {
    move |e| match e {
        StoreError::Unavailable(m) | StoreError::Refused(m) if m.contains("lease not found") => {
            StoreError::LeaseGone(lease)
        }
        e => e,
    }
}

impl ClusterStore for EtcdStore {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        let resp = self
            .read("get", |c| async move { c.kv_client().get(key, None).await })
            .await?;
        resp.kvs().first().map(key_value).transpose()
    }

    /// A count-only read of one key: the answer's header carries the revision.
    async fn current_revision(&self) -> StoreResult<Revision> {
        let resp = self
            .read("revision", |c| async move {
                c.kv_client()
                    .get(
                        crate::keys::NODES,
                        Some(GetOptions::new().with_count_only()),
                    )
                    .await
            })
            .await?;
        resp.header()
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::Unavailable("revision: an answer without a header".into()))
    }

    /// Paged: [`PAGE_KEYS`] keys per request, every page at the first one's revision
    /// (one consistent read).
    async fn get_prefix(&self, prefix: &str) -> StoreResult<(Vec<KeyValue>, Revision)> {
        self.get_prefix_at(prefix, 0).await
    }

    /// Paged as [`EtcdStore::get_prefix`], at `revision` (0: the first page's).
    async fn get_prefix_at(
        &self,
        prefix: &str,
        revision: Revision,
    ) -> StoreResult<(Vec<KeyValue>, Revision)> {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = revision;
        let mut kvs = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE_KEYS);
            if revision != 0 {
                opts = opts.with_revision(revision);
            }
            let resp = self
                .read("get prefix", |c| {
                    let (key, opts) = (from.clone(), opts.clone());
                    async move {
                        let mut kv = c.kv_client().max_decoding_message_size(MAX_ANSWER);
                        kv.get(key, Some(opts)).await
                    }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            for kv in resp.kvs() {
                kvs.push(key_value(kv)?);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((kvs, revision)),
            }
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> StoreResult<Revision> {
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let resp = self
            .call("put", |c| async move {
                c.kv_client().put(key, value, opts).await
            })
            .await
            .map_err(lease_gone(lease))?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        let resp = self
            .call("delete", |c| async move {
                c.kv_client().delete(key, None).await
            })
            .await?;
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
        let resp = self
            .call("txn", |c| async move { c.kv_client().txn(t).await })
            .await
            .map_err(lease_gone(lease))?;
        Ok(TxnOutcome {
            succeeded: resp.succeeded(),
            revision: resp.header().map(|h| h.revision()).unwrap_or(0),
        })
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        let secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let resp = self
            .call("lease grant", |c| async move {
                c.lease_client().grant(secs, None).await
            })
            .await?;
        Ok(resp.id())
    }

    /// Sent to every member at once, the first answer wins: a renewal is idempotent,
    /// and during or just after an election one member can hold a request for the whole
    /// request timeout while another answers at once — the node's fencing window
    /// (1.5 s) has no room to try them one after the other.
    async fn lease_keepalive(&self, id: LeaseId) -> StoreResult<()> {
        let mut tries = tokio::task::JoinSet::new();
        let limit = self.inner.request_timeout;
        for (i, (_, client)) in self.inner.members.iter().enumerate() {
            let client = client.clone();
            tries.spawn(async move {
                // Opening the stream sends one renewal and reads its answer (the client
                // checks its TTL: "lease not found" when it is 0).
                let renewed = timed("lease keepalive", limit, async move {
                    client.lease_client().keep_alive(id).await
                })
                .await;
                (i, renewed.map(drop).map_err(lease_gone(id)))
            });
        }
        let mut error = None;
        while let Some(joined) = tries.join_next().await {
            let Ok((i, renewed)) = joined else { continue };
            match renewed {
                Ok(()) => return Ok(()),
                Err(e @ StoreError::LeaseGone(_)) => return Err(e),
                Err(e) => {
                    self.failed(i, &e);
                    error.get_or_insert(e);
                }
            }
        }
        Err(error.unwrap_or_else(|| StoreError::Unavailable("lease keepalive: no member".into())))
    }

    async fn lease_revoke(&self, id: LeaseId) -> StoreResult<()> {
        match self
            .call("lease revoke", |c| async move {
                c.lease_client().revoke(id).await
            })
            .await
        {
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
        let (watcher, mut stream) = self
            .call("watch", |c| async move {
                c.watch_client().watch(prefix, Some(opts)).await
            })
            .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let _watcher = watcher; // dropping it would cancel the watch
            loop {
                // A watch whose receiver is gone ends now, not at its next event.
                let message = tokio::select! {
                    () = tx.closed() => return,
                    m = stream.message() => m,
                };
                let resp = match message {
                    Ok(Some(resp)) => resp,
                    Ok(None) => break,
                    Err(e) => {
                        warn!(%prefix, error = %e, "cluster watch ended");
                        break;
                    }
                };
                if resp.canceled() {
                    debug!(
                        %prefix,
                        reason = resp.cancel_reason(),
                        compact_revision = resp.compact_revision(),
                        "cluster watch canceled"
                    );
                    break;
                }
                // One response holds whole revisions: sent as one batch.
                let mut batch = Vec::with_capacity(resp.events().len());
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
                    batch.push(event);
                }
                if !batch.is_empty() && tx.send(batch).is_err() {
                    return;
                }
            }
        });
        Ok(Watch::new(rx))
    }
}

/// One etcd member's answer to a status request (the validation report's etcd check).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberHealth {
    pub endpoint: String,
    /// Its member id, its leader's id (0: it knows none), its raft term.
    pub member_id: Option<u64>,
    pub leader: Option<u64>,
    pub raft_term: Option<u64>,
    pub version: Option<String>,
    /// Why it did not answer, or its own errors (alarms).
    pub error: Option<String>,
}

impl EtcdStore {
    /// Every member's status, asked of each one directly.
    pub async fn health(&self) -> Vec<MemberHealth> {
        let mut out = Vec::new();
        for (endpoint, client) in &self.inner.members {
            let mut m = client.maintenance_client();
            let h = match tokio::time::timeout(REQUEST_TIMEOUT, m.status()).await {
                Ok(Ok(s)) => MemberHealth {
                    endpoint: endpoint.clone(),
                    member_id: s.header().map(|h| h.member_id()),
                    leader: Some(s.leader()),
                    raft_term: Some(s.raft_term()),
                    version: Some(s.version().to_string()),
                    error: (!s.errors().is_empty()).then(|| s.errors().join("; ")),
                },
                Ok(Err(e)) => MemberHealth {
                    endpoint: endpoint.clone(),
                    member_id: None,
                    leader: None,
                    raft_term: None,
                    version: None,
                    error: Some(e.to_string()),
                },
                Err(_) => MemberHealth {
                    endpoint: endpoint.clone(),
                    member_id: None,
                    leader: None,
                    raft_term: None,
                    version: None,
                    error: Some(format!("no answer within {REQUEST_TIMEOUT:?}")),
                },
            };
            out.push(h);
        }
        out
    }
}
