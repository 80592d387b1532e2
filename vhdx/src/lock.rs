//! Whole-file OFD locks (fcntl F_OFD_SETLK), as QEMU uses: shared for readers,
//! exclusive for a writer. QEMU's own byte-range locks conflict with ours, so
//! neither tool writes an image the other has open.

use crate::error::{Error, Result};

pub(crate) fn lock(fd: i32, exclusive: bool, path: &str) -> Result<()> {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if exclusive { libc::F_WRLCK } else { libc::F_RDLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
    // SAFETY: fd is an open descriptor owned by the caller; fl lives across the call.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &mut fl as *mut libc::flock) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(Error::Locked {
            path: path.to_string(),
            mode: if exclusive { "exclusive write" } else { "shared read" },
        }),
        // Filesystems without lock support: go on unlocked, like QEMU does.
        Some(libc::EINVAL) | Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) => {
            tracing::warn!(path, "file locking not supported: {e}");
            Ok(())
        }
        _ => Err(Error::io(path, "locking", 0, e)),
    }
}
