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
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cluster::failover::Snapshot;
use cluster::EtcdStore;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::cluster_node::ClusterNode;

mod checks;
mod cpu;
mod html;
mod probe;

pub use checks::n_plus_one;
use checks::*;
pub use html::html;
use probe::*;
pub use probe::{facts, peer_router, ProbeRequest};

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
