//! The layout of a replicated VM's directory: the names of its files and the file
//! helpers the store opens them with.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use super::{io_err, StoreError};

pub(super) const STATE_FILE: &str = "vm.state";
pub(super) const INTENT_FILE: &str = "committing";
/// A failover to an older kept point in progress (its cut id).
pub(super) const ROLLBACK_FILE: &str = "rolling-back";
/// The undo files of the kept points (`history.rs`).
pub(super) const HISTORY_DIR: &str = "history";

pub(super) fn disk_image_name(i: usize) -> String {
    format!("disk-{i}.img")
}

pub(super) fn disk_dir_name(i: usize) -> String {
    format!("disk-{i}")
}

pub(super) fn part_name(seq: u64) -> String {
    format!("{seq:020}.part")
}

pub(super) fn read_opt(dir: BorrowedFd<'_>, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
    match std::fs::read(confine::fd_path(dir, name.as_ref())) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(format!("reading {name}"))(e)),
    }
}

pub(super) fn open_or_create_dir(parent: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    match confine::mkdir_private(parent, name.as_ref()) {
        Ok(fd) => Ok(fd),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            confine::open_dir_at(parent, name.as_ref())
        }
        Err(e) => Err(e),
    }
}

/// Opens `name` in `dir` for reading and writing without following a symlink.
/// Tells the kernel how an image is used: `POSIX_FADV_RANDOM` (no readahead: the
/// undo capture reads the old bytes of the ranges a segment overwrites; readahead
/// would cache them as large folios, and the segment's small writes would then dirty
/// whole folios: the replica wrote back ~64x the guest's bytes on ext4 with large
/// folios) or `POSIX_FADV_DONTNEED`. Advice only: a file system that ignores it loses
/// nothing but the saving.
pub(super) fn advise(image: &File, advice: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise on an fd this File owns; no memory is passed.
    let r = unsafe { libc::posix_fadvise(image.as_raw_fd(), 0, 0, advice) };
    if r != 0 {
        tracing::debug!(advice, error = %io::Error::from_raw_os_error(r), "posix_fadvise on a replica image");
    }
}

pub(super) fn open_rw_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_nofollow()
        .open(confine::fd_path(dir, name.as_ref()))
}

trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for std::fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOFOLLOW)
    }
}

pub(super) fn rename_at(dir: BorrowedFd<'_>, from: &OsStr, to: &OsStr) -> io::Result<()> {
    std::fs::rename(confine::fd_path(dir, from), confine::fd_path(dir, to))
}
