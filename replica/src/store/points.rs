//! The kept recovery points: the history, how many are kept and how far apart
//! (thinning), and pruning the oldest.

use std::os::fd::AsFd;

use crate::history::{PointInfo, MAX_HISTORY};

use super::records::{Point, VmState};
use super::{ReplicaVm, StoreError};

/// The longest spacing of kept points: a week.
pub const MAX_SPACING_S: u64 = 7 * 24 * 3600;

impl ReplicaVm {
    pub fn point(&self) -> Option<&Point> {
        self.state.point.as_ref()
    }

    /// The kept recovery points, oldest first (the last is the latest).
    pub fn points(&self) -> &[PointInfo] {
        &self.state.history
    }

    /// How many points are kept.
    pub fn keep(&self) -> u32 {
        self.state.keep
    }

    /// Keeps up to `keep` points (1 to [`MAX_HISTORY`]); fewer than held drops the
    /// oldest at once.
    pub fn set_keep(&mut self, keep: u32) -> Result<(), StoreError> {
        if keep == 0 || keep > MAX_HISTORY {
            return Err(StoreError::Invalid(format!(
                "a replica keeps 1 to {MAX_HISTORY} recovery points, not {keep}"
            )));
        }
        if keep == self.state.keep {
            return Ok(());
        }
        let mut state = self.state.clone();
        state.keep = keep;
        prune(&mut state);
        Self::save_state(self.dir.as_fd(), &state)?;
        self.state = state;
        self.drop_unkept_undo()
    }

    /// The index of kept point `cut_id` in the history.
    pub(super) fn kept(&self, cut_id: u64) -> Result<usize, StoreError> {
        self.state
            .history
            .iter()
            .position(|p| p.cut_id == cut_id)
            .ok_or_else(|| {
                StoreError::Conflict(format!(
                    "no recovery point {cut_id} is kept (kept: {:?})",
                    self.state
                        .history
                        .iter()
                        .map(|p| p.cut_id)
                        .collect::<Vec<_>>()
                ))
            })
    }

    /// Seconds since the Unix epoch (a test sets the clock).
    pub(super) fn now_s(&self) -> u64 {
        #[cfg(test)]
        if let Some(t) = self.clock_s {
            return t;
        }
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    /// Thinning: the latest point, when a commit at `now_s` supersedes it and it is
    /// closer than the spacing to the kept point before it (so it is no "hourly"
    /// point of its own) and its undo data exists to merge.
    pub(super) fn fold_candidate(&self, now_s: u64) -> Option<u64> {
        let spacing = self.state.spacing_s;
        let [.., before, latest] = self.state.history.as_slice() else {
            return None;
        };
        let close = latest.time_s.saturating_sub(before.time_s) < spacing;
        // A clock that went back leaves the point where it is.
        (spacing > 0
            && close
            && now_s >= latest.time_s
            && self.undo_bytes(latest.undo_set()).is_some())
        .then_some(latest.cut_id)
    }

    /// Seconds at least between two kept points other than the latest (0: none);
    /// applies from the next commit. At most a week.
    pub fn set_spacing(&mut self, spacing_s: u64) -> Result<(), StoreError> {
        if spacing_s > MAX_SPACING_S {
            return Err(StoreError::Invalid(format!(
                "points are spaced by at most {MAX_SPACING_S} s (a week), not {spacing_s}"
            )));
        }
        if spacing_s == self.state.spacing_s {
            return Ok(());
        }
        let mut state = self.state.clone();
        state.spacing_s = spacing_s;
        Self::save_state(self.dir.as_fd(), &state)?;
        self.state = state;
        Ok(())
    }

    /// The spacing of kept points (0: every point).
    pub fn spacing_s(&self) -> u64 {
        self.state.spacing_s
    }
}

/// Drops the oldest points beyond `keep`; the new oldest needs no undo file.
pub(super) fn prune(state: &mut VmState) {
    let keep = state.keep.max(1) as usize;
    if state.history.len() > keep {
        let drop = state.history.len() - keep;
        state.history.drain(..drop);
    }
    if let Some(oldest) = state.history.first_mut() {
        oldest.undo_bytes = 0;
        oldest.folded.clear();
    }
}
