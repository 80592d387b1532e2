//! Live storage migration's backend: reads come from the source image, every write,
//! discard and write-zeroes goes to both images, while a background copy moves the
//! rest chunk by chunk. A chunk is locked while it is copied or written, so a guest
//! write can never be overwritten by an older copy of its chunk.
//!
//! Writes are mirrored synchronously (the guest's write completes once both images have
//! it), so the copy always converges, however fast the guest writes. A failing
//! destination never fails the guest: the mirror records the error and the migration is
//! abandoned, the guest going on with the untouched source.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vireo_util::sync;

use super::{BlockBackend, IoBufs, IoBufsMut};

/// Copy granularity (and lock granularity).
pub const MIRROR_CHUNK: u64 = 1 << 20;
const STRIPES: usize = 64;

pub struct Mirror {
    src: Arc<dyn BlockBackend>,
    dst: Arc<dyn BlockBackend>,
    stripes: Vec<Mutex<()>>,
    copied: AtomicU64,
    failure: Mutex<Option<String>>,
}

impl Mirror {
    /// Both images must have the same size; the destination must read as zeros where
    /// nothing was written (a new image).
    pub fn new(src: Arc<dyn BlockBackend>, dst: Arc<dyn BlockBackend>) -> io::Result<Self> {
        if src.size() != dst.size() {
            return Err(io::Error::other(format!(
                "destination has {} bytes, the disk {}",
                dst.size(),
                src.size()
            )));
        }
        Ok(Self {
            src,
            dst,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            copied: AtomicU64::new(0),
            failure: Mutex::new(None),
        })
    }

    pub fn source(&self) -> Arc<dyn BlockBackend> {
        self.src.clone()
    }

    pub fn destination(&self) -> Arc<dyn BlockBackend> {
        self.dst.clone()
    }

    pub fn size_bytes(&self) -> u64 {
        self.src.size()
    }

    pub fn chunks(&self) -> u64 {
        self.src.size().div_ceil(MIRROR_CHUNK)
    }

    pub fn copied_bytes(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }

    /// Why the destination failed, if it did.
    pub fn failure(&self) -> Option<String> {
        sync::lock(&self.failure).clone()
    }

    fn fail(&self, what: &str, e: &io::Error) {
        let mut f = sync::lock(&self.failure);
        if f.is_none() {
            *f = Some(format!("destination {what}: {e}"));
        }
    }

