//! The log and the reader together: what a crash leaves, what a reader refuses.

use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::path::Path;

use crate::format::{RECORD_HEADER_LEN, TRAILER_LEN};
use crate::*;

const DISK: u64 = 1 << 20;

fn dir_fd(p: &Path) -> OwnedFd {
    confine::open_dir(p).unwrap()
}

fn open(p: &Path) -> (ChangeLog, Recovery) {
    ChangeLog::open(dir_fd(p), "test", DISK).unwrap()
}

fn seg(p: &Path, seq: u64) -> std::path::PathBuf {
    p.join(segment_file_name(seq))
}

type Records = Vec<(Record, Vec<u8>)>;

/// Every record of a segment, data included, once the reader verified it all.
fn read_all(path: &Path) -> Result<(Records, Trailer), SegmentError> {
    let mut r = SegmentReader::new(std::io::BufReader::new(File::open(path).unwrap()))?;
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while let Some(rec) = r.next_record(&mut buf)? {
        out.push((rec, buf.clone()));
    }
    Ok((out, r.trailer().unwrap()))
}

fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

#[test]
fn a_sealed_segment_reads_back_every_record_and_the_next_one_starts() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, r) = open(d.path());
    assert_eq!((r.seq, r.kept_records, r.last_cut_id), (1, 0, 0));
    log.append_data(4096, &data(1, 512)).unwrap();
    log.append_zeroes(8192, 65536).unwrap();
    log.append_data(DISK - 512, &data(2, 512)).unwrap();
    let s = log.seal(7).unwrap().sync().unwrap();
    assert_eq!(
        (s.seq, s.cut_id, s.records, s.data_bytes, s.covered_bytes),
        (1, 7, 3, 1024, 1024 + 65536)
    );
    assert_eq!(log.seq(), 2);
    let (recs, t) = read_all(&seg(d.path(), 1)).unwrap();
    assert_eq!((t.seq, t.cut_id, t.records, t.disk_size), (1, 7, 3, DISK));
    assert_eq!(
        recs[0].0,
        Record {
            kind: RecordKind::Data,
            offset: 4096,
            len: 512
        }
    );
    assert_eq!(recs[0].1, data(1, 512));
    assert_eq!(
        recs[1].0,
        Record {
            kind: RecordKind::Zeroes,
            offset: 8192,
            len: 65536
        }
    );
    assert!(recs[1].1.is_empty());
    assert_eq!(recs[2].1, data(2, 512));
    // An empty cut still seals a (verifiable) segment.
    let s = log.seal(8).unwrap().sync().unwrap();
    assert_eq!((s.seq, s.records), (2, 0));
    assert_eq!(read_all(&seg(d.path(), 2)).unwrap().1.cut_id, 8);
}

#[test]
fn writes_beyond_the_disk_are_refused_and_not_logged() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path());
    assert!(matches!(
        log.append_data(DISK - 256, &[0u8; 512]),
        Err(LogError::OutOfRange { .. })
    ));
    assert!(log.append_zeroes(u64::MAX, 2).is_err());
    assert_eq!(log.pending_records(), 0);
}

#[test]
fn reopening_after_a_kill_keeps_whole_records_and_cuts_a_torn_last_one() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path());
    log.append_data(0, &data(1, 4096)).unwrap();
    log.seal(1).unwrap().sync().unwrap();
    log.append_data(4096, &data(2, 4096)).unwrap();
    log.append_zeroes(0, 512).unwrap();
    log.append_data(8192, &data(3, 4096)).unwrap();
    drop(log);
    // The third record was cut short mid-data (a kill during its append).
    let f = OpenOptions::new()
        .write(true)
        .open(seg(d.path(), 2))
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 1000).unwrap();
    drop(f);
    let (mut log, r) = open(d.path());
    assert_eq!(r.seq, 2);
    assert_eq!(r.kept_records, 2);
    assert_eq!(r.dropped_bytes, (RECORD_HEADER_LEN + 4096 - 1000) as u64);
    assert_eq!(r.last_cut_id, 1, "the cut before the crash is remembered");
    // The log goes on in the same segment, and seals into a valid one.
    log.append_data(12288, &data(4, 512)).unwrap();
    log.seal(2).unwrap().sync().unwrap();
    let (recs, t) = read_all(&seg(d.path(), 2)).unwrap();
    assert_eq!(t.records, 3);
    let offsets: Vec<u64> = recs.iter().map(|(r, _)| r.offset).collect();
    assert_eq!(offsets, [4096, 0, 12288]);
}

