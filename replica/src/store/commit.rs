//! Making a cut the VM's recovery point: every disk's staged segments verified, the
//! intent recorded, the segments applied, the point kept (a redo transaction).

use std::io;
use std::os::fd::AsFd;

use crate::apply::ApplyOutcome;
use crate::format::segment_file_name;
use crate::history::PointInfo;
use crate::log::sync_dir;

use super::layout::INTENT_FILE;
use super::points::prune;
use super::records::{encode_json, Intent, Point};
use super::stage::verify;
use super::{io_err, ReplicaVm, StoreError};

/// The answer to a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Committed {
    Committed(Point),
    /// This point or a newer one exists already (a re-send).
    AlreadyThere(Point),
}

impl ReplicaVm {
    /// Makes `cut_id` the VM's recovery point: `seqs[i]` is disk i's segment that ends
    /// at the cut; every segment between the disk's applied one and it must be staged.
    /// All are verified before the first byte is applied.
    pub fn commit(&mut self, cut_id: u64, seqs: &[u64]) -> Result<Committed, StoreError> {
        self.taking()?;
        if let Some(p) = &self.state.point {
            if p.cut_id >= cut_id {
                return Ok(Committed::AlreadyThere(p.clone()));
            }
        }
        if !self.state.base_complete {
            return Err(StoreError::Conflict(
                "the initial copy is not complete: no recovery point yet".into(),
            ));
        }
        if seqs.len() != self.disks.len() {
            return Err(StoreError::Invalid(format!(
                "a point names {} disks, the VM has {}",
                seqs.len(),
                self.disks.len()
            )));
        }
        let mut changed_bytes = 0;
        for (i, &last) in seqs.iter().enumerate() {
            let applied = self.disks[i].applied();
            if last < applied.seq {
                return Err(StoreError::Conflict(format!(
                    "disk {i} is at segment {} already, past {last}",
                    applied.seq
                )));
            }
            if last == applied.seq && applied.cut_id != cut_id {
                return Err(StoreError::Conflict(format!(
                    "disk {i}'s segment {last} ends at cut {}, not {cut_id}",
                    applied.cut_id
                )));
            }
            for seq in applied.seq + 1..=last {
                let mut f = confine::open_file_at(
                    self.disk_dirs[i].as_fd(),
                    segment_file_name(seq).as_ref(),
                )
                .map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => {
                        StoreError::Conflict(format!("disk {i}: segment {seq} is not staged"))
                    }
                    _ => io_err("opening a staged segment")(e),
                })?;
                let t = verify(&mut f, i, seq)?;
                changed_bytes += t.covered_bytes;
                if seq == last && t.cut_id != cut_id {
                    return Err(StoreError::Conflict(format!(
                        "disk {i}'s segment {last} ends at cut {}, not {cut_id}",
                        t.cut_id
                    )));
                }
            }
        }
        // The previous point stays reachable: its bytes on every range this commit
        // writes are kept first (before the intent, so a crash before it leaves
        // only an unneeded file, dropped at the next open).
        let time_s = self.now_s();
        let mut folds = None;
        if self.state.keep > 1 && self.state.point.is_some() {
            folds = self.fold_candidate(time_s);
            let latest = folds.and_then(|_| self.state.history.last());
            self.capture_undo(cut_id, seqs, latest)?;
        }
        let intent = Intent {
            cut_id,
            seqs: seqs.to_vec(),
            time_s,
            changed_bytes,
            folds,
        };
        confine::write_private_atomic(
            self.dir.as_fd(),
            INTENT_FILE.as_ref(),
            &encode_json(&intent),
        )
        .and_then(|()| sync_dir(self.dir.as_fd()))
        .map_err(io_err("recording the commit's intent"))?;
        self.finish_commit(&intent)?;
        Ok(Committed::Committed(Point {
            cut_id,
            seqs: seqs.to_vec(),
        }))
    }

    /// Applies every disk up to the intent's segments, records the point (kept in
    /// the history, the oldest beyond `keep` dropped), removes the intent, the
    /// applied segments and the undo files no kept point needs. Idempotent.
    pub(super) fn finish_commit(&mut self, intent: &Intent) -> Result<(), StoreError> {
        let point = Point {
            cut_id: intent.cut_id,
            seqs: intent.seqs.clone(),
        };
        for (i, &last) in point.seqs.iter().enumerate() {
            let ddir = self.disk_dirs[i].as_fd();
            for seq in self.disks[i].applied().seq + 1..=last {
                let f = confine::open_file_at(ddir, segment_file_name(seq).as_ref())
                    .map_err(io_err(format!("disk {i}: staged segment {seq}")))?;
                match self.disks[i].apply(f)? {
                    ApplyOutcome::Applied(_) | ApplyOutcome::AlreadyApplied { .. } => {}
                }
                #[cfg(test)]
                if self.crash_after_applying == Some((i, seq)) {
                    return Err(StoreError::Conflict("simulated crash".into()));
                }
            }
        }
        let mut state = self.state.clone();
        state.point = Some(point.clone());
        // The changes since the previous kept point: a folded point's count too.
        let mut changed_bytes = intent.changed_bytes;
        let mut folded = Vec::new();
        if let Some(latest) = intent.folds {
            // The folded point leaves the history; its undo files (and those folded
            // into it) become part of the new point's.
            if state.history.last().is_some_and(|p| p.cut_id == latest) {
                if let Some(gone) = state.history.pop() {
                    changed_bytes += gone.changed_bytes;
                    folded = gone.undo_set().collect();
                    tracing::debug!(cut_id = gone.cut_id, "replica: point thinned out");
                }
            }
        }
        if state.history.last().map(|p| p.cut_id) != Some(point.cut_id) {
            let set = folded.iter().copied().chain(std::iter::once(point.cut_id));
            let undo_bytes = self.undo_bytes(set);
            if undo_bytes.is_none() {
                // No way back from this point to the older ones: they are not kept.
                state.history.clear();
            }
            state.history.push(PointInfo {
                cut_id: point.cut_id,
                seqs: point.seqs.clone(),
                time_s: intent.time_s,
                changed_bytes,
                undo_bytes: undo_bytes.unwrap_or(0),
                folded,
            });
        }
        prune(&mut state);
        Self::save_state(self.dir.as_fd(), &state)?;
        self.state = state;
        confine::unlink_at(self.dir.as_fd(), INTENT_FILE.as_ref()).ok();
        self.drop_unkept_undo()?;
        for (i, &last) in point.seqs.iter().enumerate() {
            for seq in self.staged(i)? {
                if seq <= last {
                    confine::unlink_at(self.disk_dirs[i].as_fd(), segment_file_name(seq).as_ref())
                        .ok();
                }
            }
        }
        tracing::info!(cut_id = point.cut_id, seqs = ?point.seqs, "replica: recovery point");
        Ok(())
    }
}
