//! The replica store: segments staged, verified, committed as VM-wide points; a
//! corrupt segment refused with nothing applied; a commit a crash cut short finished.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::*;

pub(crate) const DISK: u64 = 1 << 20;

pub(crate) fn dir_fd(p: &Path) -> OwnedFd {
    confine::open_dir(p).unwrap()
}

/// A primary's two disks: their logs and a model of each disk's bytes.
pub(crate) struct Primary {
    _dir: tempfile::TempDir,
    logs: Vec<ChangeLog>,
    pub(crate) model: Vec<Vec<u8>>,
    dirs: Vec<std::path::PathBuf>,
    cut: u64,
}

impl Primary {
    pub(crate) fn new(disks: usize) -> Self {
        let d = tempfile::tempdir().unwrap();
        let mut logs = Vec::new();
        let mut dirs = Vec::new();
        for i in 0..disks {
            let p = d.path().join(format!("log{i}"));
            std::fs::create_dir(&p).unwrap();
            logs.push(ChangeLog::open(dir_fd(&p), "t", DISK).unwrap().0);
            dirs.push(p);
        }
        Primary {
            _dir: d,
            logs,
            model: vec![vec![0u8; DISK as usize]; disks],
            dirs,
            cut: 0,
        }
    }

    pub(crate) fn write(&mut self, disk: usize, offset: u64, seed: u8, len: usize) {
        let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
        self.logs[disk].append_data(offset, &data).unwrap();
        self.model[disk][offset as usize..offset as usize + len].copy_from_slice(&data);
    }

    pub(crate) fn zero(&mut self, disk: usize, offset: u64, len: usize) {
        self.logs[disk].append_zeroes(offset, len as u64).unwrap();
        self.model[disk][offset as usize..offset as usize + len].fill(0);
    }

    /// Seals every disk at one new cut: (cut id, each disk's sequence number).
    pub(crate) fn cut(&mut self) -> (u64, Vec<u64>) {
        self.cut += 1;
        let seqs = self
            .logs
            .iter_mut()
            .map(|l| l.seal(self.cut).unwrap().sync().unwrap().seq)
            .collect();
        (self.cut, seqs)
    }

    pub(crate) fn compressed(&self, disk: usize, seq: u64) -> Vec<u8> {
        let raw = std::fs::read(self.dirs[disk].join(segment_file_name(seq))).unwrap();
        zstd::encode_all(&raw[..], 3).unwrap()
    }
}

pub(crate) fn image(vm: &ReplicaVm, i: usize) -> Vec<u8> {
    let mut b = vec![0u8; DISK as usize];
    vm.image(i).unwrap().read_exact_at(&mut b, 0).unwrap();
    b
}

pub(crate) fn new_vm(root: &Path, disks: usize) -> ReplicaVm {
    let mut vm =
        ReplicaVm::create_or_open(dir_fd(root).as_fd(), "vm1", &vec![DISK; disks]).unwrap();
    vm.complete_base().unwrap();
    vm
}

#[test]
fn committed_points_equal_the_primary_s_disks_at_each_cut_and_resends_are_harmless() {
    let root = tempfile::tempdir().unwrap();
    let mut p = Primary::new(2);
    let mut vm = new_vm(root.path(), 2);
    for round in 0..4u8 {
        p.write(0, 4096 * round as u64, round, 4096);
        p.write(1, 8192 * round as u64 + 512, round + 100, 1024);
        let (cut, seqs) = p.cut();
        for (disk, &seq) in seqs.iter().enumerate() {
            let c = p.compressed(disk, seq);
            assert!(matches!(
                vm.stage(disk, seq, &c[..], 1 << 30).unwrap(),
                Staged::Staged(t) if t.cut_id == cut
            ));
            // A re-send of a staged segment (cut connection) is staged again.
            assert!(matches!(
                vm.stage(disk, seq, &c[..], 1 << 30).unwrap(),
                Staged::Staged(_)
            ));
        }
        let c = vm.commit(cut, &seqs).unwrap();
        assert_eq!(
            c,
            Committed::Committed(Point {
                cut_id: cut,
                seqs: seqs.clone()
            })
        );
        for (disk, &seq) in seqs.iter().enumerate() {
            assert!(
                image(&vm, disk) == p.model[disk],
                "round {round} disk {disk}"
            );
            // Applied: a re-send is recognised and nothing is kept.
            let c = p.compressed(disk, seq);
            assert_eq!(
                vm.stage(disk, seq, &c[..], 1 << 30).unwrap(),
                Staged::AlreadyApplied
            );
        }
        assert!(matches!(
            vm.commit(cut, &seqs).unwrap(),
            Committed::AlreadyThere(_)
        ));
        let st = vm.status().unwrap();
        assert!(st.disks.iter().all(|d| d.staged.is_empty()), "{st:?}");
    }
    // Reopened: the same point.
    let point = vm.point().cloned();
    drop(vm);
    let vm = ReplicaVm::open(dir_fd(root.path()).as_fd(), "vm1").unwrap();
    assert_eq!(vm.point().cloned(), point);
}

