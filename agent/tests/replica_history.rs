//! Recovery history, test failover and a deleted VM's replication, end to end: a
//! primary vireod (host-a) runs a real jailed VMM whose test guest writes seeded
//! blocks to two raw disks and replicates it every second, keeping 5 points, to a
//! replica vireod (host-b) over mutual TLS on the loopback.
//!
//! - the replica lists its kept points (never more than 5, the oldest dropped);
//! - a test failover starts `vm1-test` from the oldest kept point on throw-away
//!   copies: its guest reads that point's data (`rw resume n=M`, M read from the
//!   copy before the start) while new points keep arriving; `--stop` removes it all;
//! - a failover to an older kept point (not the latest) gives that point's bytes:
//!   equal byte for byte to the primary's disks frozen at it, not the later ones;
//! - with `--history-spacing`, kept points other than the latest are that far apart
//!   and the oldest, rebuilt through merged undo data, is the guest's disks at a cut;
//! - deleting the primary's VM stops its replication loop.

use crate::common;

use std::path::Path;

use common::pki::{host_daemon, tls_args, Pki};
use common::writer::{prefix_of, start_writer_vm};
use common::{Daemon, T};
use serde_json::{json, Value};

/// More iterations than the guest writes in this test.
const MAX_ITERATION: u64 = 1 << 24;

/// The replica's kept points (none before the primary declared the VM).
fn points(b: &Daemon) -> Vec<u64> {
    let (s, body) = b.api("GET", "/api/v1/replicas/vm1/points", None);
    if s == 404 {
        return Vec::new();
    }
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["cut_id"].as_u64().unwrap())
        .collect()
}

