//! Vireo Replica's log budget, between two vireods in network namespaces (the writer
//! guest on two raw disks filled with incompressible data it never touches): with the
//! link cut, each change log stays within its budget by degrading to a region bitmap;
//! the VMM killed with SIGKILL while degraded comes back degraded; with the link back,
//! replication catches up from the bitmaps — only the changed regions are read and
//! sent, no initial copy — and the replica equals the disks byte for byte.

use crate::common;

use std::path::{Path, PathBuf};

use common::replica_hosts::{Hosts, Options};
use common::writer::DISK_SIZE;
use common::{Events, T};
use serde_json::Value;

const BUDGET: u64 = 16 << 20;

fn point(v: &Value) -> u64 {
    v["last_point"].as_u64().unwrap_or(0)
}

fn log_dir(h: &Hosts, i: usize) -> PathBuf {
    h.images[i].with_file_name(format!("d{i}.rlog"))
}

/// Bytes of the segment files in a change log's directory.
fn segment_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".vlog")))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// Whether a change log's live region map is active (the log is degraded).
fn degraded(dir: &Path) -> bool {
    std::fs::read(dir.join("regions.map"))
        .ok()
        .and_then(|b| replica::RegionMap::decode(&b).ok())
        .is_some_and(|m| m.active)
}

fn link(h: &Hosts, up: bool) {
    h.ns_a
        .exec(&["ip", "link", "set", "va", if up { "up" } else { "down" }]);
}

/// `--log-budget 16M`; the link cut while the guest writes more than that: event
/// `replication-log-degraded`, the status and `replica status` say so, each log holds
/// no more than its budget (a degraded one: an empty open segment and its bitmap);
/// a kill -9 of the VMM and a restart leave it degraded; the link back: event
/// `replication-caught-up`, the catch-up sent at most the writer's 64 KiB regions (4
/// per disk), no initial copy, and a point cut after the guest paused equals the
/// disks byte for byte.
#[test]
fn over_its_budget_a_log_degrades_to_a_bitmap_and_the_replica_catches_up_from_it() {
    if !vireo_e2e::netns::is_root() {
        vireo_e2e::skip_or_fail_under_ci("network namespaces need root");
        return;
    }
    let h = Hosts::build(
        "rbud",
        Options {
            fill: true,
            enable: &["--log-budget", "16M"],
            ..Default::default()
        },
    );
    let mut events = Events::subscribe(&h.a.socket, "?vm=vm1");
    let v = h.wait("a second recovery point", |v| point(v) >= 2);
    assert_eq!(v["log_budget"].as_u64(), Some(BUDGET), "{v}");
    let base_sent = v["base_bytes_sent"].as_u64().unwrap();
    assert!(base_sent >= 6 << 20, "the filler went over: {v}");
    for i in 0..2 {
        let b = std::fs::read_to_string(log_dir(&h, i).join("log.budget")).unwrap();
        assert_eq!(
            b.trim(),
            BUDGET.to_string(),
            "disk {i}: the VMM keeps the budget"
        );
    }

    // The link is cut; the guest writes on (4 KiB + a record header per write: 16 MiB
    // is some 4,000 writes per disk).
    link(&h, false);
    let seen = events.until("vm1", "replication-log-degraded");
    let e = seen.last().unwrap();
    assert!(
        e["detail"]
            .as_str()
            .is_some_and(|d| d.contains("budget of 16 MiB")),
        "{e}"
    );
    let v = h.wait("degraded in the status", |v| v["log_degraded"] == true);
    let at_cut = point(&v);
    let out = h.a.ctl_ok(&["replica", "status", "vm1"]);
    assert!(out.contains("log over budget"), "{out}");
    let n = h.last_write();
    h.a.wait_serial("vm1", &format!("rw n={}\n", n + 6000), T * 2);
    // Nothing is appended past the budget (the segments stay, beside the active
    // map, until the next open or the catch-up).
    for i in 0..2 {
        let dir = log_dir(&h, i);
        let held = segment_bytes(&dir);
        assert!(held <= BUDGET, "disk {i}: {held} bytes of segments");
    }

    // kill -9 of the VMM while degraded, and a new one: still degraded.
    let pid = h.a.pid("vm1").unwrap();
    // SAFETY: a plain kill(2) of the VMM this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    h.a.wait_state("vm1", "Crashed", T);
    h.a.ok("PUT", "/api/v1/vms/vm1/start", None);
    h.a.wait_serial("vm1", "rw n=200\n", T * 2);
    // The new VMM's open moved the segments' ranges into the maps and removed them.
    let now: Vec<bool> = (0..2).map(|i| degraded(&log_dir(&h, i))).collect();
    assert!(now.iter().any(|&d| d), "{now:?}");
    for i in 0..2 {
        let dir = log_dir(&h, i);
        let held = segment_bytes(&dir);
        assert!(held <= BUDGET, "disk {i}: {held}");
        if degraded(&dir) {
            assert_eq!(held, 64, "disk {i}: a degraded log carries no data");
        }
    }
    let v = h.replication();
    assert_eq!(point(&v), at_cut, "no point while the link is down: {v}");

    // The link back: caught up from the bitmaps.
    link(&h, true);
    let seen = events.until("vm1", "replication-caught-up");
    let e = seen.last().unwrap();
    assert!(
        e["detail"]
            .as_str()
            .is_some_and(|d| d.contains("region maps")),
        "{e}"
    );
    let v = h.wait("a point after the catch-up", |v| {
        v["catch_ups"].as_u64() >= Some(1) && point(v) > at_cut
    });
    assert_eq!(v["log_degraded"], false, "{v}");
    assert_eq!(
        v["base_bytes_sent"].as_u64(),
        Some(base_sent),
        "no second initial copy: {v}"
    );
    let regions = v["catch_up_region_bytes"].as_u64().unwrap();
    let wire = v["catch_up_bytes_sent"].as_u64().unwrap();
    // The writer writes 64 blocks of 4 KiB at the start of each disk: 4 regions of
    // 64 KiB per disk. The filler (3 MiB per disk) is not sent.
    assert!(
        regions > 0 && regions <= 2 * 4 * (64 << 10),
        "regions sent: {regions}, {v}"
    );
    assert!(wire <= regions + (16 << 10), "{v}");
    assert!(regions < 2 * DISK_SIZE / 8, "{v}");
    for i in 0..2 {
        let dir = log_dir(&h, i);
        assert!(!degraded(&dir), "disk {i}");
        assert!(!dir.join("regions.catchup").exists(), "disk {i}");
    }

    // The guest paused: a point cut after it equals the disks byte for byte.
    h.a.ok("PUT", "/api/v1/vms/vm1/pause", None);
    let paused_at = point(&h.replication());
    h.wait("a point cut after the guest paused", |v| {
        point(v) >= paused_at + 2
    });
    for (i, img) in h.images.iter().enumerate() {
        let primary = std::fs::read(img).unwrap();
        assert!(
            h.replica_image(i) == primary,
            "disk {i}: the replica differs from the primary's disk"
        );
    }
}
