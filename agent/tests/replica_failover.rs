//! Vireo Replica between two hosts in their own network namespaces (a veth pair,
//! 10.77.0.1 ↔ 10.77.0.2): the primary vireod (host-a) replicates a real VMM whose
//! test guest writes seeded blocks to two disks to the replica vireod (host-b) over
//! mutual TLS, then fails over — planned (no write lost) or unplanned (the primary's
//! link cut: the latest recovery point, a crash-consistent prefix of the guest's
//! writes, and a primary that comes back changes nothing).

use crate::common;

use std::path::Path;

use common::pki::{call_raw, endpoint, tls_args};
use common::replica_hosts::{disk_paths, listening_daemon, wait_on, Hosts, A_IP, B_IP, PEER_PORT};
use common::writer::prefix_of;
use common::T;
use serde_json::{json, Value};

fn point(v: &Value) -> u64 {
    v["last_point"].as_u64().unwrap_or(0)
}

fn absent(path: &Path) -> bool {
    !path.exists()
}

/// Planned failover: the primary's VM is shut down, its last changes sent and
/// committed, and the replica host gets the VM defined on its images; the replica
/// equals the primary's disks byte for byte (no write lost, the guest's last reported
/// write included), and the VM then runs there from them.
#[test]
fn a_planned_failover_between_hosts_in_network_namespaces_loses_no_write() {
    if !vireo_e2e::netns::is_root() {
        vireo_e2e::skip_or_fail_under_ci("network namespaces need root");
        return;
    }
    let h = Hosts::new("rpf");
    let v = h.wait("a second recovery point", |v| point(v) >= 2);
    assert!(v["base_bytes_sent"].as_u64().unwrap() > 0, "{v}");

    let out =
        h.a.ctl_ok(&["replica", "failover", "vm1", "--planned", "--no-start"]);
    assert!(out.contains("failed over at recovery point"), "{out}");
    assert_eq!(h.a.state("vm1"), "Stopped");
    let last = h.last_write();
    assert!(last > 10, "{last}");
    for (i, img) in h.images.iter().enumerate() {
        let primary = std::fs::read(img).unwrap();
        assert!(
            h.replica_image(i) == primary,
            "disk {i}: the replica differs from the stopped primary's disk"
        );
        // The guest's last reported write is there.
        let n = prefix_of(&primary, last + 1, "primary");
        assert!(n >= last, "disk {i}: iteration {n} < the reported {last}");
    }
    h.a.wait_log("replication-failed-over");
    let (s, body) = h.a.api("GET", "/api/v1/vms/vm1/replication", None);
    assert_eq!(s, 404, "replication goes on after the failover: {body}");
    h.b.wait_log("replica-failed-over");

    // The replica takes nothing more from host-a.
    let seg = zstd::encode_all(&b"x"[..], 3).unwrap();
    let (s, v) = h.ns_a.run(|| {
        let to = endpoint(&format!("{B_IP}:{PEER_PORT}"), "host-b", &h.a_id);
        call_raw(
            &to,
            "PUT",
            "/peer/v1/replica/vm1/disks/0/segments/999",
            Some(seg),
        )
        .unwrap()
    });
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("failed over"), "{v}");

    // The VM starts on host-b from the replica: its own kernel copy, the replica disks.
    let def = h.b.ok("GET", "/api/v1/vms/vm1", None);
    let disk0 = def["definition"]["config"]["disks"][0]["path"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(disk0.ends_with("host-a/vm1/disk-0.img"), "{def}");
    h.b.ok("PUT", "/api/v1/vms/vm1/start", None);
    h.b.wait_serial("vm1", "rw n=5\n", T);
    assert!(absent(&h.replicas.join("host-a/vm1/committing")));
}

