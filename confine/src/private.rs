//! Files and directories only their owner can read, created without following links.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use crate::beneath::{cstr, openat};

/// File mode of everything created here.
pub const PRIVATE_FILE_MODE: libc::mode_t = 0o600;
/// Directory mode of everything created here.
pub const PRIVATE_DIR_MODE: libc::mode_t = 0o700;

/// Sets the process umask to 077: whatever the process creates is its own.
pub fn set_private_umask() {
    // SAFETY: umask only changes this process's file mode creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// `name` must be one plain file name: no `/`, not `.` or `..`.
fn single(name: &OsStr) -> io::Result<()> {
    let mut c = Path::new(name).components();
    match (c.next(), c.next()) {
        (Some(Component::Normal(n)), None) if n == name => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a single file name", Path::new(name).display()),
        )),
    }
}

/// Creates a new file `name` in `dir` (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600),
/// open for reading and writing. An existing file or symlink of that name is an error
/// (EEXIST): nothing is ever written through a planted link.
pub fn create_private(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<File> {
    single(name)?;
    let fd = openat(
        dir,
        name,
        libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        PRIVATE_FILE_MODE,
    )?;
    Ok(File::from(fd))
}

/// Creates directory `name` in `dir` (mode 0700) and opens it (`O_NOFOLLOW`).
pub fn mkdir_private(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    single(name)?;
    let c = cstr(name)?;
    // SAFETY: valid dir fd and NUL-terminated name; the result is checked.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), PRIVATE_DIR_MODE) } < 0 {
        return Err(io::Error::last_os_error());
    }
    open_dir_at(dir, name)
}

/// Opens directory `name` in `dir` without following a symlink.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    single(name)?;
    openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

/// Opens the existing file `name` in `dir` for reading, without following a symlink.
pub fn open_file_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<File> {
    single(name)?;
    openat(dir, name, libc::O_RDONLY | libc::O_NOFOLLOW, 0).map(File::from)
}

/// Opens an absolute directory path the operator gave (its own symlinks are followed:
/// the operator chose it).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: NUL-terminated path; the result is checked.
    let rc = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(rc) })
}

/// Writes `bytes` to `dir/name` atomically and privately: a new 0600 temporary file
/// (`O_EXCL|O_NOFOLLOW`), fsynced, renamed over `name`. A symlink at `name` is replaced,
/// never followed.
pub fn write_private_atomic(dir: BorrowedFd<'_>, name: &OsStr, bytes: &[u8]) -> io::Result<()> {
    single(name)?;
    let mut tmp = name.to_os_string();
    tmp.push(format!(".tmp{}", std::process::id()));
    unlink_at(dir, &tmp).ok();
    let mut f = create_private(dir, &tmp)?;
    let written = f.write_all(bytes).and_then(|_| f.sync_all());
    if let Err(e) = written {
        unlink_at(dir, &tmp).ok();
        return Err(e);
    }
    let (ct, cn) = (cstr(&tmp)?, cstr(name)?);
    // SAFETY: valid dir fd and NUL-terminated names; the result is checked.
    let rc = unsafe { libc::renameat(dir.as_raw_fd(), ct.as_ptr(), dir.as_raw_fd(), cn.as_ptr()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        unlink_at(dir, &tmp).ok();
        return Err(e);
    }
    Ok(())
}

/// Removes file `name` from `dir` (a symlink itself, never its target).
pub fn unlink_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    single(name)?;
    let c = cstr(name)?;
    // SAFETY: valid dir fd and NUL-terminated name; the result is checked.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A path that reaches `name` through the open directory `dir` (`/proc/self/fd/N/name`),
/// for library calls that only take paths: the directory is the one already opened,
/// whatever happens to its path meanwhile. Needs /proc.
pub fn fd_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name)
}
