//! Recovery history: kept points give their bytes exactly, pruning drops only the
//! oldest, a failover to a kept point rolls the images back, and a crash in the middle
//! of a commit or a rollback loses no kept point.
#![allow(clippy::needless_range_loop)] // disks and points are indexed side by side

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::store_tests::{dir_fd, image, new_vm, Primary, DISK};
use crate::*;

/// Stages and commits every disk's segment of the primary's next cut.
fn point(p: &mut Primary, vm: &mut ReplicaVm) -> u64 {
    let (cut, seqs) = p.cut();
    for (disk, &seq) in seqs.iter().enumerate() {
        vm.stage(disk, seq, &p.compressed(disk, seq)[..], 1 << 30)
            .unwrap();
    }
    assert!(matches!(
        vm.commit(cut, &seqs).unwrap(),
        Committed::Committed(_)
    ));
    cut
}

/// Kept point `cut`'s disk `disk`, exported into a fresh directory.
fn exported(vm: &ReplicaVm, cut: u64, disk: usize) -> Vec<u8> {
    let out = tempfile::tempdir().unwrap();
    vm.export_point(cut, dir_fd(out.path()).as_fd(), |i| format!("t{i}.img"))
        .unwrap();
    let f = File::open(out.path().join(format!("t{disk}.img"))).unwrap();
    assert_eq!(f.metadata().unwrap().len(), DISK);
    let mut b = vec![0u8; DISK as usize];
    f.read_exact_at(&mut b, 0).unwrap();
    b
}

fn kept(vm: &ReplicaVm) -> Vec<u64> {
    vm.points().iter().map(|p| p.cut_id).collect()
}

