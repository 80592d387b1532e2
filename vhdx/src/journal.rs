//! Flush: every changed metadata page (BAT, sector bitmaps, metadata region,
//! region tables) goes through the log, then in place.
//!
//! Order per flush (see `flush_pages`): [fdatasync when the file grew or the
//! disk has a parent] -> log entry appended -> fdatasync -> pages in place,
//! made durable by the next fdatasync. A crash before the entry is durable
//! leaves the old metadata (new blocks are unreferenced space); after it,
//! replay on the next open completes the update.
//!
//! Entries of one log GUID are appended from sector 0 on and never wrap: when
//! the log is full (or the file shrank, or a flush failed) everything is
//! synced and a new GUID starts a new sequence at sector 0, so stale entries
//! of an earlier sequence are never valid. Readers that replay the whole run
//! of entries from sector 0 (qemu) and readers that follow the tail (this
//! engine) get the same result: every page's last logged version.

use crate::bat;
use crate::error::{Error, Result};
use crate::image::{mlock, wlock, HeaderState, Vhdx};
use crate::io::GROW_AHEAD_MAX;
use crate::log;
use crate::storage;
use uuid::Uuid;

#[derive(Debug, Clone, Copy)]
enum Key {
    Bat(usize),
    Bitmap(u64, usize),
    Raw(u64),
}

/// What one flush writes.
struct Dirty {
    keys: Vec<Key>,
    pages: Vec<(u64, Vec<u8>)>,
    /// End of the used space: every block the pages point to lies below it.
    used_end: u64,
    /// Bytes allocated since the previous flush.
    window: u64,
}

