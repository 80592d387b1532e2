//! Where this VMM may name files: its storage roots (`--storage-root`, repeatable).
//!
//! With roots, every path that a configuration or an API call names (disks, kernel,
//! initramfs, VHDX parents, snapshot destinations and sources, storage-migration
//! destinations, a receiver's `storage_dir`, migration unix sockets) must resolve
//! beneath one of them ([`confine::Roots`]: checked on the opened fd, no symlinks, no
//! `..`). vireod always passes its roots. Without roots a user who runs `vireo`
//! directly keeps the old behaviour: paths are taken as given (the user can open those
//! files anyway); files the VMM creates are still private and never written through a
//! link.
//!
//! Every function here that opens, creates or removes runs on the file thread
//! (`vireo-files`, [`crate::file_broker`]) once there is one: the control thread's
//! filter has no `openat`.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use confine::{ConfineError, Roots};

use crate::file_broker::{run, FileOp};

static ROOTS: OnceLock<Roots> = OnceLock::new();
static SOCKET_DIRS: OnceLock<Vec<std::path::PathBuf>> = OnceLock::new();

/// Sets the directories where unix migration sockets may be (`--socket-dir`), once.
pub fn set_socket_dirs(dirs: Vec<std::path::PathBuf>) {
    let _ = SOCKET_DIRS.set(dirs);
}

/// Sets the roots once, at start (before any VM is created).
pub fn set_roots(roots: Roots) {
    if ROOTS.set(roots).is_err() {
        tracing::warn!("storage roots were already set; keeping the first");
    }
}

/// The storage roots, when configured.
pub fn roots() -> Option<&'static Roots> {
    ROOTS.get().filter(|r| !r.is_empty())
}

/// Checks a path lexically against the roots (Ok without roots).
pub fn check(path: &Path) -> Result<(), ConfineError> {
    match roots() {
        Some(r) => r.check(path),
        None => Ok(()),
    }
}

/// Opens a disk image (regular file or allow-listed block device).
pub fn open_image(path: &Path, write: bool, direct: bool) -> Result<File, ConfineError> {
    let path = path.to_path_buf();
    run(FileOp::OpenDisk, move || {
        open_image_here(&path, write, direct)
    })
}

fn open_image_here(path: &Path, write: bool, direct: bool) -> Result<File, ConfineError> {
    let mut flags = if write { libc::O_RDWR } else { libc::O_RDONLY };
    if direct {
        flags |= libc::O_DIRECT;
    }
    match roots() {
        Some(r) => r.open(path, flags, confine::Kind::File).map(File::from),
        None => {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(if direct { libc::O_DIRECT } else { 0 })
                .open(path)
                .map_err(|source| ConfineError::Io {
                    path: path.to_path_buf(),
                    what: "cannot open",
                    source,
                })
        }
    }
}

/// Opens a kernel or initramfs for reading.
pub fn open_read(path: &Path) -> Result<File, ConfineError> {
    let path = path.to_path_buf();
    run(FileOp::OpenPayload, move || {
        open_image_here(&path, false, false)
    })
}

/// How a VHDX's parents are opened: with roots, beneath a root (no symlinks); the
/// parent must be in the child's directory or under a storage root, which with roots
/// is the same thing (the child is beneath a root). None without roots.
pub fn parent_opener() -> Option<vhdx::ParentOpener> {
    let roots = roots()?;
    Some(vhdx::ParentOpener(Arc::new(move |_child, candidate| {
        let candidate = candidate.to_path_buf();
        run(FileOp::OpenDisk, move || {
            match roots.open_file(&candidate, false) {
                Ok(f) => Ok(Some(f)),
                Err(ConfineError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    Ok(None)
                }
                Err(e) => Err(format!("parent refused: {e}")),
            }
        })
    })))
}

/// Creates (0700) or opens the directory `path` for a snapshot or a receiver's disks.
pub fn create_dir(path: &Path) -> Result<OwnedFd, String> {
    let path = path.to_path_buf();
    run(FileOp::CreateDir, move || match roots() {
        Some(r) => r.create_dir_private(&path).map_err(|e| e.to_string()),
        None => migration::snapshot::create_dir(&path).map_err(|e| e.to_string()),
    })
}

