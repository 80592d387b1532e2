//! Recovery history: the replica keeps older points as *undo* data.
//!
//! The images are updated in place to the newest point. Before a commit applies the
//! segments of a new point `C`, every range those segments will write is read from the
//! images (still at the previous point `P`) and written to an undo file per disk,
//! `history/C.disk-N.undo`, in the segment format (so [`SegmentReader`] verifies it:
//! per-record checksums, trailer, whole-file checksum). The undo file of `C` turns
//! the bytes of `C` back into those of `P` on every range the transition touched;
//! elsewhere `C` and `P` are equal. A kept point `K` is therefore rebuilt from the
//! newest images by applying the undo files of every newer point, newest first.
//!
//! Every undo record writes absolute bytes, so applying the chain again after a crash
//! in the middle gives the same result (a byte ends at the value of the oldest undo
//! file that covers it, or untouched where none does).

use std::fs::File;
use std::io::{self, BufReader, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use crate::apply::Image;
use crate::error::SegmentError;
use crate::format::{
    Header, RecordHeader, RecordKind, TrailerFields, HEADER_LEN, RECORD_HEADER_LEN,
};
use crate::segment::{SegmentReader, Trailer};

/// The most points a replica keeps (Hyper-V: 24 hourly ones and the latest).
pub const MAX_HISTORY: u32 = 64;

/// Bytes read from an image per undo record.
const UNDO_CHUNK: u64 = 4 << 20;

/// One kept recovery point, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointInfo {
    /// The point's id: the cut id every disk is at.
    pub cut_id: u64,
    /// Per disk, the segment that ends at the cut.
    pub seqs: Vec<u64>,
    /// When the replica committed it (seconds since the Unix epoch; 0: not known).
    pub time_s: u64,
    /// Bytes its segments changed since the previous point.
    pub changed_bytes: u64,
    /// Bytes of undo data kept to go back from it to the previous kept point (0 for the
    /// oldest kept one).
    pub undo_bytes: u64,
    /// Points thinned out into this one, oldest first: their undo files are part of
    /// its undo data (each holds ranges none of the others does).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub folded: Vec<u64>,
}

impl PointInfo {
    /// The cut ids whose undo files lead from this point back to the one before it.
    pub fn undo_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.folded
            .iter()
            .copied()
            .chain(std::iter::once(self.cut_id))
    }
}

/// The name of point `cut_id`'s undo file of disk `disk`.
pub fn undo_file_name(cut_id: u64, disk: usize) -> String {
    format!("{cut_id:020}.disk-{disk}.undo")
}

/// The cut id an undo file (or its unfinished `.part`) belongs to.
pub fn parse_undo_file_name(name: &str) -> Option<u64> {
    let (cut, rest) = name.split_once('.')?;
    if cut.len() != 20 || !rest.starts_with("disk-") {
        return None;
    }
    cut.parse().ok()
}

/// Sorted, merged `(offset, len)` ranges.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|&(_, len)| len > 0);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (off, len) in ranges {
        match out.last_mut() {
            Some((o, l)) if off <= *o + *l => *l = (*l).max(off + len - *o),
            _ => out.push((off, len)),
        }
    }
    out
}

/// Every range the records of `segment` write.
pub fn ranges_of(segment: &mut File) -> Result<Vec<(u64, u64)>, SegmentError> {
    segment.seek(SeekFrom::Start(0))?;
    let mut reader = SegmentReader::new(BufReader::new(&mut *segment))?;
    let mut buf = Vec::new();
    let mut ranges = Vec::new();
    while let Some(rec) = reader.next_record(&mut buf)? {
        ranges.push((rec.offset, rec.len));
    }
    Ok(ranges)
}

/// Writes one complete segment to a file: header, records, trailer.
struct SegmentWriter<'a> {
    file: &'a File,
    end: u64,
    crc: u32,
    records: u64,
    data_bytes: u64,
    covered_bytes: u64,
}

impl<'a> SegmentWriter<'a> {
    fn new(file: &'a File, disk_size: u64) -> io::Result<Self> {
        let h = Header { seq: 1, disk_size }.encode();
        file.write_all_at(&h, 0)?;
        Ok(Self {
            file,
            end: HEADER_LEN as u64,
            crc: crc32c::crc32c(&h),
            records: 0,
            data_bytes: 0,
            covered_bytes: 0,
        })
    }

    fn record(&mut self, kind: RecordKind, offset: u64, len: u64, data: &[u8]) -> io::Result<()> {
        let h = RecordHeader {
            kind,
            offset,
            len,
            data_crc: if kind == RecordKind::Data {
                crc32c::crc32c(data)
            } else {
                0
            },
        }
        .encode();
        self.file.write_all_at(&h, self.end)?;
        self.file
            .write_all_at(data, self.end + RECORD_HEADER_LEN as u64)?;
        self.end += (RECORD_HEADER_LEN + data.len()) as u64;
        self.crc = crc32c::crc32c_append(crc32c::crc32c_append(self.crc, &h), data);
        self.records += 1;
        self.data_bytes += data.len() as u64;
        self.covered_bytes += len;
        Ok(())
    }

    /// Writes the trailer; the file's length.
    fn finish(self, cut_id: u64) -> io::Result<u64> {
        let t = TrailerFields {
            seq: 1,
            cut_id,
            records: self.records,
            data_bytes: self.data_bytes,
            covered_bytes: self.covered_bytes,
            body_crc: self.crc,
        }
        .encode();
        self.file.write_all_at(&t, self.end)?;
        Ok(self.end + t.len() as u64)
    }
}