/// Waits until the replica's kept points satisfy `done`.
fn wait_points(b: &Daemon, what: &str, done: impl Fn(&[u64]) -> bool) -> Vec<u64> {
    let start = std::time::Instant::now();
    loop {
        let p = points(b);
        assert!(p.len() <= 5, "more points than kept: {p:?}");
        assert!(p.windows(2).all(|w| w[0] < w[1]), "{p:?}");
        if done(&p) {
            return p;
        }
        assert!(start.elapsed() < T * 3, "{what}: {p:?}\n{}", b.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn replication(a: &Daemon) -> Value {
    a.ok("GET", "/api/v1/vms/vm1/replication", None)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// A replica server (host-b, replicas in a directory of their own, host-a allowed)
/// and a primary (host-a, no autostart), both on mutual TLS.
struct Hosts {
    // Dropped last: the daemons first.
    a: Daemon,
    b: Daemon,
    addr: String,
    replicas: std::path::PathBuf,
    _store: tempfile::TempDir,
    _pki: Pki,
}

impl Hosts {
    fn start() -> Self {
        let pki = Pki::new();
        let store = tempfile::Builder::new()
            .prefix("replicas")
            .tempdir()
            .unwrap();
        let replicas = store.path().join("replicas");
        let (b, addr) = host_daemon(
            &pki.host("host-b"),
            &["host-a"],
            &[
                "--replica-dir",
                replicas.to_str().unwrap(),
                "--replica-allow",
                "host-a",
            ],
        );
        let mut args = tls_args(&pki.host("host-a"));
        args.push("--no-autostart".into());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let a = Daemon::start(&refs);
        Hosts {
            a,
            b,
            addr,
            replicas,
            _store: store,
            _pki: pki,
        }
    }
}

#[test]
fn kept_points_a_test_failover_beside_replication_and_a_failover_to_an_older_point() {
    let h = Hosts::start();
    let (a, b, addr, replicas) = (&h.a, &h.b, h.addr.as_str(), h.replicas.clone());
    let disks_dir = a.dir.path().join("disks");
    let images = start_writer_vm(a, &disks_dir, true);
    let (s, body) = a.api(
        "PUT",
        "/api/v1/vms/vm1/replication",
        Some(
            &json!({"to": addr, "server_name": "host-b", "interval_s": 1, "history": 0})
                .to_string(),
        ),
    );
    assert_eq!(s, 400, "history 0: {body}");
    a.ctl_ok(&[
        "replica",
        "enable",
        "vm1",
        "--to",
        addr,
        "--to-name",
        "host-b",
        "--interval",
        "1s",
        "--history",
        "5",
    ]);
    assert_eq!(replication(a)["history"], 5);

    // Points arrive; beyond 5 only the oldest are dropped.
    let kept = wait_points(b, "six points committed", |p| p.len() == 5 && p[0] >= 2);
    let table = b.ctl_ok(&["replica", "points", "vm1"]);
    assert!(
        table.contains("KEPT BYTES") && table.contains(&kept[0].to_string()),
        "{table}"
    );

    // Test failover of the oldest kept point, defined first: its copy is read.
    let oldest = kept[0];
    let out = b.ctl_ok(&[
        "replica",
        "test-failover",
        "vm1",
        "--point",
        &oldest.to_string(),
        "--no-start",
    ]);
    assert!(out.contains("vm1-test"), "{out}");
    b.wait_log("replica-test-failover");
    let test_dir = replicas.join("host-a/vm1/test-failover");
    let copy0 = read(&test_dir.join("disk-0.img"));
    let copy1 = read(&test_dir.join("disk-1.img"));
    let n0 = prefix_of(&copy0, MAX_ITERATION, "test copy disk 0");
    let n1 = prefix_of(&copy1, MAX_ITERATION, "test copy disk 1");
    assert!(n0 >= 1 && (n1 == n0 || n1 + 1 == n0), "{n0} {n1}");
    let newest_then = *points(b).last().unwrap();
    assert!(
        copy0 != read(&replicas.join("host-a/vm1/disk-0.img")),
        "the oldest point equals the latest: the guest did not write between them"
    );
    b.ok("PUT", "/api/v1/vms/vm1-test/start", None);
    b.wait_serial("vm1-test", &format!("rw resume n={n0}\n"), T);
    b.wait_serial("vm1-test", &format!("rw n={}\n", n0 + 3), T);
    // Replication goes on while the copy runs; its writes stay on its copies.
    wait_points(b, "new points beside the test failover", |p| {
        p.last().is_some_and(|&l| l >= newest_then + 2)
    });
    let (s, _) = b.api("GET", "/api/v1/vms/vm1", None);
    assert_eq!(s, 404, "a test failover defined the VM itself");
    b.ctl_ok(&["replica", "test-failover", "vm1", "--stop"]);
    let (s, body) = b.api("GET", "/api/v1/vms/vm1-test", None);
    assert_eq!(s, 404, "{body}");
    assert!(!test_dir.exists(), "the test failover's disks stayed");
    b.wait_log("replica-test-failover-stopped");

    // A point with the guest paused (the disks frozen at D_a), then a later one.
    a.ok("PUT", "/api/v1/vms/vm1/pause", None);
    let paused_at = replication(a)["last_point"].as_u64().unwrap();
    let start = std::time::Instant::now();
    while replication(a)["last_point"].as_u64().unwrap() < paused_at + 2 {
        assert!(start.elapsed() < T, "no point after the pause");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    a.ok("POST", "/api/v1/vms/vm1/replication/pause", None);
    let frozen: Vec<Vec<u8>> = images.iter().map(|p| read(p)).collect();
    // Every point cut while the guest was paused holds D_a: the newest so far.
    let p_a = *points(b).last().unwrap();
    a.ok("PUT", "/api/v1/vms/vm1/resume", None);
    let n_a = prefix_of(&frozen[0], MAX_ITERATION, "frozen disk 0");
    a.wait_serial("vm1", &format!("rw n={}\n", n_a + 20), T);
    a.ok("PUT", "/api/v1/vms/vm1/pause", None);
    a.ok("POST", "/api/v1/vms/vm1/replication/resume", None);
    wait_points(b, "a point after the second pause", |p| {
        p.last().is_some_and(|&l| l > p_a)
    });
    a.ok("POST", "/api/v1/vms/vm1/replication/pause", None);
    let later: Vec<Vec<u8>> = images.iter().map(|p| read(p)).collect();
    assert!(later[0] != frozen[0]);
    let kept = points(b);
    assert!(kept.contains(&p_a), "{p_a} not kept: {kept:?}");
    assert!(*kept.last().unwrap() > p_a);

    // Failover to p_a (not the latest): the replica's images are D_a byte for byte.
    let out = b.ctl_ok(&[
        "replica",
        "failover",
        "vm1",
        "--point",
        &p_a.to_string(),
        "--no-start",
    ]);
    assert!(out.contains(&format!("recovery point {p_a}")), "{out}");
    for (i, want) in frozen.iter().enumerate() {
        let got = read(&replicas.join(format!("host-a/vm1/disk-{i}.img")));
        assert!(
            got == *want,
            "disk {i}: not the primary's bytes at point {p_a}"
        );
        assert!(got != later[i], "disk {i}: the later point's bytes");
    }
    assert_eq!(
        points(b),
        kept.iter()
            .copied()
            .filter(|&p| p <= p_a)
            .collect::<Vec<_>>()
    );
    b.ok("PUT", "/api/v1/vms/vm1/start", None);
    b.wait_serial("vm1", &format!("rw resume n={n_a}\n"), T);

    // The old primary learns the failover from its replica's answer to its next round
    // (one in flight at the pause may have brought it already): it kills its VM (no
    // split brain) and shows the replication failed over.
    if replication(a)["state"] != "failed-over-elsewhere" {
        // Answered with 404 if the round in flight learnt it meanwhile.
        a.api("POST", "/api/v1/vms/vm1/replication/resume", None);
    }
    let start = std::time::Instant::now();
    while replication(a)["state"] != "failed-over-elsewhere" {
        assert!(
            start.elapsed() < T,
            "host-a never learnt the failover: {}",
            a.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    a.wait_state("vm1", "Stopped", T);
    a.wait_log("replication-failed-over-elsewhere");
    // Deleting the VM forgets the failover record with it.
    a.ok("DELETE", "/api/v1/vms/vm1", None);
    let list = a.ok("GET", "/api/v1/replication", None);
    assert_eq!(list, json!([]), "{list}");
    let (s, body) = a.api("GET", "/api/v1/vms/vm1/replication", None);
    assert_eq!(s, 404, "{body}");
}

/// The kept points' times (seconds since the epoch), oldest first.
fn point_times(b: &Daemon) -> Vec<u64> {
    let v = b.ok("GET", "/api/v1/replicas/vm1/points", None);
    v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["time_s"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_thinned_history_keeps_points_spaced_and_its_oldest_point_is_the_guests_disk_at_a_cut() {
    let h = Hosts::start();
    let (a, b, addr, replicas) = (&h.a, &h.b, h.addr.as_str(), h.replicas.clone());
    start_writer_vm(a, &a.dir.path().join("disks"), true);
    // Thinning needs a history to thin.
    let (s, body) = a.api(
        "PUT",
        "/api/v1/vms/vm1/replication",
        Some(
            &json!({"to": addr, "server_name": "host-b", "interval_s": 1, "history_spacing_s": 3})
                .to_string(),
        ),
    );
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("history above 1"), "{body}");
    a.ctl_ok(&[
        "replica",
        "enable",
        "vm1",
        "--to",
        addr,
        "--to-name",
        "host-b",
        "--interval",
        "1s",
        "--history",
        "4",
        "--history-spacing",
        "3s",
    ]);
    assert_eq!(replication(a)["history_spacing_s"], 3);

    // A point a second; the kept ones other than the latest at least 3 s apart.
    let kept = wait_points(b, "three kept points after ten cuts", |p| {
        p.len() >= 3 && p.last().is_some_and(|&l| l >= 10)
    });
    assert!(
        kept.windows(2).any(|w| w[1] > w[0] + 1),
        "no point was thinned out: {kept:?}"
    );
    let listed = b.ok("GET", "/api/v1/replicas/vm1/points", None);
    assert_eq!(listed["spacing_s"], 3, "{listed}");
    let times = point_times(b);
    for w in times[..times.len() - 1].windows(2) {
        assert!(w[1] >= w[0] + 3, "kept points closer than 3 s: {times:?}");
    }

    // The oldest kept point, rebuilt through the merged undo data of the thinned
    // ones, is the guest's disks at one cut: iterations 1..N exactly, on both disks.
    let oldest = *points(b).first().unwrap();
    b.ctl_ok(&[
        "replica",
        "test-failover",
        "vm1",
        "--point",
        &oldest.to_string(),
        "--no-start",
    ]);
    b.wait_log("replica-test-failover");
    let test_dir = replicas.join("host-a/vm1/test-failover");
    let n0 = prefix_of(&read(&test_dir.join("disk-0.img")), MAX_ITERATION, "disk 0");
    let n1 = prefix_of(&read(&test_dir.join("disk-1.img")), MAX_ITERATION, "disk 1");
    assert!(n0 >= 1 && (n1 == n0 || n1 + 1 == n0), "{n0} {n1}");
    let latest = prefix_of(
        &read(&replicas.join("host-a/vm1/disk-0.img")),
        MAX_ITERATION,
        "latest disk 0",
    );
    assert!(latest > n0, "the oldest point is not older: {n0} {latest}");
    b.ctl_ok(&["replica", "test-failover", "vm1", "--stop"]);

    // Deleting the primary's VM while it replicates stops its loop and forgets its
    // settings.
    a.ok("PUT", "/api/v1/vms/vm1/kill", None);
    a.ok("DELETE", "/api/v1/vms/vm1", None);
    a.wait_log("replication of a deleted VM stopped");
    let list = a.ok("GET", "/api/v1/replication", None);
    assert_eq!(list, json!([]), "{list}");
    let (s, body) = a.api("GET", "/api/v1/vms/vm1/replication", None);
    assert_eq!(s, 404, "{body}");
}
