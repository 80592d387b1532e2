//! Failover: marking the replica failed over (at the latest point, or rolled back in
//! place to an older kept one), and resetting it for a resync.

use std::io;
use std::os::fd::AsFd;

use crate::format::segment_file_name;
use crate::log::sync_dir;

use super::layout::{disk_dir_name, ROLLBACK_FILE, STATE_FILE};
use super::records::{encode_json, Point, Rollback, VmState};
use super::{io_err, ReplicaVm, StoreError};

impl ReplicaVm {
    /// Refused once the replica was failed over (409).
    pub(super) fn taking(&self) -> Result<(), StoreError> {
        if self.state.failed_over {
            return Err(StoreError::Conflict(
                "the replica was failed over: a VM runs on its disks, nothing more is taken".into(),
            ));
        }
        Ok(())
    }

    pub fn failed_over(&self) -> bool {
        self.state.failed_over
    }

    /// Marks the replica failed over (recorded before a VM may start on its images)
    /// and returns its point: the latest complete one, or the kept point `cut_id`
    /// (the images are rolled back to it in place; the newer points are dropped).
    /// Refused without a point. Idempotent.
    pub fn fail_over(&mut self, cut_id: Option<u64>) -> Result<Point, StoreError> {
        let point = self.state.point.clone().ok_or_else(|| {
            StoreError::Conflict("no recovery point yet: nothing to fail over to".into())
        })?;
        if let Some(want) = cut_id.filter(|&c| c != point.cut_id) {
            if self.state.failed_over {
                return Err(StoreError::Conflict(format!(
                    "failed over at point {} already, not {want}",
                    point.cut_id
                )));
            }
            self.kept(want)?;
            confine::write_private_atomic(
                self.dir.as_fd(),
                ROLLBACK_FILE.as_ref(),
                &encode_json(&Rollback { cut_id: want }),
            )
            .and_then(|()| sync_dir(self.dir.as_fd()))
            .map_err(io_err("recording the failover's point"))?;
            self.finish_rollback(want)?;
            return self
                .state
                .point
                .clone()
                .ok_or(StoreError::Damaged(STATE_FILE));
        }
        if !self.state.failed_over {
            let mut state = self.state.clone();
            state.failed_over = true;
            Self::save_state(self.dir.as_fd(), &state)?;
            self.state = state;
        }
        Ok(point)
    }

    /// Makes a failed-over replica a new one on the same images, for a reverse
    /// replication onto them (the VM that ran on them replicates back here): no
    /// point, no kept history, nothing applied or staged, the initial copy incomplete
    /// (a resync sends what differs). The state file is written last: a crash before
    /// it leaves the replica failed over, and the reset is done again.
    pub fn reset_for_resync(self) -> Result<Self, StoreError> {
        if !self.state.failed_over {
            return Err(StoreError::Conflict(
                "only a failed-over replica is reset for a reverse replication".into(),
            ));
        }
        self.reset("a failed-over replica reset for a reverse replication")
    }

    /// Resets a replica whose primary's host went down while the VM wrote (its images
    /// and change logs may disagree there): like [`ReplicaVm::reset_for_resync`], the
    /// images kept for a resync by block hashes, every point, staged segment and
    /// applied state dropped — the primary's change logs start again. Refused for a
    /// failed-over replica (it runs the VM now: its images are no longer the copy).
    pub fn reset_after_primary_crash(self) -> Result<Self, StoreError> {
        if self.state.failed_over {
            return Err(StoreError::Conflict(
                "the replica was failed over: it is not resynchronised from the old primary (reverse the replication instead)".into(),
            ));
        }
        self.reset("reset for a resync after the primary's host went down")
    }

    fn reset(self, why: &'static str) -> Result<Self, StoreError> {
        for (i, ddir) in self.disk_dirs.iter().enumerate() {
            for seq in self.staged(i)? {
                confine::unlink_at(ddir.as_fd(), segment_file_name(seq).as_ref())
                    .map_err(io_err(format!("disk {i}: removing segment {seq}")))?;
            }
            match confine::unlink_at(ddir.as_fd(), crate::apply::STATE_FILE.as_ref()) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err(format!("disk {i}: removing its applied state"))(e))
                }
                _ => {}
            }
            sync_dir(ddir.as_fd()).map_err(io_err(disk_dir_name(i)))?;
        }
        let state = VmState {
            disk_sizes: self.state.disk_sizes.clone(),
            base_complete: false,
            point: None,
            failed_over: false,
            history: Vec::new(),
            keep: self.state.keep,
            spacing_s: self.state.spacing_s,
        };
        Self::save_state(self.dir.as_fd(), &state)?;
        tracing::info!("replica: {why}");
        let reopened = Self::open_dir(self.dir)?;
        reopened.drop_unkept_undo()?;
        Ok(reopened)
    }

    /// Rolls the images back to kept point `cut_id` in place, records it as the
    /// failed-over point (newer ones dropped) and removes the rollback intent.
    /// Idempotent: the undo chain writes absolute bytes.
    pub(super) fn finish_rollback(&mut self, cut_id: u64) -> Result<(), StoreError> {
        let at = self.kept(cut_id)?;
        self.roll_back(cut_id, &self.images)?;
        let mut state = self.state.clone();
        state.history.truncate(at + 1);
        let p = &state.history[at];
        state.point = Some(Point {
            cut_id: p.cut_id,
            seqs: p.seqs.clone(),
        });
        state.failed_over = true;
        Self::save_state(self.dir.as_fd(), &state)?;
        self.state = state;
        confine::unlink_at(self.dir.as_fd(), ROLLBACK_FILE.as_ref()).ok();
        self.drop_unkept_undo()?;
        tracing::info!(
            cut_id,
            "replica: images rolled back to a kept recovery point"
        );
        Ok(())
    }
}
