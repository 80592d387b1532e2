//! The VHDX log (MS-VHDX 2.3): finding the active sequence and turning it into
//! replay operations, and building new log entries.

use crate::bytes::*;
use crate::error::{Error, Result};
use uuid::Uuid;

pub(crate) const SECTOR: usize = 4096;
/// Offsets below this (file identifier and headers) are never written through the log.
pub(crate) const MIN_LOGGABLE_OFFSET: u64 = 192 * KIB;
/// Largest log this engine reads into memory.
pub(crate) const MAX_LOG_LEN: u64 = 64 * MIB;
const DESCS_FIRST_SECTOR: usize = (SECTOR - 64) / 32;

/// One write the log asks to be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LogOp {
    Data { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
}

/// The replay plan of the active sequence.
#[derive(Debug, Clone)]
pub(crate) struct Replay {
    pub ops: Vec<LogOp>,
    #[allow(dead_code)]
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub entries: usize,
}

impl Replay {
    /// End of the last byte a data write of the log puts into the file.
    pub(crate) fn data_end(&self) -> u64 {
        self.ops
            .iter()
            .filter_map(|op| match op {
                LogOp::Data { offset, data } => Some(offset.saturating_add(data.len() as u64)),
                LogOp::Zero { .. } => None,
            })
            .max()
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone)]
struct EntryInfo {
    seq: u64,
    sectors: usize,
    tail: usize,
    flushed: u64,
    last: u64,
}

/// What a log scan cost, counted by the scanner so tests can bound it (a
/// hostile log must not make open checksum or copy more than a few times the
/// log region).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LogScanStats {
    /// Bytes run through CRC-32C.
    pub bytes_checksummed: u64,
    /// Bytes copied out of the log into replay operations.
    pub bytes_copied: u64,
}

/// The log region as a ring of 4 KiB sectors, with the work done on it
/// counted against a byte budget.
struct CircularLog<'a> {
    buf: &'a [u8],
    stats: LogScanStats,
    budget: u64,
}

/// Bytes a scan may checksum and copy, as a multiple of the log size. Entries
/// that pass the cheap checks never share a sector (each sector after an
/// entry's first starts with a descriptor or data signature, never `loge`),
/// so an honest scan checksums the log at most once and copies it at most
/// once; the budget only stops a bug from turning into minutes of work.
const BUDGET_LOG_MULTIPLE: u64 = 3;

impl CircularLog<'_> {
    fn new(buf: &[u8]) -> CircularLog<'_> {
        CircularLog {
            buf,
            stats: LogScanStats::default(),
            budget: BUDGET_LOG_MULTIPLE.saturating_mul(buf.len() as u64),
        }
    }
    fn sectors(&self) -> usize {
        self.buf.len() / SECTOR
    }
    /// Sector `k` of the entry starting at sector `start`, wrapping around.
    fn sector(&self, start: usize, k: usize) -> &[u8] {
        let s = (start + k) % self.sectors();
        &self.buf[s * SECTOR..(s + 1) * SECTOR]
    }
    /// The 32-byte descriptor `i` of the entry starting at `start`
    /// (descriptors never straddle a sector: 64 + 32 i is 32-byte aligned).
    fn descriptor(&self, start: usize, i: usize) -> &[u8] {
        let at = 64 + 32 * i;
        let o = at % SECTOR;
        &self.sector(start, at / SECTOR)[o..o + 32]
    }
    fn spend(&mut self, bytes: u64) -> bool {
        match self.budget.checked_sub(bytes) {
            Some(b) => {
                self.budget = b;
                true
            }
            None => false,
        }
    }
    /// CRC-32C of `sectors` sectors from `start`, the checksum field (bytes
    /// 4..8 of the first sector) read as zero. `None` when over budget.
    fn entry_crc(&mut self, start: usize, sectors: usize) -> Option<u32> {
        let bytes = (sectors * SECTOR) as u64;
        if !self.spend(bytes) {
            return None;
        }
        self.stats.bytes_checksummed += bytes;
        let first = self.sector(start, 0);
        let mut c = crc32c::crc32c(&first[..4]);
        c = crc32c::crc32c_append(c, &[0u8; 4]);
        c = crc32c::crc32c_append(c, &first[8..]);
        for k in 1..sectors {
            c = crc32c::crc32c_append(c, self.sector(start, k));
        }
        Some(c)
    }
}

/// Why a scan stopped: the budget ran out.
struct OverBudget;

