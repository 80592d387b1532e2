//! Creating a replicated VM's directory (sparse images, or seeded from an older copy)
//! and opening it, finishing a commit or a rollback a crash interrupted.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

use crate::apply::ReplicaDisk;
use crate::history::PointInfo;
use crate::log::sync_dir;
use crate::source::DiskImage;

use super::layout::{
    advise, disk_dir_name, disk_image_name, open_or_create_dir, open_rw_at, read_opt, HISTORY_DIR,
    INTENT_FILE, ROLLBACK_FILE, STATE_FILE,
};
use super::records::{decode_checked, encode_state, Intent, Rollback, VmState};
use super::{io_err, ReplicaVm, StoreError, MAX_DISKS};

impl ReplicaVm {
    /// Opens the replica of a VM in `parent/name`, creating it with disks of
    /// `disk_sizes` bytes (sparse raw images) if it does not exist. An existing
    /// replica with other disks is a conflict.
    pub fn create_or_open(
        parent: BorrowedFd<'_>,
        name: &str,
        disk_sizes: &[u64],
    ) -> Result<Self, StoreError> {
        Self::create_or_open_seeded(parent, name, disk_sizes, None)
    }

    /// As [`Self::create_or_open`]; a new replica's images start as copies of
    /// `seed` (one disk image per disk, of the disk's size: an older copy of the
    /// disks, as the old primary's own disks — raw or VHDX, read as the guest sees
    /// them — for a reverse replication) instead of zero. The
    /// initial copy then is a resync that sends only the blocks that differ.
    pub fn create_or_open_seeded(
        parent: BorrowedFd<'_>,
        name: &str,
        disk_sizes: &[u64],
        seed: Option<&[Box<dyn DiskImage>]>,
    ) -> Result<Self, StoreError> {
        if let Some(seed) = seed {
            if seed.len() != disk_sizes.len() {
                return Err(StoreError::Invalid(format!(
                    "{} seed images for {} disks",
                    seed.len(),
                    disk_sizes.len()
                )));
            }
        }
        if disk_sizes.is_empty() || disk_sizes.len() > MAX_DISKS {
            return Err(StoreError::Invalid(format!(
                "a replicated VM has 1 to {MAX_DISKS} disks, not {}",
                disk_sizes.len()
            )));
        }
        if let Some(&bad) = disk_sizes
            .iter()
            .find(|&&s| s == 0 || !s.is_multiple_of(512))
        {
            return Err(StoreError::Invalid(format!(
                "a disk of {bad} bytes (must be a non-zero multiple of 512)"
            )));
        }
        let dir = open_or_create_dir(parent, name).map_err(io_err(format!("directory {name}")))?;
        if let Some(b) = read_opt(dir.as_fd(), STATE_FILE)? {
            let state: VmState = decode_checked(&b).ok_or(StoreError::Damaged(STATE_FILE))?;
            if state.disk_sizes != disk_sizes {
                return Err(StoreError::Conflict(format!(
                    "the replica holds disks of {:?} bytes, not {disk_sizes:?}",
                    state.disk_sizes
                )));
            }
            return Self::open_dir(dir);
        }
        // New (or a creation a crash cut short: vm.state is written last).
        for (i, &size) in disk_sizes.iter().enumerate() {
            let image = match confine::create_private(dir.as_fd(), disk_image_name(i).as_ref()) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    open_rw_at(dir.as_fd(), &disk_image_name(i))
                        .map_err(io_err(disk_image_name(i)))?
                }
                Err(e) => return Err(io_err(disk_image_name(i))(e)),
            };
            image.set_len(0).map_err(io_err(disk_image_name(i)))?;
            image.set_len(size).map_err(io_err(disk_image_name(i)))?;
            if let Some(from) = seed.and_then(|s| s.get(i)) {
                copy_sparse(from.as_ref(), &image, size).map_err(io_err(format!(
                    "seeding {} from an existing copy",
                    disk_image_name(i)
                )))?;
            }
            image.sync_all().map_err(io_err(disk_image_name(i)))?;
            open_or_create_dir(dir.as_fd(), &disk_dir_name(i)).map_err(io_err(disk_dir_name(i)))?;
        }
        let state = VmState {
            disk_sizes: disk_sizes.to_vec(),
            base_complete: false,
            point: None,
            failed_over: false,
            history: Vec::new(),
            keep: 1,
            spacing_s: 0,
        };
        Self::save_state(dir.as_fd(), &state)?;
        tracing::info!(vm = name, disks = ?disk_sizes, "replica: new replicated VM");
        Self::open_dir(dir)
    }

    /// Opens the existing replica in `parent/name` (and finishes a commit a crash
    /// interrupted).
    pub fn open(parent: BorrowedFd<'_>, name: &str) -> Result<Self, StoreError> {
        let dir = match confine::open_dir_at(parent, name.as_ref()) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotFound),
            Err(e) => return Err(io_err(format!("directory {name}"))(e)),
        };
        Self::open_dir(dir)
    }

    pub(super) fn open_dir(dir: OwnedFd) -> Result<Self, StoreError> {
        let b = read_opt(dir.as_fd(), STATE_FILE)?.ok_or(StoreError::NotFound)?;
        let mut state: VmState = decode_checked(&b).ok_or(StoreError::Damaged(STATE_FILE))?;
        if let (true, Some(p)) = (state.history.is_empty(), &state.point) {
            // A replica from before the history: its one point, time unknown.
            state.history.push(PointInfo {
                cut_id: p.cut_id,
                seqs: p.seqs.clone(),
                time_s: 0,
                changed_bytes: 0,
                undo_bytes: 0,
                folded: Vec::new(),
            });
        }
        let history_dir =
            open_or_create_dir(dir.as_fd(), HISTORY_DIR).map_err(io_err(HISTORY_DIR))?;
        let mut images = Vec::new();
        let mut disks = Vec::new();
        let mut disk_dirs = Vec::new();
        for i in 0..state.disk_sizes.len() {
            let image =
                open_rw_at(dir.as_fd(), &disk_image_name(i)).map_err(io_err(disk_image_name(i)))?;
            advise(&image, libc::POSIX_FADV_RANDOM);
            let ddir = confine::open_dir_at(dir.as_fd(), disk_dir_name(i).as_ref())
                .map_err(io_err(disk_dir_name(i)))?;
            let ddir2 = ddir.try_clone().map_err(io_err(disk_dir_name(i)))?;
            let image2 = image.try_clone().map_err(io_err(disk_image_name(i)))?;
            disks.push(ReplicaDisk::open(image2, ddir2)?);
            images.push(image);
            disk_dirs.push(ddir);
        }
        let mut vm = Self {
            dir,
            history_dir,
            state,
            images,
            disks,
            disk_dirs,
            #[cfg(test)]
            crash_after_applying: None,
            #[cfg(test)]
            clock_s: None,
        };
        if let Some(b) = read_opt(vm.dir.as_fd(), INTENT_FILE)? {
            let intent: Intent = decode_checked(&b).ok_or(StoreError::Damaged(INTENT_FILE))?;
            tracing::warn!(
                cut_id = intent.cut_id,
                "replica: finishing a commit a crash interrupted"
            );
            vm.finish_commit(&intent)?;
        }
        if let Some(b) = read_opt(vm.dir.as_fd(), ROLLBACK_FILE)? {
            let r: Rollback = decode_checked(&b).ok_or(StoreError::Damaged(ROLLBACK_FILE))?;
            tracing::warn!(
                cut_id = r.cut_id,
                "replica: finishing a failover to an older point a crash interrupted"
            );
            vm.finish_rollback(r.cut_id)?;
        }
        vm.drop_unkept_undo()?;
        Ok(vm)
    }

    pub(super) fn save_state(dir: BorrowedFd<'_>, state: &VmState) -> Result<(), StoreError> {
        confine::write_private_atomic(dir, STATE_FILE.as_ref(), &encode_state(state))
            .and_then(|()| sync_dir(dir))
            .map_err(io_err("recording the VM's state"))
    }
}

/// Copies the `size` bytes of `from` into `to` (new and zero: all-zero chunks, and
/// ranges `from` has not allocated, are left as holes). `from` must be a disk of
/// `size` bytes.
fn copy_sparse(from: &dyn DiskImage, to: &File, size: u64) -> io::Result<()> {
    let len = from.size();
    if len != size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the seed has {len} bytes, the disk {size}"),
        ));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        if !from.reads_as_zero(at, n as u64)? {
            from.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|&b| b != 0) {
                to.write_all_at(&buf[..n], at)?;
            }
        }
        at += n as u64;
    }
    Ok(())
}
