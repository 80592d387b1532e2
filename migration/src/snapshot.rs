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

use std::fs::File;
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
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<(), SnapshotError> {
    let bytes = serde_json::to_vec_pretty(v).map_err(|source| SnapshotError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, bytes).map_err(io(path))
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, SnapshotError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&bytes).map_err(|source| SnapshotError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a snapshot of a paused VM into `dir` (created if missing; must be empty).
/// On failure nothing is left behind that could pass for a snapshot.
pub fn write<M: GuestMemoryBackend>(
    dir: &Path,
    config: &impl Serialize,
    state: &impl Serialize,
    mem: &M,
) -> Result<SaveStats, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if std::fs::read_dir(dir).map_err(io(dir))?.next().is_some() {
        return Err(SnapshotError::NotEmpty(dir.to_path_buf()));
    }
    let result = write_files(dir, config, state, mem);
    if result.is_err() {
        for f in [MANIFEST, CONFIG, STATE, MEMORY] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }
    result
}

fn write_files<M: GuestMemoryBackend>(
    dir: &Path,
    config: &impl Serialize,
    state: &impl Serialize,
    mem: &M,
) -> Result<SaveStats, SnapshotError> {
    write_json(&dir.join(CONFIG), config)?;
    write_json(&dir.join(STATE), state)?;
    let mpath = dir.join(MEMORY);
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(&mpath)
        .map_err(io(&mpath))?;
    let stats = memory::save(mem, &file).map_err(|source| SnapshotError::Memory {
        path: mpath.clone(),
        source,
    })?;
    file.sync_all().map_err(io(&mpath))?;
    write_json(
        &dir.join(MANIFEST),
        &Manifest {
            version: SNAPSHOT_VERSION,
            vireo: env!("CARGO_PKG_VERSION").into(),
            memory: memory::layout(mem),
        },
    )?;
    Ok(stats)
}

impl<C: DeserializeOwned, S: DeserializeOwned> Snapshot<C, S> {
    /// Opens `dir`: checks the manifest and version, parses config and state.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let mpath = dir.join(MANIFEST);
        if !mpath.exists() {
            if !dir.is_dir() {
                return Err(SnapshotError::Io {
                    path: dir.to_path_buf(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            }
            return Err(SnapshotError::Incomplete(dir.to_path_buf()));
        }
        let manifest: Manifest = read_json(&mpath)?;
        if manifest.version > SNAPSHOT_VERSION {
            return Err(SnapshotError::TooNew {
                path: dir.to_path_buf(),
                found: manifest.version,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            version: manifest.version,
            config: read_json(&dir.join(CONFIG))?,
            state: read_json(&dir.join(STATE))?,
            memory: manifest.memory,
        })
    }

    /// Fills the (new, zeroed) guest memory `mem`; returns the bytes read.
    pub fn load_memory<M: GuestMemoryBackend>(&self, mem: &M) -> Result<u64, SnapshotError> {
        let path = self.dir.join(MEMORY);
        let file = File::open(&path).map_err(io(&path))?;
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
}