    /// Locks the stripes of every chunk `offset..offset+len` touches, in index order.
    fn lock_range(&self, offset: u64, len: u64) -> Vec<std::sync::MutexGuard<'_, ()>> {
        let first = offset / MIRROR_CHUNK;
        let last = (offset + len.max(1) - 1) / MIRROR_CHUNK;
        let mut idx: Vec<usize> = (first..=last.min(first + STRIPES as u64 - 1))
            .map(|c| (c % STRIPES as u64) as usize)
            .collect();
        if last - first >= STRIPES as u64 {
            idx = (0..STRIPES).collect();
        }
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| sync::lock(&self.stripes[i]))
            .collect()
    }

    /// Copies chunk `index` from the source to the destination (an all-zero chunk is
    /// left alone: the destination reads as zeros there already).
    pub fn copy_chunk(&self, index: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        let offset = index * MIRROR_CHUNK;
        let len = MIRROR_CHUNK.min(self.src.size().saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        let _held = self.lock_range(offset, len);
        if !self.src.may_have_data(offset, len) {
            // A hole: reads as zeros, and so does the new image there.
            self.copied.fetch_add(len, Ordering::Relaxed);
            return Ok(());
        }
        buf.resize(len as usize, 0);
        self.src
            .read_vectored_at(&IoBufsMut::from_slice(buf), offset)?;
        if !is_zero(buf) {
            self.dst
                .write_vectored_at(&IoBufs::from_slice(buf), offset)
                .inspect_err(|e| self.fail("write", e))?;
        }
        self.copied.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

use vireo_util::is_zero;

impl BlockBackend for Mirror {
    fn size(&self) -> u64 {
        self.src.size()
    }
    fn logical_block_size(&self) -> u32 {
        self.src.logical_block_size()
    }
    fn physical_block_size(&self) -> u32 {
        self.src.physical_block_size()
    }

    fn read_vectored_at(&self, bufs: &IoBufsMut<'_>, offset: u64) -> io::Result<()> {
        self.src.read_vectored_at(bufs, offset)
    }

    fn may_have_data(&self, offset: u64, len: u64) -> bool {
        self.src.may_have_data(offset, len)
    }

    /// A replicated disk stays replicated while it moves: its writes go through the
    /// source, which logs them.
    fn tracked(&self) -> Option<&super::Tracked> {
        self.src.tracked()
    }

    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64) -> io::Result<()> {
        let len = bufs.len();
        let _held = self.lock_range(offset, len);
        self.src.write_vectored_at(bufs, offset)?;
        if let Err(e) = self.dst.write_vectored_at(bufs, offset) {
            self.fail("write", &e);
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.src.flush()?;
        if let Err(e) = self.dst.flush() {
            self.fail("flush", &e);
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _held = self.lock_range(offset, len);
        self.src.discard(offset, len)?;
        // What the source reads back after a discard is zeros; make the copy agree.
        if let Err(e) = self.dst.write_zeroes(offset, len) {
            self.fail("write-zeroes", &e);
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let _held = self.lock_range(offset, len);
        self.src.write_zeroes(offset, len)?;
        if let Err(e) = self.dst.write_zeroes(offset, len) {
            self.fail("write-zeroes", &e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::RawFile;

    fn raw(dir: &std::path::Path, name: &str, size: u64) -> Arc<dyn BlockBackend> {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        Arc::new(RawFile::open(&p, false, false).unwrap())
    }

    fn read(b: &dyn BlockBackend, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        b.read_vectored_at(&IoBufsMut::from_slice(&mut v), offset)
            .unwrap();
        v
    }

    #[test]
    fn copy_and_concurrent_writes_leave_identical_images() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * MIRROR_CHUNK + 4096;
        let src = raw(dir.path(), "src", size);
        let dst = raw(dir.path(), "dst", size);
        // Data the copy must move, in the first, a middle and the short last chunk.
        for (off, byte) in [(0u64, 1u8), (3 * MIRROR_CHUNK + 512, 2), (size - 4096, 3)] {
            src.write_vectored_at(&IoBufs::from_slice(&[byte; 4096]), off)
                .unwrap();
        }
        let m = Arc::new(Mirror::new(src.clone(), dst.clone()).unwrap());
        let writer = {
            let m = m.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let off = (i * 7919 * 4096) % (size - 4096);
                    m.write_vectored_at(
                        &IoBufs::from_slice(&[(i % 251) as u8 + 4; 4096]),
                        off & !4095,
                    )
                    .unwrap();
                }
                m.discard(5 * MIRROR_CHUNK, MIRROR_CHUNK).unwrap();
            })
        };
        let mut buf = Vec::new();
        for c in 0..m.chunks() {
            m.copy_chunk(c, &mut buf).unwrap();
        }
        writer.join().unwrap();
        assert!(m.failure().is_none());
        assert_eq!(m.copied_bytes(), size);
        let a = read(src.as_ref(), 0, size as usize);
        let b = read(dst.as_ref(), 0, size as usize);
        assert!(a == b, "source and destination differ after the mirror");
    }

    #[test]
    fn sizes_must_match_and_destination_errors_do_not_reach_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let src = raw(dir.path(), "src", 1 << 20);
        assert!(Mirror::new(src.clone(), raw(dir.path(), "small", 4096)).is_err());
        // A read-only destination: every write to it fails.
        let p = dir.path().join("ro");
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let ro: Arc<dyn BlockBackend> = Arc::new(RawFile::open(&p, true, false).unwrap());
        let m = Mirror::new(src.clone(), ro).unwrap();
        m.write_vectored_at(&IoBufs::from_slice(&[9u8; 512]), 0)
            .unwrap();
        assert_eq!(
            read(src.as_ref(), 0, 512),
            vec![9u8; 512],
            "the guest's write landed"
        );
        assert!(m.failure().is_some_and(|f| f.contains("destination write")));
    }
}