/// Writes to `out` the bytes `image` holds now over `ranges` (merged), as the undo
/// file of point `cut_id`; an all-zero chunk is a zeroes record. Returns its length.
pub fn capture_undo(
    image: &File,
    disk_size: u64,
    ranges: &[(u64, u64)],
    out: &File,
    cut_id: u64,
) -> io::Result<u64> {
    let mut w = SegmentWriter::new(out, disk_size)?;
    let mut buf = Vec::new();
    for &(offset, len) in ranges {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(UNDO_CHUNK);
            buf.resize(n as usize, 0);
            image.read_exact_at(&mut buf, offset + done)?;
            if buf.iter().all(|&b| b == 0) {
                w.record(RecordKind::Zeroes, offset + done, n, &[])?;
            } else {
                w.record(RecordKind::Data, offset + done, n, &buf)?;
            }
            done += n;
        }
    }
    w.finish(cut_id)
}

/// The name of the file listing the ranges point `cut_id`'s undo data covers on disk
/// `disk` (with the points folded into it): what the next fold subtracts.
pub fn covered_file_name(cut_id: u64, disk: usize) -> String {
    format!("{cut_id:020}.disk-{disk}.covered")
}

const COVERED_MAGIC: &[u8; 8] = b"VRCOVER1";

/// Encodes sorted, merged ranges: magic, count, `(offset, len)` pairs (little
/// endian), CRC-32C of all that.
pub fn encode_ranges(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + ranges.len() * 16);
    b.extend_from_slice(COVERED_MAGIC);
    b.extend_from_slice(&(ranges.len() as u64).to_le_bytes());
    for &(off, len) in ranges {
        b.extend_from_slice(&off.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes [`encode_ranges`]'s bytes; `None` for anything else (torn, damaged).
pub fn decode_ranges(b: &[u8]) -> Option<Vec<(u64, u64)>> {
    let (body, crc) = b.split_at_checked(b.len().checked_sub(4)?)?;
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return None;
    }
    let rest = body.strip_prefix(COVERED_MAGIC)?;
    let (count, pairs) = rest.split_at_checked(8)?;
    let count = u64::from_le_bytes(count.try_into().ok()?);
    if pairs.len() as u64 != count.checked_mul(16)? {
        return None;
    }
    Some(
        pairs
            .chunks_exact(16)
            .filter_map(|p| {
                let off = u64::from_le_bytes(p[..8].try_into().ok()?);
                let len = u64::from_le_bytes(p[8..].try_into().ok()?);
                Some((off, len))
            })
            .collect(),
    )
}

/// The parts of `ranges` that `minus` does not cover (both sorted and merged).
pub fn subtract_ranges(ranges: &[(u64, u64)], minus: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(off, len) in ranges {
        let (mut at, end) = (off, off + len);
        for &(m_off, m_len) in minus {
            let m_end = m_off + m_len;
            if m_end <= at {
                continue;
            }
            if m_off >= end {
                break;
            }
            if m_off > at {
                out.push((at, m_off - at));
            }
            at = at.max(m_end);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push((at, end - at));
        }
    }
    out
}

/// Verifies the undo file `undo` to its trailer, then writes its bytes to `image`
/// (not synced: the caller syncs once after the chain).
pub fn apply_undo<I: Image>(image: &I, undo: &mut File) -> Result<Trailer, SegmentError> {
    undo.seek(SeekFrom::Start(0))?;
    let trailer = SegmentReader::new(BufReader::new(&mut *undo))?.verify_all()?;
    undo.seek(SeekFrom::Start(0))?;
    let mut reader = SegmentReader::new(BufReader::new(&mut *undo))?;
    let mut buf = Vec::new();
    while let Some(rec) = reader.next_record(&mut buf)? {
        match rec.kind {
            RecordKind::Data => image.write_at(&buf, rec.offset)?,
            RecordKind::Zeroes => image.write_zeroes(rec.offset, rec.len)?,
        }
    }
    Ok(trailer)
}

/// Copies `from` into `to` (both from their start; `to` gets `from`'s length).
pub fn copy_image(from: &File, to: &mut File) -> io::Result<()> {
    let mut src = from.try_clone()?;
    src.seek(SeekFrom::Start(0))?;
    to.set_len(0)?;
    to.seek(SeekFrom::Start(0))?;
    io::copy(&mut src, to)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covered_ranges_round_trip_and_damage_is_refused() {
        let r = vec![(0, 4096), (1 << 40, 512)];
        let b = encode_ranges(&r);
        assert_eq!(decode_ranges(&b), Some(r));
        assert_eq!(decode_ranges(&encode_ranges(&[])), Some(vec![]));
        for cut in 0..b.len() {
            assert_eq!(decode_ranges(&b[..cut]), None, "torn at {cut}");
        }
        let mut bad = b.clone();
        bad[12] ^= 1;
        assert_eq!(decode_ranges(&bad), None);
    }

    #[test]
    fn subtracting_leaves_exactly_the_uncovered_parts() {
        let r = [(0, 100), (200, 50), (300, 10)];
        let m = [(10, 20), (90, 120), (305, 100)];
        assert_eq!(
            subtract_ranges(&r, &m),
            [(0, 10), (30, 60), (210, 40), (300, 5)]
        );
        assert_eq!(subtract_ranges(&r, &[]), r);
        assert_eq!(subtract_ranges(&r, &[(0, 1000)]), []);
    }

    #[test]
    fn ranges_merge_overlapping_and_touching_ones_only() {
        assert_eq!(
            merge_ranges(vec![
                (4096, 512),
                (0, 512),
                (512, 512),
                (300, 10),
                (8192, 0)
            ]),
            vec![(0, 1024), (4096, 512)]
        );
        assert_eq!(
            parse_undo_file_name(&undo_file_name(7, 3)),
            Some(7),
            "round trip"
        );
        assert_eq!(parse_undo_file_name("vm.state"), None);
    }
}
