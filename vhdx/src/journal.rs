//! Flush: data first, then every changed metadata page (BAT, sector bitmaps,
//! metadata region, region tables) through the log, then in place.
//!
//! Order per flush: fdatasync (new data and file size durable) -> log entry
//! written and fdatasync'd -> pages written in place and fdatasync'd. A crash
//! before the log entry is durable leaves the old metadata (new blocks are
//! unreferenced space); after it, replay on the next open completes the update.
//! Each flush writes its entry at the start of the log with tail = itself: all
//! earlier entries were applied and flushed before, so they are not needed.

use crate::bat;
use crate::error::{Error, Result};
use crate::image::{mlock, wlock, Vhdx};
use crate::log;
use crate::storage;
use uuid::Uuid;

#[derive(Debug, Clone, Copy)]
enum Key {
    Bat(usize),
    Bitmap(u64, usize),
    Raw(u64),
}

impl Vhdx {
    /// Makes every completed write durable and the metadata that points to it
    /// consistent on disk.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _f = mlock(&self.flush_lock);
        let (keys, pages) = self.take_dirty();
        let r = self.flush_pages(&pages);
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

    fn take_dirty(&self) -> (Vec<Key>, Vec<(u64, Vec<u8>)>) {
        let mut st = wlock(&self.state);
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
        (keys, pages)
    }

    fn flush_pages(&self, pages: &[(u64, Vec<u8>)]) -> Result<()> {
        let p = &self.pstr;
        let s = &*self.storage;
        s.sync_data()
            .map_err(|e| Error::io(p, "flushing data", 0, e))?;
        if pages.is_empty() {
            return Ok(());
        }
        let mut hs = mlock(&self.hdr);
        if !hs.log_active {
            let g = Uuid::new_v4();
            self.update_header(&mut hs, |h| h.log_guid = g)?;
            hs.log_guid = g;
            hs.log_active = true;
        }
        let file_len = s
            .len()
            .map_err(|e| Error::io(p, "getting the length", 0, e))?;
        let per = log::max_pages_per_entry(self.log_len).max(1);
        for batch in pages.chunks(per) {
            hs.log_seq += 1;
            let refs: Vec<(u64, &[u8])> = batch.iter().map(|(o, d)| (*o, d.as_slice())).collect();
            let entry =
                log::build_entry(hs.log_seq, &hs.log_guid, 0, &refs, &[], file_len, file_len);
            storage::write_all_at(s, &entry, self.log_offset)
                .map_err(|e| Error::io(p, "writing a log entry", self.log_offset, e))?;
            s.sync_data()
                .map_err(|e| Error::io(p, "flushing the log", self.log_offset, e))?;
            for (o, d) in batch {
                storage::write_all_at(s, d, *o)
                    .map_err(|e| Error::io(p, "writing metadata", *o, e))?;
            }
            s.sync_data()
                .map_err(|e| Error::io(p, "flushing metadata", 0, e))?;
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