#[test]
fn a_kill_while_sealing_leaves_the_segment_open_and_a_sealed_one_starts_the_next() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path());
    log.append_data(0, &data(1, 512)).unwrap();
    log.seal(5).unwrap().sync().unwrap();
    drop(log);
    // Sealed, but the next file never got its header (killed right after creating it).
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(seg(d.path(), 2))
        .unwrap();
    let (mut log, r) = open(d.path());
    assert_eq!((r.seq, r.kept_records, r.last_cut_id), (2, 0, 5));
    log.append_data(512, &data(2, 512)).unwrap();
    drop(log);
    // A torn trailer: half of it written.
    let f = OpenOptions::new()
        .write(true)
        .open(seg(d.path(), 2))
        .unwrap();
    let len = f.metadata().unwrap().len();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0x52, 0x4c, 0x52, 0x54, 0, 0, 0, 0], len)
        .unwrap();
    drop(f);
    let (mut log, r) = open(d.path());
    assert_eq!((r.seq, r.kept_records, r.dropped_bytes), (2, 1, 8));
    log.seal(6).unwrap().sync().unwrap();
    assert_eq!(read_all(&seg(d.path(), 2)).unwrap().1.records, 1);
    // A sealed newest file: the next open starts segment 3.
    drop(log);
    let (_, r) = open(d.path());
    assert_eq!((r.seq, r.last_cut_id), (3, 6));
}

#[test]
fn the_reader_refuses_torn_corrupt_and_padded_segments() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path());
    log.append_data(0, &data(1, 4096)).unwrap();
    log.append_zeroes(4096, 4096).unwrap();
    log.seal(1).unwrap().sync().unwrap();
    let good = std::fs::read(seg(d.path(), 1)).unwrap();
    let check = |bytes: &[u8]| {
        let p = d.path().join("probe");
        std::fs::write(&p, bytes).unwrap();
        read_all(&p).map(|_| ())
    };
    assert!(check(&good).is_ok());
    // Torn anywhere: no trailer.
    for cut in [10, 64, 100, good.len() - TRAILER_LEN, good.len() - 1] {
        assert!(check(&good[..cut]).is_err(), "torn at {cut}");
    }
    assert!(matches!(
        check(&good[..good.len() - TRAILER_LEN]),
        Err(SegmentError::Torn { .. })
    ));
    // One flipped bit in the data, a record header, the trailer.
    for at in [64 + 32 + 100, 64 + 9, good.len() - 40] {
        let mut b = good.clone();
        b[at] ^= 0x10;
        assert!(check(&b).is_err(), "bit flipped at {at}");
    }
    // Bytes after the trailer.
    let mut b = good.clone();
    b.push(0);
    assert!(matches!(check(&b), Err(SegmentError::Trailer(_))));
    // A stranger's file.
    assert!(matches!(check(&[7u8; 200]), Err(SegmentError::Header(_))));
}

#[test]
fn the_log_refuses_a_disk_of_another_size_and_damage_it_cannot_explain() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path());
    log.append_data(0, &data(1, 512)).unwrap();
    drop(log);
    assert!(matches!(
        ChangeLog::open(dir_fd(d.path()), "test", DISK * 2),
        Err(LogError::DiskSize { .. })
    ));
    // A header that is not ours is never overwritten.
    std::fs::write(seg(d.path(), 1), [0xaau8; 300]).unwrap();
    assert!(matches!(
        ChangeLog::open(dir_fd(d.path()), "test", DISK),
        Err(LogError::Corrupt { .. })
    ));
    assert_eq!(std::fs::read(seg(d.path(), 1)).unwrap(), vec![0xaau8; 300]);
}

/// A primary's log sealed into three segments, and a raw image it describes.
fn primary(d: &Path) -> Vec<u8> {
    std::fs::create_dir_all(d.join("log")).unwrap();
    let (mut log, _) = open(&d.join("log"));
    let mut image = vec![0u8; DISK as usize];
    for cut in 1..=3u64 {
        for i in 0..20u64 {
            let off = ((cut * 31 + i * 7) % 200) * 4096;
            let bytes = data((cut * 20 + i) as u8, 4096);
            image[off as usize..off as usize + 4096].copy_from_slice(&bytes);
            log.append_data(off, &bytes).unwrap();
        }
        log.append_zeroes(cut * 8192, 4096).unwrap();
        image[(cut * 8192) as usize..(cut * 8192 + 4096) as usize].fill(0);
        log.seal(cut).unwrap().sync().unwrap();
    }
    image
}

