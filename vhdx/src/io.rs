//! The data path: mapping virtual ranges to file ranges, reads through the
//! parent chain, allocation at the end of the file, sector bitmaps for
//! differencing disks. Data moves with pread/pwrite straight to and from the
//! caller's buffers; locks are held only to look up or change the BAT.

use crate::bat::{self, SECTORS_PER_CHUNK, SECTOR_BITMAP_SIZE};
use crate::bytes::{is_zero, MIB};
use crate::error::{Error, Result};
use crate::image::{apply_overlay, apply_overlay_iobufs, rlock, wlock, State, Vhdx};
use crate::iobuf::{IoBufs, IoBufsMut};
use crate::storage;
use std::io::{IoSlice, IoSliceMut};

/// Most the file grows ahead of need (sparse: costs no disk space).
pub(crate) const GROW_AHEAD_MAX: u64 = 1 << 30;

/// Where a piece of a request lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seg {
    File(u64),
    Zero,
    Parent,
}

/// A piece of a request: `[pos, pos+len)` relative to the request start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    pub pos: u64,
    pub len: u64,
    pub seg: Seg,
}

fn push(out: &mut Vec<Piece>, p: Piece) {
    if let Some(last) = out.last_mut() {
        if last.pos + last.len == p.pos {
            let merged = match (last.seg, p.seg) {
                (Seg::File(a), Seg::File(b)) if a + last.len == b => true,
                (Seg::Zero, Seg::Zero) | (Seg::Parent, Seg::Parent) => true,
                _ => false,
            };
            if merged {
                last.len += p.len;
                return;
            }
        }
    }
    out.push(p);
}

fn bit(bm: &[u8], i: u64) -> bool {
    bm[(i / 8) as usize] & (1 << (i % 8)) != 0
}

