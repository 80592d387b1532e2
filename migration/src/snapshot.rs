//! A snapshot directory:
//!
//! ```text
//! DIR/config.json    the VM's configuration (what `vireo --config` takes)
//! DIR/state.json     vCPU, interrupt controller and device state (the VMM's, versioned)
//! DIR/memory         guest RAM, regions back to back, sparse (zero pages are holes)
//! DIR/snapshot.json  the manifest: format version, memory layout. Written last, so a
//!                    directory without it is an incomplete snapshot and is refused.
//! ```
//!
//! A newer Vireo reads every older version (upgrading the state as it loads); an older
//! Vireo refuses a newer snapshot with a clear error.
//!
//! The directory is 0700 and every file 0600 (guest RAM is the guest's secret), each
//! created new (`O_EXCL|O_NOFOLLOW`) relative to the directory's fd; reading opens the
//! files relative to the directory fd without following symlinks.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryBackend;

use crate::memory::{self, MemoryFileError, RegionLayout, SaveStats};

/// The format this Vireo writes.
pub const SNAPSHOT_VERSION: u32 = 1;

const MANIFEST: &str = "snapshot.json";
const CONFIG: &str = "config.json";
const STATE: &str = "state.json";
const MEMORY: &str = "memory";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot directory {0} is not empty (choose a new directory)")]
    NotEmpty(PathBuf),
    #[error("{0} is not a complete snapshot (no {MANIFEST})")]
    Incomplete(PathBuf),
    #[error("{path} was written by a newer Vireo (format {found}; this one reads up to {SNAPSHOT_VERSION})")]
    TooNew { path: PathBuf, found: u32 },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {source}")]
    Memory {
        path: PathBuf,
        #[source]
        source: MemoryFileError,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    vireo: String,
    memory: Vec<RegionLayout>,
}

/// An opened snapshot: its manifest checked, config and state parsed.
#[derive(Debug)]
pub struct Snapshot<C, S> {
    pub dir: PathBuf,
    pub version: u32,
    pub config: C,
    pub state: S,
    memory: Vec<RegionLayout>,
    dir_fd: OwnedFd,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_json(
    dir: BorrowedFd<'_>,
    dir_path: &Path,
    name: &str,
    v: &impl Serialize,
) -> Result<(), SnapshotError> {
    let path = dir_path.join(name);
    let bytes = serde_json::to_vec_pretty(v).map_err(|source| SnapshotError::Json {
        path: path.clone(),
        source,
    })?;
    let mut f = confine::create_private(dir, OsStr::new(name)).map_err(io(&path))?;
    f.write_all(&bytes).map_err(io(&path))
}

fn read_json<T: DeserializeOwned>(
    dir: BorrowedFd<'_>,
    dir_path: &Path,
    name: &str,
) -> Result<T, SnapshotError> {
    let path = dir_path.join(name);
    let mut bytes = Vec::new();
    confine::open_file_at(dir, OsStr::new(name))
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io(&path))?;
    serde_json::from_slice(&bytes).map_err(|source| SnapshotError::Json { path, source })
}

/// Creates (0700) or opens the snapshot directory `dir` as named by a local user of
/// the VMM: its parents are created as needed and followed as given; `dir` itself is
/// never a symlink. A confined caller creates the directory beneath its storage root
/// itself and calls [`write_at`].
pub fn create_dir(dir: &Path) -> Result<OwnedFd, SnapshotError> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(SnapshotError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    std::fs::create_dir_all(parent).map_err(io(dir))?;
    let pfd = confine::open_dir(parent).map_err(io(dir))?;
    match confine::mkdir_private(pfd.as_fd(), name) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            confine::open_dir_at(pfd.as_fd(), name).map_err(io(dir))
        }
        other => other.map_err(io(dir)),
    }
}

