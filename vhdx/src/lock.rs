//! OFD locks (fcntl F_OFD_SETLK) in QEMU's byte layout, so QEMU and we see
//! each other: a writer takes an exclusive lock on the whole file (every QEMU
//! open then fails with "Failed to get ... lock"); a reader takes shared locks
//! on byte 100 (QEMU's "consistent read" permission) and byte 201 ("does not
//! share write"), so QEMU readers may open alongside but QEMU writers may not.
//!
//! Locking fails closed: a file system that cannot take the lock (no OFD
//! locks: `EINVAL`, `ENOLCK`, `EOPNOTSUPP`) refuses the open instead of going
//! on unlocked, since two writers would corrupt the image. The caller may
//! opt out explicitly (`OpenOptions::no_lock`: `locking=off` on a disk,
//! `vireo-img -U`).

use crate::error::{Error, Result};
use std::io;

/// Takes the locks of a writer (`exclusive`) or a reader on `fd`.
pub(crate) fn ofd_lock(fd: i32, exclusive: bool) -> io::Result<()> {
    if exclusive {
        lock_range(fd, true, 0, 0)
    } else {
        lock_range(fd, false, 100, 1)?;
        lock_range(fd, false, 201, 1)
    }
}

/// Turns a failed lock into the engine's error: held by someone else, not
/// supported by the file system (refused: fail closed), or another I/O error.
pub(crate) fn lock_error(path: &str, exclusive: bool, e: io::Error) -> Error {
    let mode = if exclusive {
        "exclusive write"
    } else {
        "shared read"
    };
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Error::Locked {
            path: path.to_string(),
            mode,
        },
        Some(libc::EINVAL) | Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) => {
            Error::LockUnsupported {
                path: path.to_string(),
                mode,
                source: e,
            }
        }
        _ => Error::io(path, "locking", 0, e),
    }
}

/// Locks the image behind `storage` or refuses with a typed error.
pub(crate) fn lock(
    storage: &dyn crate::storage::Storage,
    exclusive: bool,
    path: &str,
) -> Result<()> {
    storage
        .lock(exclusive)
        .map_err(|e| lock_error(path, exclusive, e))
}

/// Releases every OFD lock held through `fd`'s open file description (closing a
/// descriptor releases them only when it is the description's last one).
pub(crate) fn unlock_all(fd: i32) {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_UNLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fd is an open descriptor owned by the caller; fl lives across the call.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &mut fl as *mut libc::flock) };
    if r != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "releasing the image locks");
    }
}

fn lock_range(fd: i32, exclusive: bool, start: i64, len: i64) -> io::Result<()> {
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
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_systems_without_locks_are_refused_not_ignored() {
        for errno in [libc::EINVAL, libc::ENOLCK, libc::EOPNOTSUPP] {
            let e = lock_error("img", true, io::Error::from_raw_os_error(errno));
            assert!(matches!(e, Error::LockUnsupported { .. }), "{errno}: {e}");
            assert!(e.to_string().contains("locking=off"), "{e}");
        }
        assert!(matches!(
            lock_error("img", false, io::Error::from_raw_os_error(libc::EAGAIN)),
            Error::Locked { .. }
        ));
    }
}
