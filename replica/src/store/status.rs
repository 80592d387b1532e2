//! What the replica holds of a VM, as its status shows it (a primary resumes from
//! it): the disks, their applied and staged segments, and the kept points.

use std::fs::File;
use std::os::fd::AsFd;

use serde::{Deserialize, Serialize};

use crate::history::PointInfo;

use super::layout::disk_dir_name;
use super::records::{one, Point};
use super::{io_err, ReplicaVm, StoreError};

/// One disk as the status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStatus {
    pub size: u64,
    pub applied_seq: u64,
    pub applied_cut_id: u64,
    /// Segments staged and not yet applied.
    pub staged: Vec<u64>,
}

/// What the replica holds of a VM: a primary resumes from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub base_complete: bool,
    /// A VM was started from this replica (it takes nothing from the primary now).
    #[serde(default)]
    pub failed_over: bool,
    /// The newest recovery point (none before the first commit).
    pub point: Option<Point>,
    pub disks: Vec<DiskStatus>,
    /// How many recovery points the replica keeps.
    #[serde(default = "one")]
    pub keep: u32,
    /// Seconds at least between kept points other than the latest (0: every point).
    #[serde(default)]
    pub spacing_s: u64,
    /// The kept points, oldest first (the last is `point`).
    #[serde(default)]
    pub points: Vec<PointInfo>,
    /// Bytes free for the replica on its file system (what an unprivileged writer
    /// may still use; the replica server adds it with [`free_bytes`], the store's own
    /// status leaves it None): a primary paused by a full replica resumes once its
    /// backlog fits. None from a replica that does not say.
    #[serde(default)]
    pub free_bytes: Option<u64>,
}

impl ReplicaVm {
    pub fn disk_sizes(&self) -> &[u64] {
        &self.state.disk_sizes
    }

    /// The image of disk `i` (for reading a point back, or a failover).
    pub fn image(&self, i: usize) -> Option<&File> {
        self.images.get(i)
    }

    pub fn status(&self) -> Result<VmStatus, StoreError> {
        let mut disks = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            let applied = d.applied();
            disks.push(DiskStatus {
                size: self.state.disk_sizes[i],
                applied_seq: applied.seq,
                applied_cut_id: applied.cut_id,
                staged: self.staged(i)?,
            });
        }
        Ok(VmStatus {
            base_complete: self.state.base_complete,
            failed_over: self.state.failed_over,
            point: self.state.point.clone(),
            disks,
            keep: self.state.keep,
            spacing_s: self.state.spacing_s,
            points: self.state.history.clone(),
            free_bytes: None,
        })
    }

    /// The staged segments of disk `i`, in order.
    pub(super) fn staged(&self, i: usize) -> Result<Vec<u64>, StoreError> {
        let path = confine::fd_path(self.disk_dirs[i].as_fd(), ".".as_ref());
        let mut seqs = Vec::new();
        for e in std::fs::read_dir(&path).map_err(io_err(disk_dir_name(i)))? {
            let e = e.map_err(io_err(disk_dir_name(i)))?;
            if let Some(seq) = e
                .file_name()
                .to_str()
                .and_then(crate::format::parse_file_name)
            {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        Ok(seqs)
    }

    pub(super) fn disk_index(&self, disk: usize) -> Result<usize, StoreError> {
        if disk < self.disks.len() {
            Ok(disk)
        } else {
            Err(StoreError::Invalid(format!(
                "no disk {disk} (the VM has {})",
                self.disks.len()
            )))
        }
    }
}

/// The bytes an unprivileged writer may still use on `dir`'s file system.
pub fn free_bytes(dir: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `dir` is an open descriptor for the call's duration and `st` is
    // writable memory of the struct's size, which fstatvfs fills on success.
    let rc = unsafe { libc::fstatvfs(dir.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: fstatvfs returned 0: the struct is initialised.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}
