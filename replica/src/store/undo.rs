//! The kept points' undo files: captured before a commit changes the images (merged
//! with a folded point's), applied to roll images back to an older point (in place
//! or in an exported copy), and removed once no kept point needs them.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

use crate::format::segment_file_name;
use crate::history::{self, PointInfo};
use crate::log::sync_dir;

use super::layout::{disk_image_name, read_opt, rename_at, HISTORY_DIR};
use super::{io_err, ReplicaVm, StoreError};

impl ReplicaVm {
    /// Applies to `images` (each at the latest point) the undo files of every point
    /// newer than kept point `cut_id`, newest first, and syncs them: they hold
    /// `cut_id`'s bytes.
    pub(super) fn roll_back(&self, cut_id: u64, images: &[File]) -> Result<(), StoreError> {
        let at = self.kept(cut_id)?;
        for newer in self.state.history[at + 1..].iter().rev() {
            // A point's files (its own and those of points folded into it) hold
            // disjoint ranges: their order does not matter.
            for part in newer.undo_set() {
                for (i, image) in images.iter().enumerate() {
                    let name = history::undo_file_name(part, i);
                    let mut undo = confine::open_file_at(self.history_dir.as_fd(), name.as_ref())
                        .map_err(io_err(format!("the undo file {name}")))?;
                    history::apply_undo(image, &mut undo).map_err(|source| StoreError::Undo {
                        cut_id: part,
                        disk: i,
                        source,
                    })?;
                }
            }
        }
        for (i, image) in images.iter().enumerate() {
            image.sync_all().map_err(io_err(disk_image_name(i)))?;
        }
        Ok(())
    }

    /// Writes kept point `cut_id`'s images into `dest` as `name(i)` (new files, 0600;
    /// copies of the images rolled back there). The replica is not changed: a test
    /// failover runs on these while replication goes on.
    pub fn export_point(
        &self,
        cut_id: u64,
        dest: BorrowedFd<'_>,
        name: impl Fn(usize) -> String,
    ) -> Result<(), StoreError> {
        self.kept(cut_id)?;
        let mut copies = Vec::new();
        for (i, image) in self.images.iter().enumerate() {
            let n = name(i);
            let mut f = confine::create_private(dest, n.as_ref())
                .map_err(io_err(format!("creating {n}")))?;
            history::copy_image(image, &mut f).map_err(io_err(format!("copying to {n}")))?;
            copies.push(f);
        }
        self.roll_back(cut_id, &copies)
    }

    /// The total length of the undo files of `cut_ids`; `None` if one is missing.
    pub(super) fn undo_bytes(&self, cut_ids: impl Iterator<Item = u64>) -> Option<u64> {
        let mut total = 0;
        for cut_id in cut_ids {
            for i in 0..self.images.len() {
                let name = history::undo_file_name(cut_id, i);
                total += confine::open_file_at(self.history_dir.as_fd(), name.as_ref())
                    .and_then(|f| f.metadata())
                    .map(|m| m.len())
                    .ok()?;
            }
        }
        Some(total)
    }

    /// The ranges kept point `p`'s undo data covers on disk `disk`: its covered file,
    /// or (none, or damaged) the ranges of its undo files, read.
    fn covered(&self, p: &PointInfo, disk: usize) -> Result<Vec<(u64, u64)>, StoreError> {
        let hdir = self.history_dir.as_fd();
        let name = history::covered_file_name(p.cut_id, disk);
        if let Some(r) = read_opt(hdir, &name)?.and_then(|b| history::decode_ranges(&b)) {
            return Ok(r);
        }
        let mut ranges = Vec::new();
        for part in p.undo_set() {
            let name = history::undo_file_name(part, disk);
            let mut f = confine::open_file_at(hdir, name.as_ref())
                .map_err(io_err(format!("the undo file {name}")))?;
            ranges.extend(
                history::ranges_of(&mut f).map_err(|source| StoreError::Undo {
                    cut_id: part,
                    disk,
                    source,
                })?,
            );
        }
        Ok(history::merge_ranges(ranges))
    }

