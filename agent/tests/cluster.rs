//! vireod as a cluster node, with a real 3-member etcd and two real vireods sharing a
//! storage directory: clustered VMs defined with vireoctl run on their preferred node
//! with a fencing token on their disks; when that node's vireod and VMMs are killed
//! (kill -9), both VMs run again on the other node, the High one placed first, with
//! newer tokens recorded beside their disks.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::T;
use serde_json::json;
use vireo_e2e::etcd::EtcdCluster;

fn token(disk: &Path) -> u64 {
    let mut name = disk.file_name().unwrap().to_os_string();
    name.push(".fence");
    let text = std::fs::read_to_string(disk.with_file_name(name)).unwrap_or_default();
    text.trim()
        .strip_prefix("token=")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

fn wait_until(
    what: &str,
    timeout: Duration,
    mut ok: impl FnMut() -> bool,
    log: impl Fn() -> String,
) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < timeout,
            "{what} never happened:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn clustered_vms_fail_over_high_first_with_newer_fencing_tokens() {
    let etcd = EtcdCluster::start(3);
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
    wait_until(
        "both nodes in the cluster",
        T,
        || {
            let v = b.ok("GET", "/api/v1/cluster", None);
            v["nodes"].as_array().map_or(0, |n| n.len()) == 2
        },
        || format!("{}\n{}", a.log(), b.log()),
    );

    let mut disks = Vec::new();
    for (vm, prio) in [("hi", "high"), ("lo", "low")] {
        let disk = shared.path().join(format!("{vm}.raw"));
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let mut cfg = common::counter_config();
        cfg["disks"] = json!([{"path": disk, "format": "raw"}]);
        let file = shared.path().join(format!("{vm}.json"));
        std::fs::write(&file, cfg.to_string()).unwrap();
        let out = a.ctl_ok(&[
            "vm",
            "define",
            vm,
            "--file",
            file.to_str().unwrap(),
            "--cluster",
            "--priority",
            prio,
            "--preferred-owner",
            "a",
        ]);
        assert!(out.contains(prio), "{out}");
        disks.push(disk);
    }
    let logs = || {
        format!(
            "--- a ---\n{}\n--- b ---\n{}\n{}",
            a.log(),
            b.log(),
            etcd.logs()
        )
    };
    wait_until(
        "hi and lo running on a",
        T,
        || {
            !a.absent("hi")
                && !a.absent("lo")
                && a.vm("hi")["state"] == "Running"
                && a.vm("lo")["state"] == "Running"
        },
        logs,
    );
    a.wait_serial("hi", "tick 3 ", T);
    let (hi0, lo0) = (token(&disks[0]), token(&disks[1]));
    assert!(
        hi0 > 0 && lo0 > 0,
        "no fencing tokens recorded: {hi0} {lo0}"
    );
    let status = a.ctl_ok(&["cluster", "status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("hi") && l.contains("high") && l.contains(" a ")),
        "{status}"
    );
    assert!(b.absent("hi") && b.absent("lo"));

    // Node a dies: its vireod and its VMMs, kill -9.
    let pids = [a.pid("hi").unwrap(), a.pid("lo").unwrap()];
    a.kill9();
    for pid in pids {
        // SAFETY: kill on pids of VMMs this test's vireod started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        common::wait_dead(pid, T);
    }

    wait_until(
        "hi and lo running on b",
        T,
        || {
            !b.absent("hi")
                && !b.absent("lo")
                && b.vm("hi")["state"] == "Running"
                && b.vm("lo")["state"] == "Running"
        },
        || format!("--- b ---\n{}", b.log()),
    );
    b.wait_serial("hi", "tick 3 ", T);
    let (hi1, lo1) = (token(&disks[0]), token(&disks[1]));
    assert!(
        hi1 > hi0 && lo1 > lo0,
        "tokens did not grow: hi {hi0}->{hi1}, lo {lo0}->{lo1}"
    );
    // High first: the controller placed hi before lo (tokens are store revisions).
    assert!(hi1 < lo1, "lo was placed before hi: {hi1} vs {lo1}");
    let status = b.ctl_ok(&["cluster", "status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("hi") && l.contains(" b ")),
        "{status}"
    );
    assert!(
        !status.lines().any(|l| l.starts_with("a ")),
        "a still listed: {status}"
    );
}

/// How often a vireod's `log` says it started clustered VM `vm`.
fn starts(log: &str, vm: &str) -> usize {
    let quoted = format!("\"{vm}\"");
    log.lines()
        .filter(|l| l.contains("clustered VM started") && l.contains(&quoted))
        .count()
}

/// A node that takes over two VMs starts them one after the other. The first one's
/// VMM is created with the node's fencing deadline of that moment (at most TTL −
/// margin ahead); it must get the renewals that follow while the second VM still
/// starts, however long that takes, or it refuses its guest's writes, pauses and is
/// restarted (its guest's state lost). Here lo's VMM on b waits at a gate until hi's
/// first deadline has passed.
#[test]
fn a_vm_started_beside_a_slow_start_keeps_its_write_lease() {
    let etcd = EtcdCluster::start(3);
    let shared = tempfile::tempdir().unwrap();
    let eps = etcd.endpoints_arg();
    // b's VMMs: lo's waits for the gate file before it runs.
    let gate = shared.path().join("gate");
    let wrapper = shared.path().join("vireo-gated");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$*\" in */vms/lo.json*) while [ ! -e '{}' ]; do sleep 0.05; done;; esac\nexec '{}' \"$@\"\n",
            gate.display(),
            common::bin("vireo").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let node = |name: &str, vmm: Option<&Path>| {
        let mut args = common::loopback_cluster_node_args(&eps, name, shared.path());
        if let Some(v) = vmm {
            args.extend(["--vireo-bin".to_string(), v.display().to_string()]);
        }
        common::start_with(&args)
    };
    let mut a = node("a", None);
    let b = node("b", Some(&wrapper));
    wait_until(
        "both nodes in the cluster",
        T,
        || {
            let v = b.ok("GET", "/api/v1/cluster", None);
            v["nodes"].as_array().map_or(0, |n| n.len()) == 2
        },
        || format!("{}\n{}", a.log(), b.log()),
    );
    for (vm, prio) in [("hi", "high"), ("lo", "low")] {
        let file = shared.path().join(format!("{vm}.json"));
        std::fs::write(&file, common::counter_config().to_string()).unwrap();
        a.ctl_ok(&[
            "vm",
            "define",
            vm,
            "--file",
            file.to_str().unwrap(),
            "--cluster",
            "--priority",
            prio,
            "--preferred-owner",
            "a",
        ]);
    }
    let logs = || format!("--- a ---\n{}\n--- b ---\n{}", a.log(), b.log());
    wait_until(
        "hi and lo running on a",
        T,
        || {
            !a.absent("hi")
                && !a.absent("lo")
                && a.vm("hi")["state"] == "Running"
                && a.vm("lo")["state"] == "Running"
        },
        logs,
    );
    let pids = [a.pid("hi").unwrap(), a.pid("lo").unwrap()];
    a.kill9();
    for pid in pids {
        // SAFETY: kill on pids of VMMs this test's vireod started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        common::wait_dead(pid, T);
    }

    // b starts hi, then lo, whose VMM waits at the gate.
    let b_log = || format!("--- b ---\n{}", b.log());
    wait_until(
        "hi running on b",
        T,
        || !b.absent("hi") && b.vm("hi")["state"] == "Running",
        b_log,
    );
    let hi_pid = b.pid("hi").unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.run_dir.join("vms/hi.json")).unwrap()).unwrap();
    let first_deadline = config["write_lease"]["deadline_monotonic_ns"]
        .as_u64()
        .expect("hi's VMM was created with a write lease");
    // Past the deadline hi's VMM was created with, lo still at the gate.
    while vireo_e2e::seqdisk::monotonic_ns() < first_deadline + 500_000_000 {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!b.absent("lo") && b.vm("lo")["state"] == "Starting");
    let (_, info) = common::http(
        &b.run_dir.join("vms/hi/api.sock"),
        "GET",
        "/api/v1/vm.info",
        None,
    );
    assert!(
        info.contains("\"Running\""),
        "hi's VMM got no renewal while lo started, its first write lease expired: {info}\n{}",
        b_log()
    );
    let last_tick = b.tick_numbers("hi").last().copied().unwrap_or(0);
    b.wait_serial("hi", &format!("tick {} ", last_tick + 3), T);

    // lo starts; hi ran on all along, started once.
    std::fs::write(&gate, "").unwrap();
    wait_until(
        "lo running on b",
        T,
        || b.vm("lo")["state"] == "Running",
        b_log,
    );
    assert_eq!(b.pid("hi"), Some(hi_pid), "hi was restarted:\n{}", b_log());
    assert_eq!(starts(&b.log(), "hi"), 1, "{}", b_log());
}

