//! vireod as a replica server: a primary (driven by hand here as host-a, over the
//! peer listener's mutual TLS) declares a VM, sends its initial copy and the sealed
//! segments of a real change log, and commits recovery points; the replica's images
//! equal the primary's disks at each cut. Hosts not allowed to replicate are refused
//! and store nothing; a corrupt segment is refused, changes nothing, and is taken when
//! re-sent intact.

mod common;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use agent::client::Endpoint;
use common::pki::{call_raw, endpoint, host_daemon, Pki};
use replica::{segment_file_name, ChangeLog};
use serde_json::{json, Value};

const DISK: u64 = 1 << 20;

/// A primary's disk: its change log and a model of its bytes.
struct Disk {
    _dir: tempfile::TempDir,
    log: ChangeLog,
    model: Vec<u8>,
}

impl Disk {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fd: OwnedFd = confine::open_dir(dir.path()).unwrap();
        let log = ChangeLog::open(fd, "test", DISK).unwrap().0;
        Disk {
            _dir: dir,
            log,
            model: vec![0; DISK as usize],
        }
    }

    fn write(&mut self, offset: u64, seed: u8, len: usize) {
        let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8 / 3)).collect();
        self.log.append_data(offset, &data).unwrap();
        self.model[offset as usize..offset as usize + len].copy_from_slice(&data);
    }

    /// The raw bytes of sealed segment `seq`.
    fn segment(&self, seq: u64) -> Vec<u8> {
        std::fs::read(self._dir.path().join(segment_file_name(seq))).unwrap()
    }
}

fn zstd(b: &[u8]) -> Vec<u8> {
    zstd::encode_all(b, 3).unwrap()
}

fn ok(to: &Endpoint, method: &str, path: &str, body: Option<Vec<u8>>) -> Value {
    let (s, v) = call_raw(to, method, path, body).unwrap();
    assert_eq!(s, 200, "{method} {path}: {v}");
    v
}

fn image(dir: &Path, primary: &str, vm: &str, disk: usize) -> Vec<u8> {
    std::fs::read(dir.join(primary).join(vm).join(format!("disk-{disk}.img"))).unwrap()
}

/// A replica server admitting host-a (allowed to replicate) and host-c (a peer that
/// is not), with `extra` flags; its replica directory.
fn replica_server(
    pki: &Pki,
    extra: &[&str],
) -> (common::Daemon, String, PathBuf, tempfile::TempDir) {
    let b = pki.host("host-b");
    let store = tempfile::Builder::new()
        .prefix("replicas")
        .tempdir()
        .unwrap();
    let dir = store.path().join("replicas");
    let mut args = vec![
        "--replica-dir".to_string(),
        dir.display().to_string(),
        "--replica-allow".into(),
        "host-a".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (d, addr) = host_daemon(&b, &["host-a", "host-c"], &refs);
    (d, addr, dir, store)
}

#[test]
fn a_primary_not_on_the_replica_allow_list_is_refused_and_stores_nothing() {
    let pki = Pki::new();
    let (d, addr, dir, _store) = replica_server(&pki, &[]);
    let c = endpoint(&addr, "host-b", &pki.host("host-c"));
    let declare = json!({"disks": [DISK]}).to_string().into_bytes();
    for (method, path, body) in [
        ("PUT", "/peer/v1/replica/vm1", Some(declare.clone())),
        ("GET", "/peer/v1/replica/vm1", None),
        (
            "PUT",
            "/peer/v1/replica/vm1/disks/0/segments/1",
            Some(zstd(b"x")),
        ),
        ("POST", "/peer/v1/replica/vm1/points", Some(b"{}".to_vec())),
    ] {
        let (s, v) = call_raw(&c, method, path, body).unwrap();
        assert_eq!(s, 403, "{method} {path}: {v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("not an allowed replication primary"),
            "{v}"
        );
    }
    d.wait_log("replica: refused a host that is not an allowed primary");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "something was stored"
    );

    // The allowed primary gets in, but names only a VM, never a path.
    let a = endpoint(&addr, "host-b", &pki.host("host-a"));
    for name in ["..", ".hidden", "a%2Fb", "%2E%2E"] {
        let (s, v) = call_raw(
            &a,
            "PUT",
            &format!("/peer/v1/replica/{name}"),
            Some(declare.clone()),
        )
        .unwrap();
        assert!(s == 400 || s == 404, "{name}: {s} {v}");
    }
    assert!(
        !dir.join("host-a").exists() || std::fs::read_dir(dir.join("host-a")).unwrap().count() == 0
    );
    ok(&a, "PUT", "/peer/v1/replica/vm1", Some(declare));
    assert!(dir.join("host-a/vm1/disk-0.img").is_file());
    assert!(!dir.join("host-c").exists());
}

