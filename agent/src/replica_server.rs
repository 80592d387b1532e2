//! vireod as a replica server: the `/peer/v1/replica/...` routes of the peer listener
//! (mutual TLS). A primary gets in only if its certificate's host name — the name the
//! handshake admitted it as — is on `--replica-allow`; its VMs live in
//! `<--replica-dir>/<that name>/<vm>/`, a path built only from the certificate's name
//! and a checked VM name, never from a path the primary sends.
//!
//! Routes (`{vm}` a VM name, `{disk}` a disk index):
//! - `PUT  /peer/v1/replica/{vm}` `{"disks": [size, ...]}`: declares the replica (idempotent);
//! - `GET  /peer/v1/replica/{vm}`: what the replica holds (a primary resumes from it);
//! - `PUT  /peer/v1/replica/{vm}/disks/{disk}/base/{offset}`: a zstd chunk of the
//!   initial copy (at most [`replica::MAX_BASE_CHUNK`] bytes decompressed);
//! - `GET  /peer/v1/replica/{vm}/disks/{disk}/hashes?start=B&count=N`: the SHA-256 of
//!   the image's 64 KiB blocks B..B+N (hex), for a resync by block hashes;
//! - `POST /peer/v1/replica/{vm}/base-complete` `{"image_sha256": [...]}`: the initial
//!   copy is all there (refused if an image's hash is not the primary's);
//! - `PUT  /peer/v1/replica/{vm}/disks/{disk}/segments/{seq}`: a zstd-compressed
//!   sealed segment, decompressed into its staged file as it arrives and kept once it
//!   verified (a re-send is harmless);
//! - `POST /peer/v1/replica/{vm}/points` `{"cut_id": C, "seqs": [...]}`: every disk is
//!   applied up to its segment of cut C, then C is the VM's recovery point;
//! - `PUT  /peer/v1/replica/{vm}/extras/{definition|kernel|initramfs}`: what a failover
//!   here boots (the definition's paths are never used: [`crate::replica_failover`]);
//! - `POST /peer/v1/replica/{vm}/failover`: a planned failover, the VM starts here;
//! - `PUT  /peer/v1/replica/{vm}/reverse` `{"disks": [...]}`: the host this VM was
//!   failed over to replicates it back; the replica starts from this host's own disks
//!   ([`crate::replica_reverse`]).
//!
//! Each VM's requests run one at a time; the store (`replica::ReplicaVm`) does the
//! verifying, applying and syncing.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use axum::{Extension, Json, Router};
use replica::{Committed, ReplicaVm, Staged, StoreError};
use serde::Deserialize;
use tracing::{info, warn};

use crate::peer_server::Peer;
use crate::replica_upload::{Upload, UploadEnd};

/// The default bound of one decompressed segment (and of its compressed upload).
pub const DEFAULT_MAX_SEGMENT: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaServerError {
    #[error("--replica-dir {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--replica-allow {0}: the host must be on --peer too (the TLS handshake admits only --peer hosts)")]
    NotAPeer(String),
    #[error("--replica-dir needs at least one --replica-allow (the primaries it serves)")]
    NoPrimaries,
}

/// One lock per (primary, VM): a VM's requests run one at a time.
type VmLocks = HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

/// The replica server's configuration and the per-VM locks.
pub struct ReplicaServer {
    root: OwnedFd,
    root_path: PathBuf,
    allow: BTreeSet<String>,
    max_segment: u64,
    locks: Mutex<VmLocks>,
    /// This host's replications (set once they exist): a reverse request may teach
    /// this host that its VM was failed over ([`crate::replication::failed_over`]).
    replications: std::sync::OnceLock<std::sync::Weak<crate::replication::Replications>>,
}