/// Opens an existing directory (a snapshot to restore).
pub fn open_dir(path: &Path) -> Result<OwnedFd, ConfineError> {
    let path = path.to_path_buf();
    run(FileOp::OpenDir, move || match roots() {
        Some(r) => r.open_dir(&path),
        None => confine::open_dir(&path).map_err(|source| ConfineError::Io {
            path: path.clone(),
            what: "cannot open",
            source,
        }),
    })
}

/// The parent directory of a file to be created, and its name.
pub fn open_parent(path: &Path) -> Result<(OwnedFd, std::ffi::OsString), ConfineError> {
    let path = path.to_path_buf();
    run(FileOp::OpenParent, move || open_parent_here(&path))
}

fn open_parent_here(path: &Path) -> Result<(OwnedFd, std::ffi::OsString), ConfineError> {
    match roots() {
        Some(r) => r
            .open_parent(path)
            .map(|(fd, name)| (fd, name.to_os_string())),
        None => {
            let io = |source| ConfineError::Io {
                path: path.to_path_buf(),
                what: "cannot open its directory",
                source,
            };
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let name = path
                .file_name()
                .ok_or_else(|| io(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
            Ok((confine::open_dir(parent).map_err(io)?, name.to_os_string()))
        }
    }
}

/// With roots, a `unix:` migration URL's socket must be beneath a storage root, in a
/// `--socket-dir` or in a directory directly in one (vireod's `vms/NAME/`; checked on
/// the path: a socket is bound or connected by name).
pub fn check_url(url: &str) -> Result<(), ConfineError> {
    let (Some(path), Some(r)) = (url.strip_prefix("unix:"), roots()) else {
        return Ok(());
    };
    let path = Path::new(path);
    confine::check_lexical(path)?;
    let dirs = SOCKET_DIRS.get().map(Vec::as_slice).unwrap_or(&[]);
    if confine::in_socket_dir(path, dirs) {
        return Ok(());
    }
    r.check(path)
}

/// With roots, a vhost-user backend's socket (`--net vhost-user=PATH`) must be beneath
/// a storage root or in a `--socket-dir` (checked on the path: a socket is connected by
/// name), as migration sockets.
pub fn check_socket(path: &Path) -> Result<(), ConfineError> {
    let Some(r) = roots() else {
        return Ok(());
    };
    confine::check_lexical(path)?;
    let dirs = SOCKET_DIRS.get().map(Vec::as_slice).unwrap_or(&[]);
    if confine::in_socket_dir(path, dirs) {
        return Ok(());
    }
    r.check(path)
}

/// Creates the new image `path` (0600, `O_EXCL|O_NOFOLLOW` in its directory, beneath a
/// root when there are roots) in `format`; on failure nothing is left.
pub fn create_image(
    path: &Path,
    format: api::config::DiskFormat,
    size: u64,
    logical_sector: u32,
    physical_sector: u32,
) -> Result<(), String> {
    let path = path.to_path_buf();
    run(FileOp::CreateImage, move || {
        create_image_here(&path, format, size, logical_sector, physical_sector)
    })
}

/// Removes `path` (an image this VMM made or was told to delete): `Err` names why not.
pub fn remove_file(path: &Path) -> std::io::Result<()> {
    let path = path.to_path_buf();
    run(FileOp::RemoveFile, move || std::fs::remove_file(path))
}

fn create_image_here(
    path: &Path,
    format: api::config::DiskFormat,
    size: u64,
    logical_sector: u32,
    physical_sector: u32,
) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let (dir, name) = open_parent_here(path).map_err(|e| e.to_string())?;
    let file = confine::create_private(dir.as_fd(), &name)
        .map_err(|e| format!("{}: cannot create: {e}", path.display()))?;
    let made = match format {
        api::config::DiskFormat::Raw => file.set_len(size).map_err(|e| e.to_string()),
        api::config::DiskFormat::Vhdx => {
            // The VHDX writer takes a path: the file just created, through its fd.
            let by_fd = std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
            vhdx::Vhdx::create(
                &by_fd,
                &vhdx::CreateOptions {
                    size,
                    kind: vhdx::DiskKind::Dynamic,
                    logical_sector_size: logical_sector,
                    physical_sector_size: physical_sector,
                    ..Default::default()
                },
            )
            .map(drop)
            .map_err(|e| e.to_string())
        }
    };
    if made.is_err() {
        let _ = confine::unlink_at(dir.as_fd(), &name);
    }
    made.map_err(|e| format!("{}: {e}", path.display()))
}
