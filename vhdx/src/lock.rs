//! OFD locks (fcntl F_OFD_SETLK) in QEMU's byte layout, so QEMU and we see
//! each other: a writer takes an exclusive lock on the whole file (every QEMU
//! open then fails with "Failed to get ... lock"); a reader takes shared locks
//! on byte 100 (QEMU's "consistent read" permission) and byte 201 ("does not
//! share write"), so QEMU readers may open alongside but QEMU writers may not.

use crate::error::{Error, Result};

pub(crate) fn lock(fd: i32, exclusive: bool, path: &str) -> Result<()> {
    if exclusive {
        lock_range(fd, true, 0, 0, path)
    } else {
        lock_range(fd, false, 100, 1, path)?;
        lock_range(fd, false, 201, 1, path)
    }
}

fn lock_range(fd: i32, exclusive: bool, start: i64, len: i64, path: &str) -> Result<()> {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if exclusive {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    // SAFETY: fd is an open descriptor owned by the caller; fl lives across the call.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &mut fl as *mut libc::flock) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(Error::Locked {
            path: path.to_string(),
            mode: if exclusive {
                "exclusive write"
            } else {
                "shared read"
            },
        }),
        // Filesystems without lock support: go on unlocked, like QEMU does.
        Some(libc::EINVAL) | Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) => {
            tracing::warn!(path, "file locking not supported: {e}");
            Ok(())
        }
        _ => Err(Error::io(path, "locking", 0, e)),
    }
}
