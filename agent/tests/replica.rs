//! vireod as a replica server: a primary (driven by hand here as host-a, over the
//! peer listener's mutual TLS) declares a VM, sends its initial copy and the sealed
//! segments of a real change log, and commits recovery points; the replica's images
//! equal the primary's disks at each cut. Hosts not allowed to replicate are refused
//! and store nothing; a corrupt segment is refused, changes nothing, and is taken when
//! re-sent intact.

use crate::common;

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
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
pub(crate) fn replica_server(
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
            .map(|d| d.log.seal(cut).unwrap().sync().unwrap().seq)
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
    let seq = d.log.seal(1).unwrap().sync().unwrap().seq;
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

/// A primary VM's disks as the VMM keeps them: each write logged, then written to
/// the raw image; a cut seals every log at one cut id.
struct PrimaryVm {
    dir: tempfile::TempDir,
    disks: Vec<(ChangeLog, std::fs::File)>,
    model: Vec<Vec<u8>>,
    cut: u64,
}

impl PrimaryVm {
    fn new(n: usize, base: &[u8]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut disks = Vec::new();
        for i in 0..n {
            let log_dir = dir.path().join(format!("log{i}"));
            std::fs::create_dir(&log_dir).unwrap();
            let img = dir.path().join(format!("disk{i}.img"));
            std::fs::write(&img, base).unwrap();
            let log = ChangeLog::open(confine::open_dir(&log_dir).unwrap(), "t", DISK)
                .unwrap()
                .0;
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            disks.push((log, f));
        }
        PrimaryVm {
            dir,
            disks,
            model: vec![base.to_vec(); n],
            cut: 0,
        }
    }

    fn write(&mut self, i: usize, offset: u64, seed: u8, len: usize) {
        use std::os::unix::fs::FileExt;
        let data: Vec<u8> = (0..len).map(|k| seed.wrapping_add((k / 7) as u8)).collect();
        self.disks[i].0.append_data(offset, &data).unwrap();
        self.disks[i].1.write_all_at(&data, offset).unwrap();
        self.model[i][offset as usize..offset as usize + len].copy_from_slice(&data);
    }

    fn cut(&mut self) -> u64 {
        self.cut += 1;
        for (log, _) in self.disks.iter_mut() {
            log.seal(self.cut).unwrap().sync().unwrap();
        }
        self.cut
    }

    fn sources(&self) -> Vec<agent::replica_primary::DiskSource> {
        (0..self.disks.len())
            .map(|i| agent::replica_primary::DiskSource {
                log_dir: self.dir.path().join(format!("log{i}")),
                image: self.dir.path().join(format!("disk{i}.img")),
                size: DISK,
                format: agent::replica_primary::ImageFormat::Raw,
            })
            .collect()
    }

    /// The segment files in disk `i`'s log (beside them: its region map).
    fn log_files(&self, i: usize) -> usize {
        std::fs::read_dir(self.dir.path().join(format!("log{i}")))
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.ends_with(replica::SEGMENT_SUFFIX))
            })
            .count()
    }
}

fn round(
    shipper: &agent::replica_primary::Shipper,
    vm: &std::sync::Mutex<PrimaryVm>,
) -> Result<agent::replica_primary::RoundStats, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(shipper.round(|| async { Ok(vm.lock().unwrap().cut()) }))
        .map_err(|e| agent::error_chain(&e))
}

