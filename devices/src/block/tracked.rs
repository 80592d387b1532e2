//! A disk under replication: every completed write, write-zeroes and discard is
//! recorded in the disk's change log (`replica::ChangeLog`) before it reaches the image.
//!
//! The guest's data is copied once out of guest memory, and that copy is what both
//! the log and the image get: a guest changing its buffer mid-request cannot make
//! them differ. One lock serialises each log append with its disk write, so the log's
//! order is the order the image saw; a cut takes the same lock (see
//! [`Tracked::hold`]): new writes wait, in-flight ones have finished.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use vireo_util::sync;

use replica::{ChangeLog, LogError, PendingSeal};

use super::{BlockBackend, IoBufs, IoBufsMut};

pub struct Tracked {
    inner: Arc<dyn BlockBackend>,
    log: Mutex<ChangeLog>,
}

/// The disk held for a cut: no write starts until it is dropped.
pub struct Held<'a> {
    log: MutexGuard<'a, ChangeLog>,
}

impl Held<'_> {
    /// Seals the segment with `cut_id` and starts the next; the sealed file is made
    /// durable by [`PendingSeal::sync`] once the disk is released.
    pub fn seal(&mut self, cut_id: u64) -> Result<PendingSeal, LogError> {
        self.log.seal(cut_id)
    }

    pub fn last_cut_id(&self) -> u64 {
        self.log.last_cut_id()
    }

    /// The log's budget in bytes of segments (None: none); see `replica::ChangeLog`.
    pub fn set_budget(&mut self, budget: Option<u64>) -> Result<(), LogError> {
        self.log.set_budget(budget)
    }

    /// Whether the log is over its budget and keeps a region bitmap.
    pub fn degraded(&self) -> bool {
        self.log.degraded()
    }

    /// Freezes everything the log holds into a region map and starts it again (a
    /// catch-up; no segment is sealed).
    pub fn restart_for_catch_up(&mut self) -> Result<replica::RegionMap, LogError> {
        self.log.restart_for_catch_up()
    }
}

fn log_error(e: LogError) -> io::Error {
    io::Error::other(e)
}

impl Tracked {
    pub fn new(inner: Arc<dyn BlockBackend>, log: ChangeLog) -> Self {
        Self {
            inner,
            log: Mutex::new(log),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ChangeLog> {
        sync::lock(&self.log)
    }

    /// Holds the disk for a cut: returns once in-flight writes finished; new writes
    /// wait until the guard is dropped.
    pub fn hold(&self) -> Held<'_> {
        Held { log: self.lock() }
    }

    /// The image under the log.
    pub fn inner(&self) -> Arc<dyn BlockBackend> {
        self.inner.clone()
    }
}

impl BlockBackend for Tracked {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn logical_block_size(&self) -> u32 {
        self.inner.logical_block_size()
    }
    fn physical_block_size(&self) -> u32 {
        self.inner.physical_block_size()
    }
    fn read_vectored_at(&self, bufs: &IoBufsMut<'_>, offset: u64) -> io::Result<()> {
        self.inner.read_vectored_at(bufs, offset)
    }
    fn may_have_data(&self, offset: u64, len: u64) -> bool {
        self.inner.may_have_data(offset, len)
    }

    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64) -> io::Result<()> {
        let len = usize::try_from(bufs.len()).map_err(io::Error::other)?;
        let mut data = vec![0u8; len];
        bufs.read_at(0, &mut data);
        let mut log = self.lock();
        log.append_data(offset, &data).map_err(log_error)?;
        self.inner
            .write_vectored_at(&IoBufs::from_slice(&data), offset)
    }

    fn flush(&self) -> io::Result<()> {
        // The log first: after a host crash, every write the guest saw flushed is in it.
        self.lock().sync().map_err(log_error)?;
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut log = self.lock();
        log.append_zeroes(offset, len).map_err(log_error)?;
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut log = self.lock();
        log.append_zeroes(offset, len).map_err(log_error)?;
        self.inner.write_zeroes(offset, len)
    }

    fn tracked(&self) -> Option<&Tracked> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{OpenFlags, RawFile, VhdxDisk};
    use replica::{segment_file_name, RecordKind, SegmentReader};
    use std::path::Path;

    const SIZE: u64 = 4 << 20;

