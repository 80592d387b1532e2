//! Whole-image operations: block status/map, resize, compact, commit.

use crate::bat::{self, Geometry, SECTORS_PER_CHUNK};
use crate::bytes::*;
use crate::error::{Error, Result};
use crate::image::{rlock, wlock, OpenOptions, Vhdx};
use crate::metadata::{
    ParentLocator, FLAG_REQUIRED, FLAG_VIRTUAL_DISK, PARENT_LOCATOR, VIRTUAL_DISK_SIZE,
};
use crate::region::{BAT_GUID, REGION_TABLE_OFFSETS};
use crate::storage;
use std::path::Path;

/// One run of the virtual disk with uniform allocation status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    /// Holds data somewhere in the chain.
    pub data: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Which image of the chain holds it (0 = this one); for unallocated ranges, the chain length.
    pub depth: u32,
    /// File offset in the image at `depth`, for data.
    pub offset: Option<u64>,
}

fn push_ext(out: &mut Vec<Extent>, e: Extent) {
    if let Some(l) = out.last_mut() {
        let contiguous = match (l.offset, e.offset) {
            (Some(a), Some(b)) => a + l.length == b,
            (None, None) => true,
            _ => false,
        };
        if l.start + l.length == e.start
            && l.data == e.data
            && l.zero == e.zero
            && l.depth == e.depth
            && contiguous
        {
            l.length += e.length;
            return;
        }
    }
    out.push(e);
}

/// Statistics of a compaction.
#[derive(Debug, Clone, Default)]
pub struct CompactStats {
    pub released_blocks: u64,
    pub moved_blocks: u64,
    pub old_file_size: u64,
    pub new_file_size: u64,
}

