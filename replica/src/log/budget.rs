//! The log's budget (docs/replica.md, "The log's budget"): the bytes of segments a
//! disk's change log may hold. The log keeps a zero region bitmap open beside it
//! ([`RegionMap`], file [`DEGRADED_MAP`]: made at open, where files may be made). An
//! append that would pass the budget *degrades* the log on the guest's write path with
//! `pwrite`s only (the VMM's I/O threads may not create or remove files): from then on
//! each write marks its regions in the map (the changed bytes before the disk write,
//! like a record; the first one then flags the map active) and nothing is appended to
//! the segments; no cut seals the log. The segments' own ranges go into the map, and
//! the segments away, at the next open or the catch-up. A catch-up
//! ([`ChangeLog::restart_for_catch_up`]) freezes the map as [`CATCH_UP_MAP`] and starts
//! the segments again at sequence 1; the primary sends the frozen regions' current
//! contents, then the new segments.
//!
//! Crash safety, step by step (a kill -9 keeps every `pwrite` in the page cache; a host
//! crash resyncs by block hashes anyway, `agent/src/replica_crash.rs`):
//! - degrading: the first write's bits, then the header's active flag, then the disk
//!   write. A kill before the flag leaves an inactive map (its bits cleared at the
//!   next open; that write never reached the disk); after it, the next open marks every
//!   segment's ranges in the map (synced) before it removes the segments.
//! - degraded: a region's bit is written before the disk write it describes, so every
//!   write that reached the image is in the map or the segments (as for a record).
//! - restarting for a catch-up: the frozen map (old frozen map, live map and every
//!   segment's ranges merged) is written whole first, flagged "not restarted"; then the
//!   live map and the segments are removed and the flag set. A kill in between is
//!   finished by the next open, which removes what is left and starts at sequence 1.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use super::{ChangeLog, LogError};
use crate::format::{
    parse_file_name, Decoded, Header, RecordHeader, HEADER_LEN, RECORD_HEADER_LEN,
};
use crate::regions::{RegionMap, CATCH_UP_MAP, DEGRADED_MAP};

/// The log's budget in bytes (decimal text), kept in its directory by the VMM so that
/// a restarted VMM keeps it.
pub const BUDGET_FILE: &str = "log.budget";

