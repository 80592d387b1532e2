//! The replica server's store of one replicated VM: its raw disk images, each disk's
//! applied state ([`ReplicaDisk`]), segments staged before they are applied, and the
//! VM-wide recovery point.
//!
//! A recovery point is a cut id at which *every* disk of the VM is applied. Because
//! the images are updated in place, applying a point is a redo transaction:
//!
//! 1. each disk's segments are staged first (decompressed into `disk-N/SEQ.part`,
//!    verified to the trailer, fsynced, renamed to `SEQ.vlog`, the directory fsynced);
//! 2. `commit` checks that every disk has its segments up to one whose trailer names
//!    the cut, and verifies them all again;
//! 3. it writes the intent (`committing`: the cut id and each disk's sequence number)
//!    atomically, applies each disk's segments in order (image synced, disk state
//!    recorded), writes the VM's state with the new point, and removes the intent and
//!    the applied segments.
//!
//! A crash anywhere in step 3 leaves the intent; the next open finishes it (applying a
//! segment again writes the same absolute bytes), so the point read after a crash is
//! always one whose bytes are all on the images. While an intent is pending the images
//! are between two points; nothing reads them before it is finished.
//!
//! Layout of the VM's directory: `vm.state` (checksummed JSON), `committing`,
//! `disk-N.img` (raw), `disk-N/` (the disk's `applied` state and staged segments).
//!
//! The modules: `layout` (file names and file helpers), `records` (the checksummed
//! state and intent files), `open` (creating and opening a replica), `base` (the
//! initial copy), `stage` and `commit` (segments, and making a point), `points` (the
//! kept points and thinning), `undo` (their undo files), `failover`, `extras` (the
//! definition and boot payload) and `status`.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;

use crate::apply::{ApplyError, ReplicaDisk};
use crate::error::SegmentError;

mod base;
mod commit;
mod extras;
mod failover;
mod layout;
mod open;
mod points;
mod records;
mod stage;
mod status;
mod undo;

pub use commit::Committed;
pub use extras::Extra;
pub use points::MAX_SPACING_S;
pub use records::Point;
pub use stage::Staged;
pub use status::{free_bytes, DiskStatus, VmStatus};

use records::VmState;

/// At most this many disks per replicated VM.
pub const MAX_DISKS: usize = 16;

/// At most this many bytes in one chunk of the initial copy.
pub const MAX_BASE_CHUNK: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("replica store: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("segment {seq} of disk {disk} refused: {source}")]
    Segment {
        disk: usize,
        seq: u64,
        #[source]
        source: SegmentError,
    },
    #[error("the undo data of point {cut_id}, disk {disk}: {source}")]
    Undo {
        cut_id: u64,
        disk: usize,
        #[source]
        source: SegmentError,
    },
    /// The request contradicts what the replica holds (409).
    #[error("replica store: {0}")]
    Conflict(String),
    /// The request itself is wrong (400).
    #[error("replica store: {0}")]
    Invalid(String),
    /// A body beyond its bound (413).
    #[error("replica store: {what} exceeds {limit} bytes")]
    TooLarge { what: &'static str, limit: u64 },
    #[error("replica store: no replica of this VM")]
    NotFound,
    #[error("replica store: the state file {0} is damaged")]
    Damaged(&'static str),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

/// One replicated VM's directory, opened.
pub struct ReplicaVm {
    dir: OwnedFd,
    history_dir: OwnedFd,
    state: VmState,
    images: Vec<File>,
    disks: Vec<ReplicaDisk<File>>,
    disk_dirs: Vec<OwnedFd>,
    /// Tests: the commit stops (as a killed process would) once disk `.0` applied
    /// segment `.1`.
    #[cfg(test)]
    pub(crate) crash_after_applying: Option<(usize, u64)>,
    /// A test's clock (seconds since the epoch) for the points' times.
    #[cfg(test)]
    pub(crate) clock_s: Option<u64>,
}
