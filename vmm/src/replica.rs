//! Vireo Replica in the VMM: a disk with `replica_log=DIR` gets a change log
//! (`devices::block::Tracked`), and `vm.replica-cut` seals all of them at one point.
//!
//! A cut holds every replicated disk at once (each disk's lock: new writes wait,
//! in-flight ones have finished, since a write holds the lock from its log append to
//! the end of its disk write), seals each log with the same cut id, and releases them.
//! No write can fall on one side of the cut on one disk and on the other side on
//! another: the segments of one cut id are a crash-consistent point of the whole VM.

use std::path::Path;
use std::sync::Arc;

use api::config::DiskConfig;
use api::{ApiError, ReplicaCutInfo, ReplicaSegmentInfo};
use devices::block::{BlockBackend, Tracked};

use crate::device_manager::{DeviceError, DeviceManager};

/// Puts `disk` under the change log in `dir` (created, 0700, beneath the storage roots
/// when there are any), recovering the log after a crash.
pub fn track(
    disk: Arc<dyn BlockBackend>,
    dir: &Path,
) -> Result<Arc<dyn BlockBackend>, DeviceError> {
    let fd = crate::confinement::create_dir(dir).map_err(|e| {
        DeviceError::Replica(format!("change log directory {}: {e}", dir.display()))
    })?;
    let label = dir.display().to_string();
    let (log, recovery) = replica::ChangeLog::open(fd, &label, disk.size())
        .map_err(|e| DeviceError::Replica(e.to_string()))?;
    tracing::info!(
        log = %label,
        seq = recovery.seq,
        kept_records = recovery.kept_records,
        dropped_bytes = recovery.dropped_bytes,
        last_cut_id = recovery.last_cut_id,
        "replica: change log open"
    );
    Ok(Arc::new(Tracked::new(disk, log)))
}

/// Seals every replicated disk's log at one crash-consistent point.
pub fn cut(devices: &DeviceManager, disks: &[DiskConfig]) -> Result<ReplicaCutInfo, ApiError> {
    let tracked: Vec<(&str, &Tracked)> = devices
        .replicated
        .iter()
        .filter_map(|(id, b)| b.tracked().map(|t| (id.as_str(), t)))
        .collect();
    if tracked.is_empty() {
        return Err(ApiError::conflict(
            "no disk of this VM is replicated (replica_log)",
        ));
    }
    // Hold all of them before sealing any (always in the same order).
    let mut held: Vec<_> = tracked.iter().map(|(id, t)| (*id, t.hold())).collect();
    let cut_id = held.iter().map(|(_, h)| h.last_cut_id()).max().unwrap_or(0) + 1;
    let mut segments = Vec::with_capacity(held.len());
    for (id, h) in held.iter_mut() {
        let s = h.seal(cut_id).map_err(|e| {
            tracing::error!(disk = %id, cut_id, error = %e, "replica: cut failed");
            ApiError::internal(format!("cut {cut_id}: disk '{id}': {e}"))
        })?;
        let dir = log_dir(disks, id).unwrap_or_default();
        segments.push(ReplicaSegmentInfo {
            disk: id.to_string(),
            seq: s.seq,
            records: s.records,
            data_bytes: s.data_bytes,
            covered_bytes: s.covered_bytes,
            file: dir.join(&s.file_name),
        });
    }
    drop(held);
    tracing::info!(cut_id, disks = segments.len(), "replica: cut");
    Ok(ReplicaCutInfo { cut_id, segments })
}

fn log_dir(disks: &[DiskConfig], id: &str) -> Option<std::path::PathBuf> {
    disks
        .iter()
        .enumerate()
        .find(|(i, d)| d.id.clone().unwrap_or_else(|| format!("disk{i}")) == id)
        .and_then(|(_, d)| d.replica_log.clone())
}