impl ReplicaServer {
    /// Opens `dir` (the operator's; created 0700 if missing) for the primaries `allow`,
    /// each of which must be a peer (`peers`).
    pub fn new(
        dir: &Path,
        allow: &[String],
        peers: &[String],
        max_segment: u64,
    ) -> Result<Self, ReplicaServerError> {
        let peers: BTreeSet<String> = peers.iter().map(|p| p.to_ascii_lowercase()).collect();
        let allow: BTreeSet<String> = allow.iter().map(|p| p.to_ascii_lowercase()).collect();
        if allow.is_empty() {
            return Err(ReplicaServerError::NoPrimaries);
        }
        if let Some(a) = allow.iter().find(|a| !peers.contains(*a)) {
            return Err(ReplicaServerError::NotAPeer(a.clone()));
        }
        let err = |source| ReplicaServerError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        match std::fs::create_dir(dir) {
            Ok(()) => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(err)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err(e)),
        }
        let root = confine::open_dir(dir).map_err(err)?;
        Ok(Self {
            root,
            root_path: dir.to_path_buf(),
            allow,
            max_segment: max_segment.max(1),
            locks: Mutex::new(HashMap::new()),
            replications: std::sync::OnceLock::new(),
        })
    }

    /// Hands this host's replications to the server (once, at vireod's start).
    pub fn attach(&self, r: &Arc<crate::replication::Replications>) {
        let _ = self.replications.set(Arc::downgrade(r));
    }

    /// This host's replications, if attached and alive.
    pub(crate) fn replications(&self) -> Option<Arc<crate::replication::Replications>> {
        self.replications.get().and_then(std::sync::Weak::upgrade)
    }

    /// Where `primary`'s VM `vm` is stored.
    pub fn vm_path(&self, primary: &str, vm: &str) -> PathBuf {
        self.root_path.join(primary).join(vm)
    }

    /// The allowed primaries that hold a replica of VM `vm`.
    pub fn primaries_holding(&self, vm: &str) -> Vec<String> {
        if !valid_name(vm) {
            return Vec::new();
        }
        self.allow
            .iter()
            .filter(|p| valid_name(p) && self.vm_path(p, vm).join("vm.state").is_file())
            .cloned()
            .collect()
    }

    fn lock_of(&self, primary: &str, vm: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((primary.to_string(), vm.to_string()))
            .or_default()
            .clone()
    }

    /// The primary's directory (created on its first request).
    fn primary_dir(&self, primary: &str) -> Result<OwnedFd, StoreError> {
        let io = |source| StoreError::Io {
            what: format!("the directory of primary {primary}"),
            source,
        };
        match confine::mkdir_private(self.root.as_fd(), primary.as_ref()) {
            Ok(fd) => Ok(fd),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                confine::open_dir_at(self.root.as_fd(), primary.as_ref()).map_err(io)
            }
            Err(e) => Err(io(e)),
        }
    }
}

type S = State<Arc<ReplicaServer>>;

/// The replica routes, for the peer listener.
pub fn router(server: Arc<ReplicaServer>, sup: Arc<crate::supervisor::Supervisor>) -> Router {
    let failover = Router::new()
        .route("/peer/v1/replica/{vm}/failover", post(peer_failover))
        .route("/peer/v1/replica/{vm}/reverse", put(peer_reverse))
        .layer(axum::middleware::from_fn_with_state(
            server.clone(),
            only_allowed_primaries,
        ))
        .with_state((server.clone(), sup));
    Router::new()
        .route("/peer/v1/replica/{vm}/extras/{which}", put(extra))
        .route("/peer/v1/replica/{vm}", put(declare).get(status))
        .route(
            "/peer/v1/replica/{vm}/disks/{disk}/base/{offset}",
            put(base_chunk),
        )
        .route(
            "/peer/v1/replica/{vm}/disks/{disk}/hashes",
            axum::routing::get(hashes),
        )
        .route("/peer/v1/replica/{vm}/base-complete", post(base_complete))
        .route("/peer/v1/replica/{vm}/resync", post(resync))
        .route(
            "/peer/v1/replica/{vm}/disks/{disk}/segments/{seq}",
            put(segment),
        )
        .route("/peer/v1/replica/{vm}/points", post(commit))
        .layer(axum::middleware::from_fn_with_state(
            server.clone(),
            only_allowed_primaries,
        ))
        .with_state(server)
        .merge(failover)
}

