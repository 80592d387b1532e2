//! Vireo Replica of a VM whose disks are dynamic VHDX images (two hosts in network
//! namespaces, `common::replica_hosts` with `vhdx`): the initial copy reads each
//! disk's virtual content through the `vhdx` crate — the replica's raw image equals
//! `qemu-img convert -O raw` of the primary's VHDX byte for byte and is a hole where
//! the VHDX allocated nothing —, a planned failover, a reverse replication seeded from
//! the old primary's VHDX and a failback work as for raw disks, an unplanned failover
//! gives a crash-consistent point, and a damaged VHDX is refused by `replica enable`
//! with nothing made on either side.

use crate::common;

use std::path::Path;

use common::replica_hosts::{disk_paths, wait_on, Hosts, Options, A_IP, PEER_PORT};
use common::writer::{prefix_of, vhdx_data, virtual_content, VHDX_DATA_AT, VHDX_DATA_LEN};
use common::T;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn point(v: &Value) -> u64 {
    v["last_point"].as_u64().unwrap_or(0)
}

/// Where the next data of the file at `path` at or after `from` is (SEEK_DATA).
fn next_data(path: &Path, from: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    (r >= 0).then_some(r as u64)
}

/// The replica image `img` equals the VHDX `vhdx`'s virtual content (the peer's
/// conversion) and is a hole in VHDX blocks 1 and 3 (never allocated).
fn equals_virtual_content_and_sparse(img: &Path, vhdx: &Path, what: &str) {
    let want = virtual_content(vhdx);
    let got = std::fs::read(img).unwrap();
    assert!(
        got == want,
        "{what}: the replica differs from qemu-img's raw of the VHDX"
    );
    let after = next_data(img, MIB).unwrap();
    assert!(
        after >= 2 * MIB,
        "{what}: VHDX block 1 (unallocated) holds data at {after}"
    );
    assert_eq!(
        next_data(img, VHDX_DATA_AT + VHDX_DATA_LEN as u64),
        None,
        "{what}: data after the VHDX's last allocated bytes"
    );
}

/// Planned failover of a VM on dynamic VHDX disks: the replica equals the stopped
/// primary's virtual disks (qemu-img's conversion) byte for byte and is sparse where
/// the VHDX allocated nothing, and the initial copy sent only the allocated data; the
/// VM runs on host-b; `replica reverse` seeds host-a's replica from its own VHDX disks
/// (only the guest's changed blocks go over the wire); a planned failback leaves
/// host-a's replica equal to host-b's disks and the VM running on host-a.
#[test]
fn a_vm_on_vhdx_disks_fails_over_planned_reverses_and_fails_back_byte_for_byte() {
    if !vireo_e2e::netns::is_root() {
        vireo_e2e::skip_or_fail_under_ci("network namespaces need root");
        return;
    }
    let a_store = tempfile::Builder::new()
        .prefix("replicas")
        .tempdir()
        .unwrap();
    let a_replicas = a_store.path().join("replicas");
    let h = Hosts::build(
        "rpx",
        Options {
            a_replicas: Some(&a_replicas),
            vhdx: true,
            ..Default::default()
        },
    );
    let v = h.wait("a second recovery point", |v| point(v) >= 2);
    // The initial copy: each disk's 512 KiB of data at 2 MiB and the guest's blocks
    // (at most four 64 KiB blocks); nothing of the unallocated VHDX blocks.
    let differing = v["base_differing_bytes"].as_u64().unwrap();
    let data = 2 * VHDX_DATA_LEN as u64;
    assert!(
        differing >= data && differing <= data + 2 * 4 * (64 << 10),
        "{v}"
    );

    h.a.ctl_ok(&["replica", "failover", "vm1", "--planned", "--no-start"]);
    assert_eq!(h.a.state("vm1"), "Stopped");
    let max = h.last_write() + 2;
    for (i, vhdx) in h.images.iter().enumerate() {
        let img = h.replicas.join(format!("host-a/vm1/disk-{i}.img"));
        equals_virtual_content_and_sparse(&img, vhdx, &format!("disk {i}"));
        let got = std::fs::read(&img).unwrap();
        let at = VHDX_DATA_AT as usize;
        assert!(got[at..at + VHDX_DATA_LEN] == vhdx_data(i as u64)[..]);
        assert!(prefix_of(&got, max, "replica") >= 10);
    }
    // On host-b the VM runs from raw images.
    let def = h.b.ok("GET", "/api/v1/vms/vm1", None);
    assert_eq!(
        def["definition"]["config"]["disks"][0]["format"], "raw",
        "{def}"
    );
    h.b.ok("PUT", "/api/v1/vms/vm1/start", None);
    h.b.wait_serial("vm1", "rw n=5\n", T);
    let b_disks = disk_paths(&h.b);

    // The reverse: host-a's replica starts from its own stopped VHDX disks.
    h.b.ctl_ok(&[
        "replica",
        "reverse",
        "vm1",
        "--to",
        &format!("{A_IP}:{PEER_PORT}"),
        "--interval",
        "1s",
    ]);
    let v = wait_on(&h.b, "a second point at host-a", |v| point(v) >= 2);
    // Only the guest's blocks differ from the VHDX's virtual content.
    assert!(
        v["base_differing_bytes"].as_u64().unwrap() <= 2 * 4 * (64 << 10),
        "the reverse replica is not the VHDX's content: {v}"
    );
    for i in 0..2 {
        let img = a_replicas.join(format!("host-b/vm1/disk-{i}.img"));
        assert_eq!(next_data(&img, MIB).unwrap(), 2 * MIB, "seeded sparse");
    }

    // Fail back (planned).
    h.b.ctl_ok(&["replica", "failover", "vm1", "--planned", "--no-start"]);
    for (i, disk) in b_disks.iter().enumerate() {
        let mine = a_replicas.join(format!("host-b/vm1/disk-{i}.img"));
        assert!(
            std::fs::read(&mine).unwrap() == std::fs::read(disk).unwrap(),
            "disk {i}: host-a's replica differs from host-b's disk"
        );
    }
    h.a.ok("PUT", "/api/v1/vms/vm1/start", None);
    h.a.wait_serial("vm1", "rw n=5\n", T);
    // The VHDX files stay where they were.
    assert!(h.images.iter().all(|p| p.exists()));
}

