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

#[derive(Debug, Clone)]
struct EntryInfo {
    seq: u64,
    sectors: usize,
    tail: usize,
    flushed: u64,
    last: u64,
}

struct CircularLog<'a> {
    buf: &'a [u8],
}

impl CircularLog<'_> {
    fn sectors(&self) -> usize {
        self.buf.len() / SECTOR
    }
    /// Copies `count` sectors starting at sector `start`, wrapping around.
    fn read(&self, start: usize, count: usize) -> Vec<u8> {
        let n = self.sectors();
        let mut out = Vec::with_capacity(count * SECTOR);
        for k in 0..count {
            let s = (start + k) % n;
            out.extend_from_slice(&self.buf[s * SECTOR..(s + 1) * SECTOR]);
        }
        out
    }
}

fn parse_entry(log: &CircularLog<'_>, at: usize, log_guid: &Uuid) -> Option<EntryInfo> {
    let n = log.sectors();
    let first = &log.buf[at * SECTOR..(at + 1) * SECTOR];
    if &first[0..4] != b"loge" {
        return None;
    }
    let entry_len = le32(first, 8) as usize;
    let tail = le32(first, 12) as usize;
    let seq = le64(first, 16);
    let dc = le32(first, 24) as usize;
    if guid(first, 32) != *log_guid {
        return None;
    }
    if entry_len == 0 || !entry_len.is_multiple_of(SECTOR) || entry_len / SECTOR > n {
        return None;
    }
    if !tail.is_multiple_of(SECTOR) || tail / SECTOR >= n || seq == 0 {
        return None;
    }
    let sectors = entry_len / SECTOR;
    let hs = (64 + 32 * dc).div_ceil(SECTOR);
    if hs > sectors {
        return None;
    }
    let whole = log.read(at, sectors);
    if crc_with_zero_field(&whole, 4) != le32(first, 4) {
        return None;
    }
    let flushed = le64(first, 48);
    let last = le64(first, 56);
    // Descriptors: data descriptors must match the data sectors one to one.
    let mut data_sectors = 0usize;
    for i in 0..dc {
        let d = &whole[64 + 32 * i..96 + 32 * i];
        let dseq = le64(d, 24);
        if dseq != seq {
            return None;
        }
        match &d[0..4] {
            b"desc" => {
                if hs + data_sectors >= sectors {
                    return None;
                }
                let ds = &whole[(hs + data_sectors) * SECTOR..(hs + data_sectors + 1) * SECTOR];
                if &ds[0..4] != b"data"
                    || u64::from(le32(ds, 4)) != seq >> 32
                    || u64::from(le32(ds, 4092)) != seq & 0xffff_ffff
                {
                    return None;
                }
                data_sectors += 1;
            }
            b"zero" => {}
            _ => return None,
        }
    }
    if hs + data_sectors != sectors {
        return None;
    }
    Some(EntryInfo {
        seq,
        sectors,
        tail: tail / SECTOR,
        flushed,
        last,
    })
}

/// Finds the active sequence of a log image (`buf` = the whole log region) and
/// returns what to replay, or `None` if the log holds no valid sequence.
pub(crate) fn find_replay(
    path: &str,
    log_offset: u64,
    buf: &[u8],
    log_guid: &Uuid,
    file_len: u64,
) -> Result<Option<Replay>> {
    let log = CircularLog { buf };
    let n = log.sectors();
    let mut infos: Vec<Option<EntryInfo>> = Vec::with_capacity(n);
    for i in 0..n {
        infos.push(parse_entry(&log, i, log_guid));
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
            expect = Some(e.seq + 1);
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
        let whole = log.read(at, info.sectors);
        let dc = le32(&whole, 24) as usize;
        let hs = (64 + 32 * dc).div_ceil(SECTOR);
        let mut ds = hs;
        for i in 0..dc {
            let d = &whole[64 + 32 * i..96 + 32 * i];
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
                let sec = &whole[ds * SECTOR..(ds + 1) * SECTOR];
                let mut data = vec![0u8; SECTOR];
                data[0..8].copy_from_slice(&d[8..16]);
                data[8..4092].copy_from_slice(&sec[8..4092]);
                data[4092..4096].copy_from_slice(&d[4..8]);
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
            LogOp::Data { offset, .. } => offset + SECTOR as u64,
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
            .is_none());
        // A flipped byte invalidates the entry.
        log[5000] ^= 1;
        assert!(find_replay("x", 1 << 20, &log, &g, 8 << 20)
            .unwrap()
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
            .is_none());
    }
}