/// Refuses (403) a peer whose host name is not on `--replica-allow`; nothing of its
/// request is read.
async fn only_allowed_primaries(State(s): S, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<Peer>().map(|p| p.0.clone());
    match peer {
        Some(p) if s.allow.contains(&p) && valid_name(&p) => next.run(req).await,
        Some(p) => {
            warn!(peer = %p, "replica: refused a host that is not an allowed primary");
            error(
                StatusCode::FORBIDDEN,
                format!("host {p} is not an allowed replication primary (--replica-allow)"),
            )
        }
        None => error(StatusCode::FORBIDDEN, "no peer identity".into()),
    }
}

/// A name that is one plain directory entry: a letter or digit first, then letters,
/// digits, `-`, `_`, `.` (at most 64).
fn valid_name(n: &str) -> bool {
    crate::model::validate_name(n).is_ok()
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// Whether `e` or an error beneath it is the filesystem's "no space" (ENOSPC, or
/// EDQUOT: a quota).
fn storage_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// The answer to a round the replica cannot store: 507 and `"replica_full": true`
/// (the primary pauses replication of the VM until resumed; it keeps its log).
fn full(vm: &str, message: String) -> Response {
    warn!(vm, %message, "replica: full, the round is refused");
    (
        StatusCode::INSUFFICIENT_STORAGE,
        Json(serde_json::json!({
            "error": format!("replica full: {message}"),
            "vm": vm,
            "replica_full": true,
        })),
    )
        .into_response()
}

fn store_error(vm: &str, e: StoreError) -> Response {
    use replica::ApplyError;
    if storage_full(&e) {
        return full(vm, crate::error_chain(&e));
    }
    let status = match &e {
        StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
        StoreError::Segment { .. } | StoreError::Apply(ApplyError::Segment(_)) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        StoreError::Conflict(_) | StoreError::Apply(ApplyError::Gap { .. }) => StatusCode::CONFLICT,
        StoreError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        StoreError::NotFound => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let message = crate::error_chain(&e);
    warn!(vm, %message, "replica: request refused");
    (
        status,
        Json(serde_json::json!({ "error": message, "vm": vm })),
    )
        .into_response()
}

impl ReplicaServer {
    /// Runs `f` on `primary`'s VM `vm` (its lock held, on a blocking thread); `f` gets
    /// the primary's directory.
    pub async fn on_vm<T: Send + 'static>(
        self: &Arc<Self>,
        primary: &str,
        vm: &str,
        f: impl FnOnce(OwnedFd) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        if !valid_name(vm) || !valid_name(primary) {
            return Err(StoreError::Invalid(format!(
                "invalid name {primary:?}/{vm:?}"
            )));
        }
        let lock = self.lock_of(primary, vm);
        let _held = lock.lock().await;
        let dir = self.primary_dir(primary)?;
        tokio::task::spawn_blocking(move || f(dir))
            .await
            .map_err(|e| StoreError::Io {
                what: "the replica task".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }
}

/// [`ReplicaServer::on_vm`] with a refusal as the peer's answer.
async fn with_vm<T: Send + 'static>(
    s: &Arc<ReplicaServer>,
    primary: &str,
    vm: &str,
    f: impl FnOnce(OwnedFd) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Response> {
    if !valid_name(vm) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("invalid VM name {vm:?}"),
        ));
    }
    s.on_vm(primary, vm, f)
        .await
        .map_err(|e| store_error(vm, e))
}