/// Writes a snapshot of a paused VM into `dir` (created 0700 if missing; must be
/// empty). On failure nothing is left behind that could pass for a snapshot.
pub fn write<M: GuestMemoryBackend>(
    dir: &Path,
    config: &impl Serialize,
    state: &impl Serialize,
    mem: &M,
) -> Result<SaveStats, SnapshotError> {
    let fd = create_dir(dir)?;
    write_at(fd.as_fd(), dir, config, state, mem, None)
}

/// Writes a snapshot into the open, empty directory `dir_fd` (`dir` names it in
/// errors). Every file is new, 0600, created with `O_EXCL|O_NOFOLLOW` relative to the
/// directory fd: nothing is written through a planted link. `populated`: see
/// [`memory::save`].
pub fn write_at<M: GuestMemoryBackend>(
    dir_fd: BorrowedFd<'_>,
    dir: &Path,
    config: &impl Serialize,
    state: &impl Serialize,
    mem: &M,
    populated: Option<&[Vec<u64>]>,
) -> Result<SaveStats, SnapshotError> {
    let listing = std::fs::read_dir(format!("/proc/self/fd/{}", dir_fd.as_raw_fd()));
    if listing.map_err(io(dir))?.next().is_some() {
        return Err(SnapshotError::NotEmpty(dir.to_path_buf()));
    }
    let result = write_files(dir_fd, dir, config, state, mem, populated);
    if result.is_err() {
        for f in [MANIFEST, CONFIG, STATE, MEMORY] {
            let _ = confine::unlink_at(dir_fd, OsStr::new(f));
        }
    }
    result
}

fn write_files<M: GuestMemoryBackend>(
    dir_fd: BorrowedFd<'_>,
    dir: &Path,
    config: &impl Serialize,
    state: &impl Serialize,
    mem: &M,
    populated: Option<&[Vec<u64>]>,
) -> Result<SaveStats, SnapshotError> {
    write_json(dir_fd, dir, CONFIG, config)?;
    write_json(dir_fd, dir, STATE, state)?;
    let mpath = dir.join(MEMORY);
    let file = confine::create_private(dir_fd, OsStr::new(MEMORY)).map_err(io(&mpath))?;
    let stats = memory::save(mem, &file, populated).map_err(|source| SnapshotError::Memory {
        path: mpath.clone(),
        source,
    })?;
    file.sync_all().map_err(io(&mpath))?;
    write_json(
        dir_fd,
        dir,
        MANIFEST,
        &Manifest {
            version: SNAPSHOT_VERSION,
            vireo: env!("CARGO_PKG_VERSION").into(),
            memory: memory::layout(mem),
        },
    )?;
    Ok(stats)
}