/// A damaged VHDX is refused by `replica enable` with one line naming it, and nothing
/// is stored on either host; then an unplanned failover of the VM on intact VHDX
/// disks gives the latest point: a crash-consistent prefix of the guest's writes and
/// the VHDX's other data.
#[test]
fn a_damaged_vhdx_is_refused_and_an_unplanned_failover_of_a_vhdx_vm_gives_its_writes() {
    if !vireo_e2e::netns::is_root() {
        vireo_e2e::skip_or_fail_under_ci("network namespaces need root");
        return;
    }
    let h = Hosts::build(
        "rpy",
        Options {
            vhdx: true,
            skip_enable: true,
            ..Default::default()
        },
    );
    // vm2: vm1's definition on a copy of its disk whose headers are then damaged.
    let mut def = h.a.ok("GET", "/api/v1/vms/vm1", None)["definition"].clone();
    let bad = h.images[0].with_file_name("bad.vhdx");
    std::fs::copy(&h.images[0], &bad).unwrap();
    def["config"]["disks"] = serde_json::json!([{
        "path": bad,
        "format": "vhdx",
        "replica_log": bad.with_extension("rlog"),
    }]);
    h.a.ok("PUT", "/api/v1/vms/vm2", Some(&def.to_string()));
    let mut b = std::fs::read(&bad).unwrap();
    for at in [64usize << 10, 128 << 10] {
        b[at + 100] ^= 0xff;
    }
    std::fs::write(&bad, &b).unwrap();
    let mut args = h.enable_args(&[]);
    args[2] = "vm2".into();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = h.a.ctl(&refs);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a damaged VHDX was accepted");
    assert!(err.contains("bad.vhdx"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let (s, body) = h.a.api("GET", "/api/v1/vms/vm2/replication", None);
    assert_eq!(s, 404, "{body}");
    assert!(
        !h.replicas.join("host-a/vm2").exists(),
        "the replica made vm2"
    );

    h.ctl_ok(h.enable_args(&[]));
    h.wait("a second recovery point", |v| point(v) >= 2);
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
    for (i, img) in images.iter().enumerate() {
        let at = VHDX_DATA_AT as usize;
        assert!(img[at..at + VHDX_DATA_LEN] == vhdx_data(i as u64)[..]);
        assert!(
            img[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0),
            "disk {i}: the VHDX's unallocated block 1 is not zero"
        );
    }
    h.b.ok("PUT", "/api/v1/vms/vm1/start", None);
    h.b.wait_serial("vm1", "rw n=5\n", T);
}

/// A host crash while the guest wrote to a VHDX disk: vireod and the VMM killed
/// together, the writer mark rewritten to another boot, and on the image only (as
/// the crash may leave them) a 4 KiB write into a block the VHDX had not allocated and
/// the release of the block that held its other data. After the restart the replica
/// is reset and resynchronised from the VHDX's virtual content: the differing blocks
/// only, the released block sent as zeros and a hole again on the replica, the lost
/// write there; the replica equals `qemu-img convert -O raw` of the VHDX byte for
/// byte.
#[test]
fn after_a_host_crash_a_vhdx_disk_is_resynchronised_from_its_virtual_content() {
    use crate::replica::{primary_host, replica_server, replication, wait_replication};
    let pki = common::pki::Pki::new();
    let (_b, addr, dir, _store) = replica_server(&pki, &[]);
    let (mut a, disks_dir) = primary_host(&pki);
    let size = common::writer::DISK_SIZE;
    let img = disks_dir.join("d0.vhdx");
    let log = disks_dir.join("d0.rlog");
    let v = vhdx::Vhdx::create(
        &img,
        &vhdx::CreateOptions {
            size,
            kind: vhdx::DiskKind::Dynamic,
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap();
    v.write_at(&vhdx_data(0), VHDX_DATA_AT).unwrap();
    v.close().unwrap();
    let def = serde_json::json!({
        "config": {
            "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=replica-writer disks=1 blocks=64"},
            "memory": {"size": 32u64 << 20},
            "disks": [{"path": img, "format": "vhdx", "replica_log": log}],
        },
        "restart": "never",
    });
    a.ok("PUT", "/api/v1/vms/vm1", Some(&def.to_string()));
    a.ok("PUT", "/api/v1/vms/vm1/start", None);
    a.wait_serial("vm1", "rw n=10\n", T);
    let enable =
        serde_json::json!({"to": addr, "server_name": "host-b", "interval_s": 1}).to_string();
    a.ok("PUT", "/api/v1/vms/vm1/replication", Some(&enable));
    wait_replication(&a, "vm1", "a second recovery point", |v| point(v) >= 2);

    let pid = a.pid("vm1").unwrap();
    a.kill9();
    // SAFETY: a plain kill(2) of the VMM this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    common::wait_dead(pid, T);
    let mark = log.join(agent::replica_crash::WRITER_MARK);
    std::fs::write(&mark, "00000000-0000-0000-0000-000000000000").unwrap();
    let lost = vec![0xeeu8; 4096];
    let v = open_for_writing(&img);
    v.write_at(&lost, 3 * MIB + 4096).unwrap();
    v.discard(VHDX_DATA_AT, MIB).unwrap();
    v.close().unwrap();

    a.spawn();
    a.wait_log("replication restored");
    a.ok("PUT", "/api/v1/vms/vm1/start", None);
    a.wait_log("replication-resync-required");
    let v = wait_replication(&a, "vm1", "a point after the resync", |v| {
        point(v) >= 1 && v["base_bytes_sent"].as_u64().unwrap_or(0) > 0
    });
    let differing = v["base_differing_bytes"].as_u64().unwrap();
    // The released block's 512 KiB of data (now zeros) and the lost write's block,
    // and at most the guest's four blocks: not the disk.
    assert!(
        differing >= VHDX_DATA_LEN as u64 + 4096
            && differing <= VHDX_DATA_LEN as u64 + 5 * (64 << 10),
        "the resync sends the differing blocks only: {v}"
    );

    // A VMM killed on this boot leaves its VHDX unclosed (blocks it allocated since
    // the guest's last flush are not on the image, their writes are in the log): the
    // log gets the unclean mark and the next start resyncs again.
    let resyncs = |a: &common::Daemon| a.log().matches("replication-resync-required").count();
    let before = resyncs(&a);
    let pid = a.pid("vm1").unwrap();
    a.ok("PUT", "/api/v1/vms/vm1/kill", None);
    common::wait_dead(pid, T);
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&mark).ok().as_deref() != Some(agent::replica_crash::UNCLEAN) {
        assert!(start.elapsed() < T, "no unclean mark after the kill");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    a.ok("PUT", "/api/v1/vms/vm1/start", None);
    while resyncs(&a) <= before {
        assert!(start.elapsed() < T * 2, "no second resync:\n{}", a.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let now = point(&replication(&a, "vm1"));
    wait_replication(&a, "vm1", "a point after the second resync", |v| {
        point(v) >= now + 2
    });

    // A planned failover (the VM shut down, its VHDX closed, the last changes sent):
    // the replica is the VHDX's virtual content.
    a.ctl_ok(&["replica", "failover", "vm1", "--planned", "--no-start"]);
    let replica_img = dir.join("host-a/vm1/disk-0.img");
    let replica = std::fs::read(&replica_img).unwrap();
    let at = (3 * MIB + 4096) as usize;
    assert!(
        replica[at..at + 4096] == lost[..],
        "the lost write is missing"
    );
    let peer = virtual_content(&img);
    assert!(
        replica == peer,
        "the replica differs from qemu-img's raw of the VHDX"
    );
    let after = next_data(&replica_img, VHDX_DATA_AT).unwrap();
    assert!(
        after >= 3 * MIB,
        "the released block is not a hole on the replica: data at {after}"
    );
}

/// Opens the VHDX at `path` for writing once the killed VMM's lock on it is gone (the
/// kernel releases it as the process's files are closed).
fn open_for_writing(path: &Path) -> vhdx::Vhdx {
    let start = std::time::Instant::now();
    loop {
        match vhdx::Vhdx::open(path, vhdx::OpenOptions::default()) {
            Ok(v) => return v,
            Err(vhdx::Error::Locked { .. }) if start.elapsed() < T => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    }
}