/// `PUT /peer/v1/replica/{vm}/extras/{which}`: the VM's definition (JSON), kernel or
/// initramfs, which a failover on this host boots (bounded, stored atomically).
async fn extra(
    State(s): S,
    Extension(Peer(primary)): Extension<Peer>,
    UrlPath((vm, which)): UrlPath<(String, String)>,
    body: Body,
) -> Response {
    let which = match which.as_str() {
        "definition" => replica::Extra::Definition,
        "kernel" => replica::Extra::Kernel,
        "initramfs" => replica::Extra::Initramfs,
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                format!("{which:?}: expected definition, kernel or initramfs"),
            )
        }
    };
    let limit = which.limit() as usize;
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{} over {limit} bytes, or cut short: {e}",
                    which.file_name()
                ),
            )
        }
    };
    if which == replica::Extra::Definition
        && serde_json::from_slice::<crate::model::VmDefinition>(&bytes).is_err()
    {
        return error(
            StatusCode::BAD_REQUEST,
            "the definition is not a VM definition".into(),
        );
    }
    let name = vm.clone();
    match with_vm(&s, &primary, &vm, move |dir| {
        ReplicaVm::open(dir.as_fd(), &name)?.put_extra(which, &bytes)
    })
    .await
    {
        Ok(()) => (
            StatusCode::OK,
            Json(serde_json::json!({"vm": vm, "stored": which.file_name()})),
        )
            .into_response(),
        Err(r) => r,
    }
}

/// `POST /peer/v1/replica/{vm}/failover`: the primary's planned failover (it shut
/// its VM down and sent the last changes): the VM starts here from the latest point.
async fn peer_failover(
    State((s, sup)): State<(Arc<ReplicaServer>, Arc<crate::supervisor::Supervisor>)>,
    Extension(Peer(primary)): Extension<Peer>,
    UrlPath(vm): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PeerFailover {
        #[serde(default = "yes")]
        start: bool,
    }
    fn yes() -> bool {
        true
    }
    let req: PeerFailover = if body.is_empty() {
        PeerFailover { start: true }
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("failover: {e}")),
        }
    };
    match crate::replica_failover::fail_over(&sup, &s, &primary, &vm, None, req.start).await {
        Ok(v) => (StatusCode::OK, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `PUT /peer/v1/replica/{vm}/reverse` `{"disks": [...], "history"?}`: the host VM
/// `vm` was failed over to replicates it back here; the replica starts from this
/// host's own disks of the VM ([`crate::replica_reverse::seed_here`]).
async fn peer_reverse(
    State((s, sup)): State<(Arc<ReplicaServer>, Arc<crate::supervisor::Supervisor>)>,
    Extension(Peer(primary)): Extension<Peer>,
    UrlPath(vm): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let d: Declare = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid declaration: {e}")),
    };
    if !valid_name(&vm) {
        return error(StatusCode::BAD_REQUEST, format!("invalid VM name {vm:?}"));
    }
    match crate::replica_reverse::seed_here(&sup, &s, &primary, &vm, d.disks, d.history).await {
        Ok(st) => status_reply(&vm, st),
        Err((status, m)) => {
            warn!(%primary, vm, error = %m, "replica: reverse replication refused");
            error(status, m)
        }
    }
}

fn status_reply(vm: &str, st: replica::VmStatus) -> Response {
    let mut v = serde_json::to_value(st).unwrap_or_default();
    v["vm"] = serde_json::Value::String(vm.to_string());
    (StatusCode::OK, Json(v)).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Declare {
    disks: Vec<u64>,
    /// Recovery points to keep (default: unchanged; 1 for a new replica).
    #[serde(default)]
    history: Option<u32>,
    /// Seconds at least between kept points other than the latest (default 0).
    #[serde(default)]
    history_spacing_s: Option<u64>,
}

async fn declare(
    State(s): S,
    Extension(Peer(primary)): Extension<Peer>,
    UrlPath(vm): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let d: Declare = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid declaration: {e}")),
    };
    let name = vm.clone();
    match with_vm(&s, &primary, &vm, move |dir| {
        let mut r = ReplicaVm::create_or_open(dir.as_fd(), &name, &d.disks)?;
        if let Some(keep) = d.history.filter(|_| !r.failed_over()) {
            r.set_keep(keep)?;
            r.set_spacing(d.history_spacing_s.unwrap_or(0))?;
        }
        r.status()
    })
    .await
    {
        Ok(st) => {
            info!(%primary, vm, "replica: VM declared");
            status_reply(&vm, st)
        }
        Err(r) => r,
    }
}

async fn status(
    State(s): S,
    Extension(Peer(primary)): Extension<Peer>,
    UrlPath(vm): UrlPath<String>,
) -> Response {
    let name = vm.clone();
    match with_vm(&s, &primary, &vm, move |dir| {
        let mut st = ReplicaVm::open(dir.as_fd(), &name)?.status()?;
        st.free_bytes = replica::free_bytes(dir.as_fd());
        Ok(st)
    })
    .await
    {
        Ok(st) => status_reply(&vm, st),
        Err(r) => r,
    }
}

async fn base_chunk(
    State(s): S,
    Extension(Peer(primary)): Extension<Peer>,
    UrlPath((vm, disk, offset)): UrlPath<(String, usize, u64)>,
    body: Body,
) -> Response {
    // zstd never makes a chunk much larger than its data.
    let limit = replica::MAX_BASE_CHUNK as usize + (1 << 20);
    let compressed = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a chunk of the initial copy over {limit} bytes, or cut short: {e}"),
            )
        }
    };
    let name = vm.clone();
    match with_vm(&s, &primary, &vm, move |dir| {
        let data = decompress_bounded(&compressed, replica::MAX_BASE_CHUNK)?;
        ReplicaVm::open(dir.as_fd(), &name)?.write_base(disk, offset, &data)
    })
    .await
    {
        Ok(()) => (
            StatusCode::OK,
            Json(serde_json::json!({"vm": vm, "disk": disk, "offset": offset})),
        )
            .into_response(),
        Err(r) => r,
    }
}

