//! Resync by block hashes: a replica that holds an older copy gets only the blocks
//! that differ, and the copy is complete only when the whole images agree.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use crate::store_tests::dir_fd;
use crate::*;

/// 64 full blocks and a short last one (1536 bytes).
const SIZE: u64 = 64 * HASH_BLOCK + 1536;

/// Bytes that do not compress and differ per position and seed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Runs the primary's side against `vm`'s disk 0 (the replica's hashes fetched
/// `per_request` at a time, through their hex form as on the wire); returns the
/// bytes sent and the whole-image hash.
fn resync(primary: &std::fs::File, vm: &mut ReplicaVm, per_request: u64) -> (u64, BlockHash) {
    let image = RawImage::new(primary.try_clone().unwrap(), SIZE);
    let mut pass = Resync::new(&image, 128 << 10);
    let mut sent = 0;
    while !pass.done() {
        let start = pass.next_block();
        let theirs = vm.block_hashes(0, start, per_request).unwrap();
        let wire = hex::encode(theirs.concat());
        let theirs = check_hash_list(SIZE, HASH_BLOCK, start, per_request, &wire).unwrap();
        while let Some(run) = pass.next_run(&theirs, start).unwrap() {
            assert!(run.data.len() <= 128 << 10);
            sent += run.data.len() as u64;
            vm.write_base(0, run.offset, &run.data).unwrap();
        }
    }
    assert_eq!(pass.read_bytes, SIZE);
    assert_eq!(pass.differing_bytes, sent);
    (sent, pass.finish())
}

#[test]
fn two_images_differing_in_a_few_known_blocks_resync_with_only_those_bytes_and_end_equal() {
    let d = tempfile::tempdir().unwrap();
    let mut vm = ReplicaVm::create_or_open(dir_fd(d.path()).as_fd(), "vm1", &[SIZE]).unwrap();
    // The replica holds an older copy of the disk ...
    let old = noise(1, SIZE as usize);
    vm.image(0).unwrap().write_all_at(&old, 0).unwrap();
    // ... the primary's differs in blocks 3, 17 and 18 (one run), 40 (one byte) and
    // the short last block.
    let mut new = old.clone();
    let changed = [3u64, 17, 18, 40, 64];
    for &b in &changed {
        let at = (b * HASH_BLOCK) as usize;
        let end = (at + HASH_BLOCK as usize).min(new.len());
        if b == 40 {
            new[at + 100] ^= 0xff;
        } else {
            new[at..end].copy_from_slice(&noise(100 + b, end - at));
        }
    }
    let pd = tempfile::tempdir().unwrap();
    let mut primary = std::fs::File::create_new(pd.path().join("disk")).unwrap();
    primary.write_all(&new).unwrap();

    let (sent, whole) = resync(&primary, &mut vm, 16);
    assert_eq!(
        sent,
        4 * HASH_BLOCK + 1536,
        "only the differing blocks are sent"
    );
    vm.complete_base_checked(&[whole]).unwrap();
    assert!(vm.status().unwrap().base_complete);
    let mut got = vec![0u8; SIZE as usize];
    vm.image(0).unwrap().read_exact_at(&mut got, 0).unwrap();
    assert!(
        got == new,
        "the replica's image equals the primary's byte for byte"
    );

    // Equal images: nothing is sent (a new replica of the same disk).
    let e = tempfile::tempdir().unwrap();
    let mut same = ReplicaVm::create_or_open(dir_fd(e.path()).as_fd(), "vm1", &[SIZE]).unwrap();
    same.image(0).unwrap().write_all_at(&new, 0).unwrap();
    let (sent, whole) = resync(&primary, &mut same, MAX_HASHES_PER_REQUEST);
    assert_eq!(sent, 0);
    same.complete_base_checked(&[whole]).unwrap();
}

#[test]
fn a_hash_list_of_the_wrong_length_or_block_size_and_a_differing_image_are_refused() {
    let h = hex::encode([7u8; 32 * 3]);
    // Blocks 0..3 of a 3-block disk: right.
    assert_eq!(
        check_hash_list(3 * HASH_BLOCK, HASH_BLOCK, 0, 3, &h)
            .unwrap()
            .len(),
        3
    );
    // The last request is clipped to the disk's end: 2 expected from block 1.
    let e = check_hash_list(3 * HASH_BLOCK, HASH_BLOCK, 1, 16, &h).unwrap_err();
    assert!(
        matches!(
            e,
            ResyncError::WrongLength {
                expected: 64,
                got: 96,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("expected 64"), "{e}");
    // Short by one byte, another block size, not hex.
    let e = check_hash_list(3 * HASH_BLOCK, HASH_BLOCK, 0, 3, &h[..h.len() - 2]).unwrap_err();
    assert!(matches!(e, ResyncError::WrongLength { .. }), "{e}");
    let e = check_hash_list(3 * HASH_BLOCK, 4096, 0, 3, &h).unwrap_err();
    assert!(e.to_string().contains("blocks of 4096 bytes"), "{e}");
    let e = check_hash_list(3 * HASH_BLOCK, HASH_BLOCK, 0, 3, "zz").unwrap_err();
    assert!(matches!(e, ResyncError::NotHex(_)), "{e}");

    // The replica: hashes asked beyond the disk or too many at once are refused.
    let d = tempfile::tempdir().unwrap();
    let mut vm = ReplicaVm::create_or_open(dir_fd(d.path()).as_fd(), "vm1", &[SIZE]).unwrap();
    for (start, count) in [(65, 1), (0, MAX_HASHES_PER_REQUEST + 1), (0, 0)] {
        let e = vm.block_hashes(0, start, count).unwrap_err();
        assert!(matches!(e, StoreError::Invalid(_)), "{e}");
    }
    assert!(matches!(
        vm.block_hashes(1, 0, 1).unwrap_err(),
        StoreError::Invalid(_)
    ));
    // A whole-image hash that is not the image's: the copy stays incomplete.
    let e = vm.complete_base_checked(&[[1u8; 32]]).unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e}");
    assert!(e.to_string().contains("not the primary's"), "{e}");
    let e = vm
        .complete_base_checked(&[[1u8; 32], [2u8; 32]])
        .unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e}");
    assert!(!vm.status().unwrap().base_complete);
    let zeros = image_hash(vm.image(0).unwrap(), SIZE).unwrap();
    vm.complete_base_checked(&[zeros]).unwrap();
    assert!(vm.status().unwrap().base_complete);
    // Once complete, no hashes are served.
    assert!(matches!(
        vm.block_hashes(0, 0, 1).unwrap_err(),
        StoreError::Conflict(_)
    ));
}

