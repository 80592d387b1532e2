//! The log's budget: degrading to a region bitmap, the catch-up restart, and what a
//! kill at each step leaves.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::Path;

use crate::*;

const DISK: u64 = 64 * REGION;
const BUDGET: u64 = 64 << 10;

fn open(p: &Path) -> ChangeLog {
    ChangeLog::open(confine::open_dir(p).unwrap(), "test", DISK)
        .unwrap()
        .0
}

fn data(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as u8).wrapping_mul(31).wrapping_add((i % 251) as u8))
        .collect()
}

fn segments(p: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(p)
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    v.sort_unstable();
    v
}

fn segment_bytes(p: &Path) -> u64 {
    segments(p)
        .iter()
        .map(|s| {
            std::fs::metadata(p.join(segment_file_name(*s)))
                .unwrap()
                .len()
        })
        .sum()
}

fn map(p: &Path, name: &str) -> RegionMap {
    RegionMap::decode(&std::fs::read(p.join(name)).unwrap()).unwrap()
}

fn marked(m: &RegionMap) -> BTreeSet<u64> {
    (0..DISK / REGION).filter(|&r| m.is_set(r)).collect()
}

/// A guest write: logged, then applied to the disk's model; its regions noted.
fn write(log: &mut ChangeLog, disk: &mut [u8], touched: &mut BTreeSet<u64>, i: u64) {
    let off = (i * 7919 * 4096) % (DISK - 8192);
    let bytes = data(i, 4096 + (i % 3) as usize * 512);
    log.append_data(off, &bytes).unwrap();
    disk[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
    touched.extend(off / REGION..=(off + bytes.len() as u64 - 1) / REGION);
}

/// Applies segment `seq` of the log in `p` to `image` (the replica).
fn apply(p: &Path, seq: u64, image: &mut [u8]) {
    let f = File::open(p.join(segment_file_name(seq))).unwrap();
    let mut r = SegmentReader::new(std::io::BufReader::new(f)).unwrap();
    let mut buf = Vec::new();
    while let Some(rec) = r.next_record(&mut buf).unwrap() {
        let range = rec.offset as usize..(rec.offset + rec.len) as usize;
        match rec.kind {
            RecordKind::Data => image[range].copy_from_slice(&buf),
            RecordKind::Zeroes => image[range].fill(0),
        }
    }
}

#[test]
fn over_its_budget_the_log_keeps_a_bitmap_of_every_unsent_range_and_a_catch_up_gives_the_disk() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let mut log = open(p);
    log.set_budget(Some(BUDGET)).unwrap();
    let mut disk = vec![0u8; DISK as usize];
    let mut replica = disk.clone();
    // Replicated for a while: segments 1 and 2 applied, 1 deleted (the primary keeps
    // the newest applied one).
    let mut touched = BTreeSet::new();
    for i in 0..4 {
        write(&mut log, &mut disk, &mut touched, i);
    }
    log.seal(1).unwrap().sync().unwrap();
    for i in 4..8 {
        write(&mut log, &mut disk, &mut touched, i);
    }
    log.seal(2).unwrap().sync().unwrap();
    apply(p, 1, &mut replica);
    apply(p, 2, &mut replica);
    std::fs::remove_file(p.join(segment_file_name(1))).unwrap();
    // The link is down: segment 2 (applied) stays, the rest piles up until the budget.
    let mut unsent: BTreeSet<u64> = BTreeSet::new();
    let mut i = 8;
    while !log.degraded() {
        assert!(
            segment_bytes(p) <= BUDGET,
            "the log stays within its budget"
        );
        write(&mut log, &mut disk, &mut unsent, i);
        if i % 3 == 0 && !log.degraded() {
            log.seal(i).unwrap().sync().unwrap();
        }
        i += 1;
    }
    let at_degrade = segment_bytes(p);
    assert!(at_degrade <= BUDGET);
    assert!(map(p, DEGRADED_MAP).active);
    assert!(matches!(log.seal(1000), Err(LogError::Degraded { .. })));
    let mut after = BTreeSet::new();
    for j in i..i + 40 {
        write(&mut log, &mut disk, &mut after, j);
    }
    log.sync().unwrap();
    assert_eq!(segment_bytes(p), at_degrade, "nothing more is appended");
    let live = marked(&map(p, DEGRADED_MAP));
    assert!(after.is_subset(&live));
    unsent.extend(after);
    // A kill -9 and a new VMM: still degraded, the budget kept; the segments' ranges
    // went into the map and the segments away.
    drop(log);
    let mut log = open(p);
    assert!(log.degraded());
    assert_eq!(log.budget(), Some(BUDGET));
    assert_eq!(
        segments(p).len(),
        1,
        "only the (empty) open segment is left"
    );
    assert_eq!(segment_bytes(p), 64, "a degraded log carries no data");
    // The map holds every unsent write's region, and segment 2's (still in the log).
    let live = marked(&map(p, DEGRADED_MAP));
    assert!(unsent.is_subset(&live));
    let segment_2: BTreeSet<u64> = touched.iter().copied().collect();
    assert!(live.is_subset(&unsent.union(&segment_2).copied().collect()));
    // The link is back: the catch-up restarts the log and the regions are read after.
    let frozen = log.restart_for_catch_up().unwrap();
    assert!(!log.degraded());
    assert_eq!(segments(p), [1]);
    let spare = map(p, DEGRADED_MAP);
    assert!(
        !spare.active && spare.regions() == 0,
        "the live map is a spare again"
    );
    assert!(frozen.restarted && marked(&frozen) == live);
    assert_eq!(map(p, CATCH_UP_MAP), frozen);
    let mut k = i + 40;
    for _ in 0..5 {
        write(&mut log, &mut disk, &mut BTreeSet::new(), k);
        k += 1;
    }
    let mut sent = 0;
    for (off, len) in frozen.runs(4 << 20) {
        let r = off as usize..(off + len) as usize;
        replica[r.clone()].copy_from_slice(&disk[r]);
        sent += len;
    }
    assert_eq!(sent, live.len() as u64 * REGION, "only the map's regions");
    assert!(sent < DISK / 2);
    for _ in 0..5 {
        write(&mut log, &mut disk, &mut BTreeSet::new(), k);
        k += 1;
    }
    let s = log.seal(5000).unwrap().sync().unwrap();
    assert_eq!(s.seq, 1);
    apply(p, 1, &mut replica);
    assert!(
        replica == disk,
        "regions then the new segments give the disk"
    );
}

