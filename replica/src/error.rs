//! The crate's errors: what went wrong, and where.

use std::io;

/// Errors of the writer side (the VMM's change log).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("change log {file}: {source}")]
    Io {
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("change log {file}: {reason}")]
    Corrupt { file: String, reason: String },
    #[error("change log: a write of {len} bytes at {offset} lies beyond the disk's {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("change log was made for a disk of {logged} bytes, the disk has {actual}")]
    DiskSize { logged: u64, actual: u64 },
    /// Over its budget the log keeps a region bitmap, not segments: no cut seals it
    /// until a catch-up restarts it.
    #[error("change log {file} is over its budget and keeps a region bitmap: only a catch-up restarts its segments")]
    Degraded { file: String },
}

/// Why a segment is refused (torn, corrupt, or not what it claims).
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("segment: {0}")]
    Io(#[from] io::Error),
    #[error("segment: bad header: {0}")]
    Header(String),
    #[error("segment: record {index} at byte {at}: {reason}")]
    Record { index: u64, at: u64, reason: String },
    #[error("segment is torn: it ends at byte {at} without a trailer")]
    Torn { at: u64 },
    #[error("segment: bad trailer: {0}")]
    Trailer(String),
}