impl Vhdx {
    /// Allocation status of `[offset, +len)` through the whole chain.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        self.status_into(offset, len, 0, &mut out)?;
        Ok(out)
    }

    fn status_into(&self, offset: u64, len: u64, depth: u32, out: &mut Vec<Extent>) -> Result<()> {
        for pc in self.plan(offset, len)? {
            let start = offset + pc.pos;
            match pc.seg {
                crate::io::Seg::File(f) => push_ext(
                    out,
                    Extent {
                        start,
                        length: pc.len,
                        data: true,
                        zero: false,
                        depth,
                        offset: Some(f),
                    },
                ),
                crate::io::Seg::Zero => {
                    // ZERO state at this level, or unallocated without a parent.
                    let idx = self.geo.payload_index(start / self.geo.block_size);
                    let explicit = bat::state(rlock(&self.state).bat[idx]) == bat::PAYLOAD_ZERO;
                    push_ext(
                        out,
                        Extent {
                            start,
                            length: pc.len,
                            data: false,
                            zero: true,
                            depth: if explicit { depth } else { depth + 1 },
                            offset: None,
                        },
                    )
                }
                crate::io::Seg::Parent => match &self.parent {
                    Some(p) => p.status_into(start, pc.len, depth + 1, out)?,
                    None => push_ext(
                        out,
                        Extent {
                            start,
                            length: pc.len,
                            data: false,
                            zero: true,
                            depth: depth + 1,
                            offset: None,
                        },
                    ),
                },
            }
        }
        Ok(())
    }

    /// Runs of this image's own content (not its parents'): `(virtual offset, length,
    /// file offset or None for an explicit ZERO)`.
    pub fn own_extents(&self) -> Result<Vec<(u64, u64, Option<u64>)>> {
        let mut out: Vec<(u64, u64, Option<u64>)> = Vec::new();
        let bs = self.geo.block_size;
        let lss = self.geo.logical_sector_size;
        for block in 0..self.geo.data_blocks {
            let start = block * bs;
            let len = bs.min(self.geo.virtual_size - start);
            let e = self.payload_entry(block);
            let mut add = |s: u64, l: u64, f: Option<u64>| {
                if let Some(last) = out.last_mut() {
                    let cont = match (last.2, f) {
                        (Some(a), Some(b)) => a + last.1 == b,
                        (None, None) => true,
                        _ => false,
                    };
                    if cont && last.0 + last.1 == s {
                        last.1 += l;
                        return;
                    }
                }
                out.push((s, l, f));
            };
            match bat::state(e) {
                bat::PAYLOAD_FULLY_PRESENT => add(start, len, Some(bat::offset(e))),
                bat::PAYLOAD_ZERO => add(start, len, None),
                bat::PAYLOAD_PARTIALLY_PRESENT => {
                    let chunk = block / self.geo.chunk_ratio;
                    let mut st = wlock(&self.state);
                    self.load_bitmap(&mut st, chunk)?;
                    let Some(bm) = st.bitmaps.get(&chunk) else {
                        continue;
                    };
                    let first = (start / lss) % SECTORS_PER_CHUNK;
                    for s in 0..len / lss {
                        let i = first + s;
                        if bm[(i / 8) as usize] & (1 << (i % 8)) != 0 {
                            add(start + s * lss, lss, Some(bat::offset(e) + s * lss));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Rewrites the metadata region through the log (only pages that change).
    fn queue_metadata(&self) -> Result<()> {
        let new = self.metadata.to_bytes(&self.pstr, self.meta_len as usize)?;
        let mut old = vec![0u8; self.meta_len as usize];
        storage::read_zero_padded_at(&*self.storage, &mut old, self.meta_offset).map_err(|e| {
            Error::io(
                &self.pstr,
                "reading the metadata region",
                self.meta_offset,
                e,
            )
        })?;
        for (i, (a, b)) in old.chunks(4096).zip(new.chunks(4096)).enumerate() {
            if a != b {
                self.queue_raw(self.meta_offset + (i as u64) * 4096, b);
            }
        }
        Ok(())
    }

    /// Changes the virtual size. Growing may move the BAT to the end of the file;
    /// shrinking refuses when anything past the new end is not zero.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        self.begin_write()?;
        let lss = u64::from(self.params.logical_sector_size);
        if new_size == 0
            || new_size > crate::metadata::MAX_VIRTUAL_SIZE
            || !new_size.is_multiple_of(lss)
        {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} must be non-zero, at most 64 TiB and a multiple of {lss}"
            )));
        }
        if self.parent.is_some() {
            return Err(Error::unsupported(
                &self.pstr,
                "resizing a differencing disk (its size must match the parent's)",
            ));
        }
        let old = self.geo.virtual_size;
        if new_size == old {
            return Ok(());
        }
        let new_geo = Geometry::new(
            new_size,
            self.params.block_size,
            self.params.logical_sector_size,
            false,
        );
        if new_size < old {
            // Only ranges that hold data can hold non-zero bytes.
            let mut buf = vec![0u8; MIB as usize];
            for ext in self
                .block_status(new_size, old - new_size)?
                .into_iter()
                .filter(|e| e.data)
            {
                let mut at = ext.start;
                while at < ext.start + ext.length {
                    let n = (ext.start + ext.length - at).min(buf.len() as u64);
                    self.read_at(&mut buf[..n as usize], at)?;
                    if !is_zero(&buf[..n as usize]) {
                        return Err(Error::WouldLoseData {
                            path: self.pstr.clone(),
                            reason: format!(
                                "shrinking to {new_size} would discard data near offset {at}"
                            ),
                        });
                    }
                    at += n;
                }
            }
            for block in new_geo.data_blocks..self.geo.data_blocks {
                self.release_block(block, false)?;
            }
            let mut st = wlock(&self.state);
            let n = new_geo.bat_entries() as usize;
            st.bat.truncate(n);
        } else {
            let need = new_geo.bat_entries() * 8;
            if need > self.bat_region_len {
                // Move the BAT to the end of the file, then point the region table at it.
                let new_len = new_geo.bat_region_len();
                let (off, bytes) = {
                    let mut st = wlock(&self.state);
                    let off = self.allocate(&mut st, new_len)?;
                    let mut b = vec![0u8; new_len as usize];
                    for (i, e) in st.bat.iter().enumerate() {
                        put64(&mut b, i * 8, *e);
                    }
                    (off, b)
                };
                storage::write_all_at(&*self.storage, &bytes, off)
                    .map_err(|e| Error::io(&self.pstr, "writing the moved BAT", off, e))?;
                self.storage
                    .sync_data()
                    .map_err(|e| Error::io(&self.pstr, "flushing the moved BAT", off, e))?;
                for e in self.regions.entries.iter_mut() {
                    if e.guid == BAT_GUID {
                        e.file_offset = off;
                        e.length = new_len as u32;
                    }
                }
                let rtb = self.regions.to_bytes();
                for o in REGION_TABLE_OFFSETS {
                    self.queue_raw(o, &rtb);
                }
                self.bat_offset = off;
                self.bat_region_len = new_len;
                // Every page of the new BAT must be logged against its new place.
                let mut st = wlock(&self.state);
                let pages = (new_geo.bat_entries() as usize).div_ceil(512);
                for p in 0..pages {
                    st.dirty_bat.insert(p);
                }
            }
            let mut st = wlock(&self.state);
            let n = new_geo.bat_entries() as usize;
            let old_n = st.bat.len();
            st.bat.resize(n, 0);
            for p in old_n / 512..n.div_ceil(512) {
                st.dirty_bat.insert(p);
            }
            if self.params.leave_blocks_allocated {
                for block in self.geo.data_blocks..new_geo.data_blocks {
                    let off = self.allocate(&mut st, new_geo.block_size)?;
                    let idx = new_geo.payload_index(block);
                    self.set_bat(&mut st, idx, bat::entry(bat::PAYLOAD_FULLY_PRESENT, off));
                }
            }
        }
        let mut vs = vec![0u8; 8];
        put64(&mut vs, 0, new_size);
        self.metadata
            .set(VIRTUAL_DISK_SIZE, FLAG_REQUIRED | FLAG_VIRTUAL_DISK, vs);
        self.queue_metadata()?;
        self.geo = new_geo;
        self.params.virtual_size = new_size;
        self.flush()
    }

    /// Releases all-zero blocks and moves blocks from the end of the file into
    /// the holes, then truncates the file.
    pub fn compact(&mut self) -> Result<CompactStats> {
        self.begin_write()?;
        let mut stats = CompactStats {
            old_file_size: self.file_size()?,
            ..Default::default()
        };
        if self.params.leave_blocks_allocated {
            stats.new_file_size = stats.old_file_size;
            return Ok(stats);
        }
        let mut buf = vec![0u8; (self.geo.block_size as usize).min(8 << 20)];
        for block in 0..self.geo.data_blocks {
            if bat::state(self.payload_entry(block)) == bat::PAYLOAD_FULLY_PRESENT
                && self.block_is_zero(block, &mut buf)?
            {
                self.release_block(block, self.parent.is_some())?;
                stats.released_blocks += 1;
            }
        }
        self.flush()?;
        let bs = self.geo.block_size;
        loop {
            // Spans in use according to the (now durable) BAT.
            let (mut used, blocks) = {
                let st = rlock(&self.state);
                let mut used: Vec<(u64, u64)> = vec![
                    (0, MIB),
                    (self.log_offset, self.log_len),
                    (self.meta_offset, self.meta_len),
                    (self.bat_offset, self.bat_region_len),
                ];
                let mut blocks = Vec::new();
                let stride = self.geo.chunk_ratio + 1;
                for (i, &e) in st.bat.iter().enumerate() {
                    let is_sb = (i as u64) % stride == self.geo.chunk_ratio;
                    let s = bat::state(e);
                    if is_sb && s == bat::SB_PRESENT && self.geo.has_parent {
                        used.push((bat::offset(e), MIB));
                    } else if !is_sb
                        && matches!(
                            s,
                            bat::PAYLOAD_FULLY_PRESENT | bat::PAYLOAD_PARTIALLY_PRESENT
                        )
                    {
                        used.push((bat::offset(e), bs));
                        blocks.push((bat::offset(e), i));
                    }
                }
                used.sort();
                blocks.sort();
                (used, blocks)
            };
            let mut moves = Vec::new();
            for &(from, idx) in blocks.iter().rev() {
                // Lowest 1 MiB-aligned gap that fits, below `from`.
                let mut cand = 0u64;
                let mut found = None;
                for &(o, l) in &used {
                    if o >= cand + bs {
                        found = Some(cand);
                        break;
                    }
                    cand = cand.max((o + l).div_ceil(MIB) * MIB);
                }
                let Some(to) = found else { continue };
                if to >= from {
                    continue;
                }
                used.push((to, bs));
                used.sort();
                moves.push((from, to, idx));
                if moves.len() >= 64 {
                    break;
                }
            }
            if moves.is_empty() {
                break;
            }
            let mut data = vec![0u8; bs as usize];
            for &(from, to, _) in &moves {
                storage::read_exact_at(&*self.storage, &mut data, from)
                    .map_err(|e| Error::io(&self.pstr, "reading a block to move", from, e))?;
                storage::write_all_at(&*self.storage, &data, to)
                    .map_err(|e| Error::io(&self.pstr, "moving a block", to, e))?;
            }
            // The moved data must be durable before the BAT points at it: the
            // space it went to is not fresh, so the flush adds no barrier of its own.
            self.storage
                .sync_data()
                .map_err(|e| Error::io(&self.pstr, "flushing moved blocks", 0, e))?;
            {
                let mut st = wlock(&self.state);
                for &(_, to, idx) in &moves {
                    let s = bat::state(st.bat[idx]);
                    self.set_bat(&mut st, idx, bat::entry(s, to));
                }
            }
            self.flush()?;
            stats.moved_blocks += moves.len() as u64;
        }
        // Truncate after the last used byte.
        let end = {
            let st = rlock(&self.state);
            let mut end = [
                self.log_offset + self.log_len,
                self.meta_offset + self.meta_len,
                self.bat_offset + self.bat_region_len,
            ]
            .into_iter()
            .max()
            .unwrap_or(MIB);
            let stride = self.geo.chunk_ratio + 1;
            for (i, &e) in st.bat.iter().enumerate() {
                let is_sb = (i as u64) % stride == self.geo.chunk_ratio;
                let s = bat::state(e);
                if is_sb && s == bat::SB_PRESENT && self.geo.has_parent {
                    end = end.max(bat::offset(e) + MIB);
                } else if !is_sb
                    && matches!(
                        s,
                        bat::PAYLOAD_FULLY_PRESENT | bat::PAYLOAD_PARTIALLY_PRESENT
                    )
                {
                    end = end.max(bat::offset(e) + bs);
                }
            }
            end
        };
        // Shrinking the file: nothing may be left in the log that claims a larger one.
        self.flush()?;
        self.retire_log()?;
        {
            let mut st = wlock(&self.state);
            if end < st.file_len {
                self.storage
                    .set_len(end)
                    .map_err(|e| Error::io(&self.pstr, "truncating", end, e))?;
                st.file_len = end;
                st.eof = end.div_ceil(MIB) * MIB;
            }
        }
        self.flush()?;
        stats.new_file_size = self.file_size()?;
        Ok(stats)
    }

    /// Points this differencing disk at a parent with a new data write GUID.
    fn relink(&mut self, dwg: uuid::Uuid) -> Result<()> {
        let Some(loc) = &self.locator else {
            return Ok(());
        };
        let mut loc: ParentLocator = loc.clone();
        for (k, v) in loc.entries.iter_mut() {
            if k == "parent_linkage" {
                *v = format!("{{{dwg}}}");
            }
        }
        loc.entries.retain(|(k, _)| k != "parent_linkage2");
        self.metadata
            .set(PARENT_LOCATOR, FLAG_REQUIRED, loc.to_bytes());
        self.locator = Some(loc);
        self.queue_metadata()
    }
}

