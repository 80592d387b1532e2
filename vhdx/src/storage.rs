//! The file under an image: a small trait so tests can inject faults, and its
//! implementation over `std::fs::File` with pread/pwrite.
//!
//! A [`FileStorage`] may hold a second descriptor of the same file opened with
//! `O_DIRECT`: payload I/O whose offset, length and buffer addresses are all
//! [`DIRECT_ALIGN`]-aligned goes through it (no page-cache copy, no writeback
//! later), everything else (headers, log, BAT, metadata, unaligned guest I/O)
//! through the buffered one. The two never cover the same bytes at once in
//! practice (payload blocks and metadata are disjoint regions), and where they
//! would, the kernel keeps them coherent (direct I/O writes back and drops
//! cached pages of its range first).

use std::fs::File;
use std::io;

use crate::iobuf::{IoBufs, IoBufsMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Positioned I/O on the file that holds an image.
// `len` is a file length that can fail, not a collection size.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at EOF).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes up to `buf.len()` bytes at `offset`; returns how many were written.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// Scatter read into raw buffers; returns how many bytes were read. The default
    /// goes through a bounce buffer of up to [`BOUNCE_MAX`] bytes (for test storages;
    /// [`FileStorage`] reads in place with `preadv`).
    fn read_vectored_at(&self, bufs: &IoBufsMut<'_>, offset: u64) -> io::Result<usize> {
        let mut tmp = vec![0u8; bufs.len().min(BOUNCE_MAX) as usize];
        let n = self.read_at(&mut tmp, offset)?;
        bufs.write_at(0, &tmp[..n]);
        Ok(n)
    }
    /// Gather write from raw buffers; returns how many bytes were written. The
    /// default goes through a bounce buffer like [`Self::read_vectored_at`].
    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64) -> io::Result<usize> {
        let tmp = bufs.sub(0, BOUNCE_MAX).to_vec();
        if tmp.is_empty() {
            return Ok(0);
        }
        self.write_at(&tmp, offset)
    }
    /// Makes every completed write durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Sets the file length.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Current file length.
    fn len(&self) -> io::Result<u64>;
    /// Deallocates a range so it reads back as zeros (best effort; default writes nothing).
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// The file descriptor, when there is one.
    fn raw_fd(&self) -> Option<i32> {
        None
    }
    /// Takes the image lock: OFD locks in QEMU's layout on the descriptor,
    /// exclusive for a writer. Storage without a descriptor (in memory) has
    /// no one to share with and succeeds. The error is the OS error (`EAGAIN`
    /// when held elsewhere, `ENOLCK`/`EINVAL`/`EOPNOTSUPP` when the file
    /// system has no such locks, which refuses the open).
    fn lock(&self, exclusive: bool) -> io::Result<()> {
        match self.raw_fd() {
            Some(fd) => crate::lock::ofd_lock(fd, exclusive),
            None => Ok(()),
        }
    }
    /// Whether aligned I/O bypasses the page cache (`O_DIRECT`).
    fn is_direct(&self) -> bool {
        false
    }
}

/// Most bytes the default vectored methods of [`Storage`] move at once.
pub const BOUNCE_MAX: u64 = 1 << 20;

/// Alignment (offset, length, buffer address) that I/O needs to go through
/// the `O_DIRECT` descriptor. 4 KiB covers every logical block size in use.
pub const DIRECT_ALIGN: usize = 4096;

/// A plain file, optionally with an `O_DIRECT` descriptor for aligned I/O.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    direct: Option<File>,
}

/// The image's locks go with this storage, also when another descriptor of the same
/// open file description stays open (a VMM that keeps one to take its disk back).
impl Drop for FileStorage {
    fn drop(&mut self) {
        crate::lock::unlock_all(self.file.as_raw_fd());
    }
}

impl FileStorage {
    /// Wraps an open file (buffered I/O only).
    pub fn new(file: File) -> FileStorage {
        FileStorage { file, direct: None }
    }

    /// Wraps an open file and, when the file system supports it, opens `path`
    /// a second time with `O_DIRECT` for aligned I/O. Without support (tmpfs,
    /// some FUSE file systems) all I/O stays buffered.
    pub fn with_direct(file: File, path: &std::path::Path, write: bool) -> FileStorage {
        let direct = open_direct(path, write)
            .map_err(|e| tracing::debug!(path = %path.display(), "no O_DIRECT: {e}"))
            .ok();
        FileStorage { file, direct }
    }

    fn direct_for(&self, offset: u64, bufs: impl Iterator<Item = (usize, usize)>) -> Option<&File> {
        let d = self.direct.as_ref()?;
        if !offset.is_multiple_of(DIRECT_ALIGN as u64) {
            return None;
        }
        let mut any = false;
        for (addr, len) in bufs {
            if !addr.is_multiple_of(DIRECT_ALIGN) || !len.is_multiple_of(DIRECT_ALIGN) {
                return None;
            }
            any = true;
        }
        any.then_some(d)
    }
}

