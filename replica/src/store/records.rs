//! The records the store keeps: the VM's state file and the commit and rollback
//! intents (checksummed JSON), and the recovery point they name.

use serde::{Deserialize, Serialize};

use crate::history::PointInfo;

/// A VM-wide recovery point: the cut id and, per disk, the segment that ends at it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    pub cut_id: u64,
    pub seqs: Vec<u64>,
}

/// What the VM's state file records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct VmState {
    pub(super) disk_sizes: Vec<u64>,
    pub(super) base_complete: bool,
    pub(super) point: Option<Point>,
    /// The replica was failed over: a VM runs on its images now, nothing of the
    /// primary is taken any more.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) failed_over: bool,
    /// The kept recovery points, oldest first; the last is `point`. Every one after
    /// the first has its undo files (they lead back to the one before it).
    #[serde(default)]
    pub(super) history: Vec<PointInfo>,
    /// How many points to keep (1: only the latest).
    #[serde(default = "one")]
    pub(super) keep: u32,
    /// Thinning: seconds at least between two kept points other than the latest (0:
    /// every point is kept until `keep` drops it). Hyper-V's "hourly" is 3600.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) spacing_s: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

pub(super) fn one() -> u32 {
    1
}

/// What the commit intent records: the point and what its listing shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Intent {
    pub(super) cut_id: u64,
    pub(super) seqs: Vec<u64>,
    #[serde(default)]
    pub(super) time_s: u64,
    #[serde(default)]
    pub(super) changed_bytes: u64,
    /// The latest point this commit folds into the new one (thinning): its undo data
    /// was merged into the new point's, and it leaves the history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) folds: Option<u64>,
}

/// What the rollback intent records.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Rollback {
    pub(super) cut_id: u64,
}

pub(super) fn encode_state(s: &VmState) -> Vec<u8> {
    let json = serde_json::to_vec(s).unwrap_or_default();
    let mut b = format!("{:08x}\n", crc32c::crc32c(&json)).into_bytes();
    b.extend_from_slice(&json);
    b
}

pub(super) fn decode_checked<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Option<T> {
    let (crc, json) = (b.get(..8)?, b.get(9..)?);
    let crc = u32::from_str_radix(std::str::from_utf8(crc).ok()?, 16).ok()?;
    if crc32c::crc32c(json) != crc || b.get(8) != Some(&b'\n') {
        return None;
    }
    serde_json::from_slice(json).ok()
}

pub(super) fn encode_json<T: Serialize>(p: &T) -> Vec<u8> {
    let json = serde_json::to_vec(p).unwrap_or_default();
    let mut b = format!("{:08x}\n", crc32c::crc32c(&json)).into_bytes();
    b.extend_from_slice(&json);
    b
}