#[test]
fn segments_over_mutual_tls_give_points_equal_to_the_primary_and_a_corrupt_one_is_refused_then_taken(
) {
    let pki = Pki::new();
    let (_d, addr, dir, _store) = replica_server(&pki, &[]);
    let a = endpoint(&addr, "host-b", &pki.host("host-a"));
    let mut disks = [Disk::new(), Disk::new()];
    // What the disks held before their logs started: the initial copy.
    let base: Vec<u8> = (0..DISK as usize).map(|i| (i / 4096) as u8).collect();
    for d in disks.iter_mut() {
        d.model.copy_from_slice(&base);
    }
    ok(
        &a,
        "PUT",
        "/peer/v1/replica/vm1",
        Some(json!({"disks": [DISK, DISK]}).to_string().into_bytes()),
    );
    let chunk = 256 << 10;
    for disk in 0..2 {
        for off in (0..DISK as usize).step_by(chunk) {
            ok(
                &a,
                "PUT",
                &format!("/peer/v1/replica/vm1/disks/{disk}/base/{off}"),
                Some(zstd(&base[off..off + chunk])),
            );
        }
    }
    // No point before the initial copy is complete.
    let v = ok(&a, "POST", "/peer/v1/replica/vm1/base-complete", None);
    assert_eq!(v["base_complete"], true, "{v}");

    let mut cut = 0;
    for round in 0..3u8 {
        disks[0].write(4096 * (round as u64 + 1), round, 8192);
        disks[1].write(65536 + 512 * round as u64, round + 50, 512);
        cut += 1;
        let seqs: Vec<u64> = disks
            .iter_mut()
            .map(|d| d.log.seal(cut).unwrap().seq)
            .collect();
        for (i, d) in disks.iter().enumerate() {
            let raw = d.segment(seqs[i]);
            let path = format!("/peer/v1/replica/vm1/disks/{i}/segments/{}", seqs[i]);
            if round == 1 && i == 0 {
                // One flipped bit in the data: refused (422), nothing staged, no point.
                let before = image(&dir, "host-a", "vm1", 0);
                let mut bad = raw.clone();
                bad[64 + 32 + 100] ^= 0x10;
                let (s, v) = call_raw(&a, "PUT", &path, Some(zstd(&bad))).unwrap();
                assert_eq!(s, 422, "{v}");
                assert!(v["error"].as_str().unwrap().contains("checksum"), "{v}");
                let (s, v) = call_raw(
                    &a,
                    "POST",
                    "/peer/v1/replica/vm1/points",
                    Some(
                        json!({"cut_id": cut, "seqs": seqs})
                            .to_string()
                            .into_bytes(),
                    ),
                )
                .unwrap();
                assert_eq!(s, 409, "a point without disk 0's segment: {v}");
                assert!(
                    image(&dir, "host-a", "vm1", 0) == before,
                    "the image changed"
                );
                let st = ok(&a, "GET", "/peer/v1/replica/vm1", None);
                assert_eq!(st["point"]["cut_id"], cut - 1, "{st}");
                assert_eq!(st["disks"][0]["staged"], json!([]), "{st}");
            }
            let v = ok(&a, "PUT", &path, Some(zstd(&raw)));
            assert_eq!(
                (v["cut_id"].as_u64(), &v["applied"]),
                (Some(cut), &json!(false)),
                "{v}"
            );
        }
        let v = ok(
            &a,
            "POST",
            "/peer/v1/replica/vm1/points",
            Some(
                json!({"cut_id": cut, "seqs": seqs})
                    .to_string()
                    .into_bytes(),
            ),
        );
        assert_eq!(v["new"], true, "{v}");
        for (i, d) in disks.iter().enumerate() {
            assert!(
                image(&dir, "host-a", "vm1", i) == d.model,
                "round {round}: disk {i} differs from the primary at cut {cut}"
            );
            // A re-send after the point (a cut connection): recognised, harmless.
            let path = format!("/peer/v1/replica/vm1/disks/{i}/segments/{}", seqs[i]);
            let v = ok(&a, "PUT", &path, Some(zstd(&d.segment(seqs[i]))));
            assert_eq!(v["applied"], true, "{v}");
        }
        let v = ok(
            &a,
            "POST",
            "/peer/v1/replica/vm1/points",
            Some(
                json!({"cut_id": cut, "seqs": seqs})
                    .to_string()
                    .into_bytes(),
            ),
        );
        assert_eq!(v["new"], false, "{v}");
    }
    // The initial copy is closed now.
    let (s, v) = call_raw(
        &a,
        "PUT",
        "/peer/v1/replica/vm1/disks/0/base/0",
        Some(zstd(&[0u8; 512])),
    )
    .unwrap();
    assert_eq!(s, 409, "{v}");
}

#[test]
fn oversized_uploads_are_refused_before_they_are_stored() {
    let pki = Pki::new();
    let (_d, addr, dir, _store) = replica_server(&pki, &["--replica-max-segment", "65536"]);
    let a = endpoint(&addr, "host-b", &pki.host("host-a"));
    ok(
        &a,
        "PUT",
        "/peer/v1/replica/vm1",
        Some(json!({"disks": [DISK]}).to_string().into_bytes()),
    );
    // A zstd bomb as a chunk of the initial copy.
    let bomb = zstd(&vec![0u8; 64 << 20]);
    let (s, v) = call_raw(&a, "PUT", "/peer/v1/replica/vm1/disks/0/base/0", Some(bomb)).unwrap();
    assert_eq!(s, 413, "{v}");
    ok(&a, "POST", "/peer/v1/replica/vm1/base-complete", None);
    let mut d = Disk::new();
    // Compressible data: small on the wire, over the bound once decompressed.
    d.log.append_data(0, &vec![7u8; 512 << 10]).unwrap();
    let seq = d.log.seal(1).unwrap().seq;
    let body = zstd(&d.segment(seq));
    assert!(body.len() < 65536);
    let (s, v) = call_raw(
        &a,
        "PUT",
        &format!("/peer/v1/replica/vm1/disks/0/segments/{seq}"),
        Some(body),
    )
    .unwrap();
    assert_eq!(s, 413, "{v}");
    // Incompressible bytes over the bound on the wire.
    let noise: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let (s, v) = call_raw(
        &a,
        "PUT",
        "/peer/v1/replica/vm1/disks/0/segments/1",
        Some(noise),
    )
    .unwrap();
    assert_eq!(s, 413, "{v}");
    let entries: Vec<_> = std::fs::read_dir(dir.join("host-a/vm1/disk-0"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(entries.iter().all(|n| n == "applied"), "{entries:?}");
    assert!(image(&dir, "host-a", "vm1", 0).iter().all(|&b| b == 0));
}
