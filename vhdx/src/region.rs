//! The region table (two copies): which regions exist and where.

use crate::bytes::*;
use crate::error::{Error, Result};
use uuid::{uuid, Uuid};

pub(crate) const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub(crate) const REGION_TABLE_SIZE: usize = 64 * 1024;
pub(crate) const BAT_GUID: Uuid = uuid!("2dc27766-f623-4200-9d64-115e9bfd4a08");
pub(crate) const METADATA_GUID: Uuid = uuid!("8b7ca206-4790-4b9a-b8fe-575f050f886e");
const MAX_ENTRIES: u32 = 2047;

/// One region entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionEntry {
    pub guid: Uuid,
    pub file_offset: u64,
    pub length: u32,
    pub required: bool,
}

/// A parsed region table.
#[derive(Debug, Clone)]
pub struct RegionTable {
    pub entries: Vec<RegionEntry>,
}

impl RegionTable {
    pub(crate) fn parse(b: &[u8]) -> std::result::Result<RegionTable, String> {
        if b.len() < REGION_TABLE_SIZE {
            return Err("truncated".into());
        }
        if &b[0..4] != b"regi" {
            return Err("bad signature".into());
        }
        let stored = le32(b, 4);
        let computed = crc_with_zero_field(&b[..REGION_TABLE_SIZE], 4);
        if stored != computed {
            return Err(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let count = le32(b, 8);
        if count > MAX_ENTRIES {
            return Err(format!("entry count {count} exceeds {MAX_ENTRIES}"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let o = 16 + i * 32;
            entries.push(RegionEntry {
                guid: guid(b, o),
                file_offset: le64(b, o + 16),
                length: le32(b, o + 24),
                required: le32(b, o + 28) & 1 != 0,
            });
        }
        Ok(RegionTable { entries })
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        b[0..4].copy_from_slice(b"regi");
        put32(&mut b, 8, self.entries.len() as u32);
        for (i, e) in self.entries.iter().enumerate() {
            let o = 16 + i * 32;
            put_guid(&mut b, o, &e.guid);
            put64(&mut b, o + 16, e.file_offset);
            put32(&mut b, o + 24, e.length);
            put32(&mut b, o + 28, u32::from(e.required));
        }
        let c = crc32c::crc32c(&b);
        put32(&mut b, 4, c);
        b
    }

    pub(crate) fn find(&self, g: &Uuid) -> Option<&RegionEntry> {
        self.entries.iter().find(|e| e.guid == *g)
    }

    /// Checks the entries: known regions present once, aligned, inside the file,
    /// not overlapping each other or the header area; unknown required regions refused.
    pub(crate) fn validate(&self, path: &str, file_len: u64) -> Result<()> {
        let bad =
            |reason: String| Error::corrupt(path, "region table", REGION_TABLE_OFFSETS[0], reason);
        let mut spans: Vec<(u64, u64, Uuid)> = Vec::new();
        for e in &self.entries {
            if e.guid != BAT_GUID && e.guid != METADATA_GUID {
                if e.required {
                    return Err(Error::unsupported(
                        path,
                        format!("required region {} is not known", e.guid),
                    ));
                }
                continue;
            }
            if self.entries.iter().filter(|x| x.guid == e.guid).count() > 1 {
                return Err(bad(format!("region {} listed twice", e.guid)));
            }
            if e.file_offset % MIB != 0 || e.file_offset < MIB {
                return Err(bad(format!(
                    "region {} offset {} not 1 MiB aligned past the header area",
                    e.guid, e.file_offset
                )));
            }
            if u64::from(e.length) % MIB != 0 || e.length == 0 {
                return Err(bad(format!(
                    "region {} length {} not a multiple of 1 MiB",
                    e.guid, e.length
                )));
            }
            let end = e.file_offset.saturating_add(u64::from(e.length));
            if end > file_len {
                return Err(bad(format!(
                    "region {} [{}, {}) extends past the end of the file ({file_len})",
                    e.guid, e.file_offset, end
                )));
            }
            spans.push((e.file_offset, end, e.guid));
        }
        for g in [BAT_GUID, METADATA_GUID] {
            if self.find(&g).is_none() {
                return Err(bad(format!("required region {g} missing")));
            }
        }
        spans.sort();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(bad(format!("regions {} and {} overlap", w[0].2, w[1].2)));
            }
        }
        Ok(())
    }
}