fn decompress_bounded(compressed: &[u8], limit: u64) -> Result<Vec<u8>, StoreError> {
    use std::io::Read;
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(compressed)
        .and_then(|d| d.take(limit + 1).read_to_end(&mut out))
        .map_err(|e| StoreError::Invalid(format!("not zstd data: {e}")))?;
    if out.len() as u64 > limit {
        return Err(StoreError::TooLarge {
            what: "a decompressed chunk of the initial copy",
            limit,
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HashesQuery {
    start: u64,
    count: u64,
}

/// `GET /peer/v1/replica/{vm}/disks/{disk}/hashes?start=B&count=N`: the SHA-256 of
/// blocks B..B+N of the replica's image (hex, 32 bytes each), for a resync.
async fn hashes(
    State(s): S,
    Extension(Peer(primary)): Extension<Peer>,
    UrlPath((vm, disk)): UrlPath<(String, usize)>,
    axum::extract::Query(q): axum::extract::Query<HashesQuery>,
) -> Response {
    let name = vm.clone();
    match with_vm(&s, &primary, &vm, move |dir| {
        ReplicaVm::open(dir.as_fd(), &name)?.block_hashes(disk, q.start, q.count)
    })
    .await
    {
        Ok(list) => (
            StatusCode::OK,
            Json(serde_json::json!({
                "vm": vm, "disk": disk, "start": q.start,
                "block_size": replica::HASH_BLOCK,
                "hashes": hex::encode(list.concat()),
            })),
        )
            .into_response(),
        Err(r) => r,
    }
}

/// `POST .../base-complete` `{"image_sha256": ["hex", ...]}` (one per disk): the
/// initial copy is complete if every image has the primary's hash. Without a body
/// the images are taken as they are.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BaseComplete {
    image_sha256: Vec<String>,
}

async fn base_complete(
    State(s): S,
    Extension(Peer(primary)): Extension<Peer>,
    UrlPath(vm): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let hashes = if body.is_empty() {
        None
    } else {
        let parsed = serde_json::from_slice::<BaseComplete>(&body)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                b.image_sha256
                    .iter()
                    .map(|h| {
                        let mut out = [0u8; 32];
                        hex::decode_to_slice(h, &mut out)
                            .map(|()| out)
                            .map_err(|e| format!("{h:?}: {e}"))
                    })
                    .collect::<Result<Vec<_>, _>>()
            });
        match parsed {
            Ok(h) => Some(h),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid image hashes: {e}"),
                )
            }
        }
    };
    let name = vm.clone();
    match with_vm(&s, &primary, &vm, move |dir| {
        let mut r = ReplicaVm::open(dir.as_fd(), &name)?;
        match hashes {
            Some(h) => r.complete_base_checked(&h)?,
            None => r.complete_base()?,
        }
        r.status()
    })
    .await
    {
        Ok(st) => {
            info!(%primary, vm, "replica: initial copy complete");
            status_reply(&vm, st)
        }
        Err(r) => r,
    }
}

