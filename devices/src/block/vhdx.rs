//! VHDX images (the `vhdx` crate) as block backends.

use std::io;
use std::path::Path;

use super::{BlockBackend, IoBufs, IoBufsMut, OpenError, OpenFlags};

pub struct VhdxDisk {
    image: vhdx::Vhdx,
}

impl VhdxDisk {
    /// Opens (and locks) a VHDX image; a pending log is replayed (in memory only when
    /// read-only). With `direct`, guest I/O that is 4 KiB-aligned bypasses the host
    /// page cache (`O_DIRECT`); the image's metadata stays buffered.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, OpenError> {
        Self::open_with(
            path,
            OpenFlags {
                read_only,
                direct,
                ..OpenFlags::default()
            },
        )
    }

    /// Opens a VHDX image; locks it unless `flags.locking` is off. A file
    /// system that cannot lock refuses the open ([`OpenError::LockUnsupported`]).
    pub fn open_with(path: &Path, flags: OpenFlags) -> Result<Self, OpenError> {
        let opts = vhdx::OpenOptions {
            read_only: flags.read_only,
            direct: flags.direct,
            no_lock: !flags.locking,
            ..Default::default()
        };
        let image = vhdx::Vhdx::open(path, opts).map_err(|e| open_error(path, e))?;
        Ok(Self { image })
    }

    /// Opens a VHDX image from a file the caller opened (e.g. beneath a storage root);
    /// `path` names it in errors and locates its parents, which `parent_opener` opens
    /// (None: by path). With `direct`, the `O_DIRECT` descriptor is a reopen of this
    /// very file through `/proc/self/fd`.
    pub fn from_file(
        file: std::fs::File,
        path: &Path,
        flags: OpenFlags,
        parent_opener: Option<vhdx::ParentOpener>,
    ) -> Result<Self, OpenError> {
        use std::os::fd::AsRawFd;
        let by_fd = std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let storage: std::sync::Arc<dyn vhdx::Storage> = std::sync::Arc::new(if flags.direct {
            vhdx::FileStorage::with_direct(file, &by_fd, !flags.read_only)
        } else {
            vhdx::FileStorage::new(file)
        });
        let opts = vhdx::OpenOptions {
            read_only: flags.read_only,
            direct: flags.direct,
            no_lock: !flags.locking,
            parent_opener,
            ..Default::default()
        };
        let image =
            vhdx::Vhdx::open_storage(storage, path, opts).map_err(|e| open_error(path, e))?;
        Ok(Self { image })
    }
}

/// The engine's refusal as the block layer names it.
fn open_error(path: &Path, e: vhdx::Error) -> OpenError {
    match e {
        vhdx::Error::Locked { .. } => OpenError::Locked {
            path: path.display().to_string(),
        },
        vhdx::Error::LockUnsupported { source, .. } => OpenError::LockUnsupported {
            path: path.display().to_string(),
            source,
        },
        other => OpenError::Format {
            path: path.display().to_string(),
            reason: other.to_string(),
        },
    }
}

fn to_io(e: vhdx::Error) -> io::Error {
    io::Error::other(e)
}

impl BlockBackend for VhdxDisk {
    fn size(&self) -> u64 {
        self.image.virtual_size()
    }

    fn logical_block_size(&self) -> u32 {
        self.image.logical_sector_size()
    }

    fn physical_block_size(&self) -> u32 {
        self.image.physical_sector_size()
    }

    fn read_vectored_at(&self, bufs: &IoBufsMut<'_>, offset: u64) -> io::Result<()> {
        self.image.read_iobufs_at(bufs, offset).map_err(to_io)
    }

    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64) -> io::Result<()> {
        self.image.write_iobufs_at(bufs, offset).map_err(to_io)
    }

    fn flush(&self) -> io::Result<()> {
        self.image.flush().map_err(to_io)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.image.discard(offset, len).map_err(to_io)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.image.write_zeroes(offset, len).map_err(to_io)
    }
}
