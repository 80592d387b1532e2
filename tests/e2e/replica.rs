//! Vireo Replica end to end, through a real `vireo` and the test guest: the change log
//! covers every write the guest saw completed even after kill -9, and `vm.replica-cut`
//! is one crash-consistent point across all of a VM's disks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use replica::{RecordKind, SegmentReader};
use vireo_e2e::pattern;
use vireo_e2e::{api, wait_for_socket, Vireo};

const T: Duration = Duration::from_secs(120);
const BLOCK: usize = 4096;

/// What a replica knows of one disk: its bytes and every data record applied, in order.
struct Model {
    bytes: Vec<u8>,
    records: Vec<(u64, Vec<u8>)>,
}

impl Model {
    fn zeros(size: u64) -> Self {
        Self {
            bytes: vec![0; size as usize],
            records: Vec::new(),
        }
    }

    /// Verifies the whole segment, then applies it (as a replica does).
    fn apply(&mut self, file: &Path) {
        let f = std::fs::File::open(file).unwrap();
        let mut r = SegmentReader::new(std::io::BufReader::new(f)).unwrap();
        let mut staged = Vec::new();
        let mut buf = Vec::new();
        while let Some(rec) = r.next_record(&mut buf).unwrap() {
            staged.push((rec, buf.clone()));
        }
        for (rec, data) in staged {
            let range = rec.offset as usize..(rec.offset + rec.len) as usize;
            match rec.kind {
                RecordKind::Data => {
                    self.bytes[range].copy_from_slice(&data);
                    self.records.push((rec.offset, data));
                }
                RecordKind::Zeroes => self.bytes[range].fill(0),
            }
        }
    }
}

/// `vm.replica-cut`: (cut id, [(disk, segment file)]).
fn cut(sock: &Path) -> (u64, Vec<(String, PathBuf)>) {
    let (status, body) = api(sock, "PUT", "vm.replica-cut", None);
    assert_eq!(status, 200, "vm.replica-cut: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let segments = v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["disk"].as_str().unwrap().to_string(),
                PathBuf::from(s["file"].as_str().unwrap()),
            )
        })
        .collect();
    (v["cut_id"].as_u64().unwrap(), segments)
}

/// The iterations the guest reported complete (whole lines only: a kill can cut the last).
fn acknowledged(serial: &str) -> Vec<u64> {
    let whole = &serial[..serial.rfind('\n').map_or(0, |i| i + 1)];
    whole
        .lines()
        .filter_map(|l| l.strip_prefix("rw n="))
        .map(|n| n.trim().parse().unwrap())
        .collect()
}

/// Iteration `n`'s block as the guest writes it.
fn block_of(n: u64, blocks: u64) -> (u64, Vec<u8>) {
    let lba = (n % blocks) * 8;
    let mut b = vec![0u8; BLOCK];
    pattern::fill(n, lba, &mut b);
    (lba * 512, b)
}