impl Vhdx {
    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.geo.virtual_size;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    fn io_err(&self, op: &'static str, offset: u64) -> impl Fn(std::io::Error) -> Error + '_ {
        move |e| Error::io(&self.pstr, op, offset, e)
    }

    /// Loads the sector bitmap of `chunk` into memory if it is not there.
    pub(crate) fn load_bitmap(&self, st: &mut State, chunk: u64) -> Result<()> {
        if st.bitmaps.contains_key(&chunk) {
            return Ok(());
        }
        let e = st
            .bat
            .get(self.geo.bitmap_index(chunk))
            .copied()
            .unwrap_or(0);
        let mut bm = vec![0u8; SECTOR_BITMAP_SIZE as usize];
        if bat::state(e) == bat::SB_PRESENT {
            let off = bat::offset(e);
            storage::read_zero_padded_at(&*self.storage, &mut bm, off)
                .map_err(self.io_err("reading a sector bitmap", off))?;
            if let Some(ops) = &self.overlay {
                apply_overlay(ops, &mut bm, off);
            }
        }
        st.bitmaps.insert(chunk, bm);
        Ok(())
    }

    /// Chunks whose bitmap a read of `[offset, +len)` needs and that are not loaded.
    fn missing_bitmaps(&self, st: &State, offset: u64, len: u64) -> Vec<u64> {
        let mut v = Vec::new();
        if !self.geo.has_parent || len == 0 {
            return v;
        }
        let bs = self.geo.block_size;
        for block in offset / bs..=(offset + len - 1) / bs {
            let e = st.bat[self.geo.payload_index(block)];
            let chunk = block / self.geo.chunk_ratio;
            if bat::state(e) == bat::PAYLOAD_PARTIALLY_PRESENT
                && !st.bitmaps.contains_key(&chunk)
                && !v.contains(&chunk)
            {
                v.push(chunk);
            }
        }
        v
    }

    /// Maps a request to pieces.
    pub(crate) fn plan(&self, offset: u64, len: u64) -> Result<Vec<Piece>> {
        loop {
            {
                let st = rlock(&self.state);
                if self.missing_bitmaps(&st, offset, len).is_empty() {
                    return Ok(self.plan_locked(&st, offset, len));
                }
            }
            let mut st = wlock(&self.state);
            for c in self.missing_bitmaps(&st, offset, len) {
                self.load_bitmap(&mut st, c)?;
            }
        }
    }

    fn plan_locked(&self, st: &State, offset: u64, len: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        let bs = self.geo.block_size;
        let lss = self.geo.logical_sector_size;
        let absent = if self.parent.is_some() {
            Seg::Parent
        } else {
            Seg::Zero
        };
        let mut pos = 0u64;
        while pos < len {
            let v = offset + pos;
            let block = v / bs;
            let inb = v % bs;
            let n = (bs - inb).min(len - pos);
            let e = st.bat[self.geo.payload_index(block)];
            match bat::state(e) {
                bat::PAYLOAD_FULLY_PRESENT => push(
                    &mut out,
                    Piece {
                        pos,
                        len: n,
                        seg: Seg::File(bat::offset(e) + inb),
                    },
                ),
                bat::PAYLOAD_ZERO => push(
                    &mut out,
                    Piece {
                        pos,
                        len: n,
                        seg: Seg::Zero,
                    },
                ),
                bat::PAYLOAD_PARTIALLY_PRESENT => {
                    let chunk = block / self.geo.chunk_ratio;
                    let first_sector = (block * bs) / lss % SECTORS_PER_CHUNK;
                    match st.bitmaps.get(&chunk) {
                        None => push(
                            &mut out,
                            Piece {
                                pos,
                                len: n,
                                seg: absent,
                            },
                        ),
                        Some(bm) => {
                            let mut p = inb;
                            while p < inb + n {
                                let sector = p / lss;
                                let send = ((sector + 1) * lss).min(inb + n);
                                let seg = if bit(bm, first_sector + sector) {
                                    Seg::File(bat::offset(e) + p)
                                } else {
                                    absent
                                };
                                push(
                                    &mut out,
                                    Piece {
                                        pos: pos + (p - inb),
                                        len: send - p,
                                        seg,
                                    },
                                );
                                p = send;
                            }
                        }
                    }
                }
                _ => push(
                    &mut out,
                    Piece {
                        pos,
                        len: n,
                        seg: absent,
                    },
                ),
            }
            pos += n;
        }
        out
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        for pc in self.plan(offset, len)? {
            let dst = &mut buf[pc.pos as usize..(pc.pos + pc.len) as usize];
            match pc.seg {
                Seg::File(f) => {
                    storage::read_zero_padded_at(&*self.storage, dst, f)
                        .map_err(self.io_err("reading data", f))?;
                    if let Some(ops) = &self.overlay {
                        apply_overlay(ops, dst, f);
                    }
                }
                Seg::Zero => dst.fill(0),
                Seg::Parent => match &self.parent {
                    Some(p) => p.read_at(dst, offset + pc.pos)?,
                    None => dst.fill(0),
                },
            }
        }
        Ok(())
    }

    /// Scatter read into ordinary buffers.
    pub fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        self.read_iobufs_at(&IoBufsMut::from_slices(bufs), offset)
    }

    /// Scatter read into raw buffers (guest memory): the data goes there with
    /// `preadv`; holes and replayed log entries are copied in with volatile writes.
    pub fn read_iobufs_at(&self, bufs: &IoBufsMut<'_>, offset: u64) -> Result<()> {
        let len = bufs.len();
        self.check_range(offset, len)?;
        for pc in self.plan(offset, len)? {
            let parts = bufs.sub(pc.pos, pc.len);
            match pc.seg {
                Seg::File(f) => {
                    let mut done = 0u64;
                    while done < pc.len {
                        let rest = parts.sub(done, pc.len - done);
                        let at = f + done;
                        let n = self
                            .storage
                            .read_vectored_at(&rest, at)
                            .map_err(self.io_err("reading data", at))?;
                        if n == 0 {
                            rest.fill_zero();
                            break;
                        }
                        done += n as u64;
                    }
                    if let Some(ops) = &self.overlay {
                        apply_overlay_iobufs(ops, &parts, f);
                    }
                }
                Seg::Zero => parts.fill_zero(),
                Seg::Parent => match &self.parent {
                    Some(p) => p.read_iobufs_at(&parts, offset + pc.pos)?,
                    None => parts.fill_zero(),
                },
            }
        }
        Ok(())
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_vectored_at(&[IoSlice::new(buf)], offset)
    }

