//! `vireoctl cluster validate`: a report of whether the cluster can do what it is
//! for, pass/warn/fail per check and node (JSON, and an HTML page for people).
//!
//! The vireod asked is the coordinator. It reads the cluster from etcd, writes a probe
//! file (`.vireo-validate-RUN`, random content) into each of its own storage roots,
//! and asks every node's vireod — itself directly, the others over the vireod-to-vireod
//! mutual-TLS listener (`POST /peer/v1/cluster/probe`) — for its facts: version, KVM
//! and the capabilities the VMM needs, storage roots and what each holds under the
//! probe's name (read beneath the root's descriptor, no link followed, at most 256
//! bytes), its certificate's expiry, its wall clock, and the round trip from it to
//! each other node's peer listener (`GET /peer/v1/cluster/ping`; the URLs it takes
//! from etcd, never from the request). The coordinator then removes its probe files.
//! Clock skew is the node's clock against the midpoint of the coordinator's request.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cluster::failover::Snapshot;
use cluster::keys::Priority;
use cluster::placement::{self, Decision, NodeView, Reason, VmView};
use cluster::EtcdStore;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::cluster_node::ClusterNode;

mod cpu;
use crate::supervisor::Supervisor;

/// Clock skew against the coordinator: warn above, fail above.
pub const SKEW_WARN_MS: f64 = 100.0;
pub const SKEW_FAIL_MS: f64 = 1000.0;
/// A certificate expiring within this is a warning.
pub const CERT_WARN_DAYS: u64 = 30;
/// How long one node's probe may take (it pings the others, each up to PING_TIMEOUT).
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// A probe file is read up to this many bytes.
const PROBE_MAX: usize = 256;
/// The KVM capabilities the VMM refuses to start without (vmm/src/kvm.rs).
const KVM_CAPS: [(kvm_ioctls::Cap, &str); 4] = [
    (kvm_ioctls::Cap::SplitIrqchip, "SPLIT_IRQCHIP"),
    (kvm_ioctls::Cap::Ioeventfd, "IOEVENTFD"),
    (kvm_ioctls::Cap::SignalMsi, "SIGNAL_MSI"),
    (kvm_ioctls::Cap::UserMemory, "USER_MEMORY"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// One check's verdict, for one node or the cluster (`node` None).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub check: String,
    pub node: Option<String>,
    pub status: Status,
    pub detail: String,
}

/// The report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub coordinator: String,
    pub generated_ms: u64,
    /// The worst status of any check.
    pub status: Status,
    pub checks: Vec<Check>,
    /// Every node's facts as it reported them (or why it could not be asked).
    pub nodes: BTreeMap<String, Result<NodeFacts, String>>,
    pub etcd: Vec<cluster::etcd::MemberHealth>,
}

