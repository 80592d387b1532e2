//! The file under an image: a small trait so tests can inject faults, and its
//! implementation over `std::fs::File` with pread/pwrite.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
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
    /// Scatter read; the default reads into the first non-empty buffer only.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<usize> {
        match bufs.iter_mut().find(|b| !b.is_empty()) {
            Some(b) => self.read_at(b, offset),
            None => Ok(0),
        }
    }
    /// Gather write; the default writes the first non-empty buffer only.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(b) => self.write_at(b, offset),
            None => Ok(0),
        }
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
    /// The file descriptor, when there is one (used for OFD locks).
    fn raw_fd(&self) -> Option<i32> {
        None
    }
}

/// A plain file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    /// Wraps an open file.
    pub fn new(file: File) -> FileStorage {
        FileStorage { file }
    }
}

fn iov_max(n: usize) -> libc::c_int {
    // IOV_MAX is 1024 on Linux.
    n.min(1024) as libc::c_int
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.file.write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<usize> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: IoSliceMut is ABI-compatible with iovec; the pointers are valid
        // for the lifetime of `bufs`, which outlives the call.
        let n = unsafe {
            libc::preadv(
                self.file.as_raw_fd(),
                bufs.as_mut_ptr() as *const libc::iovec,
                iov_max(bufs.len()),
                off,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: IoSlice is ABI-compatible with iovec; the buffers stay borrowed
        // for the duration of the call and are only read.
        let n = unsafe {
            libc::pwritev(
                self.file.as_raw_fd(),
                bufs.as_ptr() as *const libc::iovec,
                iov_max(bufs.len()),
                off,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
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
