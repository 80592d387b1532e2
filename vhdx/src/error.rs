//! Error type of the VHDX engine: every variant names the file and what is wrong.

use std::io;

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong opening, reading, writing or changing a VHDX file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call on the file failed.
    #[error("{path}: I/O error while {op} at offset {offset}: {source}")]
    Io {
        path: String,
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// The file does not start with the VHDX file type identifier.
    #[error("{path}: not a VHDX file (file type identifier signature missing)")]
    NotVhdx { path: String },
    /// A structure of the file is malformed.
    #[error("{path}: corrupt {what} at offset {offset}: {reason}")]
    Corrupt {
        path: String,
        what: &'static str,
        offset: u64,
        reason: String,
    },
    /// The file uses a feature this engine does not implement.
    #[error("{path}: unsupported: {reason}")]
    Unsupported { path: String, reason: String },
    /// A caller-supplied argument is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Another process holds a conflicting lock on the file.
    #[error("{path}: failed to get {mode} lock: is another process using the image?")]
    Locked { path: String, mode: &'static str },
    /// The file system cannot lock the file (no OFD locks). Refused rather
    /// than opened unlocked: two writers would corrupt the image. Open with
    /// `no_lock` (`locking=off`, `vireo-img -U`) only when nothing else can
    /// write the file.
    #[error("{path}: cannot take the {mode} lock ({source}): the file system has no OFD locks; use locking=off (vireo-img -U) only if nothing else can open the image")]
    LockUnsupported {
        path: String,
        mode: &'static str,
        #[source]
        source: io::Error,
    },
    /// A write was attempted on an image opened read-only.
    #[error("{path}: image is opened read-only")]
    ReadOnly { path: String },
    /// The request goes beyond the end of the virtual disk.
    #[error("request at offset {offset} length {len} is beyond the virtual disk size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The parent of a differencing disk could not be found or does not match.
    #[error("{path}: parent disk: {reason}")]
    Parent { path: String, reason: String },
    /// An operation would discard data that is in the image.
    #[error("{path}: refusing: {reason}")]
    WouldLoseData { path: String, reason: String },
}

impl Error {
    pub(crate) fn io(path: &str, op: &'static str, offset: u64, source: io::Error) -> Error {
        Error::Io {
            path: path.to_string(),
            op,
            offset,
            source,
        }
    }

    pub(crate) fn corrupt(
        path: &str,
        what: &'static str,
        offset: u64,
        reason: impl Into<String>,
    ) -> Error {
        Error::Corrupt {
            path: path.to_string(),
            what,
            offset,
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(path: &str, reason: impl Into<String>) -> Error {
        Error::Unsupported {
            path: path.to_string(),
            reason: reason.into(),
        }
    }
}
