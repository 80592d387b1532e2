//! Image locks: open-file-description locks (F_OFD_SETLK), as QEMU takes them, so two
//! VMMs (or a VMM and `qemu-img`) cannot both write one image.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Readers share the image.
    Shared,
    /// One writer, no one else.
    Exclusive,
}

/// Takes a whole-file OFD lock without waiting. `Ok(false)` means someone holds a
/// conflicting lock; an error that [`lock_unsupported`] recognises means the file
/// system has no OFD locks (callers refuse the image then: fail closed).
pub fn lock_image(file: &File, mode: LockMode) -> io::Result<bool> {
    // SAFETY: flock is plain data; zeroed is a valid value for every field.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = match mode {
        LockMode::Shared => libc::F_RDLCK,
        LockMode::Exclusive => libc::F_WRLCK,
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
    // SAFETY: the fd is valid for the lifetime of `file`; fl is a valid flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(err),
    }
}

/// Releases every OFD lock held through `file`'s open file description. Closing a
/// descriptor releases them only when it is the description's last one; a backend
/// that let go of its image releases them itself, so an image reopened from a kept
/// descriptor (a migration's source taking its disk back) can be handed over again.
pub fn unlock_image(file: &File) {
    // SAFETY: flock is plain data; zeroed is a valid value for every field.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_UNLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: the fd is valid for the lifetime of `file`; fl is a valid flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "releasing the image lock");
    }
}

/// Whether a lock error means the file system cannot take OFD locks at all.
pub fn lock_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP)
    )
}
