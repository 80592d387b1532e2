//! Live storage migration (`vm.migrate-disk`): the disk's backend becomes a
//! [`Mirror`] of the old and the new image, a thread copies the old image chunk by
//! chunk, and when it is done the control loop puts the new image alone under the
//! device. Cancel or any failure puts the old image back and deletes the new one; the
//! old image is deleted only if asked, and only after the switch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vireo_util::sync;

use api::{DiskMigrationInfo, MigrationStatus};
use devices::block::Mirror;

use super::MigrationEvent;
use crate::control::ControlEvent;

/// A storage migration in progress (owned by the control loop).
pub struct DiskMigration {
    pub id: String,
    pub index: usize,
    pub source: api::config::DiskConfig,
    pub destination: api::config::DiskConfig,
    pub delete_source: bool,
    pub mirror: Arc<Mirror>,
    pub cancel: Arc<AtomicBool>,
}

pub struct CopyJob {
    pub mirror: Arc<Mirror>,
    pub cancel: Arc<AtomicBool>,
    pub info: Arc<Mutex<DiskMigrationInfo>>,
    pub events: Sender<ControlEvent>,
    pub seccomp: crate::seccomp::Filters,
}

/// Starts the copy; its end arrives as [`MigrationEvent::DiskCopied`].
pub fn spawn_copy(job: CopyJob) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vireo-disk-copy".into())
        .spawn(move || {
            job.seccomp
                .apply_or_exit(crate::seccomp::ThreadKind::Control);
            let result = copy(&job);
            let _ = job
                .events
                .send(ControlEvent::Migration(MigrationEvent::DiskCopied(result)));
        })
        .map(|_| ())
}

fn copy(job: &CopyJob) -> Result<(), String> {
    let started = Instant::now();
    let mut buf = Vec::new();
    for chunk in 0..job.mirror.chunks() {
        if job.cancel.load(Ordering::Relaxed) {
            return Err("cancelled".into());
        }
        if let Some(f) = job.mirror.failure() {
            return Err(f);
        }
        job.mirror
            .copy_chunk(chunk, &mut buf)
            .map_err(|e| format!("copying chunk {chunk}: {e}"))?;
        let mut i = sync::lock(&job.info);
        i.copied_bytes = job.mirror.copied_bytes();
        i.total_ms = started.elapsed().as_secs_f64() * 1e3;
    }
    job.mirror
        .destination()
        .flush()
        .map_err(|e| format!("flushing the new image: {e}"))?;
    match job.mirror.failure() {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

/// The status to show once the control loop has switched (or given up).
pub fn finish(info: &Mutex<DiskMigrationInfo>, result: &Result<(), String>) {
    let mut i = sync::lock(info);
    match result {
        Ok(()) => i.status = MigrationStatus::Completed,
        Err(e) => {
            i.status = MigrationStatus::Failed;
            i.error = Some(e.clone());
        }
    }
}