/// What a node's vireod says of itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeFacts {
    pub node: String,
    pub version: String,
    pub wall_clock_ms: u64,
    pub kvm: KvmFacts,
    pub storage_roots: Vec<String>,
    /// What each root holds under the probe's name.
    pub probe: Vec<ProbeRead>,
    /// Its host certificate's expiry (ms since the epoch), if it has one.
    pub cert_not_after_ms: Option<u64>,
    pub peers: Vec<PeerRtt>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KvmFacts {
    pub present: bool,
    pub api_version: Option<i32>,
    pub missing_caps: Vec<String>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeRead {
    pub root: String,
    pub content: Option<String>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerRtt {
    pub node: String,
    pub rtt_ms: Option<f64>,
    pub error: Option<String>,
}

/// What the peer routes need of the cluster (set once the node joined).
#[derive(Default)]
pub struct Local {
    node: OnceLock<(String, EtcdStore)>,
}

impl Local {
    pub fn set(&self, node: &str, store: EtcdStore) {
        let _ = self.node.set((node.to_string(), store));
    }
}

/// `POST /peer/v1/cluster/probe`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeRequest {
    /// The run's id: 1 to 32 lower-case hex digits (the probe file's name).
    pub run: String,
}

fn check_run(run: &str) -> Result<(), String> {
    let ok = (1..=32).contains(&run.len())
        && run
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then_some(())
        .ok_or_else(|| format!("run {run:?}: expected 1 to 32 hex digits"))
}

fn probe_name(run: &str) -> String {
    format!(".vireo-validate-{run}")
}

/// The host-to-host routes of validation.
pub fn peer_router(sup: Arc<Supervisor>, local: Arc<Local>) -> Router {
    Router::new()
        .route("/peer/v1/cluster/probe", post(peer_probe))
        .route("/peer/v1/cluster/ping", get(ping))
        .with_state((sup, local))
}

type P = State<(Arc<Supervisor>, Arc<Local>)>;

async fn ping(State((_, local)): P) -> Response {
    let node = local.node.get().map(|(n, _)| n.clone());
    Json(serde_json::json!({"node": node, "wall_clock_ms": crate::now_ms()})).into_response()
}

async fn peer_probe(State((sup, local)): P, body: axum::body::Bytes) -> Response {
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
fn version(sup: &Supervisor) -> String {
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

fn kvm_facts() -> KvmFacts {
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
fn read_beneath(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<Option<String>> {
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
fn write_beneath(dir: BorrowedFd<'_>, name: &str, content: &str) -> std::io::Result<()> {
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

fn remove_beneath(dir: BorrowedFd<'_>, name: &str) {
    if let Ok(c) = std::ffi::CString::new(name) {
        // SAFETY: unlinkat of a plain name beneath a directory fd we borrow.
        unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) };
    }
}

/// The peer endpoint of `url` (`https://host:port`) for node `name`.
fn endpoint(sup: &Supervisor, url: &str, name: &str) -> Result<crate::client::Endpoint, String> {
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
async fn ping_peers(sup: &Arc<Supervisor>, me: &str, store: &EtcdStore) -> Vec<PeerRtt> {
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

/// Runs the validation from this node (see the module doc).
pub async fn validate(node: &ClusterNode) -> Result<Report, String> {
    let sup = &node.sup;
    let snap = Snapshot::read(&node.store)
        .await
        .map_err(|e| format!("cluster store: {e}"))?;
    let run = format!("{:x}{:x}", crate::now_ms(), std::process::id());
    let content = format!("vireo validation {run} written by {}\n", node.node);
    let roots = sup.roots();
    let mut written = BTreeSet::new();
    for (p, dir) in roots.paths().iter().zip(roots.dirs()) {
        match write_beneath(dir, &probe_name(&run), &content) {
            Ok(()) => {
                written.insert(p.display().to_string());
            }
            Err(e) => {
                warn!(root = %p.display(), error = %e, "validation: cannot write the probe file")
            }
        }
    }
    let mut nodes: BTreeMap<String, Result<NodeFacts, String>> = BTreeMap::new();
    let mut skew: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (name, (rec, _)) in &snap.nodes {
        if *name == node.node {
            nodes.insert(name.clone(), Ok(facts(sup, name, &node.store, &run).await));
            skew.insert(name.clone(), (0.0, 0.0));
            continue;
        }
        let r = async {
            let url = rec.peer_url.as_ref().ok_or("no peer URL (no --listen)")?;
            let ep = endpoint(sup, url, name)?;
            let body = serde_json::json!({"run": run}).to_string().into_bytes();
            let sent = crate::now_ms() as f64;
            let t = Instant::now();
            let r = crate::client::request_to(
                &ep,
                "POST",
                "/peer/v1/cluster/probe",
                Some(body),
                PROBE_TIMEOUT,
            )
            .await
            .map_err(|e| format!("{url}: {}", crate::error_chain(&e)))?;
            let rtt = t.elapsed().as_secs_f64() * 1000.0;
            if !r.ok() {
                return Err(format!("{url}: {} {}", r.status, r.error_message()));
            }
            let f: NodeFacts =
                serde_json::from_slice(&r.body).map_err(|e| format!("{url}: {e}"))?;
            Ok::<_, String>((f, sent + rtt / 2.0, rtt))
        }
        .await;
        match r {
            Ok((f, mid, rtt)) => {
                skew.insert(name.clone(), (f.wall_clock_ms as f64 - mid, rtt / 2.0));
                nodes.insert(name.clone(), Ok(f));
            }
            Err(e) => {
                nodes.insert(name.clone(), Err(e));
            }
        }
    }
    for (p, dir) in roots.paths().iter().zip(roots.dirs()) {
        if written.contains(&p.display().to_string()) {
            remove_beneath(dir, &probe_name(&run));
        }
    }
    let etcd = node.store.health().await;
    let mut checks = Vec::new();
    checks.extend(reachability(&nodes));
    checks.extend(kvm_checks(&nodes));
    checks.extend(version_checks(&nodes));
    checks.extend(cpu::feature_checks(&snap));
    checks.extend(cpu::fingerprint_checks(&snap));
    checks.extend(cpu::compatibility_checks(&snap));
    checks.extend(storage_checks(&node.node, &nodes, &written, &content));
    checks.extend(skew_checks(&skew));
    checks.extend(cert_checks(&nodes, crate::now_ms()));
    checks.push(etcd_check(&etcd));
    checks.push(n_plus_one(&snap));
    let status = checks
        .iter()
        .map(|c| c.status)
        .max()
        .unwrap_or(Status::Pass);
    Ok(Report {
        coordinator: node.node.clone(),
        generated_ms: crate::now_ms(),
        status,
        checks,
        nodes,
        etcd,
    })
}

fn check(check: &str, node: Option<&str>, status: Status, detail: String) -> Check {
    Check {
        check: check.into(),
        node: node.map(str::to_string),
        status,
        detail,
    }
}

fn answered(
    nodes: &BTreeMap<String, Result<NodeFacts, String>>,
) -> impl Iterator<Item = (&String, &NodeFacts)> {
    nodes
        .iter()
        .filter_map(|(n, f)| f.as_ref().ok().map(|f| (n, f)))
}

/// Each node answered the coordinator; each reached every other node's listener.
fn reachability(nodes: &BTreeMap<String, Result<NodeFacts, String>>) -> Vec<Check> {
    let mut out = Vec::new();
    for (n, f) in nodes {
        match f {
            Err(e) => out.push(check(
                "reachability",
                Some(n),
                Status::Fail,
                format!("the coordinator cannot ask {n}: {e}"),
            )),
            Ok(f) => {
                let failed: Vec<String> = f
                    .peers
                    .iter()
                    .filter_map(|p| p.error.as_ref().map(|e| format!("{} ({e})", p.node)))
                    .collect();
                let rtts: Vec<String> = f
                    .peers
                    .iter()
                    .filter_map(|p| p.rtt_ms.map(|r| format!("{} {r:.1} ms", p.node)))
                    .collect();
                if failed.is_empty() {
                    out.push(check(
                        "reachability",
                        Some(n),
                        Status::Pass,
                        format!("reaches every peer listener: {}", rtts.join(", ")),
                    ));
                } else {
                    out.push(check(
                        "reachability",
                        Some(n),
                        Status::Fail,
                        format!("{n} cannot reach {}", failed.join(", ")),
                    ));
                }
            }
        }
    }
    out
}

fn kvm_checks(nodes: &BTreeMap<String, Result<NodeFacts, String>>) -> Vec<Check> {
    answered(nodes)
        .map(|(n, f)| {
            let k = &f.kvm;
            if !k.present {
                check(
                    "kvm",
                    Some(n),
                    Status::Fail,
                    k.error.clone().unwrap_or_else(|| "no KVM".into()),
                )
            } else if k.api_version != Some(12) {
                check(
                    "kvm",
                    Some(n),
                    Status::Fail,
                    format!("KVM API version {:?}, vireo needs 12", k.api_version),
                )
            } else if !k.missing_caps.is_empty() {
                check(
                    "kvm",
                    Some(n),
                    Status::Fail,
                    format!("KVM lacks {}", k.missing_caps.join(", ")),
                )
            } else {
                check(
                    "kvm",
                    Some(n),
                    Status::Pass,
                    format!("KVM API 12 with {}", KVM_CAPS.map(|(_, n)| n).join(", ")),
                )
            }
        })
        .collect()
}

fn version_checks(nodes: &BTreeMap<String, Result<NodeFacts, String>>) -> Vec<Check> {
    let mut by: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (n, f) in answered(nodes) {
        by.entry(&f.version).or_default().push(n);
    }
    if by.len() <= 1 {
        let v = by.keys().next().copied().unwrap_or("?");
        return vec![check(
            "version",
            None,
            Status::Pass,
            format!("every node runs vireo {v}"),
        )];
    }
    // The version most nodes run is the reference; the others fail, naming both.
    let (common, _) = by
        .iter()
        .max_by_key(|(v, ns)| (ns.len(), std::cmp::Reverse(**v)))
        .map(|(v, ns)| (*v, ns.clone()))
        .unwrap_or(("?", vec![]));
    let mut out = Vec::new();
    for (v, ns) in &by {
        for n in ns {
            if *v == common {
                out.push(check(
                    "version",
                    Some(n),
                    Status::Pass,
                    format!("vireo {v}"),
                ));
            } else {
                out.push(check(
                    "version",
                    Some(n),
                    Status::Fail,
                    format!("{n} runs vireo {v}, the others {common}"),
                ));
            }
        }
    }
    out
}

fn storage_checks(
    me: &str,
    nodes: &BTreeMap<String, Result<NodeFacts, String>>,
    written: &BTreeSet<String>,
    content: &str,
) -> Vec<Check> {
    // The cluster's roots: those most nodes have. A node lacking one fails; a root
    // only a few nodes have is theirs alone (VMs stored there cannot move): a warning.
    let answered_n = answered(nodes).count();
    let mut count: BTreeMap<&String, usize> = BTreeMap::new();
    for (_, f) in answered(nodes) {
        for r in &f.storage_roots {
            *count.entry(r).or_default() += 1;
        }
    }
    let cluster: BTreeSet<&String> = count
        .iter()
        .filter(|(_, c)| **c * 2 > answered_n)
        .map(|(r, _)| *r)
        .collect();
    let mut out = Vec::new();
    for (n, f) in answered(nodes) {
        let mine: BTreeSet<&String> = f.storage_roots.iter().collect();
        let missing: Vec<&str> = cluster.difference(&mine).map(|r| r.as_str()).collect();
        let own: Vec<&str> = mine.difference(&cluster).map(|r| r.as_str()).collect();
        if !missing.is_empty() {
            out.push(check(
                "storage-roots",
                Some(n),
                Status::Fail,
                format!(
                    "{n} has no storage root {} (the other nodes have)",
                    missing.join(", ")
                ),
            ));
        } else if !own.is_empty() {
            out.push(check(
                "storage-roots",
                Some(n),
                Status::Warn,
                format!(
                    "{n} alone has {}: VMs stored there cannot move",
                    own.join(", ")
                ),
            ));
        } else {
            out.push(check(
                "storage-roots",
                Some(n),
                Status::Pass,
                format!("the cluster's roots: {}", f.storage_roots.join(", ")),
            ));
        }
        let mut bad = Vec::new();
        for root in written {
            match f.probe.iter().find(|p| p.root == *root) {
                None => bad.push(format!("{root}: not a storage root of {n}")),
                Some(p) => match (&p.content, &p.error) {
                    (Some(c), _) if c == content => {}
                    (Some(_), _) => {
                        bad.push(format!("{root}: the probe file holds other content on {n}"))
                    }
                    (None, Some(e)) => bad.push(format!("{root}: {e}")),
                    (None, None) => bad.push(format!(
                        "{root}: {me}'s probe file is not there on {n} (not the same storage)"
                    )),
                },
            }
        }
        if bad.is_empty() {
            out.push(check(
                "shared-storage",
                Some(n),
                Status::Pass,
                format!("read {me}'s probe file back from every root"),
            ));
        } else {
            out.push(check(
                "shared-storage",
                Some(n),
                Status::Fail,
                bad.join("; "),
            ));
        }
    }
    out
}

fn skew_checks(skew: &BTreeMap<String, (f64, f64)>) -> Vec<Check> {
    skew.iter()
        .map(|(n, (s, bound))| {
            let detail = format!("{s:+.0} ms against the coordinator (± {bound:.0} ms)");
            let status = if s.abs() - bound > SKEW_FAIL_MS {
                Status::Fail
            } else if s.abs() - bound > SKEW_WARN_MS {
                Status::Warn
            } else {
                Status::Pass
            };
            check("clock-skew", Some(n), status, detail)
        })
        .collect()
}

fn cert_checks(nodes: &BTreeMap<String, Result<NodeFacts, String>>, now_ms: u64) -> Vec<Check> {
    answered(nodes)
        .map(|(n, f)| match f.cert_not_after_ms {
            None => check(
                "certificate",
                Some(n),
                Status::Warn,
                "no host certificate".into(),
            ),
            Some(t) if t <= now_ms => check(
                "certificate",
                Some(n),
                Status::Fail,
                format!(
                    "{n}'s certificate expired {} days ago",
                    (now_ms - t) / 86_400_000
                ),
            ),
            Some(t) => {
                let days = (t - now_ms) / 86_400_000;
                let status = if days < CERT_WARN_DAYS {
                    Status::Warn
                } else {
                    Status::Pass
                };
                check(
                    "certificate",
                    Some(n),
                    status,
                    format!("expires in {days} days"),
                )
            }
        })
        .collect()
}

fn etcd_check(members: &[cluster::etcd::MemberHealth]) -> Check {
    let healthy: Vec<&cluster::etcd::MemberHealth> = members
        .iter()
        .filter(|m| m.error.is_none() && m.leader.is_some_and(|l| l != 0))
        .collect();
    let leaders: BTreeSet<u64> = healthy.iter().filter_map(|m| m.leader).collect();
    let quorum = members.len() / 2 + 1;
    let down: Vec<String> = members
        .iter()
        .filter(|m| !healthy.iter().any(|h| h.endpoint == m.endpoint))
        .map(|m| {
            format!(
                "{} ({})",
                m.endpoint,
                m.error.clone().unwrap_or_else(|| "no leader".into())
            )
        })
        .collect();
    let (status, detail) = if healthy.len() < quorum {
        (
            Status::Fail,
            format!(
                "{} of {} members healthy: no quorum; down: {}",
                healthy.len(),
                members.len(),
                down.join(", ")
            ),
        )
    } else if leaders.len() > 1 {
        (
            Status::Fail,
            format!("members name different leaders: {leaders:x?}"),
        )
    } else if !down.is_empty() {
        (
            Status::Warn,
            format!(
                "quorum holds ({} of {}), but down: {}",
                healthy.len(),
                members.len(),
                down.join(", ")
            ),
        )
    } else {
        (
            Status::Pass,
            format!(
                "{} members healthy, one leader ({:x})",
                members.len(),
                leaders.first().copied().unwrap_or(0)
            ),
        )
    };
    check("etcd", None, status, detail)
}

/// The cluster loses its largest node: can every VM that should run (all but No Auto
/// Start) be placed on the others (placement without preemption)?
pub fn n_plus_one(snap: &Snapshot) -> Check {
    let Some((largest, _)) = snap.nodes.iter().max_by_key(|(n, (r, _))| {
        (
            r.capacity.memory_mib,
            r.capacity.vcpus,
            std::cmp::Reverse(n.as_str()),
        )
    }) else {
        return check("n+1", None, Status::Fail, "no node".into());
    };
    let rest: Vec<NodeView> = snap
        .nodes
        .iter()
        .filter(|(n, _)| *n != largest)
        .map(|(n, (r, _))| NodeView {
            name: n.clone(),
            state: cluster::keys::NodeState::Up,
            capacity: r.capacity,
            running: vec![],
        })
        .collect();
    let vms: Vec<(VmView, Reason)> = snap
        .vms
        .values()
        .filter(|d| d.priority != Priority::NoAutoStart)
        .map(|d| {
            (
                VmView {
                    name: d.name.clone(),
                    priority: d.priority,
                    needs: d.needs,
                    preferred_owners: d.preferred_owners.clone(),
                    possible_owners: d.possible_owners.clone(),
                    anti_affinity: d.anti_affinity.clone(),
                },
                Reason::Start,
            )
        })
        .collect();
    let unplaced: Vec<String> = placement::plan_without_preemption(&rest, &vms)
        .into_iter()
        .filter_map(|d| match d {
            Decision::Place { .. } => None,
            Decision::Wait { vm } | Decision::StayOff { vm } | Decision::Preempt { vm, .. } => {
                Some(vm)
            }
        })
        .collect();
    if unplaced.is_empty() {
        check(
            "n+1",
            None,
            Status::Pass,
            format!(
                "without {largest} (the largest node) the others hold all {} auto-start VMs",
                vms.len()
            ),
        )
    } else {
        check(
            "n+1",
            None,
            Status::Fail,
            format!(
                "without {largest} (the largest node) no place for {}",
                unplaced.join(", ")
            ),
        )
    }
}

/// The report as a page a person reads: every value escaped.
pub fn html(r: &Report) -> String {
    fn esc(s: &str) -> String {
        s.chars()
            .map(|c| match c {
                '&' => "&amp;".into(),
                '<' => "&lt;".into(),
                '>' => "&gt;".into(),
                '"' => "&quot;".into(),
                '\'' => "&#39;".into(),
                c => c.to_string(),
            })
            .collect()
    }
    let word = |s: Status| match s {
        Status::Pass => "pass",
        Status::Warn => "warn",
        Status::Fail => "fail",
    };
    let mut h = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Vireo cluster validation</title>\n<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}.pass{background:#dfd}.warn{background:#ffd}.fail{background:#fdd}</style></head><body>\n",
    );
    h += &format!(
        "<h1>Vireo cluster validation: <span class=\"{0}\">{0}</span></h1>\n<p>Coordinator {1}, generated at {2} ms since the epoch.</p>\n",
        word(r.status),
        esc(&r.coordinator),
        r.generated_ms
    );
    h += "<table><tr><th>Check</th><th>Node</th><th>Result</th><th>Detail</th></tr>\n";
    for c in &r.checks {
        h += &format!(
            "<tr class=\"{0}\"><td>{1}</td><td>{2}</td><td>{0}</td><td>{3}</td></tr>\n",
            word(c.status),
            esc(&c.check),
            esc(c.node.as_deref().unwrap_or("cluster")),
            esc(&c.detail)
        );
    }
    h += "</table>\n</body></html>\n";
    h
}

/// `GET /api/v1/cluster/validate` (operators: it writes probe files).
pub async fn route(State(node): State<Option<Arc<ClusterNode>>>) -> Response {
    let Some(node) = node else {
        return (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"error": "this vireod is not a cluster node"})),
        )
            .into_response();
    };
    match validate(&node).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"error": e})),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_escapes_what_nodes_report() {
        let r = Report {
            coordinator: "a".into(),
            generated_ms: 1,
            status: Status::Fail,
            checks: vec![check(
                "version",
                Some("<b>"),
                Status::Fail,
                "runs \"<script>alert(1)</script>\" & more".into(),
            )],
            nodes: BTreeMap::new(),
            etcd: vec![],
        };
        let h = html(&r);
        assert!(!h.contains("<script>") && !h.contains("<b>"), "{h}");
        assert!(h.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(h.contains("&quot;") && h.contains("&amp; more") && h.contains("<td>fail</td>"));
    }

    #[test]
    fn run_ids_are_hex_only() {
        assert!(check_run("17a9f").is_ok());
        for bad in ["", "../x", "ABC", "x".repeat(33).as_str(), "a/b", "1 2"] {
            assert!(check_run(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn skew_thresholds_allow_for_the_round_trip() {
        let s = |ms: f64, bound: f64| {
            skew_checks(&BTreeMap::from([("n".to_string(), (ms, bound))]))[0].status
        };
        assert_eq!(s(50.0, 0.0), Status::Pass);
        assert_eq!(s(-150.0, 0.0), Status::Warn);
        assert_eq!(s(150.0, 60.0), Status::Pass);
        assert_eq!(s(1500.0, 10.0), Status::Fail);
    }

    #[test]
    fn a_different_version_fails_naming_both() {
        let f = |v: &str| {
            Ok(NodeFacts {
                node: String::new(),
                version: v.into(),
                wall_clock_ms: 0,
                kvm: KvmFacts::default(),
                storage_roots: vec![],
                probe: vec![],
                cert_not_after_ms: None,
                peers: vec![],
            })
        };
        let nodes = BTreeMap::from([
            ("a".to_string(), f("1.0")),
            ("b".to_string(), f("1.0")),
            ("c".to_string(), f("2.0")),
        ]);
        let c = version_checks(&nodes);
        let bad: Vec<&Check> = c.iter().filter(|c| c.status == Status::Fail).collect();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].detail, "c runs vireo 2.0, the others 1.0");
    }

    #[test]
    fn probe_files_are_read_beneath_the_root_without_links() {
        let d = tempfile::tempdir().unwrap();
        let dir = std::fs::File::open(d.path()).unwrap();
        let fd = std::os::fd::AsFd::as_fd(&dir);
        assert_eq!(read_beneath(fd, ".vireo-validate-1").unwrap(), None);
        write_beneath(fd, ".vireo-validate-1", "x").unwrap();
        assert!(
            write_beneath(fd, ".vireo-validate-1", "y").is_err(),
            "not over an existing file"
        );
        assert_eq!(
            read_beneath(fd, ".vireo-validate-1").unwrap().as_deref(),
            Some("x")
        );
        std::os::unix::fs::symlink("/etc/hostname", d.path().join(".vireo-validate-2")).unwrap();
        assert!(
            read_beneath(fd, ".vireo-validate-2").is_err(),
            "a link is not followed"
        );
        remove_beneath(fd, ".vireo-validate-1");
        assert!(!d.path().join(".vireo-validate-1").exists());
    }
}