/// Unplanned failover: the primary's link goes down mid-run; on the replica host
/// `vireoctl replica failover vm1 --point latest` defines the VM on the latest
/// recovery point: every disk holds exactly the guest's iterations up to one N (disk 1
/// written after disk 0: N or one less). When the link comes back the primary's rounds
/// are refused and the replica's images do not change.
#[test]
fn an_unplanned_failover_starts_the_latest_point_and_a_returning_primary_changes_nothing() {
    if !vireo_e2e::netns::is_root() {
        vireo_e2e::skip_or_fail_under_ci("network namespaces need root");
        return;
    }
    let h = Hosts::new("rpu");
    let v = h.wait("a second recovery point", |v| point(v) >= 2);
    let before = point(&v);

    // The primary is cut off (its vireod and VM go on, as on a partitioned host).
    h.ns_a.exec(&["ip", "link", "set", "va", "down"]);
    h.wait("a failed round", |v| {
        v["failed_rounds"].as_u64().unwrap_or(0) > 0
    });

    let out = h.b.ctl_ok(&[
        "replica",
        "failover",
        "vm1",
        "--point",
        "latest",
        "--no-start",
    ]);
    assert!(out.contains("failed over here from host-a"), "{out}");
    let max = h.last_write() + 2;
    let images: Vec<Vec<u8>> = (0..2).map(|i| h.replica_image(i)).collect();
    let n0 = prefix_of(&images[0], max, "disk 0");
    let n1 = prefix_of(&images[1], max, "disk 1");
    assert!(
        n1 > 0 && (n0 == n1 || n0 == n1 + 1),
        "disk 0 at {n0}, disk 1 at {n1}"
    );
    let (s, st) = h.b.api("GET", "/api/v1/vms/vm1", None);
    assert_eq!(s, 200, "{st}");

    // The link is back: host-a's rounds are refused, the replica does not change.
    h.ns_a.exec(&["ip", "link", "set", "va", "up"]);
    // It learns the failover from host-b: its loop stops for good and its VM, which
    // ran through the partition, is killed (it must not run beside the replica's).
    assert!(before >= 2);
    let v = h.wait("the failover learnt from the replica host", |v| {
        v["state"] == "failed-over-elsewhere"
    });
    assert_eq!(v["failed_over_to"], "host-b", "{v}");
    assert!(
        v["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("failed over")),
        "{v}"
    );
    h.a.wait_log("replication-failed-over-elsewhere");
    h.a.wait_state("vm1", "Stopped", T);
    for (i, img) in images.iter().enumerate() {
        assert!(
            h.replica_image(i) == *img,
            "disk {i}: the returning primary changed the replica"
        );
    }

    // The VM runs on host-b from that point.
    h.b.ok("PUT", "/api/v1/vms/vm1/start", None);
    h.b.wait_serial("vm1", "rw n=5\n", T);

    // A second failover of the same VM is refused (it exists here now).
    let (s, body) = h.b.api(
        "POST",
        "/api/v1/replicas/vm1/failover",
        Some(&json!({"point": "latest"}).to_string()),
    );
    assert_eq!(s, 409, "{body}");
    // Only the latest point exists (no recovery history yet).
    let (s, body) = h.b.api(
        "POST",
        "/api/v1/replicas/vm1/failover",
        Some(&json!({"point": "2026-01-01T00:00:00Z"}).to_string()),
    );
    assert_eq!(s, 400, "{body}");
}

/// The round trip: a planned failover to host-b, `replica reverse` there replicates
/// vm1 back to host-a starting from host-a's own (stopped) disks — only the blocks the
/// guest changed since are sent —, recovery points arrive at host-a, and a planned
/// failover back leaves host-a's replica equal to host-b's disks byte for byte and
/// the VM running on host-a again. Refused and changing nothing: `reverse` of a VM
/// that is not a failed-over replica, and towards a host that does not allow it.
/// Then the same back to host-b (its failed-over replica reset in place as the base).
#[test]
fn a_reverse_replication_after_a_planned_failover_sends_only_changed_blocks_and_fails_back() {
    if !vireo_e2e::netns::is_root() {
        vireo_e2e::skip_or_fail_under_ci("network namespaces need root");
        return;
    }
    let a_store = tempfile::Builder::new()
        .prefix("replicas")
        .tempdir()
        .unwrap();
    let a_replicas = a_store.path().join("replicas");
    let h = Hosts::with("rpr", Some(&a_replicas));
    let v = h.wait("a second recovery point", |v| point(v) >= 2);
    // The first initial copy sent the filler (it does not compress).
    let filler = 2 * (common::writer::DISK_SIZE - common::writer::FILL_FROM);
    assert!(v["base_differing_bytes"].as_u64().unwrap() >= filler, "{v}");
    h.a.ctl_ok(&["replica", "failover", "vm1", "--planned"]);
    h.b.wait_serial("vm1", "rw n=5\n", T);
    let b_disks = disk_paths(&h.b);
    let a_addr = format!("{A_IP}:{PEER_PORT}");

    // Not a failed-over replica: host-a's own (stopped) vm1. Nothing changes.
    let def_before = h.a.ok("GET", "/api/v1/vms/vm1", None)["definition"].clone();
    let o = h.a.ctl(&[
        "replica",
        "reverse",
        "vm1",
        "--to",
        &format!("{B_IP}:{PEER_PORT}"),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not a failed-over replica"),
        "{err}"
    );
    assert_eq!(
        h.a.ok("GET", "/api/v1/vms/vm1", None)["definition"],
        def_before
    );
    let (s, _) = h.a.api("GET", "/api/v1/vms/vm1/replication", None);
    assert_eq!(s, 404);

    // Towards a host that does not allow host-b (host-a's identity, another vireod
    // that replicates only for host-c): refused, vm1 on host-b untouched.
    let decoy_store = tempfile::tempdir().unwrap();
    let decoy_addr = format!("{A_IP}:{}", PEER_PORT + 1);
    let mut args = tls_args(&h.a_id);
    args.push("--no-autostart".into());
    args.extend(["--listen".into(), decoy_addr.clone()]);
    args.extend([
        "--peer".into(),
        "host-b".into(),
        "--peer".into(),
        "host-c".into(),
    ]);
    let decoy_dir = decoy_store.path().join("replicas");
    args.extend(["--replica-dir".into(), decoy_dir.display().to_string()]);
    args.extend(["--replica-allow".into(), "host-c".into()]);
    let decoy = listening_daemon(&args, &h.ns_a, &decoy_addr);
    let b_def = h.b.ok("GET", "/api/v1/vms/vm1", None);
    let o = h.b.ctl(&[
        "replica",
        "reverse",
        "vm1",
        "--to",
        &decoy_addr,
        "--interval",
        "1s",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not an allowed replication primary"),
        "{err}"
    );
    let b_after = h.b.ok("GET", "/api/v1/vms/vm1", None);
    assert_eq!(
        b_after["definition"], b_def["definition"],
        "the definition changed"
    );
    assert_eq!(b_after["pid"], b_def["pid"], "the VM was restarted");
    let (s, _) = h.b.api("GET", "/api/v1/vms/vm1/replication", None);
    assert_eq!(s, 404);
    assert!(
        absent(&decoy_dir.join("host-b")),
        "the refusing host stored something"
    );
    drop(decoy);

    // The reverse: host-b's VMM restarted with change logs, host-a's replica made from
    // its own disks; only the blocks the guest wrote on host-b are sent.
    h.b.ctl_ok(&[
        "replica",
        "reverse",
        "vm1",
        "--to",
        &a_addr,
        "--interval",
        "1s",
    ]);
    h.b.wait_log("replication-reversed");
    let def = h.b.ok("GET", "/api/v1/vms/vm1", None);
    assert!(
        def["definition"]["config"]["disks"][0]["replica_log"].is_string(),
        "{def}"
    );
    let v = wait_on(&h.b, "a second point at host-a", |v| point(v) >= 2);
    eprintln!("reverse: {v}");
    let total = 2 * common::writer::DISK_SIZE;
    let differing = v["base_differing_bytes"].as_u64().unwrap();
    // The writer guest touches only the first 256 KiB of each disk: at most four
    // 64 KiB blocks per disk differ.
    assert!(differing <= 2 * 4 * (64 << 10), "{v}");
    assert!(v["base_bytes_sent"].as_u64().unwrap() < total / 8, "{v}");
    let (s, pts) =
        h.a.api("GET", "/api/v1/replicas/vm1/points?primary=host-b", None);
    assert_eq!(s, 200, "{pts}");

    // Fail back (planned): host-a's replica equals host-b's stopped disks, byte for
    // byte, and vm1 runs on host-a again, on those images.
    h.b.ctl_ok(&["replica", "failover", "vm1", "--planned", "--no-start"]);
    assert_eq!(h.b.state("vm1"), "Stopped");
    for (i, disk) in b_disks.iter().enumerate() {
        let theirs = std::fs::read(disk).unwrap();
        let mine =
            std::fs::read(a_replicas.join("host-b/vm1").join(format!("disk-{i}.img"))).unwrap();
        assert!(
            mine == theirs,
            "disk {i}: host-a's replica differs from host-b's disk"
        );
    }
    let a_disks = disk_paths(&h.a);
    assert!(a_disks[0].ends_with("host-b/vm1/disk-0.img"), "{a_disks:?}");
    h.a.ok("PUT", "/api/v1/vms/vm1/start", None);
    h.a.wait_serial("vm1", "rw n=5\n", T);
    let (s, _) = h.a.api("GET", "/api/v1/vms/vm1/replication", None);
    assert_eq!(s, 404);
    // host-b asks host-a for a reverse replica of a VM host-a did not fail over to
    // it (vm1 runs there now): refused, nothing stored.
    let (s, v) = h.ns_a.run(|| {
        let to = endpoint(&a_addr, "host-a", &h.b_id);
        let sizes = [common::writer::DISK_SIZE; 2];
        let body = json!({ "disks": sizes }).to_string();
        call_raw(
            &to,
            "PUT",
            "/peer/v1/replica/vm2/reverse",
            Some(body.into_bytes()),
        )
        .unwrap()
    });
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("was not failed over from here"),
        "{v}"
    );
    assert!(absent(&a_replicas.join("host-b/vm2")));

    // Once more the other way: host-a reverses to host-b, whose failed-over replica
    // (the disks vm1 ran on there) is reset in place as the base: again only the
    // changed blocks are sent, and host-b's stopped vm1 is gone (its disks are the
    // replica's again).
    h.a.ctl_ok(&[
        "replica",
        "reverse",
        "vm1",
        "--to",
        &format!("{B_IP}:{PEER_PORT}"),
        "--interval",
        "1s",
    ]);
    let v = wait_on(&h.a, "a second point at host-b", |v| point(v) >= 2);
    eprintln!("second reverse: {v}");
    assert!(
        v["base_differing_bytes"].as_u64().unwrap() <= 2 * 4 * (64 << 10),
        "{v}"
    );
    let (s, body) = h.b.api("GET", "/api/v1/vms/vm1", None);
    assert_eq!(s, 404, "{body}");
    h.a.ctl_ok(&["replica", "failover", "vm1", "--planned", "--no-start"]);
    for (i, disk) in b_disks.iter().enumerate() {
        let a_disk = a_replicas.join("host-b/vm1").join(format!("disk-{i}.img"));
        assert!(
            std::fs::read(disk).unwrap() == std::fs::read(&a_disk).unwrap(),
            "disk {i}: host-b's replica differs from host-a's disk after the second failover"
        );
    }
    assert_eq!(disk_paths(&h.b), b_disks);
}

/// More iterations than the writer guest makes in these tests.
const MAX_ITERATION: u64 = 1 << 24;

/// At most this many bytes of the disks differ between the two hosts after an
/// unplanned failover: the writer guest writes only its 64 4-KiB blocks (256 KiB,
/// four 64 KiB hash blocks) of each of the two disks, on either host.
const WRITTEN_AREA: u64 = 2 * 4 * (64 << 10);

/// host-a goes down the hard way: its vireod and vm1's VMM are killed (SIGKILL)
/// while the guest writes. Returns its disks as the kill left them.
fn crash_host_a(h: &mut Hosts) -> Vec<Vec<u8>> {
    let pid = h.a.pid("vm1").unwrap();
    h.a.kill9();
    // SAFETY: a plain kill(2) of the VMM this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    common::wait_dead(pid, T);
    h.images.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Writes that reach no recovery point: replication paused at host-a, the guest
/// goes on for `more` iterations.
fn write_past_every_point(h: &Hosts, more: u64) {
    h.a.ctl_ok(&["replica", "pause", "vm1"]);
    let w = h.last_write();
    h.a.wait_serial("vm1", &format!("rw n={}\n", w + more), T);
}

/// The return of host-a after an unplanned failover of vm1 to host-b (which runs it
/// and writes): host-a's vireod restarts, learns the failover from host-b, does not
/// start vm1 and shows it; `replica reverse` on host-b sends only the blocks that
/// differ since the common point; a planned failback leaves host-a's replica equal
/// to host-b's disks byte for byte. Returns host-b's reverse replication status.
///
/// With `cut_off`, host-a comes back with its link down: it cannot learn the
/// failover at its start (its replication, paused, stays as it was); the link back,
/// host-b's reverse request is what teaches it (host-a asks host-b, its VM's replica
/// host, before it accepts).
///
/// Without `cut_off`, host-a's vireod comes back with automatic starts on (vm1's
/// priority is High): it asks host-b first, so the automatic start is refused.
fn return_reverse_and_fail_back(h: &mut Hosts, a_replicas: &Path, cut_off: bool) -> Value {
    let b_disks = disk_paths(&h.b);
    let a_addr = format!("{A_IP}:{PEER_PORT}");
    if cut_off {
        h.ns_a.exec(&["ip", "link", "set", "va", "down"]);
    } else {
        h.a.args.retain(|a| a != "--no-autostart");
    }
    h.a.spawn();
    h.ns_a.run(|| {
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(&a_addr).is_err() {
            assert!(start.elapsed() < T, "host-a's peer listener never came up");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    });
    if cut_off {
        h.a.wait_log("replica not reached at start");
        let v = h.replication();
        assert_eq!(v["state"], "paused", "{v}");
        h.ns_a.exec(&["ip", "link", "set", "va", "up"]);
        h.b.ctl_ok(&[
            "replica",
            "reverse",
            "vm1",
            "--to",
            &a_addr,
            "--interval",
            "1s",
        ]);
    }
    // host-b tells: replication stops with that state, vm1 does not start here.
    let v = h.wait("the failover learnt from host-b", |v| {
        v["state"] == "failed-over-elsewhere"
    });
    assert_eq!(v["failed_over_to"], "host-b", "{v}");
    h.a.wait_log("replication-failed-over-elsewhere");
    if !cut_off {
        // The automatic start came after the answer: refused, never started.
        let log = h.a.wait_log("automatic start failed");
        assert!(log.contains("does not start here"), "{log}");
        assert!(
            !log.contains("killed: it runs on its replica host"),
            "{log}"
        );
    }
    assert_eq!(h.a.pid("vm1"), None);
    let (s, body) = h.a.api("PUT", "/api/v1/vms/vm1/start", None);
    assert_eq!(s, 409, "{body}");
    assert!(body.contains("failed over to host-b"), "{body}");
    assert_eq!(h.a.pid("vm1"), None);
    let (s, body) = h.a.api("POST", "/api/v1/vms/vm1/replication/resume", None);
    assert_eq!(s, 409, "{body}");
    let table = h.a.ctl_ok(&["replica", "status", "vm1"]);
    assert!(
        table.contains("failed-over-elsewhere") && table.contains("host-b"),
        "{table}"
    );
    let list = h.a.ok("GET", "/api/v1/replication", None);
    assert_eq!(list[0]["state"], "failed-over-elsewhere", "{list}");
    if !cut_off {
        // The record outlives a restart of host-a's vireod that cannot reach host-b.
        h.ns_a.exec(&["ip", "link", "set", "va", "down"]);
        h.a.kill9();
        h.a.spawn();
        let v = h.replication();
        assert_eq!(v["state"], "failed-over-elsewhere", "{v}");
        let (s, body) = h.a.api("PUT", "/api/v1/vms/vm1/start", None);
        assert_eq!(s, 409, "{body}");
        h.ns_a.exec(&["ip", "link", "set", "va", "up"]);
        h.ns_a.run(|| {
            let start = std::time::Instant::now();
            while std::net::TcpStream::connect(&a_addr).is_err() {
                assert!(start.elapsed() < T, "host-a's peer listener never came up");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        });
    }

    // The reverse: host-a's replica of vm1 starts from its own (diverged) disks;
    // only the blocks either host wrote since the common point go over the wire.
    if !cut_off {
        h.b.ctl_ok(&[
            "replica",
            "reverse",
            "vm1",
            "--to",
            &a_addr,
            "--interval",
            "1s",
        ]);
    }
    h.b.wait_log("replication-reversed");
    let v = wait_on(&h.b, "a second point at host-a", |v| point(v) >= 2);
    let differing = v["base_differing_bytes"].as_u64().unwrap();
    let base = v["base_bytes_sent"].as_u64().unwrap();
    let total = 2 * common::writer::DISK_SIZE;
    eprintln!(
        "reverse after an unplanned failover: {differing} bytes differed, {base} bytes of the \
         catch-up on the wire (zstd), {} bytes written to the link in all so far (with the \
         segments since), disks {total} bytes: {v}",
        v["wire_bytes_sent"]
    );
    assert!(
        differing > 0,
        "host-a's own writes after the point differ: {v}"
    );
    assert!(differing <= WRITTEN_AREA, "{v}");
    // zstd frames of at most the differing bytes (the writer's data does not
    // compress much; the filler is never sent).
    assert!(base <= WRITTEN_AREA + 4096, "{v}");
    assert!(base < total / 8, "{v}");

    // Fail back (planned): host-a's replica equals host-b's stopped disks byte for
    // byte; vm1 runs on host-a again, its failover record gone with its old
    // definition.
    h.b.ctl_ok(&["replica", "failover", "vm1", "--planned", "--no-start"]);
    assert_eq!(h.b.state("vm1"), "Stopped");
    for (i, disk) in b_disks.iter().enumerate() {
        let theirs = std::fs::read(disk).unwrap();
        let mine =
            std::fs::read(a_replicas.join("host-b/vm1").join(format!("disk-{i}.img"))).unwrap();
        assert!(
            mine == theirs,
            "disk {i}: host-a's replica differs from host-b's disk"
        );
    }
    let a_disks = disk_paths(&h.a);
    assert!(a_disks[0].ends_with("host-b/vm1/disk-0.img"), "{a_disks:?}");
    h.a.ok("PUT", "/api/v1/vms/vm1/start", None);
    assert!(h.a.pid("vm1").is_some());
    let (s, _) = h.a.api("GET", "/api/v1/vms/vm1/replication", None);
    assert_eq!(s, 404);
    v
}

/// Unplanned failover to the latest point after host-a crashed (its vireod and VMM
/// killed) with writes that reached no point; host-b runs vm1 and writes; host-a
/// comes back, learns the failover and keeps vm1 stopped; the reverse sends only what
/// changed since the common point, and the failback gives host-b's bytes exactly.
#[test]
fn after_an_unplanned_failover_the_returning_primary_stays_down_and_reverse_sends_only_changes() {
    if !vireo_e2e::netns::is_root() {
        vireo_e2e::skip_or_fail_under_ci("network namespaces need root");
        return;
    }
    let a_store = tempfile::Builder::new()
        .prefix("replicas")
        .tempdir()
        .unwrap();
    let a_replicas = a_store.path().join("replicas");
    let mut h = Hosts::build(
        "rpk",
        common::replica_hosts::Options {
            a_replicas: Some(&a_replicas),
            fill: true,
            priority: Some("High"),
            ..Default::default()
        },
    );
    h.wait("a second recovery point", |v| point(v) >= 2);
    write_past_every_point(&h, 200);
    let a_disks = crash_host_a(&mut h);
    let n_a = prefix_of(&a_disks[0], MAX_ITERATION, "host-a disk 0");

    // Unplanned failover on host-b to the latest point: a prefix of host-a's writes,
    // not what host-a wrote after it.
    let out = h.b.ctl_ok(&[
        "replica",
        "failover",
        "vm1",
        "--point",
        "latest",
        "--no-start",
    ]);
    assert!(out.contains("failed over here from host-a"), "{out}");
    let at_point: Vec<Vec<u8>> = (0..2).map(|i| h.replica_image(i)).collect();
    let n_b = prefix_of(&at_point[0], MAX_ITERATION, "the point's disk 0");
    assert!(n_b < n_a, "host-a wrote past the point: {n_b} vs {n_a}");
    // The new primary writes.
    h.b.ok("PUT", "/api/v1/vms/vm1/start", None);
    h.b.wait_serial("vm1", "rw n=100\n", T);

    return_reverse_and_fail_back(&mut h, &a_replicas, false);
}

/// Unplanned failover to an older kept point (not the latest): host-b's disks are
/// exactly that point's data — host-a's disks frozen at it — and not the later
/// point's; then host-a's return and the reverse as above.
#[test]
fn an_unplanned_failover_to_an_older_point_gives_exactly_its_data_and_reverses_only_changes() {
    if !vireo_e2e::netns::is_root() {
        vireo_e2e::skip_or_fail_under_ci("network namespaces need root");
        return;
    }
    let a_store = tempfile::Builder::new()
        .prefix("replicas")
        .tempdir()
        .unwrap();
    let a_replicas = a_store.path().join("replicas");
    let mut h = Hosts::build(
        "rpo",
        common::replica_hosts::Options {
            a_replicas: Some(&a_replicas),
            fill: true,
            enable: &["--history", "8"],
            ..Default::default()
        },
    );
    h.wait("a second recovery point", |v| point(v) >= 2);

    // Point p_a: cut while the guest was paused, so it holds the disks as frozen.
    h.a.ok("PUT", "/api/v1/vms/vm1/pause", None);
    let paused_at = point(&h.replication());
    h.wait("two points after the pause", |v| point(v) >= paused_at + 2);
    h.a.ok("POST", "/api/v1/vms/vm1/replication/pause", None);
    let frozen: Vec<Vec<u8>> = h.images.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let p_a = point(&h.replication());
    h.a.ok("PUT", "/api/v1/vms/vm1/resume", None);
    let n_frozen = prefix_of(&frozen[0], MAX_ITERATION, "frozen disk 0");
    h.a.wait_serial("vm1", &format!("rw n={}\n", n_frozen + 20), T);
    // A later point, then writes that reach none.
    h.a.ok("POST", "/api/v1/vms/vm1/replication/resume", None);
    h.wait("a point after p_a", |v| point(v) > p_a);
    write_past_every_point(&h, 200);
    let a_disks = crash_host_a(&mut h);

    let out = h.b.ctl_ok(&[
        "replica",
        "failover",
        "vm1",
        "--point",
        &p_a.to_string(),
        "--no-start",
    ]);
    assert!(out.contains(&format!("recovery point {p_a}")), "{out}");
    for (i, want) in frozen.iter().enumerate() {
        let got = h.replica_image(i);
        assert!(got == *want, "disk {i}: not exactly point {p_a}'s data");
        assert!(got != a_disks[i], "disk {i}: host-a's later writes");
    }
    h.b.ok("PUT", "/api/v1/vms/vm1/start", None);
    h.b.wait_serial("vm1", "rw n=100\n", T);

    // host-a returns cut off: the reverse request teaches it.
    return_reverse_and_fail_back(&mut h, &a_replicas, true);
}