/// Options that open a child without its parent (for commit).
fn skip_parent_opts() -> OpenOptions {
    OpenOptions {
        read_only: false,
        skip_parent: true,
        ..Default::default()
    }
}

/// Merges a differencing disk into its parent (like `qemu-img commit`), then
/// empties the child and re-links it to the updated parent.
/// Returns the number of bytes copied.
pub fn commit(child_path: &Path) -> Result<u64> {
    let (extents, parent_path) = {
        let child = Vhdx::open(
            child_path,
            OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )?;
        let Some(parent) = child.parent() else {
            return Err(Error::InvalidArgument(format!(
                "{} has no parent to commit into",
                child_path.display()
            )));
        };
        (child.own_extents()?, parent.path().to_path_buf())
    };
    let cstr = child_path.display().to_string();
    let cfile = std::fs::File::open(child_path).map_err(|e| Error::io(&cstr, "opening", 0, e))?;
    let cs = storage::FileStorage::new(cfile);
    let parent = Vhdx::open(&parent_path, OpenOptions::default())?;
    let mut copied = 0u64;
    let mut buf = Vec::new();
    for (start, len, f) in &extents {
        match f {
            Some(f) => {
                let mut done = 0;
                while done < *len {
                    let n = (*len - done).min(8 << 20);
                    buf.resize(n as usize, 0);
                    storage::read_exact_at(&cs, &mut buf, f + done)
                        .map_err(|e| Error::io(&cstr, "reading", f + done, e))?;
                    parent.write_at(&buf, start + done)?;
                    done += n;
                }
                copied += len;
            }
            None => parent.write_zeroes(*start, *len)?,
        }
    }
    parent.flush()?;
    let dwg = parent.data_write_guid();
    parent.close()?;
    let mut child = Vhdx::open(child_path, skip_parent_opts())?;
    child.begin_write()?;
    for block in 0..child.geo.data_blocks {
        let s = bat::state(child.payload_entry(block));
        if s != bat::PAYLOAD_NOT_PRESENT {
            // Force NOT_PRESENT: the data now lives in the parent.
            let idx = child.geo.payload_index(block);
            let e = child.payload_entry(block);
            let mut st = wlock(&child.state);
            if s == bat::PAYLOAD_PARTIALLY_PRESENT {
                drop(st);
                child.release_block(block, false)?;
                st = wlock(&child.state);
            }
            child.set_bat(&mut st, idx, bat::entry(bat::PAYLOAD_NOT_PRESENT, 0));
            if matches!(s, bat::PAYLOAD_FULLY_PRESENT) {
                let _ = child
                    .storage
                    .punch_hole(bat::offset(e), child.geo.block_size);
            }
        }
    }
    child.relink(dwg)?;
    child.flush()?;
    child.close()?;
    Ok(copied)
}