#[test]
fn the_primary_s_rounds_resume_after_a_cut_link_and_a_torn_cut_without_a_full_copy() {
    let pki = Pki::new();
    let (_d, addr, dir, _store) = replica_server(&pki, &[]);
    let a_id = pki.host("host-a");
    let base: Vec<u8> = (0..DISK as usize)
        .map(|i| {
            if i < DISK as usize / 2 {
                (i / 512) as u8
            } else {
                0
            }
        })
        .collect();
    let vm = std::sync::Mutex::new(PrimaryVm::new(2, &base));
    let shipper = agent::replica_primary::Shipper {
        to: endpoint(&addr, "host-b", &a_id),
        vm: "vm1".into(),
        disks: vm.lock().unwrap().sources(),
        extras: Default::default(),
        history: 1,
        history_spacing_s: 0,
        reverse: false,
        throttle: agent::throttle::Throttle::new(None),
        verified: Default::default(),
    };
    let same = |what: &str| {
        let v = vm.lock().unwrap();
        for (i, model) in v.model.iter().enumerate() {
            assert!(
                image(&dir, "host-a", "vm1", i) == *model,
                "{what}: disk {i} differs"
            );
        }
    };

    // Round 1: the initial copy (the zero half skipped), then the first point.
    vm.lock().unwrap().write(0, 4096, 1, 8192);
    let s = round(&shipper, &vm).unwrap();
    assert!(s.base_bytes > 0 && s.base_bytes < DISK, "{s:?}");
    assert_eq!((s.point, s.segments_sent), (Some(1), 2), "{s:?}");
    same("after round 1");

    // Round 2: only the new segments.
    vm.lock().unwrap().write(1, 600_000, 2, 4096);
    let s = round(&shipper, &vm).unwrap();
    assert_eq!(
        (s.base_bytes, s.point, s.segments_sent),
        (0, Some(2), 2),
        "{s:?}"
    );
    same("after round 2");

    // The link is cut for a round (nobody listens there): the cut is made, nothing
    // is lost; the next round sends what piled up, no initial copy again.
    let dead = agent::replica_primary::Shipper {
        to: endpoint(
            &format!("127.0.0.1:{}", common::pki::free_port()),
            "host-b",
            &a_id,
        ),
        vm: "vm1".into(),
        disks: shipper.disks.clone(),
        extras: Default::default(),
        history: 1,
        history_spacing_s: 0,
        reverse: false,
        throttle: agent::throttle::Throttle::new(None),
        verified: Default::default(),
    };
    vm.lock().unwrap().write(0, 800_000, 3, 4096);
    let err = round(&dead, &vm).unwrap_err();
    assert!(err.contains("connect"), "{err}");
    vm.lock().unwrap().cut();
    vm.lock().unwrap().write(1, 0, 4, 512);
    let s = round(&shipper, &vm).unwrap();
    assert_eq!(s.base_bytes, 0, "{s:?}");
    assert_eq!(s.segments_sent, 4, "the piled-up segments only: {s:?}");
    assert!(s.segment_bytes < 64 << 10, "{s:?}");
    same("after the outage");

    // A cut the VMM's death tore (disk 0 sealed, disk 1 not): the next complete cut
    // is the point.
    {
        let mut v = vm.lock().unwrap();
        v.write(0, 12_288, 5, 4096);
        v.write(1, 12_288, 6, 4096);
        v.cut += 1;
        let torn = v.cut;
        v.disks[0].0.seal(torn).unwrap().sync().unwrap();
        v.write(0, 20_480, 7, 4096);
    }
    let s = round(&shipper, &vm).unwrap();
    assert_eq!(s.point, Some(vm.lock().unwrap().cut), "{s:?}");
    same("after a torn cut");

    // Applied segments are deleted but each disk's newest sealed one and the open one.
    let v = vm.lock().unwrap();
    assert_eq!((v.log_files(0), v.log_files(1)), (2, 2));
}