#[test]
fn a_corrupt_segment_is_refused_nothing_is_applied_and_the_intact_resend_is_taken() {
    let root = tempfile::tempdir().unwrap();
    let mut p = Primary::new(1);
    let mut vm = new_vm(root.path(), 1);
    p.write(0, 0, 7, 65536);
    let (cut, seqs) = p.cut();
    let raw = std::fs::read(p.dirs[0].join(segment_file_name(seqs[0]))).unwrap();
    let before = image(&vm, 0);
    // One flipped bit in the data; a truncated (torn) one; bytes that are no zstd.
    let mut flipped = raw.clone();
    flipped[64 + 32 + 1000] ^= 1;
    let torn = raw[..raw.len() - 10].to_vec();
    for (what, body) in [
        ("flipped", zstd::encode_all(&flipped[..], 3).unwrap()),
        ("torn", zstd::encode_all(&torn[..], 3).unwrap()),
        ("not zstd", raw.clone()),
    ] {
        let e = vm.stage(0, seqs[0], &body[..], 1 << 30).unwrap_err();
        assert!(
            matches!(e, StoreError::Segment { .. } | StoreError::Invalid(_)),
            "{what}: {e}"
        );
        assert!(vm.status().unwrap().disks[0].staged.is_empty(), "{what}");
        assert!(
            matches!(vm.commit(cut, &seqs), Err(StoreError::Conflict(_))),
            "{what}"
        );
        assert!(image(&vm, 0) == before, "{what}: the image changed");
        assert_eq!(vm.point(), None);
    }
    // Beyond the bound: refused.
    let c = p.compressed(0, seqs[0]);
    assert!(matches!(
        vm.stage(0, seqs[0], &c[..], 1000),
        Err(StoreError::TooLarge { .. })
    ));
    // Sent as another sequence number: refused.
    assert!(vm.stage(0, seqs[0] + 1, &c[..], 1 << 30).is_err());
    // The intact re-send.
    vm.stage(0, seqs[0], &c[..], 1 << 30).unwrap();
    vm.commit(cut, &seqs).unwrap();
    assert!(image(&vm, 0) == p.model[0]);
}