fn replica_disk(d: &Path) -> ReplicaDisk<File> {
    let img = d.join("replica.raw");
    if !img.exists() {
        File::create(&img).unwrap().set_len(DISK).unwrap();
    }
    std::fs::create_dir_all(d.join("state")).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    ReplicaDisk::open(f, dir_fd(&d.join("state"))).unwrap()
}

fn segment_file(d: &Path, seq: u64) -> File {
    File::open(seg(&d.join("log"), seq)).unwrap()
}

#[test]
fn a_replica_applies_segments_in_order_to_the_primary_s_bytes_and_ignores_a_resend() {
    let d = tempfile::tempdir().unwrap();
    let want = primary(d.path());
    let mut r = replica_disk(d.path());
    assert!(
        matches!(r.apply(segment_file(d.path(), 1)).unwrap(), ApplyOutcome::Applied(t) if t.cut_id == 1)
    );
    // A gap is refused and changes nothing.
    assert!(matches!(
        r.apply(segment_file(d.path(), 3)),
        Err(ApplyError::Gap { applied: 1, got: 3 })
    ));
    r.apply(segment_file(d.path(), 2)).unwrap();
    // A re-send (a cut connection) of an applied segment: not applied again.
    assert_eq!(
        r.apply(segment_file(d.path(), 2)).unwrap(),
        ApplyOutcome::AlreadyApplied { seq: 2 }
    );
    r.apply(segment_file(d.path(), 3)).unwrap();
    assert_eq!(r.applied(), Applied { seq: 3, cut_id: 3 });
    assert!(std::fs::read(d.path().join("replica.raw")).unwrap() == want);
    // The recovery point survives a restart of the replica.
    drop(r);
    assert_eq!(
        replica_disk(d.path()).applied(),
        Applied { seq: 3, cut_id: 3 }
    );
}

#[test]
fn a_corrupt_segment_touches_nothing_and_a_crash_mid_apply_is_repaired_by_the_resend() {
    let d = tempfile::tempdir().unwrap();
    let want = primary(d.path());
    let mut r = replica_disk(d.path());
    r.apply(segment_file(d.path(), 1)).unwrap();
    let before = std::fs::read(d.path().join("replica.raw")).unwrap();
    // Segment 2 with one flipped data byte near its end: refused before any write.
    let mut bad = std::fs::read(seg(&d.path().join("log"), 2)).unwrap();
    let at = bad.len() - TRAILER_LEN - 100;
    bad[at] ^= 1;
    let e = r.apply(std::io::Cursor::new(bad)).unwrap_err();
    assert!(matches!(e, ApplyError::Segment(_)), "{e}");
    assert!(
        std::fs::read(d.path().join("replica.raw")).unwrap() == before,
        "nothing was written"
    );
    assert_eq!(r.applied().seq, 1);
    // A crash mid-apply: half of segment 2's records reached the image, no record of it.
    {
        use std::os::unix::fs::FileExt;
        let img = OpenOptions::new()
            .write(true)
            .open(d.path().join("replica.raw"))
            .unwrap();
        let mut reader =
            SegmentReader::new(std::io::BufReader::new(segment_file(d.path(), 2))).unwrap();
        let mut buf = Vec::new();
        for _ in 0..10 {
            let rec = reader.next_record(&mut buf).unwrap().unwrap();
            img.write_all_at(&buf, rec.offset).unwrap();
        }
    }
    drop(r);
    let mut r = replica_disk(d.path());
    assert_eq!(r.applied().seq, 1);
    r.apply(segment_file(d.path(), 2)).unwrap();
    r.apply(segment_file(d.path(), 3)).unwrap();
    assert!(std::fs::read(d.path().join("replica.raw")).unwrap() == want);
}

#[test]
fn the_fuzz_seeds_are_valid_segments() {
    // fuzz/seeds/make-seeds writes them with its own encoder: the format is what the
    // docs say, not only what this crate's writer does.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/replica_segment");
    let writes = read_all(&dir.join("writes")).unwrap();
    assert_eq!((writes.1.seq, writes.1.cut_id, writes.1.records), (7, 3, 3));
    assert_eq!(writes.0[1].0.kind, RecordKind::Zeroes);
    assert_eq!(read_all(&dir.join("empty")).unwrap().1.records, 0);
}
