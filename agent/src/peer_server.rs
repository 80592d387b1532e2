//! vireod's peer listener (`--listen ADDR:PORT`): HTTPS with mutual TLS for other
//! hosts' vireods, and only for what one host asks of another.
//!
//! A connection gets in only with a client certificate from the host CA that names a
//! host on the `--peer` list (checked in the handshake, see [`crate::hosttls`]); that
//! name travels with each request. The routes are the destination's side of a
//! migration: `POST /api/v1/migrations/incoming` (the peer becomes the migration's
//! source) and `GET`/`DELETE /api/v1/migrations/{id}` of an incoming migration that
//! peer sent; with `--replica-dir`, the replica server's `/peer/v1/replica/...`
//! ([`crate::replica_server`]). Everything else — the full API — is only on the unix socket: here it is
//! 404.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::hosttls::{admitted_name, identity_line, HostIdentity};
use crate::model::IncomingRequest;
use crate::supervisor::Supervisor;
use crate::{error_chain, AgentError};

/// How long a client may take for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The peer host a request came from (its certificate's name on the allow-list).
#[derive(Clone, Debug)]
pub struct Peer(pub String);

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("--listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("--listen needs this host's identity: --tls-cert, --tls-key and --tls-ca")]
    NoIdentity,
    #[error("--listen needs at least one --peer (the hosts it admits)")]
    NoPeers,
    #[error(transparent)]
    Tls(#[from] crate::hosttls::TlsError),
}

/// The bound listener and its TLS; [`PeerListener::serve`] runs it.
pub struct PeerListener {
    listener: TcpListener,
    tls: Reloader,
    replica: Option<Arc<crate::replica_server::ReplicaServer>>,
    validate: Arc<crate::cluster_validate::Local>,
}

/// The listener's TLS, which [`Reloader::reload`] replaces from the identity's files
/// (vireod: SIGHUP): connections accepted afterwards see the new certificate, CA and
/// CRL; established ones keep theirs.
#[derive(Clone)]
pub struct Reloader {
    identity: HostIdentity,
    peers: Arc<BTreeSet<String>>,
    acceptor: Arc<std::sync::RwLock<TlsAcceptor>>,
}

impl Reloader {
    /// Reads the identity's files again and rebuilds the listener's TLS; on an error
    /// the TLS in use stays.
    pub fn reload(&self) -> Result<(), crate::hosttls::TlsError> {
        self.identity.reload()?;
        let config = self.identity.server_config((*self.peers).clone())?;
        *vireo_util::sync::write(&self.acceptor) = TlsAcceptor::from(config);
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        vireo_util::sync::read(&self.acceptor).clone()
    }
}

impl PeerListener {
    /// Binds `addr` and prepares the TLS that admits `peers` (host names, any case).
    pub async fn bind(
        addr: SocketAddr,
        identity: Option<&HostIdentity>,
        peers: &[String],
    ) -> Result<Self, ListenError> {
        let identity = identity.ok_or(ListenError::NoIdentity)?;
        let peers: BTreeSet<String> = peers.iter().map(|p| p.to_ascii_lowercase()).collect();
        if peers.is_empty() {
            return Err(ListenError::NoPeers);
        }
        let config = identity.server_config(peers.clone())?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ListenError::Bind { addr, source })?;
        Ok(Self {
            listener,
            tls: Reloader {
                identity: identity.clone(),
                peers: Arc::new(peers),
                acceptor: Arc::new(std::sync::RwLock::new(TlsAcceptor::from(config))),
            },
            replica: None,
            validate: Default::default(),
        })
    }

    /// Answers cluster validation probes (`/peer/v1/cluster/...`) once `local` names
    /// the node.
    pub fn with_validation(mut self, local: Arc<crate::cluster_validate::Local>) -> Self {
        self.validate = local;
        self
    }

    /// Serves the replica routes (`/peer/v1/replica/...`) too.
    pub fn with_replica(mut self, replica: Arc<crate::replica_server::ReplicaServer>) -> Self {
        self.replica = Some(replica);
        self
    }

    /// What reloads this listener's TLS.
    pub fn reloader(&self) -> Reloader {
        self.tls.clone()
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Accepts connections until the task is dropped; each one is served on its own.
    pub async fn serve(self, sup: Arc<Supervisor>) {
        let app = router(sup, self.replica.clone(), self.validate.clone());
        info!(addr = ?self.local_addr(), peers = ?self.tls.peers, "peer listener ready");
        loop {
            let (tcp, from) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "peer listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, peers, app) = (self.tls.acceptor(), self.tls.peers.clone(), app.clone());
            tokio::spawn(async move { serve_connection(tcp, from, acceptor, peers, app).await });
        }
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    from: SocketAddr,
    acceptor: TlsAcceptor,
    peers: Arc<BTreeSet<String>>,
    app: Router,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            warn!(%from, error = %e, "peer refused in the TLS handshake");
            return;
        }
        Err(_) => {
            warn!(%from, "peer refused: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    // The verifier admitted the certificate; this is the name it was admitted for.
    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let Some((peer, identity)) =
        cert.and_then(|c| admitted_name(c, &peers).map(|n| (n.clone(), identity_line(c, &n))))
    else {
        warn!(%from, "peer refused: no admitted certificate after the handshake");
        return;
    };
    debug!(%from, %peer, "peer connected");
    let svc = TowerToHyperService::new(
        app.layer(Extension(PeerIdentity(identity)))
            .layer(Extension(Peer(peer))),
    );
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), svc)
        .await
    {
        debug!(%from, error = %e, "peer connection ended");
    }
}

/// The peer's certificate identity as the audit trail records it.
#[derive(Clone, Debug)]
pub struct PeerIdentity(pub String);

/// The host-to-host routes; nothing else. Each change and each error answer is
/// audited with the peer's certificate identity.
pub fn router(
    sup: Arc<Supervisor>,
    replica: Option<Arc<crate::replica_server::ReplicaServer>>,
    validate: Arc<crate::cluster_validate::Local>,
) -> Router {
    let replica = replica
        .map(|r| crate::replica_server::router(r, sup.clone()))
        .unwrap_or_default();
    Router::new()
        .route("/api/v1/migrations/incoming", post(incoming))
        .route("/api/v1/migrations/{id}", get(migration).delete(cancel))
        .with_state(sup.clone())
        .merge(replica)
        .merge(crate::cluster_validate::peer_router(sup.clone(), validate))
        .fallback(|| async { error(404, "not a host-to-host API endpoint".into()) })
        .layer(axum::middleware::from_fn_with_state(sup, audit))
}

/// Records a peer's request in the audit trail: every change (any method but GET),
/// and every request answered with an error (a refusal, a probe of another route).
/// The polls of a migration's progress (GET, 200) are not recorded.
async fn audit(State(s): S, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().chars().take(200).collect());
    let identity = req
        .extensions()
        .get::<PeerIdentity>()
        .map(|p| p.0.clone())
        .unwrap_or_else(|| "unknown".into());
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    if method == axum::http::Method::GET && status < 400 {
        return resp;
    }
    let (resp, outcome) = crate::authz::read_outcome(resp).await;
    let e = crate::audit::Entry {
        id: 0,
        at_ms: crate::now_ms(),
        uid: None,
        pid: None,
        role: "peer".into(),
        peer: Some(identity),
        method: method.to_string(),
        route,
        vm: outcome.vm,
        status,
        detail: outcome.detail,
    };
    if let Err(err) = s.inventory().record_audit(&e) {
        warn!(error = %error_chain(&err), entry = ?e, "cannot write the audit record");
    }
    resp
}

type S = State<Arc<Supervisor>>;

fn error(status: u16, message: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn reply<T: serde::Serialize>(status: StatusCode, r: Result<T, AgentError>) -> Response {
    match r {
        Ok(v) => (status, Json(v)).into_response(),
        Err(e) => error(e.status(), error_chain(&e)),
    }
}

async fn incoming(State(s): S, Extension(Peer(peer)): Extension<Peer>, b: Bytes) -> Response {
    let req: IncomingRequest = match serde_json::from_slice(&b) {
        Ok(r) => r,
        Err(e) => return error(400, format!("invalid incoming migration request: {e}")),
    };
    info!(%peer, vm = %req.name, "incoming migration asked for by a peer");
    reply(StatusCode::CREATED, s.incoming(req, Some(peer)).await)
}

async fn migration(
    State(s): S,
    Extension(Peer(peer)): Extension<Peer>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    reply(StatusCode::OK, s.peer_migration(&id, &peer))
}

async fn cancel(
    State(s): S,
    Extension(Peer(peer)): Extension<Peer>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    reply(StatusCode::OK, s.peer_cancel_migration(&id, &peer))
}