    /// Gather write from ordinary buffers.
    pub fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        self.write_iobufs_at(&IoBufs::from_slices(bufs), offset)
    }

    /// Gather write from raw buffers (guest memory) with `pwritev`.
    pub fn write_iobufs_at(&self, bufs: &IoBufs<'_>, offset: u64) -> Result<()> {
        let len = bufs.len();
        self.check_range(offset, len)?;
        self.begin_write()?;
        if len == 0 {
            return Ok(());
        }
        let lss = self.geo.logical_sector_size;
        if self.geo.has_parent && (!offset.is_multiple_of(lss) || !len.is_multiple_of(lss)) {
            // Copy-on-write works on whole sectors: merge partial sectors here.
            let start = offset / lss * lss;
            let end = (offset + len).div_ceil(lss) * lss;
            let mut tmp = vec![0u8; (end - start) as usize];
            self.read_at(&mut tmp, start)?;
            let at = (offset - start) as usize;
            bufs.read_at(0, &mut tmp[at..at + len as usize]);
            return self.write_iobufs_at(&IoBufs::from_slice(&tmp), start);
        }
        let bs = self.geo.block_size;
        let mut pos = 0u64;
        while pos < len {
            let v = offset + pos;
            let block = v / bs;
            let inb = v % bs;
            let n = (bs - inb).min(len - pos);
            let (block_off, set_bits) = self.block_for_write(block, inb == 0 && n == bs)?;
            let parts = bufs.sub(pos, n);
            let mut done = 0u64;
            while done < n {
                let at = block_off + inb + done;
                let w = self
                    .storage
                    .write_vectored_at(&parts.sub(done, n - done), at)
                    .map_err(self.io_err("writing data", at))?;
                if w == 0 {
                    return Err(Error::io(
                        &self.pstr,
                        "writing data",
                        at,
                        std::io::ErrorKind::WriteZero.into(),
                    ));
                }
                done += w as u64;
            }
            if set_bits {
                self.set_sector_bits(block, inb / lss, n / lss)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Takes `len` bytes of zeros at the end of the used space; returns where.
    ///
    /// When the file must grow it grows ahead of need (by an eighth of its
    /// length, between 1 MiB and [`GROW_AHEAD_MAX`]): one metadata change
    /// instead of one per block. Flushes grow it ahead too (see `journal.rs`);
    /// `close` gives the unused tail back.
    pub(crate) fn allocate(&self, st: &mut State, len: u64) -> Result<u64> {
        let off = st.eof;
        st.eof += len;
        st.alloc_since_flush += len;
        if st.eof > st.file_len {
            let ahead = (st.file_len / 8).clamp(MIB, GROW_AHEAD_MAX) / MIB * MIB;
            let new_len = st.eof + ahead;
            self.storage
                .set_len(new_len)
                .map_err(|e| Error::io(&self.pstr, "extending the file", off, e))?;
            st.file_len = new_len;
        }
        Ok(off)
    }

    /// Makes sure at least `room` bytes of file lie past the used space.
    pub(crate) fn grow_ahead(&self, room: u64) -> Result<()> {
        let mut st = wlock(&self.state);
        let want = (st.eof + room).div_ceil(MIB) * MIB;
        if want > st.file_len {
            self.storage
                .set_len(want)
                .map_err(|e| Error::io(&self.pstr, "extending the file", st.file_len, e))?;
            st.file_len = want;
        }
        Ok(())
    }

    /// Cuts the space grown ahead of need off the end of the file (once the log
    /// is retired: log entries must not claim a larger file than there is).
    pub(crate) fn trim_growth(&self) -> Result<()> {
        let mut st = wlock(&self.state);
        if st.file_len > st.eof {
            let end = st.eof;
            self.storage
                .set_len(end)
                .map_err(|e| Error::io(&self.pstr, "trimming the file", end, e))?;
            self.storage
                .sync_data()
                .map_err(|e| Error::io(&self.pstr, "flushing the trimmed file", end, e))?;
            st.file_len = end;
        }
        Ok(())
    }

    pub(crate) fn set_bat(&self, st: &mut State, idx: usize, e: u64) {
        st.bat[idx] = e;
        st.dirty_bat.insert(idx / 512);
    }

    /// Finds or allocates the block a write goes to. Returns its file offset
    /// and whether the sector bitmap must record the written sectors.
    fn block_for_write(&self, block: u64, whole: bool) -> Result<(u64, bool)> {
        let idx = self.geo.payload_index(block);
        {
            let st = rlock(&self.state);
            let e = st.bat[idx];
            match bat::state(e) {
                bat::PAYLOAD_FULLY_PRESENT => return Ok((bat::offset(e), false)),
                bat::PAYLOAD_PARTIALLY_PRESENT => return Ok((bat::offset(e), true)),
                _ => {}
            }
        }
        let mut st = wlock(&self.state);
        let e = st.bat[idx];
        match bat::state(e) {
            bat::PAYLOAD_FULLY_PRESENT => return Ok((bat::offset(e), false)),
            bat::PAYLOAD_PARTIALLY_PRESENT => return Ok((bat::offset(e), true)),
            _ => {}
        }
        // New space at the end of the file reads as zeros, which is what a
        // NOT_PRESENT/ZERO block of a disk without parent holds: no log write is
        // needed until flush, when the BAT entry is logged after the data is durable.
        let off = self.allocate(&mut st, self.geo.block_size)?;
        let from_parent = self.parent.is_some() && bat::state(e) != bat::PAYLOAD_ZERO;
        if !from_parent || whole {
            self.set_bat(&mut st, idx, bat::entry(bat::PAYLOAD_FULLY_PRESENT, off));
            return Ok((off, false));
        }
        let chunk = block / self.geo.chunk_ratio;
        let sbi = self.geo.bitmap_index(chunk);
        if bat::state(st.bat[sbi]) != bat::SB_PRESENT {
            let sb = self.allocate(&mut st, SECTOR_BITMAP_SIZE)?;
            self.set_bat(&mut st, sbi, bat::entry(bat::SB_PRESENT, sb));
            st.bitmaps
                .insert(chunk, vec![0u8; SECTOR_BITMAP_SIZE as usize]);
            // The whole new bitmap block goes through the log with its BAT entry.
            for page in 0..(SECTOR_BITMAP_SIZE as usize / 4096) {
                st.dirty_bitmap.insert((chunk, page));
            }
        } else {
            self.load_bitmap(&mut st, chunk)?;
            // Stale bits of this block (from an earlier life) must not leak through.
            let spb = self.geo.sectors_per_block();
            let first = (block * spb) % SECTORS_PER_CHUNK;
            self.change_bits(&mut st, chunk, first, spb, false);
        }
        self.set_bat(
            &mut st,
            idx,
            bat::entry(bat::PAYLOAD_PARTIALLY_PRESENT, off),
        );
        Ok((off, true))
    }

    pub(crate) fn change_bits(
        &self,
        st: &mut State,
        chunk: u64,
        first: u64,
        count: u64,
        value: bool,
    ) {
        let Some(bm) = st.bitmaps.get_mut(&chunk) else {
            return;
        };
        let mut pages = Vec::new();
        let mut i = first;
        let end = first + count;
        while i < end {
            let byte = (i / 8) as usize;
            if i.is_multiple_of(8) && end - i >= 8 {
                let nv = if value { 0xff } else { 0 };
                if bm[byte] != nv {
                    bm[byte] = nv;
                    pages.push(byte / 4096);
                }
                i += 8;
                continue;
            }
            let old = bm[byte];
            if value {
                bm[byte] |= 1 << (i % 8);
            } else {
                bm[byte] &= !(1 << (i % 8));
            }
            if bm[byte] != old {
                pages.push(byte / 4096);
            }
            i += 1;
        }
        for p in pages {
            st.dirty_bitmap.insert((chunk, p));
        }
    }

    fn set_sector_bits(&self, block: u64, first_in_block: u64, count: u64) -> Result<()> {
        let chunk = block / self.geo.chunk_ratio;
        let spb = self.geo.sectors_per_block();
        let first = (block * spb) % SECTORS_PER_CHUNK + first_in_block;
        let mut st = wlock(&self.state);
        self.load_bitmap(&mut st, chunk)?;
        self.change_bits(&mut st, chunk, first, count, true);
        Ok(())
    }

    /// Reads as zeros from now on. Whole blocks are released (dynamic) or marked
    /// ZERO (differencing); partial blocks get zeros written where needed.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.begin_write()?;
        let bs = self.geo.block_size;
        let mut pos = 0u64;
        while pos < len {
            let v = offset + pos;
            let block = v / bs;
            let inb = v % bs;
            let n = (bs - inb).min(len - pos);
            let idx = self.geo.payload_index(block);
            let e = rlock(&self.state).bat[idx];
            let st_now = bat::state(e);
            let whole = inb == 0 && n == bs;
            if whole && !self.params.leave_blocks_allocated {
                self.release_block(block, self.parent.is_some())?;
            } else if st_now == bat::PAYLOAD_FULLY_PRESENT
                || st_now == bat::PAYLOAD_PARTIALLY_PRESENT
                || (self.parent.is_some() && st_now != bat::PAYLOAD_ZERO)
            {
                let zeros = vec![0u8; n.min(8 << 20) as usize];
                let mut done = 0;
                while done < n {
                    let k = (n - done).min(zeros.len() as u64);
                    self.write_at(&zeros[..k as usize], v + done)?;
                    done += k;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Releases whole blocks; partial ranges are ignored (discard is advisory).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        if self.params.leave_blocks_allocated {
            return Ok(());
        }
        self.begin_write()?;
        let bs = self.geo.block_size;
        let first = offset.div_ceil(bs);
        let end = (offset + len) / bs;
        let end = if offset + len == self.geo.virtual_size {
            self.geo.data_blocks
        } else {
            end
        };
        for block in first..end {
            self.release_block(block, self.parent.is_some())?;
        }
        Ok(())
    }

    /// Marks a block NOT_PRESENT (or ZERO when a parent would show through) and
    /// gives its space back to the filesystem.
    pub(crate) fn release_block(&self, block: u64, zero_state: bool) -> Result<()> {
        let idx = self.geo.payload_index(block);
        let mut st = wlock(&self.state);
        let e = st.bat[idx];
        let new_state = if zero_state {
            bat::PAYLOAD_ZERO
        } else {
            bat::PAYLOAD_NOT_PRESENT
        };
        if bat::state(e) == new_state {
            return Ok(());
        }
        if bat::state(e) == bat::PAYLOAD_PARTIALLY_PRESENT {
            let chunk = block / self.geo.chunk_ratio;
            self.load_bitmap(&mut st, chunk)?;
            let spb = self.geo.sectors_per_block();
            self.change_bits(
                &mut st,
                chunk,
                (block * spb) % SECTORS_PER_CHUNK,
                spb,
                false,
            );
        }
        self.set_bat(&mut st, idx, bat::entry(new_state, 0));
        if matches!(
            bat::state(e),
            bat::PAYLOAD_FULLY_PRESENT | bat::PAYLOAD_PARTIALLY_PRESENT
        ) {
            // Zeroed space stays referenced by the on-disk BAT until the next
            // flush; reading zeros from it is what discard allows.
            let _ = self.storage.punch_hole(bat::offset(e), self.geo.block_size);
        }
        Ok(())
    }

    /// Whether a whole block reads as zeros (checked by reading it).
    pub(crate) fn block_is_zero(&self, block: u64, buf: &mut [u8]) -> Result<bool> {
        let bs = self.geo.block_size;
        let start = block * bs;
        let len = bs.min(self.geo.virtual_size - start);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            self.read_at(&mut buf[..n], start + done)?;
            if !is_zero(&buf[..n]) {
                return Ok(false);
            }
            done += n as u64;
        }
        Ok(true)
    }
}