#[test]
fn a_kill_at_each_step_of_degrading_or_restarting_loses_no_region() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let save = tempfile::tempdir().unwrap();
    let mut log = open(p);
    let mut disk = vec![0u8; DISK as usize];
    let mut all = BTreeSet::new();
    for i in 0..6 {
        write(&mut log, &mut disk, &mut all, i);
        if i % 2 == 1 {
            log.seal(i).unwrap().sync().unwrap();
        }
    }
    write(&mut log, &mut disk, &mut all, 6);
    // The segments as they were when the budget was passed.
    for s in segments(p) {
        let n = segment_file_name(s);
        std::fs::copy(p.join(&n), save.path().join(&n)).unwrap();
    }
    log.set_budget(Some(segment_bytes(p))).unwrap();
    // A kill between the degrading write's bits and the active flag: that write
    // never reached the disk, and the next open clears the bits.
    let spare = std::fs::read(p.join(DEGRADED_MAP)).unwrap();
    write(&mut log, &mut disk, &mut all, 7);
    assert!(log.degraded());
    drop(log);
    let active = std::fs::read(p.join(DEGRADED_MAP)).unwrap();
    let mut torn = RegionMap::decode(&active).unwrap();
    torn.active = false;
    std::fs::write(p.join(DEGRADED_MAP), torn.encode()).unwrap();
    let log = open(p);
    assert!(!log.degraded());
    let cleared = map(p, DEGRADED_MAP);
    assert!(!cleared.active && cleared.regions() == 0);
    assert_eq!(cleared.encode().len(), spare.len());
    drop(log);
    // Killed once degraded, before any open settled the segments (as they were when
    // the budget was passed).
    std::fs::write(p.join(DEGRADED_MAP), &active).unwrap();
    for e in std::fs::read_dir(save.path()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), p.join(e.file_name())).unwrap();
    }
    let mut log = open(p);
    assert!(log.degraded());
    assert_eq!(
        segments(p).len(),
        1,
        "what was left of the segments is removed"
    );
    assert_eq!(segment_bytes(p), 64);
    assert_eq!(marked(&map(p, DEGRADED_MAP)), all);
    assert_eq!(log.last_cut_id(), 5, "the cut ids go on");
    write(&mut log, &mut disk, &mut all, 8);
    // The catch-up restart killed after its frozen map, before the live map and the
    // segments went: the next open finishes it.
    let live = std::fs::read(p.join(DEGRADED_MAP)).unwrap();
    let mut frozen = log.restart_for_catch_up().unwrap();
    drop(log);
    frozen.restarted = false;
    std::fs::write(p.join(CATCH_UP_MAP), frozen.encode()).unwrap();
    std::fs::write(p.join(DEGRADED_MAP), live).unwrap();
    for e in std::fs::read_dir(save.path()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), p.join(e.file_name())).unwrap();
    }
    let (log, r) = ChangeLog::open(confine::open_dir(p).unwrap(), "test", DISK).unwrap();
    assert!(!log.degraded());
    assert_eq!((r.seq, r.last_cut_id), (1, 5));
    assert_eq!(segments(p), [1]);
    assert!(!map(p, DEGRADED_MAP).active);
    let after = map(p, CATCH_UP_MAP);
    assert!(after.restarted);
    assert_eq!(marked(&after), all);
    // A second catch-up before the first finished merges the frozen map.
    drop(log);
    let mut log = open(p);
    let mut more = BTreeSet::new();
    write(&mut log, &mut disk, &mut more, 40);
    let again = log.restart_for_catch_up().unwrap();
    assert_eq!(marked(&again), all.union(&more).copied().collect());
    // A damaged map is refused, not taken as "nothing changed".
    drop(log);
    let mut b = std::fs::read(p.join(CATCH_UP_MAP)).unwrap();
    b[30] ^= 0xff;
    std::fs::write(p.join(CATCH_UP_MAP), b).unwrap();
    let e = ChangeLog::open(confine::open_dir(p).unwrap(), "test", DISK)
        .err()
        .unwrap();
    assert!(e.to_string().contains("checksum"), "{e}");
}
