//! VHDX images (the `vhdx` crate) as block backends.

use std::io::{self, IoSlice, IoSliceMut};
use std::path::Path;

use super::{BlockBackend, OpenError, OpenFlags};

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
        let image = vhdx::Vhdx::open(path, opts).map_err(|e| match e {
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
        })?;
        Ok(Self { image })
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

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        self.image.read_vectored_at(bufs, offset).map_err(to_io)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        self.image.write_vectored_at(bufs, offset).map_err(to_io)
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
