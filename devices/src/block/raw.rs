//! Raw disk images: the file is the disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::{
    lock_image, lock_unsupported, unlock_image, BlockBackend, IoBufs, IoBufsMut, LockMode,
    OpenError, OpenFlags,
};

pub struct RawFile {
    file: File,
    size: u64,
    /// Whether it took the image lock (released on drop, see `unlock_image`).
    locked: bool,
}

impl Drop for RawFile {
    fn drop(&mut self) {
        if self.locked {
            unlock_image(&self.file);
        }
    }
}

impl RawFile {
    /// Opens and locks a raw image (exclusive for writers, shared for readers).
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, OpenError> {
        Self::open_with(
            path,
            OpenFlags {
                read_only,
                direct,
                ..OpenFlags::default()
            },
        )
    }

    /// Opens a raw image; locks it unless `flags.locking` is off. A file system
    /// that cannot lock refuses the open ([`OpenError::LockUnsupported`]).
    pub fn open_with(path: &Path, flags: OpenFlags) -> Result<Self, OpenError> {
        let io_err = |source| OpenError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut opts = OpenOptions::new();
        opts.read(true).write(!flags.read_only);
        if flags.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path).map_err(io_err)?;
        Self::from_file(file, path, flags)
    }

    /// Takes an image file opened by the caller (e.g. beneath a storage root, with
    /// `flags.direct` already applied) and locks it unless `flags.locking` is off
    /// (exclusive for writers, shared for readers). `path` names it in errors.
    pub fn from_file(file: File, path: &Path, flags: OpenFlags) -> Result<Self, OpenError> {
        let io_err = |source| OpenError::Io {
            path: path.display().to_string(),
            source,
        };
        let mode = if flags.read_only {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        };
        if flags.locking {
            match lock_image(&file, mode) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(OpenError::Locked {
                        path: path.display().to_string(),
                    })
                }
                Err(source) if lock_unsupported(&source) => {
                    return Err(OpenError::LockUnsupported {
                        path: path.display().to_string(),
                        source,
                    })
                }
                Err(e) => return Err(io_err(e)),
            }
        } else {
            tracing::info!(path = %path.display(), "opening without the image lock (locking=off)");
        }
        let size = file.metadata().map_err(io_err)?.len();
        Ok(Self {
            file,
            size,
            locked: flags.locking,
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on a valid fd with integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl RawFile {
    /// One preadv (or pwritev when `write`); retried on EINTR.
    fn vectored(&self, iov: &[libc::iovec], offset: u64, write: bool) -> io::Result<usize> {
        let cnt = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let fd = self.file.as_raw_fd();
        loop {
            let n = if write {
                // SAFETY: the iovecs come from an IoBufs, valid for reads while it is
                // borrowed (this call).
                unsafe { libc::pwritev(fd, iov.as_ptr(), cnt, off) }
            } else {
                // SAFETY: the iovecs come from an IoBufsMut, valid for writes while it
                // is borrowed (this call).
                unsafe { libc::preadv(fd, iov.as_ptr(), cnt, off) }
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    /// One preadv for the whole request; a short read (end of file, or more than
    /// UIO_MAXIOV buffers) continues where it stopped.
    fn read_vectored_at(&self, bufs: &IoBufsMut<'_>, offset: u64) -> io::Result<()> {
        let len = bufs.len();
        let mut done = self.vectored(bufs.iovecs(), offset, false)? as u64;
        while done < len {
            let rest = bufs.sub(done, len - done);
            let n = self.vectored(rest.iovecs(), offset + done, false)?;
            if n == 0 {
                // Past the end of the file: reads as zeros.
                rest.fill_zero();
                break;
            }
            done += n as u64;
        }
        Ok(())
    }

    /// One pwritev for the whole request; a short write continues where it stopped.
    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64) -> io::Result<()> {
        let len = bufs.len();
        let mut done = self.vectored(bufs.iovecs(), offset, true)? as u64;
        while done < len {
            let n = self.vectored(bufs.sub(done, len - done).iovecs(), offset + done, true)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n as u64;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn may_have_data(&self, offset: u64, len: u64) -> bool {
        match vireo_util::extents::next_data(&self.file, offset) {
            Ok(Some(data)) => data < offset.saturating_add(len),
            Ok(None) => false,
            // We cannot tell: assume data.
            Err(_) => true,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(_) => {
                let zeros = vec![0u8; 1 << 20];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    self.file.write_all_at(&zeros[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }
}