/// Opens `path` with `O_DIRECT` (read-only or read-write).
pub fn open_direct(path: &std::path::Path, write: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Whether an error from the `O_DIRECT` descriptor means "not this way"
/// (alignment the device does not accept) rather than a real I/O error.
fn direct_refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

fn iov_max(n: usize) -> libc::c_int {
    // IOV_MAX is 1024 on Linux.
    n.min(1024) as libc::c_int
}

/// One `preadv` (or `pwritev` when `write`) of `iov` at `offset`.
fn vectored(file: &File, iov: &[libc::iovec], offset: u64, write: bool) -> io::Result<usize> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    let n = if write {
        // SAFETY: the iovecs come from an IoBufs, whose constructors guarantee that
        // they are valid for reads for as long as it is borrowed (the whole call).
        unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), iov_max(iov.len()), off) }
    } else {
        // SAFETY: the iovecs come from an IoBufsMut, valid for writes for the call.
        unsafe { libc::preadv(file.as_raw_fd(), iov.as_ptr(), iov_max(iov.len()), off) }
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn segments(iov: &[libc::iovec]) -> impl Iterator<Item = (usize, usize)> + '_ {
    iov.iter().map(|v| (v.iov_base as usize, v.iov_len))
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if let Some(d) =
            self.direct_for(offset, std::iter::once((buf.as_ptr() as usize, buf.len())))
        {
            match d.read_at(buf, offset) {
                Err(e) if direct_refused(&e) => {}
                r => return r,
            }
        }
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        if let Some(d) =
            self.direct_for(offset, std::iter::once((buf.as_ptr() as usize, buf.len())))
        {
            match d.write_at(buf, offset) {
                Err(e) if direct_refused(&e) => {}
                r => return r,
            }
        }
        self.file.write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &IoBufsMut<'_>, offset: u64) -> io::Result<usize> {
        let iov = bufs.iovecs();
        if let Some(d) = self.direct_for(offset, segments(iov)) {
            match vectored(d, iov, offset, false) {
                Err(e) if direct_refused(&e) => {}
                r => return r,
            }
        }
        vectored(&self.file, iov, offset, false)
    }
    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64) -> io::Result<usize> {
        let iov = bufs.iovecs();
        if let Some(d) = self.direct_for(offset, segments(iov)) {
            match vectored(d, iov, offset, true) {
                Err(e) if direct_refused(&e) => {}
                r => return r,
            }
        }
        vectored(&self.file, iov, offset, true)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Ok(false);
        };
        // SAFETY: fallocate on an owned, open descriptor with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        Ok(r == 0)
    }
    fn raw_fd(&self) -> Option<i32> {
        Some(self.file.as_raw_fd())
    }
    fn is_direct(&self) -> bool {
        self.direct.is_some()
    }
}

/// Reads exactly `buf.len()` bytes; a read past the end of the file fails with `UnexpectedEof`.
pub(crate) fn read_exact_at(
    s: &dyn Storage,
    mut buf: &mut [u8],
    mut offset: u64,
) -> io::Result<()> {
    while !buf.is_empty() {
        match s.read_at(buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the file",
                ))
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads `buf.len()` bytes, filling whatever lies past the end of the file with zeros.
pub(crate) fn read_zero_padded_at(
    s: &dyn Storage,
    mut buf: &mut [u8],
    mut offset: u64,
) -> io::Result<()> {
    while !buf.is_empty() {
        match s.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf` at `offset`.
pub(crate) fn write_all_at(s: &dyn Storage, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match s.write_at(buf, offset) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote nothing")),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes zeros over a range: punches a hole when the file supports it, else writes zeros.
pub(crate) fn zero_range(s: &dyn Storage, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    if s.punch_hole(offset, len)? {
        return Ok(());
    }
    let chunk = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        write_all_at(s, &chunk[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// An image held in memory (tests and fuzzing): no descriptor, so nothing to
/// lock. Growing past `max_len` fails like a full disk, so a hostile image
/// cannot make replay allocate more than the caller allows.
#[derive(Debug)]
pub struct MemStorage {
    data: std::sync::Mutex<Vec<u8>>,
    max_len: u64,
}

impl MemStorage {
    /// Holds `data`; the file may grow to `max_len` bytes.
    pub fn new(data: Vec<u8>, max_len: u64) -> MemStorage {
        MemStorage {
            data: std::sync::Mutex::new(data),
            max_len,
        }
    }

    /// The bytes as they are now.
    pub fn contents(&self) -> Vec<u8> {
        self.lock_data().clone()
    }

    fn lock_data(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        vireo_util::sync::lock(&self.data)
    }

    fn grow(&self, d: &mut Vec<u8>, end: u64) -> io::Result<()> {
        if end > self.max_len {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if end > d.len() as u64 {
            d.resize(end as usize, 0);
        }
        Ok(())
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let d = self.lock_data();
        let Ok(o) = usize::try_from(offset) else {
            return Ok(0);
        };
        if o >= d.len() {
            return Ok(0);
        }
        let n = buf.len().min(d.len() - o);
        buf[..n].copy_from_slice(&d[o..o + n]);
        Ok(n)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let mut d = self.lock_data();
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        self.grow(&mut d, end)?;
        d[offset as usize..end as usize].copy_from_slice(buf);
        Ok(buf.len())
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut d = self.lock_data();
        self.grow(&mut d, len)?;
        d.truncate(len as usize);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock_data().len() as u64)
    }
}