/// `POST /peer/v1/replica/{vm}/resync`: the primary's host went down while the VM
/// wrote, so its images and change logs may disagree: the replica is reset for a
/// resync by block hashes (every point dropped; refused once failed over). See
/// `crate::replica_crash`.
async fn resync(
    State(s): S,
    Extension(Peer(primary)): Extension<Peer>,
    UrlPath(vm): UrlPath<String>,
) -> Response {
    let name = vm.clone();
    match with_vm(&s, &primary, &vm, move |dir| {
        ReplicaVm::open(dir.as_fd(), &name)?
            .reset_after_primary_crash()?
            .status()
    })
    .await
    {
        Ok(st) => {
            warn!(%primary, vm, "replica: reset for a resync (the primary's host went down)");
            status_reply(&vm, st)
        }
        Err(r) => r,
    }
}

async fn segment(
    State(s): S,
    Extension(Peer(primary)): Extension<Peer>,
    UrlPath((vm, disk, seq)): UrlPath<(String, usize, u64)>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    if !valid_name(&vm) {
        return error(StatusCode::BAD_REQUEST, format!("invalid VM name {vm:?}"));
    }
    let max = s.max_segment;
    // A body announced over the bound is refused before a byte of it is read (one
    // without a length is cut off at the bound as it arrives).
    let announced = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            UploadEnd::TooLarge { limit: max }.to_string(),
        );
    }
    // Staged as it arrives (decompressed straight into the staged file), the VM's lock
    // held meanwhile: see `replica_upload`.
    let (pump, reader, upload) = Upload::start(body, max);
    let name = vm.clone();
    let staging = with_vm(&s, &primary, &vm, move |dir| {
        ReplicaVm::open(dir.as_fd(), &name)?.stage(disk, seq, std::io::BufReader::new(reader), max)
    });
    let ((), staged) = tokio::join!(pump, staging);
    if let Some(end) = upload.ended() {
        let status = match end {
            UploadEnd::CutShort(_) => StatusCode::BAD_REQUEST,
            UploadEnd::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        };
        return error(status, end.to_string());
    }
    match staged {
        Ok(Staged::Staged(t)) => (
            StatusCode::OK,
            Json(serde_json::json!({
                "vm": vm, "disk": disk, "seq": seq, "cut_id": t.cut_id,
                "records": t.records, "data_bytes": t.data_bytes, "applied": false,
            })),
        )
            .into_response(),
        Ok(Staged::AlreadyApplied) => (
            StatusCode::OK,
            Json(serde_json::json!({"vm": vm, "disk": disk, "seq": seq, "applied": true})),
        )
            .into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitRequest {
    cut_id: u64,
    seqs: Vec<u64>,
}

async fn commit(
    State(s): S,
    Extension(Peer(primary)): Extension<Peer>,
    UrlPath(vm): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let c: CommitRequest = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid point: {e}")),
    };
    let name = vm.clone();
    match with_vm(&s, &primary, &vm, move |dir| {
        ReplicaVm::open(dir.as_fd(), &name)?.commit(c.cut_id, &c.seqs)
    })
    .await
    {
        Ok(Committed::Committed(p)) => {
            info!(%primary, vm, cut_id = p.cut_id, "replica: recovery point");
            (
                StatusCode::OK,
                Json(serde_json::json!({"vm": vm, "point": p, "new": true})),
            )
                .into_response()
        }
        Ok(Committed::AlreadyThere(p)) => (
            StatusCode::OK,
            Json(serde_json::json!({"vm": vm, "point": p, "new": false})),
        )
            .into_response(),
        Err(r) => r,
    }
}