#[test]
fn a_failed_over_replica_is_reset_in_place_for_a_reverse_and_keeps_its_bytes() {
    let mut p = crate::store_tests::Primary::new(1);
    let d = tempfile::tempdir().unwrap();
    let dir = dir_fd(d.path());
    let mut vm =
        ReplicaVm::create_or_open(dir.as_fd(), "vm1", &[crate::store_tests::DISK]).unwrap();
    vm.complete_base().unwrap();
    p.write(0, 4096, 9, 8192);
    let (cut, seqs) = p.cut();
    for (i, &seq) in seqs.iter().enumerate() {
        vm.stage(i, seq, &p.compressed(i, seq)[..], 1 << 30)
            .unwrap();
    }
    vm.commit(cut, &seqs).unwrap();
    // Not failed over: no reset.
    let vm = match vm.reset_for_resync() {
        Err(StoreError::Conflict(_)) => ReplicaVm::open(dir.as_fd(), "vm1").unwrap(),
        other => panic!("{:?}", other.map(|_| ())),
    };
    let mut vm = vm;
    vm.fail_over(None).unwrap();
    let vm = vm.reset_for_resync().unwrap();
    let st = vm.status().unwrap();
    assert!(
        !st.failed_over && !st.base_complete && st.point.is_none(),
        "{st:?}"
    );
    assert_eq!(st.disks[0].applied_seq, 0);
    assert!(st.points.is_empty());
    // The images keep their bytes (the base of the resync), and reopening agrees.
    let mut got = vec![0u8; crate::store_tests::DISK as usize];
    vm.image(0).unwrap().read_exact_at(&mut got, 0).unwrap();
    assert!(got == p.model[0]);
    let again = ReplicaVm::open(dir.as_fd(), "vm1")
        .unwrap()
        .status()
        .unwrap();
    assert_eq!(again, st);
}

#[test]
fn after_the_primarys_host_went_down_a_replica_is_reset_for_a_resync_unless_failed_over() {
    let mut p = crate::store_tests::Primary::new(1);
    let d = tempfile::tempdir().unwrap();
    let dir = dir_fd(d.path());
    let mut vm =
        ReplicaVm::create_or_open(dir.as_fd(), "vm1", &[crate::store_tests::DISK]).unwrap();
    vm.set_keep(3).unwrap();
    vm.complete_base().unwrap();
    for round in 0..2u64 {
        p.write(0, 4096 * (round + 1), 9 + round as u8, 8192);
        let (cut, seqs) = p.cut();
        for (i, &seq) in seqs.iter().enumerate() {
            vm.stage(i, seq, &p.compressed(i, seq)[..], 1 << 30)
                .unwrap();
        }
        vm.commit(cut, &seqs).unwrap();
    }
    assert_eq!(vm.status().unwrap().points.len(), 2);
    let vm = vm.reset_after_primary_crash().unwrap();
    let st = vm.status().unwrap();
    assert!(
        !st.failed_over && !st.base_complete && st.point.is_none(),
        "{st:?}"
    );
    assert_eq!(st.disks[0].applied_seq, 0);
    assert!(st.points.is_empty());
    assert_eq!(vm.keep(), 3, "the history setting stays");
    // The images keep their bytes (the base of the resync), and reopening agrees.
    let mut got = vec![0u8; crate::store_tests::DISK as usize];
    vm.image(0).unwrap().read_exact_at(&mut got, 0).unwrap();
    assert!(got == p.model[0]);
    let again = ReplicaVm::open(dir.as_fd(), "vm1")
        .unwrap()
        .status()
        .unwrap();
    assert_eq!(again, st);

    // A failed-over replica runs the VM: never reset from the old primary.
    let mut p = crate::store_tests::Primary::new(1);
    let mut vm =
        ReplicaVm::create_or_open(dir.as_fd(), "vm2", &[crate::store_tests::DISK]).unwrap();
    vm.complete_base().unwrap();
    p.write(0, 4096, 3, 8192);
    let (cut, seqs) = p.cut();
    vm.stage(0, seqs[0], &p.compressed(0, seqs[0])[..], 1 << 30)
        .unwrap();
    vm.commit(cut, &seqs).unwrap();
    vm.fail_over(None).unwrap();
    match vm.reset_after_primary_crash() {
        Err(StoreError::Conflict(m)) => assert!(m.contains("failed over"), "{m}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert!(ReplicaVm::open(dir.as_fd(), "vm2").unwrap().failed_over());
}
