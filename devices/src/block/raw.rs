//! Raw disk images: the file is the disk.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::{lock_image, lock_unsupported, BlockBackend, LockMode, OpenError, OpenFlags};

pub struct RawFile {
    file: File,
    size: u64,
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
        Ok(Self { file, size })
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
    /// One preadv/pwritev; a short transfer is completed buffer by buffer.
    fn vectored<F>(&self, iov: &[libc::iovec], offset: u64, sys: F) -> io::Result<usize>
    where
        F: Fn(libc::c_int, *const libc::iovec, libc::c_int, libc::off_t) -> isize,
    {
        let cnt = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        loop {
            let n = sys(
                self.file.as_raw_fd(),
                iov.as_ptr(),
                cnt,
                offset as libc::off_t,
            );
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

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: each iovec points into a live, writable caller buffer of its length.
        let mut done = self.vectored(&iov, offset, |fd, v, n, off| unsafe {
            libc::preadv(fd, v, n, off)
        })?;
        let mut pos = offset;
        for b in bufs.iter_mut() {
            let len = b.len();
            if done >= len {
                done -= len;
                pos += len as u64;
                continue;
            }
            let mut filled = done;
            done = 0;
            while filled < len {
                let n = self.file.read_at(&mut b[filled..], pos + filled as u64)?;
                if n == 0 {
                    // Past the end of the file: reads as zeros.
                    b[filled..].fill(0);
                    break;
                }
                filled += n;
            }
            pos += len as u64;
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: each iovec points into a live caller buffer of its length; pwritev
        // only reads from them.
        let mut done = self.vectored(&iov, offset, |fd, v, n, off| unsafe {
            libc::pwritev(fd, v, n, off)
        })?;
        let mut pos = offset;
        for b in bufs {
            let len = b.len();
            if done >= len {
                done -= len;
            } else {
                self.file.write_all_at(&b[done..], pos + done as u64)?;
                done = 0;
            }
            pos += len as u64;
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
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on our open fd; no memory is passed.
        let data = unsafe {
            libc::lseek(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                libc::SEEK_DATA,
            )
        };
        if data < 0 {
            // ENXIO: no data after offset. Anything else: we cannot tell, assume data.
            return io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO);
        }
        (data as u64) < offset.saturating_add(len)
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
