//! Saving clustered VMs (Hyper-V's Save of a clustered role) with a real etcd and two
//! real vireods on loopback sharing a storage directory: a VM saved on node a leaves
//! its state on the shared storage and the cluster's record says saved; when a dies its
//! other VM fails over but the saved one stays saved; started through the cluster it
//! resumes on b where the guest was, the spent state gone; a bulk save has b save its
//! VMs; a discard turns a saved VM off cluster-wide.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, T};
use serde_json::{json, Value};
use vireo_e2e::etcd::EtcdCluster;

fn wait_until(what: &str, mut ok: impl FnMut() -> bool, log: impl Fn() -> String) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < T, "{what} never happened:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The VM's owner as `GET /api/v1/cluster` lists it: a node's name, or why none.
fn owner(d: &Daemon, vm: &str) -> String {
    let v = d.ok("GET", "/api/v1/cluster", None);
    let row = v["vms"]
        .as_array()
        .and_then(|vms| vms.iter().find(|r| r["name"] == vm).cloned())
        .unwrap_or(Value::Null);
    match &row["owner"] {
        Value::Object(o) => o["node"].as_str().unwrap_or_default().to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn define(d: &Daemon, shared: &Path, vm: &str, priority: &str) {
    let disk = shared.join(format!("{vm}.raw"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut cfg = common::counter_config();
    cfg["disks"] = json!([{"path": disk, "format": "raw"}]);
    let file = shared.join(format!("{vm}.json"));
    std::fs::write(&file, cfg.to_string()).unwrap();
    d.ctl_ok(&[
        "vm",
        "define",
        vm,
        "--file",
        file.to_str().unwrap(),
        "--cluster",
        "--priority",
        priority,
        "--preferred-owner",
        "a",
    ]);
}

#[test]
fn a_clustered_vm_saved_on_one_node_stays_saved_through_a_failover_and_resumes_on_another() {
    let etcd = EtcdCluster::start(1);
    let shared = tempfile::tempdir().unwrap();
    let eps = etcd.endpoints_arg();
    let node = |name: &str| {
        common::start_with(&common::loopback_cluster_node_args(
            &eps,
            name,
            shared.path(),
        ))
    };
    let mut a = node("a");
    let b = node("b");
    let logs = |a: &Daemon| format!("--- a ---\n{}\n--- b ---\n{}", a.log(), b.log());
    wait_until(
        "both nodes in the cluster",
        || {
            b.ok("GET", "/api/v1/cluster", None)["nodes"]
                .as_array()
                .map_or(0, Vec::len)
                == 2
        },
        || logs(&a),
    );
    define(&a, shared.path(), "web", "high");
    define(&a, shared.path(), "other", "low");
    wait_until(
        "web and other running on a",
        || {
            ["web", "other"]
                .iter()
                .all(|vm| !a.absent(vm) && a.vm(vm)["state"] == "Running")
        },
        || logs(&a),
    );
    a.wait_serial("web", "tick 10 ", T);

    // Paused first, so that the tick it was saved at is known; then saved on its
    // owner: the state is on the shared storage, the cluster says saved, and a no
    // longer has it.
    a.ctl_ok(&["vm", "pause", "web"]);
    let last = *a.tick_numbers("web").last().unwrap();
    let out = a.ctl_ok(&["-o", "json", "vm", "save", "web"]);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["state"], "Saved", "{out}");
    let state = shared.path().join(".vireo-saved/web/state");
    assert!(state.join("snapshot.json").is_file(), "no saved state");
    assert_eq!(owner(&b, "web"), "saved");
    assert!(a.absent("web"), "a still has web");
    let status = b.ctl_ok(&["cluster", "status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("web") && l.contains("saved")),
        "{status}"
    );

    // a dies (its vireod and VMMs, kill -9): other fails over to b, web stays saved.
    let pid = a.pid("other").unwrap();
    a.kill9();
    // SAFETY: kill on the pid of a VMM this test's vireod started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    common::wait_dead(pid, T);
    wait_until(
        "other running on b",
        || !b.absent("other") && b.vm("other")["state"] == "Running",
        || logs(&a),
    );
    assert_eq!(owner(&b, "web"), "saved");
    assert!(b.absent("web"), "failover started the saved VM");
    assert!(state.join("snapshot.json").is_file());

    // Started through the cluster: it resumes on b where the guest was, under a new
    // fencing token; once it runs the spent state is gone.
    b.ctl_ok(&["vm", "start", "web", "--cluster"]);
    wait_until(
        "web running on b",
        || !b.absent("web") && b.vm("web")["state"] == "Running",
        || logs(&a),
    );
    assert_eq!(owner(&b, "web"), "b");
    b.wait_serial("web", &format!("tick {} ", last + 5), T);
    let ticks = b.tick_numbers("web");
    assert!(
        ticks.first().is_some_and(|&t| t > last && t <= last + 3),
        "web did not resume where it was saved (tick {last}): {ticks:?}"
    );
    wait_until("the spent state removed", || !state.exists(), || logs(&a));

    // A bulk save: b saves other, and the cluster says so.
    b.ctl_ok(&["vm", "save", "--selector", "priority=low"]);
    wait_until(
        "other saved",
        || owner(&b, "other") == "saved" && b.absent("other"),
        || logs(&a),
    );
    assert!(shared
        .path()
        .join(".vireo-saved/other/state/snapshot.json")
        .is_file());
    // Discarded cluster-wide: off, its files gone; discarding again is refused.
    b.ctl_ok(&["vm", "discard-saved-state", "other", "--cluster"]);
    assert_eq!(owner(&b, "other"), "off");
    assert!(!shared.path().join(".vireo-saved/other").exists());
    let (s, body) = b.api("DELETE", "/api/v1/cluster/vms/other/saved-state", None);
    assert_eq!(s, 409, "{body}");
}