/// The primary host-a's vireod (no autostart) and a directory for its disks beneath
/// one of its storage roots.
pub(crate) fn primary_host(pki: &Pki) -> (common::Daemon, PathBuf) {
    let a_id = pki.host("host-a");
    let mut args = common::pki::tls_args(&a_id);
    args.push("--no-autostart".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = common::Daemon::start(&refs);
    let disks_dir = a.dir.path().join("disks");
    std::fs::create_dir(&disks_dir).unwrap();
    (a, disks_dir)
}

/// The replication status of `vm` on `d` (its unix socket API).
pub(crate) fn replication(d: &common::Daemon, vm: &str) -> Value {
    d.ok("GET", &format!("/api/v1/vms/{vm}/replication"), None)
}

/// Waits until `vm`'s replication satisfies `done`.
pub(crate) fn wait_replication(
    d: &common::Daemon,
    vm: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let start = std::time::Instant::now();
    loop {
        let v = replication(d, vm);
        if done(&v) {
            return v;
        }
        assert!(
            start.elapsed() < common::T * 3,
            "{what}: {v}\nvireod log:\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn point(v: &Value) -> u64 {
    v["last_point"].as_u64().unwrap_or(0)
}

/// End to end: a real VMM with the test guest writing to two raw disks on the
/// primary vireod (host-a); `PUT .../replication` every second to the replica vireod
/// (host-b) over mutual TLS. The VMM is killed with SIGKILL mid-run and started again:
/// replication resumes with no second initial copy. Once the guest is paused and a
/// later cut is a recovery point, each replica image equals its disk byte for byte.
#[test]
fn a_running_vm_replicates_survives_a_kill_9_of_its_vmm_and_its_replica_equals_its_disks() {
    let pki = Pki::new();
    let (_b, addr, dir, _store) = replica_server(&pki, &[]);
    let (mut a, disks_dir) = primary_host(&pki);
    let size = 4u64 << 20;
    let mut disks = Vec::new();
    let mut images = Vec::new();
    for i in 0..2 {
        let img = disks_dir.join(format!("d{i}.raw"));
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        disks.push(json!({
            "path": img,
            "format": "raw",
            "replica_log": disks_dir.join(format!("d{i}.rlog")),
        }));
        images.push(img);
    }
    let def = json!({
        "config": {
            "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=replica-writer disks=2 blocks=64"},
            "memory": {"size": 32u64 << 20},
            "disks": disks,
        },
        "restart": "never",
    });
    a.ok("PUT", "/api/v1/vms/vm1", Some(&def.to_string()));
    a.ok("PUT", "/api/v1/vms/vm1/start", None);
    a.wait_serial("vm1", "rw n=10\n", common::T);
    // The VMM is jailed (vireod's default as root): vireod made each change log
    // directory and gave it to the VM's own uid, and the VMM writes its segments there.
    for i in 0..2 {
        let log = disks_dir.join(format!("d{i}.rlog"));
        let owner = std::fs::metadata(&log).unwrap().uid();
        assert_ne!(owner, 0, "{}: not handed to the jail", log.display());
        for f in std::fs::read_dir(&log).unwrap() {
            let f = f.unwrap();
            // vireod's own mark of the boot writing it (root's: replica_crash).
            if f.file_name() == agent::replica_crash::WRITER_MARK {
                continue;
            }
            assert_eq!(f.metadata().unwrap().uid(), owner);
        }
    }

    // An interval under 1 s is refused.
    let (s, body) = a.api(
        "PUT",
        "/api/v1/vms/vm1/replication",
        Some(&json!({"to": addr, "server_name": "host-b", "interval_s": 0.5}).to_string()),
    );
    assert_eq!(s, 400, "{body}");
    let enable = json!({"to": addr, "server_name": "host-b", "interval_s": 1}).to_string();
    a.ok("PUT", "/api/v1/vms/vm1/replication", Some(&enable));
    let v = wait_replication(&a, "vm1", "a second recovery point", |v| point(v) >= 2);
    let base = v["base_bytes_sent"].as_u64().unwrap();
    assert!(base > 0, "{v}");
    a.wait_log("replication-enabled");

    // kill -9 of the VMM mid-run: rounds fail (an event says so), nothing is lost.
    let pid = a.pid("vm1").unwrap();
    // SAFETY: a plain kill(2) of the VMM this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let failed = wait_replication(&a, "vm1", "a failed round", |v| {
        v["failed_rounds"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(failed["state"], "retrying", "{failed}");
    a.wait_log("replication-failing");
    let before = point(&failed);
    a.wait_state("vm1", "Crashed", common::T);
    a.ok("PUT", "/api/v1/vms/vm1/start", None);
    let v = wait_replication(&a, "vm1", "a point after the restart", |v| {
        point(v) >= before + 2
    });
    assert_eq!(
        v["base_bytes_sent"].as_u64(),
        Some(base),
        "a second initial copy: {v}"
    );
    a.wait_log("replication-recovered");

    // kill -9 of the primary vireod (its VMM keeps running): the settings are in its
    // inventory, the loop comes back on its own and goes on from the replica's point
    // (the new process's counters: no byte of an initial copy).
    let before = point(&replication(&a, "vm1"));
    a.kill9();
    a.spawn();
    a.wait_log("replication restored");
    let v = wait_replication(&a, "vm1", "a point after the vireod restart", |v| {
        v["last_point"].as_u64().is_some_and(|p| p > before)
    });
    assert_eq!(
        v["base_bytes_sent"].as_u64(),
        Some(0),
        "an initial copy: {v}"
    );

    // The guest paused: a point cut after the pause holds every write; the replica
    // images equal the disks byte for byte.
    a.ok("PUT", "/api/v1/vms/vm1/pause", None);
    let paused_at = point(&replication(&a, "vm1"));
    wait_replication(&a, "vm1", "a point after the pause", |v| {
        point(v) >= paused_at + 2
    });
    a.ok("POST", "/api/v1/vms/vm1/replication/pause", None);
    let st = replication(&a, "vm1");
    assert_eq!(
        (st["paused"].as_bool(), st["state"].as_str()),
        (Some(true), Some("paused"))
    );
    for (i, img) in images.iter().enumerate() {
        let replica = image(&dir, "host-a", "vm1", i);
        assert!(
            replica == std::fs::read(img).unwrap(),
            "disk {i}: the replica differs"
        );
        assert!(
            replica.iter().any(|&b| b != 0),
            "disk {i}: nothing was written"
        );
    }
    let list = a.ok("GET", "/api/v1/replication", None);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    // Paused stays paused across a restart of vireod; disabled stays disabled.
    a.kill9();
    a.spawn();
    a.wait_log("replication restored");
    let st = replication(&a, "vm1");
    assert_eq!(st["paused"].as_bool(), Some(true), "{st}");
    assert_eq!(st["rounds"].as_u64(), Some(0), "{st}");
    a.ok("DELETE", "/api/v1/vms/vm1/replication", None);
    a.kill9();
    a.spawn();
    let (s, body) = a.api("GET", "/api/v1/vms/vm1/replication", None);
    assert_eq!(s, 404, "{body}");
}

/// A change log directory is a path the VM names like its disks: beneath a storage
/// root, no symlink on the way, checked when the VM is defined and again when vireod
/// makes it for a start (the jail chowns it to the VM's uid: a host directory named
/// there, or reached through a link swapped in later, would be given away).
#[test]
fn a_change_log_outside_the_storage_roots_or_through_a_link_is_refused_and_nothing_is_chowned() {
    let d = common::Daemon::start(&["--no-autostart"]);
    let disks = d.dir.path().join("disks");
    std::fs::create_dir(&disks).unwrap();
    let img = disks.join("d0.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // A host directory outside every root, and links to it beneath the root.
    let outside = tempfile::Builder::new()
        .prefix("outside")
        .tempdir()
        .unwrap();
    let host_dir = outside.path().join("etc-like");
    std::fs::create_dir(&host_dir).unwrap();
    std::os::unix::fs::symlink(&host_dir, disks.join("link")).unwrap();
    let def = |log: &Path| {
        json!({
            "config": {
                "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=replica-writer blocks=8"},
                "memory": {"size": 32u64 << 20},
                "disks": [{"path": img, "format": "raw", "replica_log": log}],
            },
            "restart": "never",
        })
        .to_string()
    };
    for (log, why) in [
        (host_dir.join("new.rlog"), "outside every storage root"),
        (host_dir.clone(), "outside every storage root"),
        (disks.join("link"), "symlink"),
        (disks.join("link/new.rlog"), "symlink"),
        (disks.join("missing/new.rlog"), "replica_log"),
    ] {
        let (s, v) = d.api("PUT", "/api/v1/vms/vm1", Some(&def(&log)));
        assert_eq!(s, 400, "{}: {v}", log.display());
        assert!(
            v.contains("replica_log") && v.contains(why),
            "{}: {v}",
            log.display()
        );
    }
    assert!(!host_dir.join("new.rlog").exists());

    // Accepted beneath the root; swapped for a link before the start: the start is
    // refused, the VMM never runs, the host directory keeps its owner.
    let log = disks.join("d0.rlog");
    d.ok("PUT", "/api/v1/vms/vm1", Some(&def(&log)));
    std::os::unix::fs::symlink(&host_dir, &log).unwrap();
    let (s, v) = d.api("PUT", "/api/v1/vms/vm1/start", None);
    assert_ne!(s, 200, "{v}");
    // Opened with O_NOFOLLOW|O_DIRECTORY: the link is "not a directory".
    assert!(
        v.contains("replica_log") && (v.contains("symlink") || v.contains("Not a directory")),
        "{v}"
    );
    assert_eq!(std::fs::metadata(&host_dir).unwrap().uid(), 0);
    assert!(d.pid("vm1").is_none(), "a VMM was started");
}

/// A jailed VM's change log is its uid's while it runs; when the VM is deleted the
/// directory and every entry in it go back to root (its uid is handed to the next VM),
/// through the directory's descriptor: a link planted in it changes owner itself, its
/// target keeps its owner.
#[test]
fn a_deleted_jailed_vms_change_log_goes_back_to_root() {
    let d = common::Daemon::start(&["--no-autostart"]);
    let disks = d.dir.path().join("disks");
    std::fs::create_dir(&disks).unwrap();
    let img = disks.join("d0.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let log = disks.join("d0.rlog");
    let def = json!({
        "config": {
            "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=replica-writer blocks=8 count=20"},
            "memory": {"size": 32u64 << 20},
            "disks": [{"path": img, "format": "raw", "replica_log": log}],
        },
        "restart": "never",
    })
    .to_string();
    d.ok("PUT", "/api/v1/vms/vm1", Some(&def));
    d.ok("PUT", "/api/v1/vms/vm1/start", None);
    d.wait_state("vm1", "Stopped", std::time::Duration::from_secs(60));
    // vireod's own writer mark (root's) goes once it synced the logs after the VMM
    // ended, which is after the VM shows Stopped.
    let mark = log.join(agent::replica_crash::WRITER_MARK);
    let since = std::time::Instant::now();
    while mark.exists() {
        assert!(
            since.elapsed() < std::time::Duration::from_secs(30),
            "vireod never removed its writer mark"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uid = std::fs::metadata(&log).unwrap().uid();
    assert_ne!(uid, 0, "the jailed VMM owned its change log");
    let segments: Vec<PathBuf> = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!segments.is_empty(), "the guest's writes were logged");
    assert!(segments
        .iter()
        .all(|p| std::fs::symlink_metadata(p).unwrap().uid() == uid));
    // A link planted by the VM's uid, pointing at a host file of another owner.
    let host_file = d.dir.path().join("host-file");
    std::fs::write(&host_file, b"host").unwrap();
    std::os::unix::fs::chown(&host_file, Some(4242), Some(4242)).unwrap();
    let planted = log.join("planted");
    std::os::unix::fs::symlink(&host_file, &planted).unwrap();
    std::os::unix::fs::lchown(&planted, Some(uid), Some(uid)).unwrap();

    d.ok("DELETE", "/api/v1/vms/vm1", None);
    assert_eq!(std::fs::metadata(&log).unwrap().uid(), 0);
    for p in segments.iter().chain([&planted]) {
        let m = std::fs::symlink_metadata(p).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "{}", p.display());
    }
    assert_eq!(std::fs::metadata(&host_file).unwrap().uid(), 4242);
}

/// A host crash as the disk and its change log see it: the primary's vireod and VMM
/// die at once, the log's writer mark names another boot (the one that went down), and
/// a write reached the image but not the log (after the guest's last flush). At the
/// next start the log starts again (event `replication-resync-required`), the replica
/// is reset and resynchronised by block hashes — only differing blocks sent — and its
/// image equals the disk again, that write included. (Before, the replica went on
/// from its point and never got that block.)
#[test]
fn after_a_host_crash_the_replica_is_resynchronised_and_equals_the_disk_again() {
    use std::os::unix::fs::FileExt;
    let pki = Pki::new();
    let (_b, addr, dir, _store) = replica_server(&pki, &[]);
    let (mut a, disks_dir) = primary_host(&pki);
    let size = 4u64 << 20;
    let img = disks_dir.join("d0.raw");
    let log = disks_dir.join("d0.rlog");
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let def = json!({
        "config": {
            "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=replica-writer disks=1 blocks=64"},
            "memory": {"size": 32u64 << 20},
            "disks": [{"path": img, "format": "raw", "replica_log": log}],
        },
        "restart": "never",
    });
    a.ok("PUT", "/api/v1/vms/vm1", Some(&def.to_string()));
    a.ok("PUT", "/api/v1/vms/vm1/start", None);
    a.wait_serial("vm1", "rw n=10\n", common::T);
    let boot = agent::replica_crash::boot_id().unwrap();
    let mark = log.join(agent::replica_crash::WRITER_MARK);
    assert_eq!(std::fs::read_to_string(&mark).unwrap(), boot);
    let enable = json!({"to": addr, "server_name": "host-b", "interval_s": 1}).to_string();
    a.ok("PUT", "/api/v1/vms/vm1/replication", Some(&enable));
    wait_replication(&a, "vm1", "a second recovery point", |v| point(v) >= 2);

    // The host goes down: vireod and the VMM die together; what the crash leaves.
    let pid = a.pid("vm1").unwrap();
    a.kill9();
    // SAFETY: a plain kill(2) of the VMM this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    common::wait_dead(pid, common::T);
    std::fs::write(&mark, "00000000-0000-0000-0000-000000000000").unwrap();
    let lost = vec![0xeeu8; 4096];
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&lost, size - 4096)
        .unwrap();
    let segments_before = std::fs::read_dir(&log).unwrap().count();
    assert!(segments_before > 1);

    // The next boot: the VM starts again; its replica is resynchronised.
    a.spawn();
    a.wait_log("replication restored");
    a.ok("PUT", "/api/v1/vms/vm1/start", None);
    a.wait_log("replication-resync-required");
    let v = wait_replication(&a, "vm1", "a point after the resync", |v| {
        point(v) >= 1 && v["base_bytes_sent"].as_u64().unwrap_or(0) > 0
    });
    let differing = v["base_differing_bytes"].as_u64().unwrap();
    assert!(
        differing >= 4096 && differing < size,
        "the resync sends the differing blocks only: {v}"
    );
    assert!(!log.join(agent::replica_crash::RESYNC_MARK).exists());
    assert_eq!(std::fs::read_to_string(&mark).unwrap(), boot);

    // The guest paused: a later point holds everything; the replica equals the disk.
    a.ok("PUT", "/api/v1/vms/vm1/pause", None);
    let paused_at = point(&replication(&a, "vm1"));
    wait_replication(&a, "vm1", "a point after the pause", |v| {
        point(v) >= paused_at + 2
    });
    a.ok("POST", "/api/v1/vms/vm1/replication/pause", None);
    let replica = image(&dir, "host-a", "vm1", 0);
    assert!(
        replica[(size - 4096) as usize..] == lost[..],
        "the lost write is not on the replica"
    );
    assert!(
        replica == std::fs::read(&img).unwrap(),
        "the replica differs"
    );

    // A VMM that ends on this boot leaves no mark: no resync at its next start.
    a.ok("PUT", "/api/v1/vms/vm1/kill", None);
    let start = std::time::Instant::now();
    while mark.exists() {
        assert!(
            start.elapsed() < common::T,
            "the writer mark stays after the VMM ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
