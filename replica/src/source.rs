//! What the primary reads for an initial copy or a resync, and what seeds a reverse
//! replica: a disk's *virtual* content. A raw image is its file's bytes; a VHDX is
//! read through the `vhdx` crate (its BAT, and for a differencing disk its parent
//! chain), never as the file's bytes, and tells which ranges it has not allocated:
//! those read as zeros without a read, so the copy neither reads nor sends them and
//! the replica's image stays sparse there.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One disk as the guest sees it: `size` bytes, read at any offset.
pub trait DiskImage: Send + Sync {
    /// The disk's size in bytes (a VHDX's virtual size).
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset` (within [`Self::size`]).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Whether `[offset, +len)` reads as zeros without holding data (a VHDX's
    /// unallocated or zero blocks). `false` says nothing: the range must be read.
    fn reads_as_zero(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }
}

/// A raw image: the first `size` bytes of a file.
pub struct RawImage {
    file: File,
    size: u64,
}

impl RawImage {
    pub fn new(file: File, size: u64) -> Self {
        RawImage { file, size }
    }

    /// The whole file (its length is the disk's size).
    pub fn whole(file: File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(RawImage { file, size })
    }
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// (The `vhdx` crate's errors name the file.)
    #[error("VHDX disk {source}")]
    Vhdx {
        path: PathBuf,
        #[source]
        source: vhdx::Error,
    },
    #[error("VHDX disk {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("VHDX disk {path}: a differencing disk whose parent chain is not opened (its own blocks alone are not the disk)")]
    NoParent { path: PathBuf },
}

/// A VHDX (fixed, dynamic or differencing with its parent chain) opened read-only,
/// without the image's lock (the VMM holds it while the VM runs) and with a pending
/// log replayed in memory only: nothing of the file is ever written.
pub struct VhdxImage {
    vhdx: vhdx::Vhdx,
}

impl VhdxImage {
    /// Opens `file` (the image at `path`); a differencing disk's parents are opened by
    /// `parents` (`None`: by the locator's paths). Any damage the open finds (headers,
    /// region table, metadata, a BAT entry outside the file, a log that does not
    /// replay) is an error naming the disk.
    pub fn open(
        file: File,
        path: &Path,
        parents: Option<vhdx::ParentOpener>,
    ) -> Result<Self, SourceError> {
        let storage: Arc<dyn vhdx::Storage> = Arc::new(vhdx::FileStorage::new(file));
        let opts = vhdx::OpenOptions {
            read_only: true,
            no_lock: true,
            parent_opener: parents,
            ..Default::default()
        };
        let vhdx =
            vhdx::Vhdx::open_storage(storage, path, opts).map_err(|source| SourceError::Vhdx {
                path: path.to_path_buf(),
                source,
            })?;
        if vhdx.has_parent() && vhdx.parent().is_none() {
            return Err(SourceError::NoParent {
                path: path.to_path_buf(),
            });
        }
        Ok(VhdxImage { vhdx })
    }

    /// Opens the image at `path` (parents by the locator's paths).
    pub fn open_path(path: &Path) -> Result<Self, SourceError> {
        let file = File::open(path).map_err(|source| SourceError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::open(file, path, None)
    }
}

fn vhdx_io(e: vhdx::Error) -> io::Error {
    io::Error::other(e)
}

impl DiskImage for VhdxImage {
    fn size(&self) -> u64 {
        self.vhdx.virtual_size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.vhdx.read_at(buf, offset).map_err(vhdx_io)
    }

    fn reads_as_zero(&self, offset: u64, len: u64) -> io::Result<bool> {
        Ok(self
            .vhdx
            .block_status(offset, len)
            .map_err(vhdx_io)?
            .iter()
            .all(|e| e.zero && !e.data))
    }
}
