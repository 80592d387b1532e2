//! Vireo Replica's change tracking: every completed guest write of a disk is recorded,
//! data included, in a change log beside the disk; a cut seals the log into a segment
//! (per-record checksums, a trailer with sequence number, cut id, totals and a checksum
//! of the whole file) and starts the next one. A replica applies a segment only after
//! [`SegmentReader`] verified all of it.
//!
//! The on-disk format and the crash argument are in docs/replica.md.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod apply;
mod error;
mod format;
mod history;
mod log;
mod regions;
mod resync;
mod segment;
mod source;
mod store;

pub use apply::{Applied, ApplyError, ApplyOutcome, Image, ReplicaDisk};
pub use error::{LogError, SegmentError};
pub use format::{segment_file_name, RecordKind, MAX_RECORD_DATA, SEGMENT_SUFFIX};
pub use history::{PointInfo, MAX_HISTORY};
pub use log::{ChangeLog, PendingSeal, Recovery, SealedSegment, BUDGET_FILE};
pub use regions::{RegionMap, CATCH_UP_MAP, DEGRADED_MAP, REGION};
pub use resync::{
    block_count, check_hash_list, image_hash, BlockHash, Resync, ResyncError, Run, HASH_BLOCK,
    MAX_HASHES_PER_REQUEST,
};
pub use segment::{ends_with_trailer, Record, SegmentReader, Trailer};
pub use source::{DiskImage, RawImage, SourceError, VhdxImage};
pub use store::{
    free_bytes, Committed, DiskStatus, Extra, Point, ReplicaVm, Staged, StoreError, VmStatus,
    MAX_BASE_CHUNK, MAX_DISKS, MAX_SPACING_S,
};

#[cfg(test)]
mod budget_tests;
#[cfg(test)]
mod history_tests;
#[cfg(test)]
mod resync_tests;
#[cfg(test)]
mod source_tests;
#[cfg(test)]
mod store_tests;
#[cfg(test)]
mod tests;