#[test]
fn a_point_needs_every_disk_at_its_cut_and_a_crash_mid_commit_is_finished_on_open() {
    let root = tempfile::tempdir().unwrap();
    let mut p = Primary::new(2);
    let mut vm = new_vm(root.path(), 2);
    p.write(0, 0, 1, 4096);
    p.write(1, 0, 2, 4096);
    let (cut, seqs) = p.cut();
    // Only disk 0 staged: no point.
    vm.stage(0, seqs[0], &p.compressed(0, seqs[0])[..], 1 << 30)
        .unwrap();
    assert!(matches!(
        vm.commit(cut, &seqs),
        Err(StoreError::Conflict(_))
    ));
    vm.stage(1, seqs[1], &p.compressed(1, seqs[1])[..], 1 << 30)
        .unwrap();
    // The wrong cut id: refused.
    assert!(matches!(
        vm.commit(cut + 1, &seqs),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(vm.point(), None);

    // A crash after the intent and disk 0's apply, before disk 1's: simulated by
    // applying disk 0 by hand and writing the intent the commit writes.
    let vm_dir = dir_fd(&root.path().join("vm1"));
    {
        let seg = File::open(
            root.path()
                .join("vm1/disk-0")
                .join(segment_file_name(seqs[0])),
        )
        .unwrap();
        let img = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(root.path().join("vm1/disk-0.img"))
            .unwrap();
        let mut d0 = ReplicaDisk::open(img, dir_fd(&root.path().join("vm1/disk-0"))).unwrap();
        d0.apply(seg).unwrap();
        let point = Point {
            cut_id: cut,
            seqs: seqs.clone(),
        };
        let json = serde_json::to_vec(&point).unwrap();
        let mut b = format!("{:08x}\n", crc32c::crc32c(&json)).into_bytes();
        b.extend_from_slice(&json);
        confine::write_private_atomic(vm_dir.as_fd(), "committing".as_ref(), &b).unwrap();
    }
    drop(vm);
    let vm = ReplicaVm::open(dir_fd(root.path()).as_fd(), "vm1").unwrap();
    assert_eq!(
        vm.point(),
        Some(&Point {
            cut_id: cut,
            seqs: seqs.clone()
        })
    );
    for (disk, model) in p.model.iter().enumerate() {
        assert!(image(&vm, disk) == *model, "disk {disk}");
    }
    assert!(!root.path().join("vm1/committing").exists());
}

#[test]
fn the_initial_copy_is_bounded_and_closed_before_points_and_disks_must_match() {
    let root = tempfile::tempdir().unwrap();
    let fd = dir_fd(root.path());
    let mut vm = ReplicaVm::create_or_open(fd.as_fd(), "vm1", &[DISK]).unwrap();
    let mut p = Primary::new(1);
    p.write(0, 0, 3, 512);
    let (cut, seqs) = p.cut();
    vm.stage(0, seqs[0], &p.compressed(0, seqs[0])[..], 1 << 30)
        .unwrap();
    assert!(matches!(
        vm.commit(cut, &seqs),
        Err(StoreError::Conflict(_))
    ));
    vm.write_base(0, 4096, &[9u8; 4096]).unwrap();
    assert!(matches!(
        vm.write_base(0, DISK - 512, &[1u8; 1024]),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        vm.write_base(0, u64::MAX - 511, &[1u8; 1024]),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        vm.write_base(1, 0, &[1u8; 512]),
        Err(StoreError::Invalid(_))
    ));
    vm.complete_base().unwrap();
    assert!(matches!(
        vm.write_base(0, 0, &[1u8; 512]),
        Err(StoreError::Conflict(_))
    ));
    vm.commit(cut, &seqs).unwrap();
    let img = image(&vm, 0);
    assert!(img[..512] == p.model[0][..512] && img[4096..8192] == [9u8; 4096]);
    drop(vm);
    assert!(matches!(
        ReplicaVm::create_or_open(fd.as_fd(), "vm1", &[DISK, DISK]),
        Err(StoreError::Conflict(_))
    ));
    assert!(ReplicaVm::create_or_open(fd.as_fd(), "vm1", &[DISK]).is_ok());
    let mut f = File::open(root.path().join("vm1/vm.state")).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert!(s.contains("\"base_complete\":true"), "{s}");
}

#[test]
fn a_failed_over_replica_keeps_its_point_and_takes_nothing_more_even_after_reopening() {
    let root = tempfile::tempdir().unwrap();
    let mut p = Primary::new(1);
    let mut vm = new_vm(root.path(), 1);
    // No point yet: nothing to fail over to.
    assert!(matches!(vm.fail_over(None), Err(StoreError::Conflict(_))));
    p.write(0, 0, 1, 4096);
    let (cut, seqs) = p.cut();
    vm.stage(0, seqs[0], &p.compressed(0, seqs[0])[..], 1 << 30)
        .unwrap();
    vm.commit(cut, &seqs).unwrap();
    vm.put_extra(Extra::Definition, b"{}").unwrap();
    let too_big = vec![0u8; Extra::Definition.limit() as usize + 1];
    assert!(matches!(
        vm.put_extra(Extra::Definition, &too_big),
        Err(StoreError::TooLarge { .. })
    ));
    assert_eq!(vm.fail_over(None).unwrap().cut_id, cut);
    // Idempotent, and recorded: a reopened replica is still failed over.
    assert_eq!(vm.fail_over(None).unwrap().cut_id, cut);
    drop(vm);
    let mut vm = ReplicaVm::open(dir_fd(root.path()).as_fd(), "vm1").unwrap();
    assert!(vm.failed_over() && vm.status().unwrap().failed_over);
    let at_failover = image(&vm, 0);
    // A primary that comes back: its next segment, commit, base chunk and extras are
    // refused, and the image stays at the failover point.
    p.write(0, 8192, 2, 4096);
    let (cut2, seqs2) = p.cut();
    let refused = |r: Result<(), StoreError>| {
        assert!(
            matches!(&r, Err(StoreError::Conflict(m)) if m.contains("failed over")),
            "{r:?}"
        )
    };
    refused(
        vm.stage(0, seqs2[0], &p.compressed(0, seqs2[0])[..], 1 << 30)
            .map(drop),
    );
    refused(vm.commit(cut2, &seqs2).map(drop));
    refused(vm.write_base(0, 0, &[1u8; 512]));
    refused(vm.complete_base());
    refused(vm.put_extra(Extra::Kernel, b"k"));
    assert!(image(&vm, 0) == at_failover);
    assert_eq!(vm.point().unwrap().cut_id, cut);
    assert_eq!(
        vm.extra(Extra::Definition).unwrap().as_deref(),
        Some(&b"{}"[..])
    );
}
