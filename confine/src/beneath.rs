//! Opening a relative path beneath a directory fd without following any symlink.
//!
//! The kernel does it with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)` (Linux 5.6+). Where `openat2` is missing (ENOSYS: an older
//! kernel, or a seccomp filter that hides it) the path is walked one component at a
//! time with `O_NOFOLLOW`, and the final fd is checked: its `/proc/self/fd` path must lie
//! beneath the root and name the same inode (`st_dev`/`st_ino`) as the fd.
//!
//! Either way a symlink anywhere in the path is an `ELOOP` error and `..` is an `EXDEV`
//! error, so nothing outside the root is ever opened.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};
use std::sync::atomic::{AtomicBool, Ordering};

/// `struct open_how` of linux/openat2.h (libc's is `non_exhaustive`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

static OPENAT2_MISSING: AtomicBool = AtomicBool::new(false);

/// Which resolver [`open_beneath`] uses on this system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolver {
    Openat2,
    Walk,
}

/// The resolver in use: `Walk` once `openat2` answered ENOSYS.
pub fn resolver() -> Resolver {
    if OPENAT2_MISSING.load(Ordering::Relaxed) {
        Resolver::Walk
    } else {
        Resolver::Openat2
    }
}

pub(crate) fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check_fd(rc: libc::c_int) -> io::Result<OwnedFd> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(rc) })
    }
}

/// `openat(dir, name, flags, mode)` with `O_CLOEXEC`.
pub(crate) fn openat(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: valid dir fd, NUL-terminated name; the result is checked.
    let rc = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    check_fd(rc)
}

/// Lexical check: a relative path of normal components only (`.` is skipped).
fn components(rel: &Path) -> io::Result<Vec<&OsStr>> {
    let mut out = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(io::Error::from_raw_os_error(libc::EXDEV)),
            Component::RootDir | Component::Prefix(_) => {
                return Err(io::Error::from_raw_os_error(libc::EXDEV))
            }
        }
    }
    Ok(out)
}

/// Opens `rel` beneath `dir` (`flags` as for `open(2)`; `O_CLOEXEC` and `O_NOFOLLOW`
/// are always added). An empty `rel` opens `dir` itself again. `root` is the path
/// `dir` was opened at (used only by the fallback's final check).
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    root: &Path,
    rel: &Path,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    components(rel)?;
    if !OPENAT2_MISSING.load(Ordering::Relaxed) {
        match openat2(dir, rel, flags, mode) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                OPENAT2_MISSING.store(true, Ordering::Relaxed);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                // O_DIRECTORY on a trailing symlink says ENOTDIR: name it a symlink.
                return match openat2(dir, rel, libc::O_PATH, 0) {
                    Ok(fd) if is_link(fd.as_fd()) => Err(io::Error::from_raw_os_error(libc::ELOOP)),
                    _ => Err(e),
                };
            }
            other => return other,
        }
    }
    open_beneath_walk(dir, root, rel, flags, mode)
}

fn openat2(
    dir: BorrowedFd<'_>,
    rel: &Path,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let c = cstr(rel.as_os_str())?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
        mode: if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
            mode as u64
        } else {
            0
        },
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 with a valid dir fd, a NUL-terminated path and an open_how of
    // the size we pass; the result is checked.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    check_fd(rc as libc::c_int)
}

/// Is `name` in `dir` a symlink (not followed)?
fn is_symlink_at(dir: BorrowedFd<'_>, name: &OsStr) -> bool {
    fstatat(dir, name)
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
        .unwrap_or(false)
}

fn fstatat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated name, st points at a stat.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(st)
    }
}

fn is_link(fd: BorrowedFd<'_>) -> bool {
    fstat(fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
}

/// `fstat` of an open fd.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, st points at a stat.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(st)
    }
}

/// The fallback resolver (public so that tests run it where `openat2` exists too).
pub fn open_beneath_walk(
    dir: BorrowedFd<'_>,
    root: &Path,
    rel: &Path,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let names = components(rel)?;
    let eloop = || io::Error::from_raw_os_error(libc::ELOOP);
    let dir_flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
    let mut cur = openat(dir, OsStr::new("."), dir_flags, 0)?;
    let Some((last, walk)) = names.split_last() else {
        return openat(dir, OsStr::new("."), flags | libc::O_NOFOLLOW, mode);
    };
    for name in walk {
        cur = match openat(cur.as_fd(), name, dir_flags, 0) {
            Ok(fd) => fd,
            Err(e)
                if e.raw_os_error() == Some(libc::ENOTDIR) && is_symlink_at(cur.as_fd(), name) =>
            {
                return Err(eloop())
            }
            Err(e) => return Err(e),
        };
    }
    let fd = match openat(cur.as_fd(), last, flags | libc::O_NOFOLLOW, mode) {
        // O_PATH|O_NOFOLLOW opens a symlink itself instead of failing: refuse it too.
        Ok(fd) if is_link(fd.as_fd()) => return Err(eloop()),
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) && is_symlink_at(cur.as_fd(), last) => {
            return Err(eloop())
        }
        Err(e) => return Err(e),
    };
    verify_beneath(fd.as_fd(), root)?;
    Ok(fd)
}

/// The fallback's final check: the fd's `/proc/self/fd` path lies beneath `root` and
/// names the fd's own inode.
fn verify_beneath(fd: BorrowedFd<'_>, root: &Path) -> io::Result<()> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let root = std::fs::canonicalize(root)?;
    if !link.starts_with(&root) {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    }
    let by_path = std::fs::symlink_metadata(&link)?;
    let by_fd = fstat(fd)?;
    use std::os::unix::fs::MetadataExt;
    if by_path.dev() != by_fd.st_dev || by_path.ino() != by_fd.st_ino {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    }
    Ok(())
}