/// Is this a VHDX file?
pub fn probe(path: &Path) -> Result<bool> {
    let pstr = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|e| Error::io(&pstr, "opening", 0, e))?;
    let mut b = [0u8; 8];
    let s = storage::FileStorage::new(f);
    match storage::read_exact_at(&s, &mut b, 0) {
        Ok(()) => Ok(&b == crate::header::FILE_ID_SIGNATURE),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::io(&pstr, "reading", 0, e)),
    }
}

impl Vhdx {
    /// End of the last byte any structure or block uses.
    fn used_end(&self) -> u64 {
        let st = rlock(&self.state);
        let mut end = [
            self.log_offset + self.log_len,
            self.meta_offset + self.meta_len,
            self.bat_offset + self.bat_region_len,
        ]
        .into_iter()
        .max()
        .unwrap_or(MIB);
        let stride = self.geo.chunk_ratio + 1;
        for (i, &e) in st.bat.iter().enumerate() {
            let is_sb = (i as u64) % stride == self.geo.chunk_ratio;
            let s = bat::state(e);
            if is_sb && s == bat::SB_PRESENT && self.geo.has_parent {
                end = end.max(bat::offset(e) + MIB);
            } else if !is_sb
                && matches!(
                    s,
                    bat::PAYLOAD_FULLY_PRESENT | bat::PAYLOAD_PARTIALLY_PRESENT
                )
            {
                end = end.max(bat::offset(e) + self.geo.block_size);
            }
        }
        end
    }

    /// Bytes at the end of the file that nothing references (left by a crash
    /// between allocating a block and logging its BAT entry).
    pub fn leaked_bytes(&self) -> Result<u64> {
        Ok(self.file_size()?.saturating_sub(self.used_end()))
    }

    /// Cuts leaked space off the end of the file.
    pub fn repair_leaks(&self) -> Result<()> {
        self.begin_write()?;
        self.flush()?;
        self.retire_log()?;
        let end = self.used_end();
        let mut st = wlock(&self.state);
        if st.file_len > end {
            self.storage
                .set_len(end)
                .map_err(|e| Error::io(&self.pstr, "truncating leaked space", end, e))?;
            st.file_len = end;
            st.eof = end.div_ceil(MIB) * MIB;
        }
        Ok(())
    }
}
