//! The node side of validation: the peer routes (`/peer/v1/cluster/probe` and
//! `/ping`), the facts a node reports of itself, and the probe files read and written
//! beneath the storage roots' descriptors (no link followed).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cluster::failover::Snapshot;
use cluster::EtcdStore;
use serde::Deserialize;

use crate::supervisor::Supervisor;

use super::{KvmFacts, Local, NodeFacts, PeerRtt, ProbeRead, KVM_CAPS, PING_TIMEOUT, PROBE_MAX};

/// `POST /peer/v1/cluster/probe`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeRequest {
    /// The run's id: 1 to 32 lower-case hex digits (the probe file's name).
    pub run: String,
}

pub(super) fn check_run(run: &str) -> Result<(), String> {
    let ok = (1..=32).contains(&run.len())
        && run
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then_some(())
        .ok_or_else(|| format!("run {run:?}: expected 1 to 32 hex digits"))
}

pub(super) fn probe_name(run: &str) -> String {
    format!(".vireo-validate-{run}")
}

/// The host-to-host routes of validation.
pub fn peer_router(sup: Arc<Supervisor>, local: Arc<Local>) -> Router {
    Router::new()
        .route("/peer/v1/cluster/probe", post(peer_probe))
        .route("/peer/v1/cluster/ping", get(ping))
        .with_state((sup, local))
}

pub(super) type P = State<(Arc<Supervisor>, Arc<Local>)>;

pub(super) async fn ping(State((_, local)): P) -> Response {
    let node = local.node.get().map(|(n, _)| n.clone());
    Json(serde_json::json!({"node": node, "wall_clock_ms": crate::now_ms()})).into_response()
}

pub(super) async fn peer_probe(State((sup, local)): P, body: axum::body::Bytes) -> Response {
    let err = |s: StatusCode, m: String| (s, Json(serde_json::json!({"error": m}))).into_response();
    let req: ProbeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return err(StatusCode::BAD_REQUEST, format!("probe: {e}")),
    };
    if let Err(m) = check_run(&req.run) {
        return err(StatusCode::BAD_REQUEST, m);
    }
    let Some((node, store)) = local.node.get() else {
        return err(StatusCode::CONFLICT, "not a cluster node".into());
    };
    Json(facts(&sup, node, store, &req.run).await).into_response()
}

/// The version this vireod reports (the `test-hooks` build takes
/// `VIREO_TEST_REPORTED_VERSION` instead, for the mixed-version test).
pub(super) fn version(sup: &Supervisor) -> String {
    #[cfg(feature = "test-hooks")]
    if let Ok(v) = std::env::var("VIREO_TEST_REPORTED_VERSION") {
        return v;
    }
    sup.host_info().version
}

/// This node's facts for run `run`.
pub async fn facts(sup: &Arc<Supervisor>, node: &str, store: &EtcdStore, run: &str) -> NodeFacts {
    let roots = sup.roots();
    let name = probe_name(run);
    let probe = roots
        .paths()
        .iter()
        .zip(roots.dirs())
        .map(|(p, dir)| match read_beneath(dir, &name) {
            Ok(c) => ProbeRead {
                root: p.display().to_string(),
                content: c,
                error: None,
            },
            Err(e) => ProbeRead {
                root: p.display().to_string(),
                content: None,
                error: Some(e.to_string()),
            },
        })
        .collect();
    NodeFacts {
        node: node.to_string(),
        version: version(sup),
        wall_clock_ms: crate::now_ms(),
        kvm: kvm_facts(),
        storage_roots: roots
            .paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        probe,
        cert_not_after_ms: sup.cfg.identity.as_ref().and_then(|i| i.not_after_ms()),
        peers: ping_peers(sup, node, store).await,
    }
}

pub(super) fn kvm_facts() -> KvmFacts {
    match kvm_ioctls::Kvm::new() {
        Ok(kvm) => KvmFacts {
            present: true,
            api_version: Some(kvm.get_api_version()),
            missing_caps: KVM_CAPS
                .iter()
                .filter(|(c, _)| !kvm.check_extension(*c))
                .map(|(_, n)| n.to_string())
                .collect(),
            error: None,
        },
        Err(e) => KvmFacts {
            error: Some(format!("/dev/kvm: {e}")),
            ..Default::default()
        },
    }
}

/// `name` beneath the root `dir`, no link followed: None when absent.
pub(super) fn read_beneath(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<Option<String>> {
    use std::io::Read;
    let c = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: openat on a directory fd we borrow, a NUL-terminated name without '/'.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return match e.kind() {
            std::io::ErrorKind::NotFound => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: a descriptor openat just returned, owned from here on.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut buf = Vec::new();
    file.take(PROBE_MAX as u64).read_to_end(&mut buf)?;
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Writes `content` as a new file `name` beneath `dir` (no link followed, not over an
/// existing file).
pub(super) fn write_beneath(dir: BorrowedFd<'_>, name: &str, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    let c = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: openat on a directory fd we borrow, a NUL-terminated name without '/'.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o644 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor openat just returned, owned from here on.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(content.as_bytes())?;
    file.sync_all()
}

pub(super) fn remove_beneath(dir: BorrowedFd<'_>, name: &str) {
    if let Ok(c) = std::ffi::CString::new(name) {
        // SAFETY: unlinkat of a plain name beneath a directory fd we borrow.
        unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) };
    }
}

/// The peer endpoint of `url` (`https://host:port`) for node `name`.
pub(super) fn endpoint(
    sup: &Supervisor,
    url: &str,
    name: &str,
) -> Result<crate::client::Endpoint, String> {
    let id = sup
        .cfg
        .identity
        .as_ref()
        .ok_or("no host identity (--tls-cert, --tls-key, --tls-ca)")?;
    let tls = id.client_config().map_err(|e| crate::error_chain(&e))?;
    let authority = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("peer URL {url:?}: not https://"))?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string())
        .map_err(|e| format!("node name {name:?}: {e}"))?;
    Ok(crate::client::Endpoint::Https {
        authority: authority.to_string(),
        server_name,
        tls,
    })
}

/// The round trip to each other node's peer listener (URLs from etcd).
pub(super) async fn ping_peers(sup: &Arc<Supervisor>, me: &str, store: &EtcdStore) -> Vec<PeerRtt> {
    let snap = match Snapshot::read(store).await {
        Ok(s) => s,
        Err(e) => {
            return vec![PeerRtt {
                node: "*".into(),
                rtt_ms: None,
                error: Some(format!("cluster store: {e}")),
            }]
        }
    };
    let mut out = Vec::new();
    for (name, (rec, _)) in snap.nodes.iter().filter(|(n, _)| *n != me) {
        let Some(url) = &rec.peer_url else {
            out.push(PeerRtt {
                node: name.clone(),
                rtt_ms: None,
                error: Some("no peer URL (no --listen)".into()),
            });
            continue;
        };
        let r = match endpoint(sup, url, name) {
            Ok(ep) => {
                let t = Instant::now();
                match crate::client::request_to(
                    &ep,
                    "GET",
                    "/peer/v1/cluster/ping",
                    None,
                    PING_TIMEOUT,
                )
                .await
                {
                    Ok(r) if r.ok() => Ok(t.elapsed().as_secs_f64() * 1000.0),
                    Ok(r) => Err(format!("{url}: {} {}", r.status, r.error_message())),
                    Err(e) => Err(format!("{url}: {}", crate::error_chain(&e))),
                }
            }
            Err(e) => Err(e),
        };
        out.push(PeerRtt {
            node: name.clone(),
            rtt_ms: r.as_ref().ok().copied(),
            error: r.err(),
        });
    }
    out
}
