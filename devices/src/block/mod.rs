//! Disk backends behind one trait: the virtio-blk worker never knows which it has.

mod leased;
mod lock;
mod mirror;
mod raw;
mod tracked;
mod vhdx;

use std::io;

pub use self::vhdx::VhdxDisk;
/// Scatter-gather buffers over memory no Rust reference may point into (guest RAM):
/// what every backend reads into and writes from.
pub use ::vhdx::{IoBufs, IoBufsMut};
pub use leased::{monotonic_ns, LeaseError, Leased, WriteLease};
pub use lock::{lock_image, lock_unsupported, unlock_image, LockMode};
pub use mirror::{Mirror, MIRROR_CHUNK};
pub use raw::RawFile;
pub use tracked::{Held, Tracked};

/// What a virtio-blk device needs from a disk image.
///
/// I/O goes straight between the caller's buffers (guest memory) and the image. The
/// buffers are raw iovecs ([`IoBufsMut`], [`IoBufs`]), never Rust slices: the guest may
/// change its memory while a request is in flight, which a `&[u8]` must not see.
pub trait BlockBackend: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    fn logical_block_size(&self) -> u32 {
        512
    }
    fn physical_block_size(&self) -> u32 {
        512
    }
    /// Fills all of `bufs` from `offset` (past the end of the image reads as zeros).
    fn read_vectored_at(&self, bufs: &IoBufsMut<'_>, offset: u64) -> io::Result<()>;
    /// Writes all of `bufs` at `offset`.
    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// False only if `offset..offset+len` surely reads as zeros without being stored
    /// (a hole): copies skip it without reading it.
    fn may_have_data(&self, _offset: u64, _len: u64) -> bool {
        true
    }
    /// The disk's change log, if it is replicated (see [`Tracked`]).
    fn tracked(&self) -> Option<&Tracked> {
        None
    }
}

/// Disk image formats Vireo opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Vhdx,
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Vhdx => "vhdx",
        })
    }
}

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open disk image {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is in use by another process (lock held)")]
    Locked { path: String },
    #[error("disk image {path}: {reason}")]
    Format { path: String, reason: String },
    /// The file system cannot take the image lock (no OFD locks): refused,
    /// since two writers would corrupt the image, unless `locking=off`.
    #[error("disk image {path}: cannot lock it ({source}): the file system has no OFD locks; use locking=off only if nothing else can open the image")]
    LockUnsupported {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// How a disk image is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFlags {
    pub read_only: bool,
    /// Aligned guest I/O bypasses the host page cache (`O_DIRECT`).
    pub direct: bool,
    /// Take the image lock (the default). Off (`locking=off`) only for file
    /// systems without OFD locks where nothing else can open the image: an
    /// open that cannot lock otherwise fails.
    pub locking: bool,
}

impl Default for OpenFlags {
    fn default() -> Self {
        Self {
            read_only: false,
            direct: false,
            locking: true,
        }
    }
}
