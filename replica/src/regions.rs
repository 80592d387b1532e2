//! The region bitmap a change log degrades to when it outgrows its budget: one bit per
//! [`REGION`] of the disk, set once the guest changed a byte of it since the replica's
//! last applied segment. It carries no data: a catch-up reads the set regions' current
//! contents from the disk (docs/replica.md, "The log's budget").
//!
//! File format (all integers little endian): a 64-byte header — magic `VIREORGN`,
//! version 1, flags (bit 0: [`RegionMap::restarted`]), the disk's size, the region
//! size, the cut id the log had reached, CRC-32C of bytes 0..60 at 60 — then one bit
//! per region (region *i*: byte *i*/8, bit *i*%8). A live map's bits are set in place
//! (one `pwrite` of the changed bytes before the disk write they describe); the header
//! is written whole.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;

use crate::error::LogError;

/// The bytes one bit stands for (the resync's hash block: a catch-up may compare them).
pub const REGION: u64 = crate::resync::HASH_BLOCK;
/// The live map of a log (active once the log is degraded; a zero spare until then).
pub const DEGRADED_MAP: &str = "regions.map";
/// The frozen map a catch-up sends from (the log restarted beside it).
pub const CATCH_UP_MAP: &str = "regions.catchup";

const MAGIC: &[u8; 8] = b"VIREORGN";
const VERSION: u32 = 1;
pub(crate) const MAP_HEADER_LEN: usize = 64;
const FLAG_RESTARTED: u32 = 1;
const FLAG_ACTIVE: u32 = 2;

/// The set of changed regions of one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionMap {
    disk_size: u64,
    /// The newest cut id the log had sealed when the map was made.
    pub last_cut_id: u64,
    /// A catch-up map: the log's old segments are gone and it started again beside it.
    pub restarted: bool,
    /// A live map in use: the log passed its budget (a live map that is not active
    /// is the spare the log keeps open, all zeros, so that degrading on the guest's
    /// write path needs no new file).
    pub active: bool,
    bits: Vec<u8>,
}

impl RegionMap {
    /// An empty map of a disk of `disk_size` bytes.
    pub fn new(disk_size: u64, last_cut_id: u64) -> Self {
        let regions = disk_size.div_ceil(REGION);
        RegionMap {
            disk_size,
            last_cut_id,
            restarted: false,
            active: false,
            bits: vec![0; regions.div_ceil(8) as usize],
        }
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Marks the regions `offset..offset+len` touches (clipped to the disk). Returns
    /// the byte range of the bitmap that changed, if any.
    pub fn mark(&mut self, offset: u64, len: u64) -> Option<(usize, usize)> {
        if len == 0 || offset >= self.disk_size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.disk_size);
        let (first, last) = (offset / REGION, (end - 1) / REGION);
        let mut changed: Option<(usize, usize)> = None;
        for r in first..=last {
            let (byte, bit) = ((r / 8) as usize, (r % 8) as u8);
            if self.bits[byte] & (1 << bit) == 0 {
                self.bits[byte] |= 1 << bit;
                changed = Some(changed.map_or((byte, byte), |(a, _)| (a, byte)));
            }
        }
        changed
    }

    /// Whether region `r` is marked.
    pub fn is_set(&self, r: u64) -> bool {
        self.bits
            .get((r / 8) as usize)
            .is_some_and(|b| b & (1 << (r % 8)) != 0)
    }

