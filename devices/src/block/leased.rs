//! A disk whose writes need a live write lease: a clustered VM's VMM writes to its
//! disks only before the deadline its host's vireod gave it, on the host's
//! `CLOCK_MONOTONIC` (the clock vireod's own self-fencing deadline is counted on).
//!
//! The check is in the write path itself, before every write, write-zeroes, discard
//! and flush: a VMM that was frozen (SIGSTOP, a stalled host) and wakes up after its
//! deadline refuses the guest's next write at once, whatever its other threads have
//! noticed yet. Reads stay allowed (they change nothing).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::{BlockBackend, IoBufs, IoBufsMut, Tracked};

/// Nanoseconds on `CLOCK_MONOTONIC` (shared by every process of the host).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Why a lease renewal was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("the write lease expired (deadline {deadline_ns} ns on CLOCK_MONOTONIC passed); this VMM no longer writes its disks")]
    Expired { deadline_ns: u64 },
}

/// The write lease of one VMM: a deadline that only moves forward, and once passed
/// stays passed (another host may own the disks by then).
#[derive(Debug)]
pub struct WriteLease {
    deadline_ns: AtomicU64,
    expired: AtomicBool,
    /// When the deadline was last set or moved (`CLOCK_MONOTONIC`): an expiry's
    /// report says how long renewals had stopped.
    renewed_at_ns: AtomicU64,
}

impl WriteLease {
    pub fn new(deadline_ns: u64) -> Self {
        Self {
            deadline_ns: AtomicU64::new(deadline_ns),
            expired: AtomicBool::new(false),
            renewed_at_ns: AtomicU64::new(monotonic_ns()),
        }
    }

    /// How far the deadline is ahead of `now_ns` (negative: passed), and how long ago
    /// it was last set, both in milliseconds: what a log line about the lease needs.
    pub fn timing_ms(&self, now_ns: u64) -> (f64, f64) {
        let ms = |a: u64, b: u64| (a as f64 - b as f64) / 1e6;
        (
            ms(self.deadline_ns(), now_ns),
            ms(now_ns, self.renewed_at_ns.load(Ordering::Acquire)),
        )
    }

    pub fn deadline_ns(&self) -> u64 {
        self.deadline_ns.load(Ordering::Acquire)
    }

    /// Whether the deadline has passed at `now_ns` (and so for good).
    pub fn expired_at(&self, now_ns: u64) -> bool {
        if self.expired.load(Ordering::Acquire) {
            return true;
        }
        if now_ns >= self.deadline_ns() {
            self.expired.store(true, Ordering::Release);
            return true;
        }
        false
    }

    pub fn expired(&self) -> bool {
        self.expired_at(monotonic_ns())
    }

    /// Moves the deadline to `deadline_ns` if that is later; refused once expired.
    pub fn renew(&self, deadline_ns: u64) -> Result<(), LeaseError> {
        if self.expired() {
            return Err(LeaseError::Expired {
                deadline_ns: self.deadline_ns(),
            });
        }
        self.deadline_ns.fetch_max(deadline_ns, Ordering::AcqRel);
        self.renewed_at_ns.store(monotonic_ns(), Ordering::Release);
        Ok(())
    }

    /// Renews a lease nothing has run or written under yet (an arriving VM's, before
    /// the VM is built): a deadline still ahead is taken even if the old one passed.
    /// Its expiry fenced nothing, and the new deadline is the host's word, now, that it
    /// holds its cluster lease. A deadline already past is refused like [`Self::renew`].
    pub fn renew_unused(&self, deadline_ns: u64) -> Result<(), LeaseError> {
        if deadline_ns <= monotonic_ns() {
            return self.renew(deadline_ns);
        }
        self.deadline_ns.fetch_max(deadline_ns, Ordering::AcqRel);
        self.renewed_at_ns.store(monotonic_ns(), Ordering::Release);
        self.expired.store(false, Ordering::Release);
        Ok(())
    }

    /// `Ok` while writes may go on; the error every refused write returns.
    pub fn check(&self) -> io::Result<()> {
        if self.expired() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                LeaseError::Expired {
                    deadline_ns: self.deadline_ns(),
                },
            ));
        }
        Ok(())
    }
}

/// A backend whose writes are refused once its [`WriteLease`] expired.
pub struct Leased {
    inner: Arc<dyn BlockBackend>,
    lease: Arc<WriteLease>,
}

impl Leased {
    pub fn new(inner: Arc<dyn BlockBackend>, lease: Arc<WriteLease>) -> Self {
        Self { inner, lease }
    }
}

impl BlockBackend for Leased {
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
    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64) -> io::Result<()> {
        self.lease.check()?;
        self.inner.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.lease.check()?;
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.lease.check()?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.lease.check()?;
        self.inner.write_zeroes(offset, len)
    }
    fn may_have_data(&self, offset: u64, len: u64) -> bool {
        self.inner.may_have_data(offset, len)
    }
    fn tracked(&self) -> Option<&Tracked> {
        self.inner.tracked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{OpenFlags, RawFile};

    fn disk(path: &std::path::Path) -> Arc<dyn BlockBackend> {
        std::fs::File::create(path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        Arc::new(RawFile::from_file(file, path, OpenFlags::default()).unwrap())
    }

    #[test]
    fn writes_stop_at_the_deadline_and_stay_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let far = monotonic_ns() + 3_600_000_000_000;
        let lease = Arc::new(WriteLease::new(far));
        let d = Leased::new(disk(&dir.path().join("a.raw")), lease.clone());
        let data = [7u8; 512];
        d.write_vectored_at(&IoBufs::from_slice(&data), 0).unwrap();
        d.flush().unwrap();

        // A deadline in the past (as after a SIGSTOP longer than the lease).
        let past = Arc::new(WriteLease::new(monotonic_ns().saturating_sub(1)));
        let d = Leased::new(disk(&dir.path().join("b.raw")), past.clone());
        let e = d
            .write_vectored_at(&IoBufs::from_slice(&[9u8; 512]), 0)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(d.flush().is_err() && d.discard(0, 512).is_err());
        assert!(d.write_zeroes(0, 512).is_err());
        // Nothing reached the image; reads still work.
        let mut back = [1u8; 512];
        d.read_vectored_at(&IoBufsMut::from_slice(&mut back), 0)
            .unwrap();
        assert_eq!(back, [0u8; 512]);
        // An expired lease is not revived by a renewal.
        assert!(past.renew(far).is_err());
        assert!(d.write_vectored_at(&IoBufs::from_slice(&data), 0).is_err());
        // A live one only moves forward.
        lease.renew(far - 1).unwrap();
        assert_eq!(lease.deadline_ns(), far);
    }
}