    fn log_in(dir: &Path) -> ChangeLog {
        std::fs::create_dir_all(dir).unwrap();
        ChangeLog::open(confine::open_dir(dir).unwrap(), "disk", SIZE)
            .unwrap()
            .0
    }

    fn read(b: &dyn BlockBackend, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        b.read_vectored_at(&IoBufsMut::from_slice(&mut v), offset)
            .unwrap();
        v
    }

    /// Replays segment `seq` onto `model` (the replica's view of the disk).
    fn replay(dir: &Path, seq: u64, model: &mut [u8]) -> u64 {
        let f = std::fs::File::open(dir.join(segment_file_name(seq))).unwrap();
        let mut r = SegmentReader::new(std::io::BufReader::new(f)).unwrap();
        let mut buf = Vec::new();
        while let Some(rec) = r.next_record(&mut buf).unwrap() {
            let range = rec.offset as usize..(rec.offset + rec.len) as usize;
            match rec.kind {
                RecordKind::Data => model[range].copy_from_slice(&buf),
                RecordKind::Zeroes => model[range].fill(0),
            }
        }
        r.trailer().unwrap().cut_id
    }

    fn exercise(disk: Arc<dyn BlockBackend>, logdir: &Path) {
        let t = Tracked::new(disk.clone(), log_in(logdir));
        // The replica starts from a copy of the image as it was.
        let mut replica = read(disk.as_ref(), 0, SIZE as usize);
        for i in 0..64u64 {
            let off = (i * 7919 * 512) % (SIZE - 8192);
            let bytes: Vec<u8> = (0..4096).map(|j| (i as u8) ^ (j as u8)).collect();
            t.write_vectored_at(&IoBufs::from_slice(&bytes), off)
                .unwrap();
        }
        t.write_zeroes(65536, 8192).unwrap();
        t.flush().unwrap();
        let s = t.hold().seal(1).unwrap().sync().unwrap();
        assert_eq!(s.records, 65);
        t.write_vectored_at(&IoBufs::from_slice(&[9u8; 512]), 0)
            .unwrap();
        t.discard(SIZE - 4096, 4096).unwrap();
        t.hold().seal(2).unwrap().sync().unwrap();
        assert_eq!(replay(logdir, 1, &mut replica), 1);
        assert_eq!(replay(logdir, 2, &mut replica), 2);
        assert!(
            read(disk.as_ref(), 0, SIZE as usize) == replica,
            "the image and the replayed replica differ"
        );
    }

    #[test]
    fn replaying_the_segments_of_a_raw_disk_gives_the_same_bytes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.raw");
        std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
        std::fs::write(&p, vec![0x5a; SIZE as usize]).unwrap();
        let raw: Arc<dyn BlockBackend> = Arc::new(RawFile::open(&p, false, false).unwrap());
        exercise(raw, &d.path().join("log"));
    }

    #[test]
    fn replaying_the_segments_of_a_vhdx_disk_gives_the_same_bytes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.vhdx");
        let opts = vhdx::CreateOptions {
            size: SIZE,
            block_size: Some(1 << 20),
            ..Default::default()
        };
        drop(vhdx::Vhdx::create(&p, &opts).unwrap());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let v: Arc<dyn BlockBackend> =
            Arc::new(VhdxDisk::from_file(file, &p, OpenFlags::default(), None).unwrap());
        exercise(v, &d.path().join("log"));
    }

    #[test]
    fn a_write_the_log_refuses_never_reaches_the_image() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.raw");
        std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
        let raw: Arc<dyn BlockBackend> = Arc::new(RawFile::open(&p, false, false).unwrap());
        let logdir = d.path().join("log");
        let t = Tracked::new(raw.clone(), log_in(&logdir));
        // The log's directory is removed under it: the cut seals the segment but cannot
        // start the next, and from then on the log refuses every append.
        std::fs::remove_dir_all(&logdir).unwrap();
        assert!(t.hold().seal(1).is_err());
        let e = t
            .write_vectored_at(&IoBufs::from_slice(&[7u8; 512]), 4096)
            .unwrap_err();
        assert!(e.to_string().contains("change log"), "{e}");
        assert!(t.write_zeroes(0, 512).is_err());
        assert_eq!(
            read(raw.as_ref(), 4096, 512),
            vec![0u8; 512],
            "the image is untouched"
        );
    }
}