/// Checks the entry that would start at sector `at`: every cheap check
/// (signature, GUID, sequence, length and tail against the log, descriptor
/// count against the length, each descriptor's signature and sequence, each
/// data sector's signature and sequence halves) before the CRC over its
/// sectors, which is the only step whose cost grows with the entry.
fn parse_entry(
    log: &mut CircularLog<'_>,
    at: usize,
    log_guid: &Uuid,
) -> std::result::Result<Option<EntryInfo>, OverBudget> {
    let n = log.sectors();
    let first = log.sector(at, 0);
    if &first[0..4] != b"loge" {
        return Ok(None);
    }
    let entry_len = le32(first, 8) as usize;
    let tail = le32(first, 12) as usize;
    let seq = le64(first, 16);
    let dc = le32(first, 24) as usize;
    let stored_crc = le32(first, 4);
    let flushed = le64(first, 48);
    let last = le64(first, 56);
    if guid(first, 32) != *log_guid || seq == 0 {
        return Ok(None);
    }
    if entry_len == 0 || !entry_len.is_multiple_of(SECTOR) || entry_len / SECTOR > n {
        return Ok(None);
    }
    if !tail.is_multiple_of(SECTOR) || tail / SECTOR >= n {
        return Ok(None);
    }
    let sectors = entry_len / SECTOR;
    // Descriptors fill the header sectors; every other sector is a data sector.
    let Some(hs) = dc
        .checked_mul(32)
        .and_then(|b| b.checked_add(64))
        .map(|b| b.div_ceil(SECTOR))
    else {
        return Ok(None);
    };
    if hs > sectors {
        return Ok(None);
    }
    let mut data_sectors = 0usize;
    for i in 0..dc {
        let d = log.descriptor(at, i);
        if le64(d, 24) != seq {
            return Ok(None);
        }
        match &d[0..4] {
            b"desc" => {
                if hs + data_sectors >= sectors {
                    return Ok(None);
                }
                let ds = log.sector(at, hs + data_sectors);
                if &ds[0..4] != b"data"
                    || u64::from(le32(ds, 4)) != seq >> 32
                    || u64::from(le32(ds, 4092)) != seq & 0xffff_ffff
                {
                    return Ok(None);
                }
                data_sectors += 1;
            }
            b"zero" => {}
            _ => return Ok(None),
        }
    }
    if hs + data_sectors != sectors {
        return Ok(None);
    }
    match log.entry_crc(at, sectors) {
        None => Err(OverBudget),
        Some(c) if c != stored_crc => Ok(None),
        Some(_) => Ok(Some(EntryInfo {
            seq,
            sectors,
            tail: tail / SECTOR,
            flushed,
            last,
        })),
    }
}

/// Finds the active sequence of a log image (`buf` = the whole log region) and
/// returns what to replay (`None` if the log holds no valid sequence), with
/// what the scan cost.
pub(crate) fn find_replay(
    path: &str,
    log_offset: u64,
    buf: &[u8],
    log_guid: &Uuid,
    file_len: u64,
) -> Result<(Option<Replay>, LogScanStats)> {
    let mut log = CircularLog::new(buf);
    let replay = scan(&mut log, path, log_offset, log_guid, file_len)?;
    Ok((replay, log.stats))
}

