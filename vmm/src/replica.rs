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
use api::{ApiError, ReplicaCatchUpInfo, ReplicaCutInfo, ReplicaCutRequest, ReplicaSegmentInfo};
use devices::block::{BlockBackend, Tracked};

use crate::device_manager::{DeviceError, DeviceManager};

/// Puts `disk` under the change log in `dir` (created, 0700, beneath the storage roots
/// when there are any), recovering the log after a crash.
pub fn track(
    disk: Arc<dyn BlockBackend>,
    dir: &Path,
) -> Result<Arc<dyn BlockBackend>, DeviceError> {
    let dir = dir.to_path_buf();
    crate::file_broker::run(crate::file_broker::FileOp::OpenChangeLog, move || {
        track_here(disk, &dir)
    })
}

fn track_here(
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

/// Seals every replicated disk's log at one crash-consistent point (on the file
/// thread: each seal makes the log's next segment file); with `catch_up`, restarts
/// every log for a catch-up instead (see [`catch_up_here`]).
pub fn cut(
    devices: &DeviceManager,
    disks: &[DiskConfig],
    req: ReplicaCutRequest,
) -> Result<ReplicaCutInfo, ApiError> {
    let (replicated, disks) = (devices.replicated.clone(), disks.to_vec());
    crate::file_broker::run(crate::file_broker::FileOp::SealChangeLogs, move || {
        cut_here(&replicated, &disks, &req)
    })
}

fn cut_here(
    replicated: &[(String, Arc<dyn BlockBackend>)],
    disks: &[DiskConfig],
    req: &ReplicaCutRequest,
) -> Result<ReplicaCutInfo, ApiError> {
    let tracked: Vec<(&str, &Tracked)> = replicated
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
    let held_at = std::time::Instant::now();
    if let Some(budget) = req.log_budget {
        for (id, h) in held.iter_mut() {
            h.set_budget(Some(budget)).map_err(|e| {
                ApiError::internal(format!("disk '{id}': storing the log's budget: {e}"))
            })?;
        }
    }
    if req.catch_up {
        return catch_up_here(held, held_at);
    }
    // A degraded log seals nothing: the cut is refused before any disk is sealed.
    if let Some((id, _)) = held.iter().find(|(_, h)| h.degraded()) {
        return Err(ApiError::conflict(format!(
            "disk '{id}': its change log is over its budget and keeps a region bitmap: a catch-up (catch_up) restarts it"
        )));
    }
    let cut_id = held.iter().map(|(_, h)| h.last_cut_id()).max().unwrap_or(0) + 1;
    let mut pending = Vec::with_capacity(held.len());
    for (id, h) in held.iter_mut() {
        let p = h.seal(cut_id).map_err(|e| cut_failed(id, cut_id, &e))?;
        pending.push((*id, p));
    }
    // The guest writes again while the sealed segments are made durable.
    drop(held);
    let held_us = u64::try_from(held_at.elapsed().as_micros()).unwrap_or(u64::MAX);
    let mut segments = Vec::with_capacity(pending.len());
    for (id, p) in pending {
        let s = p.sync().map_err(|e| cut_failed(id, cut_id, &e))?;
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
    tracing::info!(cut_id, disks = segments.len(), held_us, "replica: cut");
    Ok(ReplicaCutInfo {
        cut_id,
        segments,
        held_us,
        catch_up: Vec::new(),
    })
}

/// A catch-up: with every disk held, each log (degraded or not) freezes all it holds
/// into a region map and starts again at segment 1 — at one moment for all disks, so
/// the new segments of every disk begin at the same point. The primary then reads the
/// maps' regions (after this moment) and sends them before the new segments.
fn catch_up_here(
    mut held: Vec<(&str, devices::block::Held<'_>)>,
    held_at: std::time::Instant,
) -> Result<ReplicaCutInfo, ApiError> {
    let mut out = Vec::with_capacity(held.len());
    let mut cut_id = 0;
    for (id, h) in held.iter_mut() {
        let map = h.restart_for_catch_up().map_err(|e| {
            tracing::error!(disk = %id, error = %e, "replica: restart for a catch-up failed");
            ApiError::internal(format!(
                "disk '{id}': restarting its log for a catch-up: {e}"
            ))
        })?;
        cut_id = cut_id.max(map.last_cut_id);
        out.push(ReplicaCatchUpInfo {
            disk: id.to_string(),
            regions: map.regions(),
            dirty_bytes: map.dirty_bytes(),
        });
    }
    drop(held);
    let held_us = u64::try_from(held_at.elapsed().as_micros()).unwrap_or(u64::MAX);
    tracing::info!(
        disks = out.len(),
        held_us,
        "replica: logs restarted for a catch-up"
    );
    Ok(ReplicaCutInfo {
        cut_id,
        segments: Vec::new(),
        held_us,
        catch_up: out,
    })
}

fn cut_failed(disk: &str, cut_id: u64, e: &replica::LogError) -> ApiError {
    tracing::error!(disk = %disk, cut_id, error = %e, "replica: cut failed");
    ApiError::internal(format!("cut {cut_id}: disk '{disk}': {e}"))
}

fn log_dir(disks: &[DiskConfig], id: &str) -> Option<std::path::PathBuf> {
    disks
        .iter()
        .enumerate()
        .find(|(i, d)| d.id.clone().unwrap_or_else(|| format!("disk{i}")) == id)
        .and_then(|(_, d)| d.replica_log.clone())
}
