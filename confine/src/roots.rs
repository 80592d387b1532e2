//! The allowed roots: which root a path falls under, and opening it beneath that root.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use crate::beneath::{fstat, open_beneath};
use crate::error::ConfineError;
use crate::private::mkdir_private;

/// One allowed root: the path as given, its canonical form, and its directory fd.
#[derive(Debug)]
struct Root {
    given: PathBuf,
    canonical: PathBuf,
    dir: OwnedFd,
}

/// What an opened path must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A regular file, or a block device on the allow-list.
    File,
    Directory,
}

/// A list of allowed roots (and allow-listed block devices).
#[derive(Debug, Default)]
pub struct Roots {
    roots: Vec<Root>,
    block_devices: Vec<PathBuf>,
}

fn kind_name(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "regular file",
        libc::S_IFDIR => "directory",
        libc::S_IFBLK => "block device",
        libc::S_IFCHR => "character device",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFLNK => "symlink",
        _ => "special file",
    }
}

/// An absolute path without `..`.
pub fn check_lexical(path: &Path) -> Result<(), ConfineError> {
    if !path.is_absolute() {
        return Err(ConfineError::NotAbsolute {
            path: path.to_path_buf(),
        });
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(ConfineError::DotDot {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Whether the socket `path` (lexically checked by the caller) is in one of the socket
/// directories `dirs` or in a directory directly beneath one (vireod's `vms/NAME/`:
/// each VM's own run directory holds its sockets). Decided on the path alone: a socket
/// is bound or connected by name.
pub fn in_socket_dir(path: &Path, dirs: &[PathBuf]) -> bool {
    let Some(parent) = path.parent().filter(|_| path.file_name().is_some()) else {
        return false;
    };
    dirs.iter()
        .any(|d| parent == d.as_path() || parent.parent() == Some(d.as_path()))
}

impl Roots {
    /// Opens each root (absolute, an existing directory) and keeps its fd.
    pub fn new(roots: &[PathBuf], block_devices: &[PathBuf]) -> Result<Self, ConfineError> {
        let mut out = Roots::default();
        for r in roots {
            check_lexical(r)?;
            let io = |what, source| ConfineError::Io {
                path: r.clone(),
                what,
                source,
            };
            let dir = crate::private::open_dir(r).map_err(|e| io("opening the storage root", e))?;
            let canonical =
                std::fs::canonicalize(r).map_err(|e| io("resolving the storage root", e))?;
            out.roots.push(Root {
                given: r.clone(),
                canonical,
                dir,
            });
        }
        for d in block_devices {
            check_lexical(d)?;
            out.block_devices.push(d.clone());
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The roots as given.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.roots.iter().map(|r| r.given.clone()).collect()
    }

    pub fn block_devices(&self) -> &[PathBuf] {
        &self.block_devices
    }

    /// Each root's directory descriptor, opened when the roots were made (what a
    /// Landlock rule is anchored to, so a root renamed or replaced later is not followed).
    pub fn dirs(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.roots.iter().map(|r| r.dir.as_fd())
    }

    fn list(&self) -> String {
        let v: Vec<String> = self
            .roots
            .iter()
            .map(|r| r.given.display().to_string())
            .collect();
        if v.is_empty() {
            "none configured".into()
        } else {
            v.join(", ")
        }
    }

    /// The root `path` falls under (the longest match) and the rest of the path.
    fn locate<'a>(&'a self, path: &Path) -> Result<(&'a Root, PathBuf), ConfineError> {
        check_lexical(path)?;
        let mut best: Option<(&Root, PathBuf)> = None;
        for r in &self.roots {
            for base in [&r.given, &r.canonical] {
                if let Ok(rest) = path.strip_prefix(base) {
                    let better = best
                        .as_ref()
                        .is_none_or(|(_, b)| rest.components().count() < b.components().count());
                    if better {
                        best = Some((r, rest.to_path_buf()));
                    }
                }
            }
        }
        best.ok_or_else(|| ConfineError::Outside {
            path: path.to_path_buf(),
            roots: self.list(),
        })
    }

    /// Does `path` fall under a root (lexically; nothing is opened)?
    pub fn contains(&self, path: &Path) -> bool {
        self.locate(path).is_ok()
    }

    /// Checks `path` lexically: absolute, no `..`, under a root (or an allow-listed
    /// block device).
    pub fn check(&self, path: &Path) -> Result<(), ConfineError> {
        if self.block_devices.iter().any(|d| d == path) {
            return Ok(());
        }
        self.locate(path).map(|_| ())
    }

    /// Opens `path` beneath its root with `flags` (as for `open(2)`) and checks the fd:
    /// a regular file (`Kind::File`; an allow-listed block device too) or a directory.
    pub fn open(
        &self,
        path: &Path,
        flags: libc::c_int,
        kind: Kind,
    ) -> Result<OwnedFd, ConfineError> {
        let open_err = |e| ConfineError::from_open(path.to_path_buf(), "cannot open", e);
        let fd = if kind == Kind::File && self.block_devices.iter().any(|d| d == path) {
            // An operator named this device: open it as named, but not through a link.
            crate::beneath::openat(at_fdcwd(), path.as_os_str(), flags | libc::O_NOFOLLOW, 0)
                .map_err(open_err)?
        } else {
            let (root, rest) = self.locate(path)?;
            open_beneath(root.dir.as_fd(), &root.canonical, &rest, flags, 0).map_err(open_err)?
        };
        let st = fstat(fd.as_fd()).map_err(|e| ConfineError::Io {
            path: path.to_path_buf(),
            what: "fstat",
            source: e,
        })?;
        let fmt = st.st_mode & libc::S_IFMT;
        let listed = self.block_devices.iter().any(|d| d == path);
        match (kind, fmt) {
            (Kind::File, libc::S_IFREG) | (Kind::Directory, libc::S_IFDIR) => Ok(fd),
            (Kind::File, libc::S_IFBLK) if listed => Ok(fd),
            (Kind::File, libc::S_IFBLK) => Err(ConfineError::BlockDevice {
                path: path.to_path_buf(),
            }),
            (kind, _) => Err(ConfineError::WrongType {
                path: path.to_path_buf(),
                expected: match kind {
                    Kind::File => "regular file",
                    Kind::Directory => "directory",
                },
                found: kind_name(st.st_mode),
            }),
        }
    }

    /// Opens `path` beneath its root as an `O_PATH` descriptor (nothing is read, no
    /// access time changes) of a regular file, a directory or an allow-listed block
    /// device; no symlink is followed anywhere on the way, the last component included.
    /// What a jail binds and chowns through, so no later lookup can be redirected.
    pub fn open_path(&self, path: &Path) -> Result<OwnedFd, ConfineError> {
        let listed = self.block_devices.iter().any(|d| d == path);
        let fd = if listed {
            o_path_nofollow(path)?
        } else {
            self.o_path_beneath(path)?
        };
        check_node(path, fd, listed)
    }

    /// An `O_PATH` descriptor of `path`, beneath its root with no symlink.
    fn o_path_beneath(&self, path: &Path) -> Result<OwnedFd, ConfineError> {
        let (root, rest) = self.locate(path)?;
        open_beneath(root.dir.as_fd(), &root.canonical, &rest, libc::O_PATH, 0)
            .map_err(|e| ConfineError::from_open(path.to_path_buf(), "cannot open", e))
    }

    /// As [`Roots::open_path`], for a unix socket (one a VMM connects to): beneath its
    /// root with no symlink, and anything but a socket refused.
    pub fn open_socket_path(&self, path: &Path) -> Result<OwnedFd, ConfineError> {
        let fd = self.o_path_beneath(path)?;
        check_socket_node(path, fd)
    }

    /// Opens a regular file (or allow-listed block device) for reading, or reading and
    /// writing.
    pub fn open_file(&self, path: &Path, write: bool) -> Result<File, ConfineError> {
        let flags = if write { libc::O_RDWR } else { libc::O_RDONLY };
        self.open(path, flags, Kind::File).map(File::from)
    }

    /// Opens a directory beneath its root.
    pub fn open_dir(&self, path: &Path) -> Result<OwnedFd, ConfineError> {
        self.open(path, libc::O_RDONLY | libc::O_DIRECTORY, Kind::Directory)
    }

    /// Splits `path` into its parent directory (opened beneath its root) and its last
    /// component: where a new file or directory is to be created.
    pub fn open_parent<'p>(&self, path: &'p Path) -> Result<(OwnedFd, &'p OsStr), ConfineError> {
        check_lexical(path)?;
        let Some(name) = path.file_name() else {
            return Err(ConfineError::WrongType {
                path: path.to_path_buf(),
                expected: "file name",
                found: "root directory",
            });
        };
        // The parent must itself be under a root (or be a root).
        let (root, rest) = self.locate(path)?;
        if rest.as_os_str().is_empty() {
            return Err(ConfineError::Outside {
                path: path.to_path_buf(),
                roots: self.list(),
            });
        }
        let parent_rest = rest.parent().unwrap_or(Path::new(""));
        let fd = open_beneath(
            root.dir.as_fd(),
            &root.canonical,
            parent_rest,
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .map_err(|e| ConfineError::from_open(path.to_path_buf(), "cannot open its directory", e))?;
        Ok((fd, name))
    }

    /// Creates directory `path` (mode 0700) beneath its root, or opens it when it
    /// already exists as a directory (not through a symlink). Returns its fd.
    pub fn create_dir_private(&self, path: &Path) -> Result<OwnedFd, ConfineError> {
        let (parent, name) = self.open_parent(path)?;
        match mkdir_private(parent.as_fd(), name) {
            Ok(fd) => Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                crate::private::open_dir_at(parent.as_fd(), name)
                    .map_err(|e| ConfineError::from_open(path.to_path_buf(), "cannot open", e))
            }
            Err(e) => Err(ConfineError::Io {
                path: path.to_path_buf(),
                what: "cannot create the directory",
                source: e,
            }),
        }
    }

    /// Creates the new file `path` (0600, `O_EXCL|O_NOFOLLOW`) beneath its root.
    pub fn create_file_private(&self, path: &Path) -> Result<File, ConfineError> {
        let (parent, name) = self.open_parent(path)?;
        crate::private::create_private(parent.as_fd(), name).map_err(|e| ConfineError::Io {
            path: path.to_path_buf(),
            what: "cannot create",
            source: e,
        })
    }
}

/// Opens `path` as an `O_PATH` descriptor without following a symlink as its last
/// component (earlier components resolve as usual: for paths outside the storage roots,
/// in directories only root may change); a regular file, directory or block device.
pub fn open_path_nofollow(path: &Path) -> Result<OwnedFd, ConfineError> {
    let fd = o_path_nofollow(path)?;
    check_node(path, fd, true)
}

/// As [`open_path_nofollow`], for a unix socket: anything else is refused.
pub fn open_socket_path_nofollow(path: &Path) -> Result<OwnedFd, ConfineError> {
    let fd = o_path_nofollow(path)?;
    check_socket_node(path, fd)
}

/// An `O_PATH` descriptor of `path` (lexically checked), its last component not
/// followed if it is a symlink.
fn o_path_nofollow(path: &Path) -> Result<OwnedFd, ConfineError> {
    check_lexical(path)?;
    crate::beneath::openat(
        at_fdcwd(),
        path.as_os_str(),
        libc::O_PATH | libc::O_NOFOLLOW,
        0,
    )
    .map_err(|e| ConfineError::from_open(path.to_path_buf(), "cannot open", e))
}

/// An `O_PATH` descriptor's file must be a unix socket.
fn check_socket_node(path: &Path, fd: OwnedFd) -> Result<OwnedFd, ConfineError> {
    let st = fstat(fd.as_fd()).map_err(|e| ConfineError::Io {
        path: path.to_path_buf(),
        what: "fstat",
        source: e,
    })?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFSOCK => Ok(fd),
        libc::S_IFLNK => Err(ConfineError::Symlink {
            path: path.to_path_buf(),
        }),
        _ => Err(ConfineError::WrongType {
            path: path.to_path_buf(),
            expected: "unix socket",
            found: kind_name(st.st_mode),
        }),
    }
}

/// An `O_PATH` descriptor's file must be a regular file, a directory or (`block`) a
/// block device: with `O_PATH | O_NOFOLLOW` a trailing symlink opens as itself.
fn check_node(path: &Path, fd: OwnedFd, block: bool) -> Result<OwnedFd, ConfineError> {
    let st = fstat(fd.as_fd()).map_err(|e| ConfineError::Io {
        path: path.to_path_buf(),
        what: "fstat",
        source: e,
    })?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG | libc::S_IFDIR => Ok(fd),
        libc::S_IFBLK if block => Ok(fd),
        libc::S_IFLNK => Err(ConfineError::Symlink {
            path: path.to_path_buf(),
        }),
        _ => Err(ConfineError::WrongType {
            path: path.to_path_buf(),
            expected: "regular file or directory",
            found: kind_name(st.st_mode),
        }),
    }
}

fn at_fdcwd() -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: AT_FDCWD is a valid "fd" for the *at calls for the life of the process.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(libc::AT_FDCWD) }
}