fn segment_seqs(dir: BorrowedFd<'_>) -> io::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(confine::fd_path(dir, "".as_ref()))? {
        if let Some(seq) = entry?.file_name().to_str().and_then(parse_file_name) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

fn unlink_if_there(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    match confine::unlink_at(dir, OsStr::new(name)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_segments(dir: BorrowedFd<'_>, keep: Option<u64>) -> io::Result<()> {
    for seq in segment_seqs(dir)? {
        if Some(seq) != keep {
            unlink_if_there(dir, &crate::format::segment_file_name(seq))?;
        }
    }
    Ok(())
}

/// At open: a catch-up restart a kill interrupted (its frozen map written, not flagged
/// restarted) is finished: the live map and every segment removed, the flag set.
/// Returns the cut id the frozen map recorded (0: none), below which the restarted
/// log's cut ids do not go.
pub(super) fn finish_restart(dir: BorrowedFd<'_>, label: &str) -> Result<u64, LogError> {
    let Some(mut map) = RegionMap::load(dir, label, CATCH_UP_MAP)? else {
        return Ok(0);
    };
    if !map.restarted {
        let io = |source| LogError::Io {
            file: format!("{label}/{CATCH_UP_MAP}"),
            source,
        };
        unlink_if_there(dir, DEGRADED_MAP).map_err(io)?;
        remove_segments(dir, None).map_err(io)?;
        crate::log::sync_dir(dir).map_err(io)?;
        map.restarted = true;
        map.store(dir, label, CATCH_UP_MAP)?;
        tracing::warn!(log = %label, "change log: an interrupted restart for a catch-up finished");
    }
    Ok(map.last_cut_id)
}

impl ChangeLog {
    /// After the segments were opened: the stored budget, and the live map — made
    /// (a zero spare) if there is none; an active one (a degraded log) gets every
    /// range the remaining segments record, then the segments go. Runs where files
    /// may be made (the VMM's file thread), unlike [`Self::bitmap_instead`].
    pub(super) fn after_open(&mut self) -> Result<(), LogError> {
        self.budget = read_budget(self.dir.as_fd());
        let dir = self.dir.as_fd();
        let map = match RegionMap::load(dir, &self.label, DEGRADED_MAP)? {
            Some(map) if map.disk_size() != self.disk_size => {
                return Err(LogError::DiskSize {
                    logged: map.disk_size(),
                    actual: self.disk_size,
                })
            }
            Some(map) => map,
            None => {
                let spare = RegionMap::new(self.disk_size, 0);
                spare.store(dir, &self.label, DEGRADED_MAP)?;
                spare
            }
        };
        let file = self.map_file()?;
        self.map = Some((map, file));
        self.settle()?;
        self.count_held();
        Ok(())
    }

    /// An active map takes the segments' ranges and the segments go; an inactive one
    /// with bits (a kill between a degrading write's bits and its header: that write
    /// never reached the disk) is cleared.
    fn settle(&mut self) -> Result<(), LogError> {
        let Some((mut map, file)) = self.map.take() else {
            return Ok(());
        };
        let err = self.map_err(DEGRADED_MAP);
        if map.active {
            self.mark_segments(&mut map)?;
            map.last_cut_id = map.last_cut_id.max(self.last_cut_id);
            map.write_all(&file).map_err(&err)?;
            self.last_cut_id = map.last_cut_id;
            self.trim_to_current()?;
            self.degraded = true;
            tracing::warn!(log = %self.label, regions = map.regions(), "change log: degraded (over its budget): a region bitmap");
        } else if map.regions() > 0 {
            map.clear();
            map.write_all(&file).map_err(&err)?;
        }
        self.map = Some((map, file));
        Ok(())
    }

    fn map_err(&self, name: &str) -> impl Fn(io::Error) -> LogError {
        let file = format!("{}/{name}", self.label);
        move |source| LogError::Io {
            file: file.clone(),
            source,
        }
    }

    fn map_file(&self) -> Result<File, LogError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(confine::fd_path(self.dir.as_fd(), DEGRADED_MAP.as_ref()))
            .map_err(self.map_err(DEGRADED_MAP))
    }

    /// Counts the bytes of the segments other than the one being written.
    pub(super) fn count_held(&mut self) {
        let dir = confine::fd_path(self.dir.as_fd(), "".as_ref());
        self.held_bytes = segment_seqs(self.dir.as_fd())
            .unwrap_or_default()
            .into_iter()
            .filter(|&s| s != self.seq)
            .filter_map(|s| std::fs::metadata(dir.join(crate::format::segment_file_name(s))).ok())
            .map(|m| m.len())
            .sum();
    }

    /// The budget in bytes of segments (None: none). Kept in the log's directory.
    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    /// Sets the budget (stored in the directory when it changes; 0: none).
    pub fn set_budget(&mut self, budget: Option<u64>) -> Result<(), LogError> {
        let budget = budget.filter(|&b| b > 0);
        if budget == self.budget {
            return Ok(());
        }
        let text = budget.map_or(String::new(), |b| b.to_string());
        confine::write_private_atomic(self.dir.as_fd(), OsStr::new(BUDGET_FILE), text.as_bytes())
            .map_err(self.map_err(BUDGET_FILE))?;
        self.budget = budget;
        tracing::info!(log = %self.label, budget = ?budget, "change log: budget set");
        Ok(())
    }

    /// Whether the log is degraded to a region bitmap.
    pub fn degraded(&self) -> bool {
        self.degraded
    }

    /// Bytes of segments the log holds (as last counted, and the one being written).
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes + self.end
    }

    /// Called by an append of `len` bytes at `offset` carrying `data_len` bytes, on the
    /// guest's write path (no file is made or removed there: `pwrite`s of the open
    /// map only): true when the write is recorded in the bitmap instead of a record.
    /// The write that passes the budget activates the map: its bits, then the header
    /// (a kill between leaves an inactive map, cleared at the next open, and no disk
    /// write). The segments stay until the next open or catch-up; nothing more is
    /// appended to them.
    pub(super) fn bitmap_instead(
        &mut self,
        offset: u64,
        len: u64,
        data_len: u64,
    ) -> Result<bool, LogError> {
        if !self.degraded {
            let records = data_len.div_ceil(crate::format::MAX_RECORD_DATA).max(1);
            let need = records * RECORD_HEADER_LEN as u64 + data_len;
            match self.budget {
                Some(b) if self.held_bytes + self.end + need > b => {}
                _ => return Ok(false),
            }
        }
        let err = self.map_err(DEGRADED_MAP);
        let Some((map, file)) = &mut self.map else {
            return Err(LogError::Degraded {
                file: self.label.clone(),
            });
        };
        if let Some(range) = map.mark(offset, len) {
            map.write_bits(file, range).map_err(&err)?;
        }
        if !self.degraded {
            map.active = true;
            map.last_cut_id = self.last_cut_id;
            map.write_header(file).map_err(&err)?;
            self.degraded = true;
            tracing::warn!(log = %self.label, budget = ?self.budget, held = self.held_bytes + self.end,
                "change log over its budget: degraded to a region bitmap");
        }
        Ok(true)
    }

    pub(super) fn sync_bitmap(&mut self) -> Result<(), LogError> {
        let err = self.map_err(DEGRADED_MAP);
        match &self.map {
            Some((_, file)) if self.degraded => file.sync_data().map_err(err),
            _ => Ok(()),
        }
    }

    /// Marks every range the directory's segments record in `map` (record headers
    /// only; the data is skipped). A torn tail of the newest file is a write that never
    /// reached the disk; any other damage is refused.
    fn mark_segments(&self, map: &mut RegionMap) -> Result<(), LogError> {
        let seqs = segment_seqs(self.dir.as_fd()).map_err(|e| self.io(e))?;
        let newest = seqs.last().copied();
        for seq in seqs {
            let f = super::open_segment(&self.dir, &self.label, seq)?;
            let len = if seq == self.seq {
                self.end
            } else {
                f.metadata().map_err(|e| self.io(e))?.len()
            };
            let mut h = [0u8; HEADER_LEN];
            if len < HEADER_LEN as u64 || f.read_exact_at(&mut h, 0).is_err() {
                continue;
            }
            Header::decode(&h).map_err(|r| self.corrupt(seq, r))?;
            let mut at = HEADER_LEN as u64;
            let mut rh = [0u8; RECORD_HEADER_LEN];
            while at + RECORD_HEADER_LEN as u64 <= len {
                f.read_exact_at(&mut rh, at).map_err(|e| self.io(e))?;
                match RecordHeader::decode(&rh) {
                    Decoded::Record(r) => {
                        map.mark(r.offset, r.len);
                        at += RECORD_HEADER_LEN as u64 + r.data_len();
                    }
                    Decoded::Trailer => break,
                    Decoded::Invalid(_) if Some(seq) == newest => break,
                    Decoded::Invalid(why) => {
                        return Err(self.corrupt(seq, format!("record at byte {at}: {why}")))
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes every segment but the one being written and empties that one.
    fn trim_to_current(&mut self) -> Result<(), LogError> {
        remove_segments(self.dir.as_fd(), Some(self.seq)).map_err(|e| self.io(e))?;
        self.file
            .set_len(HEADER_LEN as u64)
            .map_err(|e| self.io(e))?;
        self.write_header()?;
        self.sync_dir()?;
        self.held_bytes = 0;
        Ok(())
    }

    /// For a catch-up (the caller holds the disk; where files may be made): everything
    /// the log holds — the active map, every segment's ranges, an earlier catch-up's
    /// frozen map — is frozen into [`CATCH_UP_MAP`], the segments removed, the live
    /// map cleared to a spare, and the log starts again at sequence 1 (its cut ids go
    /// on). Returns the frozen map. The primary sends its regions' current contents
    /// (read after this), then the new segments.
    pub fn restart_for_catch_up(&mut self) -> Result<RegionMap, LogError> {
        let dir = self.dir.as_fd();
        let mut map = match &self.map {
            Some((m, _)) if self.degraded => m.clone(),
            _ => RegionMap::new(self.disk_size, self.last_cut_id),
        };
        map.active = false;
        self.mark_segments(&mut map)?;
        if let Some(earlier) = RegionMap::load(dir, &self.label, CATCH_UP_MAP)? {
            map.merge(&earlier);
        }
        map.last_cut_id = map.last_cut_id.max(self.last_cut_id);
        map.restarted = false;
        map.store(dir, &self.label, CATCH_UP_MAP)?;
        let err = self.map_err(CATCH_UP_MAP);
        remove_segments(dir, None).map_err(&err)?;
        crate::log::sync_dir(dir).map_err(&err)?;
        if let Some((live, file)) = &mut self.map {
            live.clear();
            live.active = false;
            live.write_all(file).map_err(self.map_err(DEGRADED_MAP))?;
        }
        map.restarted = true;
        let frozen = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(confine::fd_path(dir, CATCH_UP_MAP.as_ref()))
            .map_err(&err)?;
        map.write_header(&frozen)
            .and_then(|()| frozen.sync_data())
            .map_err(&err)?;
        self.degraded = false;
        self.last_cut_id = map.last_cut_id;
        self.start(1)?;
        self.held_bytes = 0;
        tracing::info!(log = %self.label, regions = map.regions(), last_cut_id = map.last_cut_id,
            "change log restarted for a catch-up");
        Ok(map)
    }
}

fn read_budget(dir: BorrowedFd<'_>) -> Option<u64> {
    let mut s = String::new();
    let mut f = confine::open_file_at(dir, OsStr::new(BUDGET_FILE)).ok()?;
    (&mut f).take(64).read_to_string(&mut s).ok()?;
    s.trim().parse::<u64>().ok().filter(|&b| b > 0)
}