    /// Removes every undo file no kept point needs (a pruned point's, a `.part` or a
    /// capture a crash cut short before its commit's intent).
    pub(super) fn drop_unkept_undo(&self) -> Result<(), StoreError> {
        let needed: Vec<u64> = self
            .state
            .history
            .iter()
            .skip(1)
            .flat_map(|p| p.undo_set())
            .collect();
        let path = confine::fd_path(self.history_dir.as_fd(), ".".as_ref());
        for e in std::fs::read_dir(&path).map_err(io_err(HISTORY_DIR))? {
            let e = e.map_err(io_err(HISTORY_DIR))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let keep = (name.ends_with(".undo") || name.ends_with(".covered"))
                && history::parse_undo_file_name(name).is_some_and(|c| needed.contains(&c));
            if !keep {
                confine::unlink_at(self.history_dir.as_fd(), name.as_ref()).ok();
            }
        }
        Ok(())
    }

    /// Before a commit of `cut_id` changes the images: the bytes they hold now on
    /// every range its segments write, per disk, as `cut_id`'s undo files (synced);
    /// with `folds` (the latest point, to be thinned out), only the ranges its undo
    /// data does not cover. Returns their total length.
    pub(super) fn capture_undo(
        &self,
        cut_id: u64,
        seqs: &[u64],
        folds: Option<&PointInfo>,
    ) -> Result<u64, StoreError> {
        let mut total = 0;
        for (i, &last) in seqs.iter().enumerate() {
            let mut ranges = Vec::new();
            for seq in self.disks[i].applied().seq + 1..=last {
                let mut f = confine::open_file_at(
                    self.disk_dirs[i].as_fd(),
                    segment_file_name(seq).as_ref(),
                )
                .map_err(io_err(format!("disk {i}: staged segment {seq}")))?;
                ranges.extend(history::ranges_of(&mut f).map_err(|source| {
                    StoreError::Segment {
                        disk: i,
                        seq,
                        source,
                    }
                })?);
            }
            let ranges = history::merge_ranges(ranges);
            // Folding the latest point: its undo files stay (they become part of the
            // new point's); the new file holds only the ranges they do not cover,
            // whose bytes at the point before are the image's now. What is kept is
            // what changed since that point, each range once, whatever the cuts.
            let (capture, covered) = match folds {
                Some(latest) => {
                    let covered = self.covered(latest, i)?;
                    let capture = history::subtract_ranges(&ranges, &covered);
                    let mut all = covered;
                    all.extend_from_slice(&ranges);
                    (capture, history::merge_ranges(all))
                }
                None => (ranges.clone(), ranges),
            };
            let hdir = self.history_dir.as_fd();
            let name = history::undo_file_name(cut_id, i);
            let part = format!("{name}.part");
            confine::unlink_at(hdir, part.as_ref()).ok();
            let f = confine::create_private(hdir, part.as_ref())
                .map_err(io_err(format!("creating {part}")))?;
            total += history::capture_undo(
                &self.images[i],
                self.state.disk_sizes[i],
                &capture,
                &f,
                cut_id,
            )
            .and_then(|n| f.sync_all().map(|()| n))
            .map_err(io_err(format!("writing {part}")))?;
            rename_at(hdir, part.as_ref(), name.as_ref())
                .map_err(io_err(format!("keeping {name}")))?;
            if self.state.spacing_s > 0 {
                // What the next fold subtracts without reading the undo files.
                let name = history::covered_file_name(cut_id, i);
                confine::write_private_atomic(
                    hdir,
                    name.as_ref(),
                    &history::encode_ranges(&covered),
                )
                .map_err(io_err(format!("keeping {name}")))?;
            }
            sync_dir(hdir).map_err(io_err(format!("keeping {name}")))?;
        }
        Ok(total)
    }
}