fn undo_files(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("vm1/history"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn a_kept_point_gives_its_bytes_byte_for_byte_and_pruning_drops_the_oldest_only() {
    let root = tempfile::tempdir().unwrap();
    let mut p = Primary::new(2);
    let mut vm = new_vm(root.path(), 2);
    vm.set_keep(3).unwrap();
    assert!(matches!(vm.set_keep(0), Err(StoreError::Invalid(_))));
    assert!(matches!(
        vm.set_keep(MAX_HISTORY + 1),
        Err(StoreError::Invalid(_))
    ));
    // A, point 1.
    p.write(0, 0, 0xA0, 8192);
    p.write(1, 4096, 0xA1, 4096);
    let p1 = point(&mut p, &mut vm);
    let model1 = p.model.clone();
    // B over part of A and beside it, a zeroed range: point 2.
    p.write(0, 4096, 0xB0, 8192);
    p.zero(1, 4096, 2048);
    p.write(1, 65536, 0xB1, 512);
    let p2 = point(&mut p, &mut vm);
    let model2 = p.model.clone();
    assert_ne!(model1, model2);
    assert_eq!(kept(&vm), [p1, p2]);
    for disk in 0..2 {
        let at1 = exported(&vm, p1, disk);
        assert!(at1 == model1[disk], "point 1, disk {disk}: A's bytes");
        assert!(at1 != model2[disk], "point 1, disk {disk}: not B's");
        assert!(
            exported(&vm, p2, disk) == model2[disk],
            "point 2, disk {disk}"
        );
        // Exporting changed nothing of the replica.
        assert!(image(&vm, disk) == model2[disk]);
    }
    let listed = vm.status().unwrap().points;
    assert_eq!(listed[0].undo_bytes, 0, "the oldest needs no undo data");
    assert!(listed[1].undo_bytes > 0 && listed[1].changed_bytes == 8192 + 2048 + 512);
    assert!(listed.iter().all(|p| p.time_s > 0));

    // Points 3 and 4: point 1 (only) is pruned; 2 stays exact.
    p.write(0, 0, 0xC0, 512);
    let p3 = point(&mut p, &mut vm);
    let model3 = p.model.clone();
    p.write(1, 0, 0xD0, 512);
    let p4 = point(&mut p, &mut vm);
    assert_eq!(kept(&vm), [p2, p3, p4]);
    for disk in 0..2 {
        assert!(
            exported(&vm, p2, disk) == model2[disk],
            "point 2, disk {disk}"
        );
        assert!(
            exported(&vm, p3, disk) == model3[disk],
            "point 3, disk {disk}"
        );
    }
    assert!(matches!(
        vm.export_point(p1, dir_fd(root.path()).as_fd(), |i| format!("x{i}")),
        Err(StoreError::Conflict(_))
    ));
    // Undo data only for the points after the oldest kept one.
    let want: Vec<String> = [p3, p4]
        .iter()
        .flat_map(|&c| (0..2).map(move |d| format!("{c:020}.disk-{d}.undo")))
        .collect();
    assert_eq!(undo_files(root.path()), want);
    // Keeping fewer drops the oldest at once.
    vm.set_keep(2).unwrap();
    assert_eq!(kept(&vm), [p3, p4]);
    assert_eq!(undo_files(root.path()).len(), 2);

    // A failover to point 3 rolls the images back to it, in place, for good.
    assert_eq!(vm.fail_over(Some(p3)).unwrap().cut_id, p3);
    drop(vm);
    let mut vm = ReplicaVm::open(dir_fd(root.path()).as_fd(), "vm1").unwrap();
    assert!(vm.failed_over());
    assert_eq!(kept(&vm), [p3]);
    for disk in 0..2 {
        assert!(image(&vm, disk) == model3[disk], "failed over, disk {disk}");
    }
    assert!(matches!(
        vm.fail_over(Some(p4)),
        Err(StoreError::Conflict(_))
    ));
}

#[test]
fn a_kill_while_a_point_is_applied_or_rolled_back_loses_no_kept_point() {
    let root = tempfile::tempdir().unwrap();
    let mut p = Primary::new(2);
    let mut vm = new_vm(root.path(), 2);
    vm.set_keep(4).unwrap();
    let mut models = Vec::new();
    let mut cuts = Vec::new();
    for round in 0..2u8 {
        p.write(0, 4096 * round as u64, round + 1, 8192);
        p.write(1, 512 * round as u64, round + 11, 4096);
        cuts.push(point(&mut p, &mut vm));
        models.push(p.model.clone());
    }
    // Point 3 dies after disk 0 applied its segment, before disk 1's.
    p.write(0, 0, 0x33, 16384);
    p.write(1, 0, 0x34, 16384);
    let (cut3, seqs3) = p.cut();
    for (disk, &seq) in seqs3.iter().enumerate() {
        vm.stage(disk, seq, &p.compressed(disk, seq)[..], 1 << 30)
            .unwrap();
    }
    vm.crash_after_applying = Some((0, seqs3[0]));
    assert!(vm.commit(cut3, &seqs3).is_err());
    drop(vm);
    // The next open finishes it; every kept point is still exact.
    let mut vm = ReplicaVm::open(dir_fd(root.path()).as_fd(), "vm1").unwrap();
    cuts.push(cut3);
    models.push(p.model.clone());
    assert_eq!(kept(&vm), cuts);
    for (k, &cut) in cuts.iter().enumerate() {
        for disk in 0..2 {
            assert!(
                exported(&vm, cut, disk) == models[k][disk],
                "point {cut} disk {disk}"
            );
        }
    }

    // A failover to point 1 killed half way through its rollback: the intent is
    // there and only the newest undo file was applied; the next open finishes it.
    {
        let json = br#"{"cut_id":1}"#;
        let mut b = format!("{:08x}\n", crc32c::crc32c(json)).into_bytes();
        b.extend_from_slice(json);
        confine::write_private_atomic(
            dir_fd(&root.path().join("vm1")).as_fd(),
            "rolling-back".as_ref(),
            &b,
        )
        .unwrap();
        let undo = root
            .path()
            .join("vm1/history")
            .join(format!("{cut3:020}.disk-0.undo"));
        let mut undo = File::open(undo).unwrap();
        crate::history::apply_undo(vm.image(0).unwrap(), &mut undo).unwrap();
    }
    vm.crash_after_applying = None;
    drop(vm);
    let vm = ReplicaVm::open(dir_fd(root.path()).as_fd(), "vm1").unwrap();
    assert!(vm.failed_over());
    assert_eq!(vm.point().unwrap().cut_id, cuts[0]);
    for disk in 0..2 {
        assert!(
            image(&vm, disk) == models[0][disk],
            "rolled back, disk {disk}"
        );
    }
    assert!(!root.path().join("vm1/rolling-back").exists());
    assert!(undo_files(root.path()).is_empty());
}

/// Stages and commits the primary's next cut with the replica's clock at `t`.
fn point_at(p: &mut Primary, vm: &mut ReplicaVm, t: u64) -> u64 {
    vm.clock_s = Some(t);
    point(p, vm)
}

#[test]
fn thinning_keeps_one_point_per_spacing_and_the_latest_each_exact() {
    let root = tempfile::tempdir().unwrap();
    let mut p = Primary::new(2);
    let mut vm = new_vm(root.path(), 2);
    vm.set_keep(10).unwrap();
    vm.set_spacing(3600).unwrap();
    assert!(matches!(
        vm.set_spacing(crate::store::MAX_SPACING_S + 1),
        Err(StoreError::Invalid(_))
    ));
    p.write(0, 0, 0x11, 16384);
    p.write(1, 0, 0x12, 8192);
    let p1 = point_at(&mut p, &mut vm, 1000);
    let model1 = p.model.clone();
    // p2 and p3 overwrite overlapping ranges (and p3 new ones) within the hour: p2 is
    // folded into p3, whose undo data leads straight back to p1.
    p.write(0, 4096, 0x21, 8192);
    p.zero(1, 0, 4096);
    let p2 = point_at(&mut p, &mut vm, 1030);
    assert_eq!(kept(&vm), [p1, p2]);
    p.write(0, 8192, 0x31, 16384);
    p.write(1, 2048, 0x32, 4096);
    p.write(1, 65536, 0x33, 512);
    let p3 = point_at(&mut p, &mut vm, 1060);
    assert_eq!(kept(&vm), [p1, p3], "p2 thinned out");
    let model3 = p.model.clone();
    for disk in 0..2 {
        assert!(exported(&vm, p1, disk) == model1[disk], "p1, disk {disk}");
        assert!(exported(&vm, p3, disk) == model3[disk], "p3, disk {disk}");
    }
    // p2's undo files stay, as part of p3's; p3's own holds only what p2's do not
    // cover: every range since p1 is kept once.
    assert_eq!(vm.points()[1].folded, [p2]);
    let mut want: Vec<String> = Vec::new();
    for cut in [p2, p3] {
        for d in 0..2 {
            want.push(format!("{cut:020}.disk-{d}.covered"));
            want.push(format!("{cut:020}.disk-{d}.undo"));
        }
    }
    want.sort();
    assert_eq!(undo_files(root.path()), want);
    let ranges = |cut: u64, d: usize| {
        let path = root
            .path()
            .join(format!("vm1/history/{cut:020}.disk-{d}.undo"));
        crate::history::ranges_of(&mut File::open(path).unwrap()).unwrap()
    };
    assert_eq!(ranges(p2, 0), [(4096, 8192)]);
    assert_eq!(
        ranges(p3, 0),
        [(12288, 12288)],
        "p2's part is not kept twice"
    );
    assert_eq!(ranges(p3, 1), [(4096, 2048), (65536, 512)]);

    // An hour after p1: p4 folds p3 (still within p1's hour) and stays itself, so p5
    // is kept beside it: p1, p4 (the next "hourly" point), p5.
    p.write(0, 0, 0x41, 512);
    let p4 = point_at(&mut p, &mut vm, 4700);
    let model4 = p.model.clone();
    assert_eq!(kept(&vm), [p1, p4]);
    p.write(0, 512, 0x51, 512);
    let p5 = point_at(&mut p, &mut vm, 4730);
    assert_eq!(kept(&vm), [p1, p4, p5]);
    for disk in 0..2 {
        assert!(exported(&vm, p1, disk) == model1[disk], "p1, disk {disk}");
        assert!(exported(&vm, p4, disk) == model4[disk], "p4, disk {disk}");
        assert!(image(&vm, disk) == p.model[disk], "p5 in the images");
    }
    // Undo data is what changed, once: p4's holds p1's bytes of every range written
    // since p1 (merged), no more than p2's, p3's and p4's own together.
    let listed = vm.status().unwrap().points;
    assert!(listed[1].undo_bytes > 0 && listed[2].undo_bytes > 0);
    assert_eq!(vm.spacing_s(), 3600);
}

#[test]
fn a_kill_while_a_folding_point_is_applied_loses_no_kept_point() {
    let root = tempfile::tempdir().unwrap();
    let mut p = Primary::new(2);
    let mut vm = new_vm(root.path(), 2);
    vm.set_keep(5).unwrap();
    vm.set_spacing(600).unwrap();
    p.write(0, 0, 0x01, 8192);
    p.write(1, 0, 0x02, 8192);
    let p1 = point_at(&mut p, &mut vm, 100);
    let model1 = p.model.clone();
    p.write(0, 4096, 0x03, 8192);
    p.write(1, 1024, 0x04, 2048);
    point_at(&mut p, &mut vm, 130);
    // The third point folds the second; it dies after disk 0 applied its segment.
    p.write(0, 0, 0x05, 16384);
    p.write(1, 4096, 0x06, 16384);
    let (cut3, seqs3) = p.cut();
    for (disk, &seq) in seqs3.iter().enumerate() {
        vm.stage(disk, seq, &p.compressed(disk, seq)[..], 1 << 30)
            .unwrap();
    }
    vm.clock_s = Some(160);
    vm.crash_after_applying = Some((0, seqs3[0]));
    assert!(vm.commit(cut3, &seqs3).is_err());
    drop(vm);
    // The next open finishes the commit and its fold: p1 and p3, both exact.
    let vm = ReplicaVm::open(dir_fd(root.path()).as_fd(), "vm1").unwrap();
    assert_eq!(kept(&vm), [p1, cut3]);
    for disk in 0..2 {
        assert!(exported(&vm, p1, disk) == model1[disk], "p1, disk {disk}");
        assert!(
            exported(&vm, cut3, disk) == p.model[disk],
            "p3, disk {disk}"
        );
    }
    // The folded point's undo files stay as part of p3's.
    let p2 = vm.points()[1].folded[0];
    let mut want: Vec<String> = Vec::new();
    for cut in [p2, cut3] {
        for d in 0..2 {
            want.push(format!("{cut:020}.disk-{d}.covered"));
            want.push(format!("{cut:020}.disk-{d}.undo"));
        }
    }
    want.sort();
    assert_eq!(undo_files(root.path()), want);
}