impl<C: DeserializeOwned, S: DeserializeOwned> Snapshot<C, S> {
    /// Opens `dir` (as a local user of the VMM names it): checks the manifest and
    /// version, parses config and state.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let fd = confine::open_dir(dir).map_err(io(dir))?;
        Self::open_at(fd, dir)
    }

    /// Opens the snapshot in the open directory `dir_fd` (`dir` names it in errors);
    /// its files are opened relative to it, never through a symlink.
    pub fn open_at(dir_fd: OwnedFd, dir: &Path) -> Result<Self, SnapshotError> {
        match confine::open_file_at(dir_fd.as_fd(), OsStr::new(MANIFEST)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SnapshotError::Incomplete(dir.to_path_buf()))
            }
            _ => {}
        }
        let manifest: Manifest = read_json(dir_fd.as_fd(), dir, MANIFEST)?;
        if manifest.version > SNAPSHOT_VERSION {
            return Err(SnapshotError::TooNew {
                path: dir.to_path_buf(),
                found: manifest.version,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            version: manifest.version,
            config: read_json(dir_fd.as_fd(), dir, CONFIG)?,
            state: read_json(dir_fd.as_fd(), dir, STATE)?,
            memory: manifest.memory,
            dir_fd,
        })
    }

    /// Fills the (new, zeroed) guest memory `mem`; returns the bytes read. The memory
    /// file is opened on the program's file thread if it has one
    /// ([`confine::broker`]); it is read here.
    pub fn load_memory<M: GuestMemoryBackend>(&self, mem: &M) -> Result<u64, SnapshotError> {
        let path = self.dir.join(MEMORY);
        let dir = self.dir_fd.try_clone().map_err(io(&path))?;
        let file = confine::broker::run(confine::broker::FileOp::ReadSnapshot, move || {
            confine::open_file_at(dir.as_fd(), OsStr::new(MEMORY))
        })
        .map_err(io(&path))?;
        memory::load(mem, &file, &self.memory)
            .map_err(|source| SnapshotError::Memory { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    type Mem = GuestMemoryMmap<()>;

    #[test]
    fn write_then_open_round_trips_and_guards_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("snap");
        let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1234)).unwrap();
        write(&snap, &"the config", &vec![1u32, 2, 3], &mem).unwrap();
        // A second snapshot into the same directory is refused, the first kept.
        assert!(matches!(
            write(&snap, &"x", &0, &mem),
            Err(SnapshotError::NotEmpty(_))
        ));
        let s: Snapshot<String, Vec<u32>> = Snapshot::open(&snap).unwrap();
        assert_eq!(
            (s.config.as_str(), s.state.as_slice()),
            ("the config", &[1, 2, 3][..])
        );
        let back = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        s.load_memory(&back).unwrap();
        let mut b = [0u8; 5];
        back.read_slice(&mut b, GuestAddress(0x1234)).unwrap();
        assert_eq!(&b, b"hello");
    }

    #[test]
    fn incomplete_newer_and_corrupt_snapshots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("snap");
        let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        write(&snap, &0, &0, &mem).unwrap();
        let manifest = snap.join(MANIFEST);
        let text = std::fs::read_to_string(&manifest).unwrap();
        std::fs::write(&manifest, text.replace("\"version\": 1", "\"version\": 99")).unwrap();
        let e = Snapshot::<u32, u32>::open(&snap).unwrap_err();
        assert!(matches!(e, SnapshotError::TooNew { found: 99, .. }), "{e}");
        std::fs::write(&manifest, "{ not json").unwrap();
        assert!(matches!(
            Snapshot::<u32, u32>::open(&snap),
            Err(SnapshotError::Json { .. })
        ));
        std::fs::remove_file(&manifest).unwrap();
        assert!(matches!(
            Snapshot::<u32, u32>::open(&snap),
            Err(SnapshotError::Incomplete(_))
        ));
        assert!(Snapshot::<u32, u32>::open(&dir.path().join("nowhere")).is_err());
    }

    #[test]
    fn snapshot_files_are_private_and_planted_links_are_refused() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("snap");
        let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        write(&snap, &0, &0, &mem).unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&snap), 0o700);
        for f in [MANIFEST, CONFIG, STATE, MEMORY] {
            assert_eq!(mode(&snap.join(f)), 0o600, "{f}");
        }
        // An empty directory with a planted link: refused as not empty, nothing written.
        let planted = dir.path().join("planted");
        std::fs::create_dir(&planted).unwrap();
        let victim = dir.path().join("victim");
        symlink(&victim, planted.join(MEMORY)).unwrap();
        assert!(write(&planted, &0, &0, &mem).is_err());
        assert!(!victim.exists());
        // The snapshot directory itself as a symlink is not followed.
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        symlink(&real, dir.path().join("link")).unwrap();
        assert!(write(&dir.path().join("link"), &0, &0, &mem).is_err());
        assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0);
        // A snapshot whose memory file was swapped for a link is not read through it.
        std::fs::remove_file(snap.join(MEMORY)).unwrap();
        std::fs::write(&victim, b"x").unwrap();
        symlink(&victim, snap.join(MEMORY)).unwrap();
        let s: Snapshot<u32, u32> = Snapshot::open(&snap).unwrap();
        let e = s.load_memory(&mem).unwrap_err().to_string();
        assert!(
            e.contains("symbolic link") || e.contains("os error 40"),
            "{e}"
        );
    }
}