fn scan(
    log: &mut CircularLog<'_>,
    path: &str,
    log_offset: u64,
    log_guid: &Uuid,
    file_len: u64,
) -> Result<Option<Replay>> {
    let over_budget = || {
        Error::corrupt(
            path,
            "log",
            log_offset,
            "log scan exceeded its work budget (overlapping or repeated entries)",
        )
    };
    let n = log.sectors();
    let mut infos: Vec<Option<EntryInfo>> = Vec::with_capacity(n);
    for i in 0..n {
        infos.push(parse_entry(log, i, log_guid).map_err(|OverBudget| over_budget())?);
    }
    // Candidate heads: each valid entry whose tail walk reaches it through
    // consecutive sequence numbers. Bound the total walking work.
    let mut best: Option<(u64, Vec<usize>)> = None;
    let mut budget = 4 * n + 16;
    for h in 0..n {
        let Some(head) = &infos[h] else { continue };
        if best.as_ref().is_some_and(|(s, _)| *s >= head.seq) {
            continue;
        }
        let mut chain = Vec::new();
        let mut cur = head.tail;
        let mut expect: Option<u64> = None;
        let ok = loop {
            if budget == 0 {
                return Err(Error::corrupt(
                    path,
                    "log",
                    log_offset,
                    "log entries form too many overlapping sequences",
                ));
            }
            budget -= 1;
            let Some(e) = &infos[cur] else { break false };
            if let Some(x) = expect {
                if e.seq != x {
                    break false;
                }
            }
            chain.push(cur);
            if cur == h {
                break e.seq == head.seq;
            }
            if chain.len() > n {
                break false;
            }
            expect = e.seq.checked_add(1);
            cur = (cur + e.sectors) % n;
        };
        if ok {
            best = Some((head.seq, chain));
        }
    }
    let Some((_, chain)) = best else {
        return Ok(None);
    };
    let mut ops = Vec::new();
    let mut flushed = 0;
    let mut last = 0;
    for &at in &chain {
        let Some(info) = &infos[at] else { continue };
        let dc = le32(log.sector(at, 0), 24) as usize;
        let hs = (64 + 32 * dc).div_ceil(SECTOR);
        let mut ds = hs;
        for i in 0..dc {
            let d = log.descriptor(at, i);
            let file_offset = le64(d, 16);
            let bad = |r: String| {
                Error::corrupt(path, "log descriptor", log_offset + (at * SECTOR) as u64, r)
            };
            if !file_offset.is_multiple_of(SECTOR as u64) || file_offset < MIN_LOGGABLE_OFFSET {
                return Err(bad(format!(
                    "target offset {file_offset} is unaligned or inside the header area"
                )));
            }
            if &d[0..4] == b"desc" {
                let mut data = vec![0u8; SECTOR];
                data[0..8].copy_from_slice(&d[8..16]);
                data[4092..4096].copy_from_slice(&d[4..8]);
                data[8..4092].copy_from_slice(&log.sector(at, ds)[8..4092]);
                if !log.spend(SECTOR as u64) {
                    return Err(over_budget());
                }
                log.stats.bytes_copied += SECTOR as u64;
                ops.push(LogOp::Data {
                    offset: file_offset,
                    data,
                });
                ds += 1;
            } else {
                let len = le64(d, 8);
                if !len.is_multiple_of(SECTOR as u64) {
                    return Err(bad(format!("zero length {len} is not a multiple of 4 KiB")));
                }
                ops.push(LogOp::Zero {
                    offset: file_offset,
                    len,
                });
            }
        }
        flushed = info.flushed;
        last = info.last;
    }
    let at = log_offset + (chain[chain.len() - 1] * SECTOR) as u64;
    if flushed > file_len {
        return Err(Error::corrupt(
            path,
            "log entry",
            at,
            format!("flushed file offset {flushed} is beyond the end of the file ({file_len}): the file was truncated"),
        ));
    }
    if last < flushed || last > crate::metadata::MAX_VIRTUAL_SIZE * 2 {
        return Err(Error::corrupt(
            path,
            "log entry",
            at,
            format!("last file offset {last} is implausible"),
        ));
    }
    let limit = last.max(file_len);
    for op in &ops {
        let end = match op {
            LogOp::Data { offset, .. } => offset.saturating_add(SECTOR as u64),
            LogOp::Zero { offset, len } => offset.saturating_add(*len),
        };
        if end > limit {
            return Err(Error::corrupt(
                path,
                "log descriptor",
                at,
                format!("write ending at {end} is beyond the file size the log claims ({limit})"),
            ));
        }
    }
    Ok(Some(Replay {
        ops,
        flushed_file_offset: flushed,
        last_file_offset: last,
        entries: chain.len(),
    }))
}

/// How many 4 KiB pages fit in one entry of a log of `log_len` bytes.
pub(crate) fn max_pages_per_entry(log_len: u64) -> usize {
    let sectors = (log_len / SECTOR as u64) as usize;
    // k pages need ceil((64 + 32k)/4096) + k sectors.
    let mut k = sectors.saturating_sub(1);
    while k > 0 && (64 + 32 * k).div_ceil(SECTOR) + k > sectors {
        k -= 1;
    }
    k
}

/// Sectors of a log entry holding `pages` data pages (and no zero descriptors).
pub(crate) fn entry_sectors(pages: usize) -> usize {
    (64 + 32 * pages).div_ceil(SECTOR) + pages
}