impl Vhdx {
    /// Makes every completed write durable and the metadata that points to it
    /// consistent on disk.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _f = mlock(&self.flush_lock);
        let Dirty {
            keys,
            pages,
            used_end,
            window,
        } = self.take_dirty();
        let r = self.flush_pages(&pages, used_end, window);
        if r.is_err() {
            // Nothing was lost: the pages go back into the dirty sets for the next flush.
            let mut st = wlock(&self.state);
            for (k, (_, d)) in keys.into_iter().zip(pages) {
                match k {
                    Key::Bat(p) => {
                        st.dirty_bat.insert(p);
                    }
                    Key::Bitmap(c, p) => {
                        st.dirty_bitmap.insert((c, p));
                    }
                    Key::Raw(o) => {
                        st.dirty_raw.entry(o).or_insert(d);
                    }
                }
            }
        }
        r
    }

    fn take_dirty(&self) -> Dirty {
        let mut st = wlock(&self.state);
        let window = std::mem::take(&mut st.alloc_since_flush);
        let mut keys = Vec::new();
        let mut pages = Vec::new();
        for p in std::mem::take(&mut st.dirty_bat) {
            let mut page = vec![0u8; 4096];
            let first = p * 512;
            for (i, e) in st.bat.iter().skip(first).take(512).enumerate() {
                page[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
            }
            keys.push(Key::Bat(p));
            pages.push((self.bat_offset + (p as u64) * 4096, page));
        }
        for (c, p) in std::mem::take(&mut st.dirty_bitmap) {
            let e = st.bat.get(self.geo.bitmap_index(c)).copied().unwrap_or(0);
            let Some(bm) = st.bitmaps.get(&c) else {
                continue;
            };
            if bat::state(e) != bat::SB_PRESENT {
                continue;
            }
            keys.push(Key::Bitmap(c, p));
            pages.push((
                bat::offset(e) + (p as u64) * 4096,
                bm[p * 4096..(p + 1) * 4096].to_vec(),
            ));
        }
        for (o, d) in std::mem::take(&mut st.dirty_raw) {
            keys.push(Key::Raw(o));
            pages.push((o, d));
        }
        Dirty {
            keys,
            pages,
            used_end: st.eof,
            window,
        }
    }

    /// fdatasync, recording what it made durable: the file length, and the
    /// in-place writes of every log entry written so far.
    pub(crate) fn sync_tracked(&self, hs: &mut HeaderState) -> Result<()> {
        let p = &self.pstr;
        let s = &*self.storage;
        let len = s
            .len()
            .map_err(|e| Error::io(p, "getting the length", 0, e))?;
        s.sync_data()
            .map_err(|e| Error::io(p, "flushing data", 0, e))?;
        hs.durable_len = len;
        hs.pending_tail = None;
        Ok(())
    }

    /// Starts a new log sequence at sector 0 under a new log GUID, so that no
    /// entry of the previous one can be mistaken for part of it. Everything
    /// earlier entries describe is made durable first.
    fn restart_log(&self, hs: &mut HeaderState) -> Result<()> {
        self.sync_tracked(hs)?;
        let g = Uuid::new_v4();
        self.update_header(hs, |h| h.log_guid = g)?;
        hs.log_guid = g;
        hs.log_active = true;
        hs.log_head = 0;
        Ok(())
    }

    /// Makes everything durable and clears the log GUID (nothing is left to
    /// replay). Before the file shrinks: log entries must not claim a larger file.
    pub(crate) fn retire_log(&self) -> Result<()> {
        let mut hs = mlock(&self.hdr);
        if hs.log_active {
            if hs.pending_tail.is_some() {
                self.sync_tracked(&mut hs)?;
            }
            self.update_header(&mut hs, |h| h.log_guid = Uuid::nil())?;
            hs.log_active = false;
        }
        Ok(())
    }

    /// Writes `pages` through the log with one fdatasync per log entry, two
    /// when the entry needs a barrier:
    ///
    /// 1. A barrier (fdatasync) only when it is needed: for differencing
    ///    disks (a new block's sectors would read as zeros instead of the
    ///    parent's data if its BAT entry became durable before its data),
    ///    and when blocks lie past the file length made durable by the last
    ///    fdatasync (qemu refuses images whose BAT points past the end of the
    ///    file, and does not extend the file to a log entry's LastFileOffset
    ///    on replay). To keep that rare, each flush grows the file ahead by
    ///    twice what the last interval allocated (at most [`GROW_AHEAD_MAX`])
    ///    before its fdatasync, so the next interval's blocks usually lie in
    ///    durable space. New blocks of a dynamic disk lie in space that reads
    ///    as zeros, which is what the block held before, so their data needs
    ///    no barrier of its own.
    /// 2. The log entry, appended after the previous one; its tail is the
    ///    oldest entry whose in-place writes are not yet known durable.
    /// 3. fdatasync: the entry, the data, and the previous entries' in-place
    ///    writes are durable.
    /// 4. The pages in place, left to the next fdatasync (the entry covers
    ///    them until then; `close` syncs before clearing the log GUID).
    fn flush_pages(&self, pages: &[(u64, Vec<u8>)], used_end: u64, window: u64) -> Result<()> {
        let mut hs = mlock(&self.hdr);
        if pages.is_empty() {
            return self.sync_tracked(&mut hs);
        }
        let r = self.log_pages(&mut hs, pages, used_end, window);
        if r.is_err() {
            // What reached the file is unknown: the next flush syncs and starts
            // a new sequence (the failed pages are queued again by `flush`).
            hs.log_active = false;
        }
        r
    }

    fn log_pages(
        &self,
        hs: &mut HeaderState,
        pages: &[(u64, Vec<u8>)],
        used_end: u64,
        window: u64,
    ) -> Result<()> {
        let p = &self.pstr;
        let s = &*self.storage;
        let log_sectors = (self.log_len / log::SECTOR as u64) as usize;
        // Entries of at most a quarter of the log: one always fits after a restart.
        let per = log::max_pages_per_entry(self.log_len / 4).max(1);
        for batch in pages.chunks(per) {
            let sectors = log::entry_sectors(batch.len());
            let len = s
                .len()
                .map_err(|e| Error::io(p, "getting the length", 0, e))?;
            // The last sector of the log stays unused: qemu's log search never
            // ends on a log whose run of entries reaches its very end (it wraps
            // back to where it started and scans again).
            if !hs.log_active || len < hs.durable_len || hs.log_head + sectors >= log_sectors {
                self.restart_log(hs)?;
            } else if self.geo.has_parent || used_end > hs.durable_len {
                self.sync_tracked(hs)?;
            }
            if window > 0 {
                self.grow_ahead(window.saturating_mul(2).min(GROW_AHEAD_MAX))?;
            }
            let len = s
                .len()
                .map_err(|e| Error::io(p, "getting the length", 0, e))?;
            hs.log_seq += 1;
            let tail = hs.pending_tail.unwrap_or(hs.log_head);
            let refs: Vec<(u64, &[u8])> = batch.iter().map(|(o, d)| (*o, d.as_slice())).collect();
            let entry = log::build_entry(
                hs.log_seq,
                &hs.log_guid,
                (tail * log::SECTOR) as u32,
                &refs,
                &[],
                hs.durable_len.min(len),
                len,
            );
            let at = self.log_offset + (hs.log_head * log::SECTOR) as u64;
            storage::write_all_at(s, &entry, at)
                .map_err(|e| Error::io(p, "writing a log entry", at, e))?;
            self.sync_tracked(hs)?;
            hs.pending_tail = Some(hs.log_head);
            hs.log_head += sectors;
            for (o, d) in batch {
                storage::write_all_at(s, d, *o)
                    .map_err(|e| Error::io(p, "writing metadata", *o, e))?;
            }
        }
        Ok(())
    }

    /// Queues whole pages (metadata region, region tables) for the next flush.
    pub(crate) fn queue_raw(&self, offset: u64, data: &[u8]) {
        let mut st = wlock(&self.state);
        for (i, page) in data.chunks(4096).enumerate() {
            let mut v = page.to_vec();
            v.resize(4096, 0);
            st.dirty_raw.insert(offset + (i as u64) * 4096, v);
        }
    }
}