    /// Adds every region `other` marks (a map of the same disk).
    pub fn merge(&mut self, other: &RegionMap) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
        self.last_cut_id = self.last_cut_id.max(other.last_cut_id);
    }

    /// Marked regions.
    pub fn regions(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Bytes of the disk the marked regions cover (the last one may be short).
    pub fn dirty_bytes(&self) -> u64 {
        self.runs(u64::MAX).iter().map(|r| r.1).sum()
    }

    /// The marked bytes as (offset, length) runs of adjacent regions, each at most
    /// `max` bytes (rounded up to a region), in order, clipped to the disk.
    pub fn runs(&self, max: u64) -> Vec<(u64, u64)> {
        let max = max.max(REGION);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in 0..self.disk_size.div_ceil(REGION) {
            if !self.is_set(r) {
                continue;
            }
            let at = r * REGION;
            let n = (self.disk_size - at).min(REGION);
            match out.last_mut() {
                Some((o, l)) if *o + *l == at && *l + n <= max => *l += n,
                _ => out.push((at, n)),
            }
        }
        out
    }

    fn header(&self) -> [u8; MAP_HEADER_LEN] {
        let mut h = [0u8; MAP_HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if self.restarted { FLAG_RESTARTED } else { 0 }
            | if self.active { FLAG_ACTIVE } else { 0 };
        h[12..16].copy_from_slice(&flags.to_le_bytes());
        h[16..24].copy_from_slice(&self.disk_size.to_le_bytes());
        h[24..32].copy_from_slice(&REGION.to_le_bytes());
        h[32..40].copy_from_slice(&self.last_cut_id.to_le_bytes());
        let crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.header().to_vec();
        b.extend_from_slice(&self.bits);
        b
    }

    /// Parses a map file: a bad magic, version, checksum, region size or length is an
    /// error (one line).
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let h = b
            .get(..MAP_HEADER_LEN)
            .ok_or_else(|| format!("{} bytes: shorter than its header", b.len()))?;
        let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let u64_at = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&h[at..at + 8]);
            u64::from_le_bytes(x)
        };
        if &h[0..8] != MAGIC {
            return Err("not a region map (bad magic)".into());
        }
        if crc32c::crc32c(&h[..60]) != u32_at(60) {
            return Err("header checksum mismatch".into());
        }
        if u32_at(8) != VERSION {
            return Err(format!("version {}, this build reads {VERSION}", u32_at(8)));
        }
        if u64_at(24) != REGION {
            return Err(format!(
                "regions of {} bytes, this build uses {REGION}",
                u64_at(24)
            ));
        }
        let mut map = RegionMap::new(u64_at(16), u64_at(32));
        map.restarted = u32_at(12) & FLAG_RESTARTED != 0;
        map.active = u32_at(12) & FLAG_ACTIVE != 0;
        let body = &b[MAP_HEADER_LEN..];
        if body.len() != map.bits.len() {
            return Err(format!(
                "{} bytes of bits for a disk of {} bytes ({} expected)",
                body.len(),
                map.disk_size,
                map.bits.len()
            ));
        }
        map.bits.copy_from_slice(body);
        Ok(map)
    }

    /// Reads map `name` in `dir` (`None`: there is none); `label` names the log.
    pub fn load(dir: BorrowedFd<'_>, label: &str, name: &str) -> Result<Option<Self>, LogError> {
        let file = format!("{label}/{name}");
        let f = match confine::open_file_at(dir, OsStr::new(name)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(LogError::Io { file, source }),
        };
        let mut b = Vec::new();
        io::Read::read_to_end(&mut &f, &mut b).map_err(|source| LogError::Io {
            file: file.clone(),
            source,
        })?;
        Self::decode(&b)
            .map(Some)
            .map_err(|reason| LogError::Corrupt { file, reason })
    }

    /// Writes the map as `name` in `dir` atomically and durably (a temporary file
    /// fsynced, renamed over it, the directory synced).
    pub fn store(&self, dir: BorrowedFd<'_>, label: &str, name: &str) -> Result<(), LogError> {
        confine::write_private_atomic(dir, OsStr::new(name), &self.encode())
            .and_then(|()| crate::log::sync_dir(dir))
            .map_err(|source| LogError::Io {
                file: format!("{label}/{name}"),
                source,
            })
    }

    /// Writes bitmap bytes `range` (from [`Self::mark`]) into the map's file.
    pub(crate) fn write_bits(&self, file: &File, range: (usize, usize)) -> io::Result<()> {
        file.write_all_at(
            &self.bits[range.0..=range.1],
            (MAP_HEADER_LEN + range.0) as u64,
        )
    }

    /// Rewrites the map's header in its file (a flag or the cut id changed).
    pub(crate) fn write_header(&self, file: &File) -> io::Result<()> {
        file.write_all_at(&self.header(), 0)
    }

    /// Rewrites the whole map in its file and makes it durable.
    pub(crate) fn write_all(&self, file: &File) -> io::Result<()> {
        file.write_all_at(&self.encode(), 0)?;
        file.sync_data()
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.bits.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_and_runs_merge_adjacent_regions_clipped_to_the_disk() {
        let size = 10 * REGION + 4096;
        let mut m = RegionMap::new(size, 7);
        assert_eq!(m.mark(0, 1), Some((0, 0)));
        assert_eq!(m.mark(100, 10), None, "already marked");
        // Spans regions 1..=3 and 8..=10 (the short last one).
        assert!(m.mark(REGION + 5, 2 * REGION).is_some());
        assert!(m.mark(8 * REGION, 2 * REGION + 10).is_some());
        assert_eq!(m.mark(size, 10), None, "beyond the disk");
        assert_eq!(m.regions(), 7);
        assert_eq!(
            m.runs(u64::MAX),
            vec![(0, 4 * REGION), (8 * REGION, 2 * REGION + 4096)]
        );
        assert_eq!(
            m.runs(2 * REGION)[..2],
            [(0, 2 * REGION), (2 * REGION, 2 * REGION)]
        );
        assert_eq!(m.dirty_bytes(), 6 * REGION + 4096);
        let back = RegionMap::decode(&m.encode()).unwrap();
        assert_eq!(back, m);
        let mut other = RegionMap::new(size, 9);
        other.mark(5 * REGION, 1);
        other.restarted = true;
        other.active = true;
        let again = RegionMap::decode(&other.encode()).unwrap();
        assert!(again.restarted && again.active);
        m.merge(&again);
        assert_eq!((m.regions(), m.last_cut_id), (8, 9));
    }

    #[test]
    fn a_damaged_or_foreign_map_is_refused_in_one_line() {
        let mut m = RegionMap::new(3 * REGION, 1);
        m.mark(REGION, 1);
        let good = m.encode();
        let mut bad = good.clone();
        bad[20] ^= 1;
        assert!(RegionMap::decode(&bad).unwrap_err().contains("checksum"));
        assert!(RegionMap::decode(&good[..good.len() - 1])
            .unwrap_err()
            .contains("bytes of bits"));
        assert!(RegionMap::decode(&good[..10]).is_err());
        let mut foreign = good.clone();
        foreign[0] = b'X';
        assert!(RegionMap::decode(&foreign).unwrap_err().contains("magic"));
    }
}