/// Builds one log entry writing `pages` (each 4 KiB at a 4 KiB-aligned file offset).
pub(crate) fn build_entry(
    seq: u64,
    log_guid: &Uuid,
    tail: u32,
    pages: &[(u64, &[u8])],
    zeros: &[(u64, u64)],
    flushed: u64,
    last: u64,
) -> Vec<u8> {
    let dc = pages.len() + zeros.len();
    let hs = (64 + 32 * dc).div_ceil(SECTOR);
    let total = (hs + pages.len()) * SECTOR;
    let mut b = vec![0u8; total];
    b[0..4].copy_from_slice(b"loge");
    put32(&mut b, 8, total as u32);
    put32(&mut b, 12, tail);
    put64(&mut b, 16, seq);
    put32(&mut b, 24, dc as u32);
    put_guid(&mut b, 32, log_guid);
    put64(&mut b, 48, flushed);
    put64(&mut b, 56, last);
    let _ = DESCS_FIRST_SECTOR;
    let mut d = 64;
    for (i, (off, data)) in pages.iter().enumerate() {
        b[d..d + 4].copy_from_slice(b"desc");
        b[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
        b[d + 8..d + 16].copy_from_slice(&data[0..8]);
        put64(&mut b, d + 16, *off);
        put64(&mut b, d + 24, seq);
        d += 32;
        let s = (hs + i) * SECTOR;
        b[s..s + 4].copy_from_slice(b"data");
        put32(&mut b, s + 4, (seq >> 32) as u32);
        b[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        put32(&mut b, s + 4092, (seq & 0xffff_ffff) as u32);
    }
    for (off, len) in zeros {
        b[d..d + 4].copy_from_slice(b"zero");
        put64(&mut b, d + 8, *len);
        put64(&mut b, d + 16, *off);
        put64(&mut b, d + 24, seq);
        d += 32;
    }
    let c = crc32c::crc32c(&b);
    put32(&mut b, 4, c);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_roundtrip() {
        let g = Uuid::new_v4();
        let page: Vec<u8> = (0..4096).map(|i| (i * 7 % 251) as u8).collect();
        let e = build_entry(
            9,
            &g,
            0,
            &[(3 << 20, &page)],
            &[(5 << 20, 8192)],
            8 << 20,
            8 << 20,
        );
        let mut log = vec![0u8; 1 << 20];
        log[..e.len()].copy_from_slice(&e);
        let r = find_replay("x", 1 << 20, &log, &g, 8 << 20)
            .unwrap()
            .0
            .unwrap();
        assert_eq!(r.ops.len(), 2);
        assert_eq!(
            r.ops[0],
            LogOp::Data {
                offset: 3 << 20,
                data: page
            }
        );
        assert_eq!(
            r.ops[1],
            LogOp::Zero {
                offset: 5 << 20,
                len: 8192
            }
        );
        // A different log GUID means no active log.
        assert!(find_replay("x", 1 << 20, &log, &Uuid::new_v4(), 8 << 20)
            .unwrap()
            .0
            .is_none());
        // A flipped byte invalidates the entry.
        log[5000] ^= 1;
        assert!(find_replay("x", 1 << 20, &log, &g, 8 << 20)
            .unwrap()
            .0
            .is_none());
    }

    #[test]
    fn sequence_picks_highest_and_replays_from_tail() {
        let g = Uuid::new_v4();
        let p1 = vec![1u8; 4096];
        let p2 = vec![2u8; 4096];
        let e1 = build_entry(10, &g, 0, &[(4 << 20, &p1)], &[], 8 << 20, 8 << 20);
        let e2 = build_entry(11, &g, 0, &[(4 << 20, &p2)], &[], 8 << 20, 8 << 20);
        let mut log = vec![0u8; 1 << 20];
        log[..e1.len()].copy_from_slice(&e1);
        log[e1.len()..e1.len() + e2.len()].copy_from_slice(&e2);
        let r = find_replay("x", 1 << 20, &log, &g, 8 << 20)
            .unwrap()
            .0
            .unwrap();
        assert_eq!(r.entries, 2);
        assert_eq!(
            r.ops[1],
            LogOp::Data {
                offset: 4 << 20,
                data: p2
            }
        );
        assert!(max_pages_per_entry(1 << 20) >= 250);
    }

    #[test]
    fn descriptor_count_lying_about_data_sectors_is_invalid() {
        let g = Uuid::new_v4();
        let page = vec![5u8; 4096];
        let mut e = build_entry(4, &g, 0, &[(3 << 20, &page)], &[], 8 << 20, 8 << 20);
        // Claim the entry is only one sector long: the data sector is missing.
        put32(&mut e, 8, 4096);
        let c = crc_with_zero_field(&e[..4096], 4);
        put32(&mut e, 4, c);
        let mut log = vec![0u8; 1 << 20];
        log[..4096].copy_from_slice(&e[..4096]);
        assert!(find_replay("x", 1 << 20, &log, &g, 8 << 20)
            .unwrap()
            .0
            .is_none());
    }
}