/// A VMM that takes no renewal (stopped: its socket accepts, nothing answers) holds
/// up only its own: the other VMs of the node keep their write leases. (The renewals
/// went to the VMMs one after another, each waiting up to a second for an answer, so
/// a VMM behind a silent one got each renewal a second late and its lease ran out:
/// killed and started again, its guest's state lost. A VMM receiving a migration on
/// a loaded host is such a silent one: the drains of `cluster_hosts` lost VMs so.)
#[test]
fn a_vmm_that_does_not_answer_holds_up_no_other_vms_renewals() {
    let etcd = EtcdCluster::start(3);
    let shared = tempfile::tempdir().unwrap();
    let args = common::loopback_cluster_node_args(&etcd.endpoints_arg(), "a", shared.path());
    let a = common::start_with(&args);
    // "aa" is renewed before "zz" in name order.
    for (vm, prio) in [("aa", "high"), ("zz", "low")] {
        let file = shared.path().join(format!("{vm}.json"));
        std::fs::write(&file, common::counter_config().to_string()).unwrap();
        a.ctl_ok(&[
            "vm",
            "define",
            vm,
            "--file",
            file.to_str().unwrap(),
            "--cluster",
            "--priority",
            prio,
        ]);
    }
    let logs = || format!("--- a ---\n{}", a.log());
    wait_until(
        "aa and zz running",
        T,
        || {
            ["aa", "zz"]
                .iter()
                .all(|vm| !a.absent(vm) && a.vm(vm)["state"] == "Running")
        },
        logs,
    );
    let silent = a.pid("aa").unwrap();
    let zz = a.pid("zz").unwrap();
    // SAFETY: signals to a VMM this test's vireod started.
    unsafe { libc::kill(silent, libc::SIGSTOP) };
    common::wait_stopped(silent, T);
    // Six renewals later (three fencing windows), zz has taken every one.
    let renewals = |log: &str| log.matches("lease renewed").count();
    let from = renewals(&a.log());
    wait_until(
        "six more renewals",
        T,
        || renewals(&a.log()) >= from + 6,
        logs,
    );
    let (_, info) = common::http(
        &a.run_dir.join("vms/zz/api.sock"),
        "GET",
        "/api/v1/vm.info",
        None,
    );
    // SAFETY: as above.
    unsafe { libc::kill(silent, libc::SIGCONT) };
    assert!(
        info.contains("\"Running\"") && a.pid("zz") == Some(zz),
        "zz's write lease ran out behind the silent VMM: {info}\n{}",
        logs()
    );
    assert!(
        !a.log()
            .lines()
            .any(|l| l.contains("write lease expired") && l.contains("\"zz\"")),
        "{}",
        logs()
    );
    assert_eq!(starts(&a.log(), "zz"), 1, "{}", logs());
}