fn new_vhdx(path: &Path, size: u64) {
    drop(
        vhdx::Vhdx::create(
            path,
            &vhdx::CreateOptions {
                size,
                block_size: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap(),
    );
}

fn read_vhdx(path: &Path) -> Vec<u8> {
    let v = vhdx::Vhdx::open(
        path,
        vhdx::OpenOptions {
            read_only: true,
            no_lock: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut out = vec![0u8; v.virtual_size() as usize];
    v.read_at(&mut out, 0).unwrap();
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Raw,
    Vhdx,
}

#[test]
fn after_kill_9_the_log_of_a_raw_disk_holds_every_acknowledged_write_and_replays_to_the_image() {
    kill_9_then_replay(Format::Raw);
}

#[test]
fn after_kill_9_the_log_of_a_vhdx_disk_holds_every_acknowledged_write_and_covers_the_image() {
    kill_9_then_replay(Format::Vhdx);
}

fn kill_9_then_replay(format: Format) {
    let dir = tempfile::tempdir().unwrap();
    let size = 16u64 << 20;
    // 4 MiB of slots: the writes span several 1 MiB VHDX blocks.
    let blocks = 1024;
    let (disk, name) = match format {
        Format::Raw => {
            let p = dir.path().join("os.raw");
            std::fs::File::create(&p).unwrap().set_len(size).unwrap();
            (p, "raw")
        }
        Format::Vhdx => {
            let p = dir.path().join("os.vhdx");
            new_vhdx(&p, size);
            (p, "vhdx")
        }
    };
    let log = dir.path().join("os.rlog");
    let sock = dir.path().join("vm.sock");
    let disk_arg = format!(
        "path={},format={name},replica_log={}",
        disk.display(),
        log.display()
    );
    let mut vm = Vireo::guest(
        &format!("test=replica-writer disks=1 blocks={blocks}"),
        &["--disk", &disk_arg, "--api-socket", sock.to_str().unwrap()],
    )
    .spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("rw n=100\n", T);
    let (first_cut, first) = cut(&sock);
    assert_eq!(first_cut, 1);
    vm.wait_serial("rw n=400\n", T);
    // kill -9 while the guest writes.
    let mut child = vm.child.take().unwrap();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let serial = vm.serial_text();
    drop(vm);
    let acked = acknowledged(&serial);
    let last = *acked.last().unwrap();
    assert!(last >= 400, "the guest reported up to {last}");

    // Restart on the same disk and log with a guest that does not write; its cut
    // seals what the dead VMM logged (the log recovered on open).
    let sock2 = dir.path().join("vm2.sock");
    let vm2 = Vireo::guest(
        "test=echo",
        &["--disk", &disk_arg, "--api-socket", sock2.to_str().unwrap()],
    )
    .spawn();
    wait_for_socket(&sock2, T);
    vm2.wait_serial("echo ready", T);
    let (second_cut, second) = cut(&sock2);
    assert_eq!(
        second_cut, 2,
        "the cut id goes on from the newest sealed segment"
    );
    drop(vm2);

    let mut model = Model::zeros(size);
    for (_, file) in first.iter().chain(second.iter()) {
        model.apply(file);
    }
    // Every acknowledged write is in the log, in order (an unacknowledged last one may
    // follow it: it reached the log, and so perhaps the disk, before the kill).
    assert!(
        model.records.len() as u64 >= last && model.records.len() as u64 <= last + 1,
        "{} records for {last} acknowledged writes",
        model.records.len()
    );
    for (i, (offset, data)) in model.records.iter().enumerate() {
        let (want_off, want) = block_of(i as u64 + 1, blocks);
        assert_eq!(*offset, want_off, "record {}", i + 1);
        assert!(*data == want, "record {} holds other bytes", i + 1);
    }
    // And nothing on the disk is missing from the log.
    match format {
        // Raw: every completed write is in the image (the page cache survives the
        // kill), so replaying the log gives the image exactly.
        Format::Raw => assert!(
            std::fs::read(&disk).unwrap() == model.bytes,
            "the image differs from the replayed log"
        ),
        // VHDX: the guest never flushed, so a payload block allocated since the last
        // flush may have lost its BAT entry with the kill and reads as zeros (the
        // format's crash semantics); every other block equals the replayed log.
        Format::Vhdx => {
            let image = read_vhdx(&disk);
            let mut equal = 0;
            for (i, (got, want)) in image
                .chunks(1 << 20)
                .zip(model.bytes.chunks(1 << 20))
                .enumerate()
            {
                if got == want {
                    equal += 1;
                } else {
                    assert!(
                        got.iter().all(|&b| b == 0),
                        "VHDX block {i} differs from the log"
                    );
                }
            }
            assert!(equal >= 2, "{equal} of 16 blocks equal");
        }
    }
}

#[test]
fn every_cut_is_consistent_across_the_disks_and_the_last_equals_the_images() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let blocks = 64;
    let mut args = Vec::new();
    let mut images = Vec::new();
    for d in 0..2 {
        let p = dir.path().join(format!("d{d}.raw"));
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        args.push("--disk".to_string());
        args.push(format!(
            "path={},format=raw,replica_log={}",
            p.display(),
            dir.path().join(format!("d{d}.rlog")).display()
        ));
        images.push(p);
    }
    let sock = dir.path().join("vm.sock");
    args.push("--api-socket".into());
    args.push(sock.to_str().unwrap().into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let vm = Vireo::guest(
        &format!("test=replica-writer disks=2 blocks={blocks}"),
        &argv,
    )
    .spawn();
    wait_for_socket(&sock, T);
    let mut models = [Model::zeros(size), Model::zeros(size)];
    let mut previous = (0usize, 0usize);
    for round in 1..=10u64 {
        vm.wait_serial(&format!("rw n={}\n", round * 25), T);
        let (cut_id, segments) = cut(&sock);
        assert_eq!(cut_id, round);
        assert_eq!(segments.len(), 2);
        for (disk, file) in &segments {
            let d: usize = disk.strip_prefix("disk").unwrap().parse().unwrap();
            models[d].apply(file);
        }
        let k = (models[0].records.len(), models[1].records.len());
        // Disk 1's write n starts after disk 0's write n completed, and disk 0's write
        // n+1 after disk 1's write n: a consistent cut holds k1 <= k0 <= k1 + 1.
        assert!(
            k.1 <= k.0 && k.0 <= k.1 + 1,
            "cut {cut_id}: disk0 has {} writes, disk1 {}",
            k.0,
            k.1
        );
        assert!(k.0 >= previous.0 && k.1 >= previous.1);
        assert!(
            k.1 as u64 >= round * 25,
            "cut {cut_id} misses acknowledged writes"
        );
        previous = k;
    }
    for (d, m) in models.iter().enumerate() {
        for (i, (offset, data)) in m.records.iter().enumerate() {
            let (want_off, want) = block_of(i as u64 + 1, blocks);
            assert!(
                *offset == want_off && *data == want,
                "disk{d} record {}",
                i + 1
            );
        }
    }
    // Paused, one more cut: the replicas equal the images byte for byte.
    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 204);
    let (_, segments) = cut(&sock);
    for (disk, file) in &segments {
        let d: usize = disk.strip_prefix("disk").unwrap().parse().unwrap();
        models[d].apply(file);
    }
    for (d, image) in images.iter().enumerate() {
        assert!(
            std::fs::read(image).unwrap() == models[d].bytes,
            "disk{d}: the image differs from its replica"
        );
    }
    drop(vm);
}

#[test]
fn a_cut_without_replicated_disks_is_refused_and_a_read_only_log_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let vm = Vireo::guest("test=echo", &["--api-socket", sock.to_str().unwrap()]).spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("echo ready", T);
    let (status, body) = api(&sock, "PUT", "vm.replica-cut", None);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("replicated"), "{body}");
    drop(vm);
    let disk = dir.path().join("d.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (out, _) = Vireo::guest(
        "test=boot",
        &[
            "--disk",
            &format!(
                "path={},readonly=on,replica_log={}/log",
                disk.display(),
                dir.path().display()
            ),
        ],
    )
    .run(T);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("read-only disk has no writes to replicate"),
        "{err}"
    );
    assert!(
        !dir.path().join("log").exists(),
        "no log directory was made"
    );
}
