//! The metadata region: table, known items, parent locator, and byte-exact
//! preservation of every item this engine does not interpret.

use crate::bytes::*;
use crate::error::{Error, Result};
use uuid::{uuid, Uuid};

pub(crate) const FILE_PARAMETERS: Uuid = uuid!("caa16737-fa36-4d43-b3b6-33f0aa44e76b");
pub(crate) const VIRTUAL_DISK_SIZE: Uuid = uuid!("2fa54224-cd1b-4876-b211-5dbed83bf4b8");
pub(crate) const PAGE83: Uuid = uuid!("beca12ab-b2e6-4523-93ef-c309e000c746");
pub(crate) const LOGICAL_SECTOR: Uuid = uuid!("8141bf1d-a96f-4709-ba47-f233a8faab5f");
pub(crate) const PHYSICAL_SECTOR: Uuid = uuid!("cda348c7-445d-4471-9cc9-e9885251c556");
pub(crate) const PARENT_LOCATOR: Uuid = uuid!("a8d35f2d-b30b-454d-abf7-d3d84834ab0c");
pub(crate) const VHDX_LOCATOR_TYPE: Uuid = uuid!("b04aefb7-d19e-4a81-b789-25b8e9445913");

pub(crate) const FLAG_USER: u32 = 1;
pub(crate) const FLAG_VIRTUAL_DISK: u32 = 2;
pub(crate) const FLAG_REQUIRED: u32 = 4;

const TABLE_SIZE: usize = 64 * 1024;
const MAX_ENTRIES: usize = 2047;
/// The largest virtual disk the format allows (64 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// One metadata item, raw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataItem {
    pub id: Uuid,
    pub flags: u32,
    pub data: Vec<u8>,
}

/// Interpreted values of the known items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskParams {
    pub block_size: u32,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub page83: Uuid,
}

/// The parent locator of a differencing disk (all key/value pairs, in order).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParentLocator {
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn parse(path: &str, off: u64, b: &[u8]) -> Result<ParentLocator> {
        let bad = |r: String| Error::corrupt(path, "parent locator", off, r);
        if b.len() < 20 {
            return Err(bad("shorter than its 20-byte header".into()));
        }
        let ty = guid(b, 0);
        if ty != VHDX_LOCATOR_TYPE {
            return Err(Error::unsupported(
                path,
                format!("parent locator type {ty}"),
            ));
        }
        let count = le16(b, 18) as usize;
        if 20 + count * 12 > b.len() {
            return Err(bad(format!(
                "{count} key/value entries do not fit in {} bytes",
                b.len()
            )));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let e = 20 + i * 12;
            let ko = le32(b, e) as usize;
            let vo = le32(b, e + 4) as usize;
            let kl = le16(b, e + 8) as usize;
            let vl = le16(b, e + 10) as usize;
            let get = |o: usize, l: usize| -> Result<String> {
                let end = o
                    .checked_add(l)
                    .filter(|&x| x <= b.len())
                    .ok_or_else(|| bad(format!("entry {i} string [{o}, +{l}) outside the item")))?;
                from_utf16le(&b[o..end]).ok_or_else(|| bad(format!("entry {i} is not UTF-16")))
            };
            entries.push((get(ko, kl)?, get(vo, vl)?));
        }
        Ok(ParentLocator { entries })
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 20 + 12 * self.entries.len()];
        put_guid(&mut b, 0, &VHDX_LOCATOR_TYPE);
        put16(&mut b, 18, self.entries.len() as u16);
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let kb = utf16le(k);
            let vb = utf16le(v);
            let ko = b.len();
            b.extend_from_slice(&kb);
            let vo = b.len();
            b.extend_from_slice(&vb);
            let e = 20 + i * 12;
            put32(&mut b, e, ko as u32);
            put32(&mut b, e + 4, vo as u32);
            put16(&mut b, e + 8, kb.len() as u16);
            put16(&mut b, e + 10, vb.len() as u16);
        }
        b
    }
}

/// The whole metadata region as items.
#[derive(Debug, Clone)]
pub struct Metadata {
    pub items: Vec<MetadataItem>,
}

impl Metadata {
    /// Parses the table and items of a metadata region image `b` (whole region).
    pub(crate) fn parse(path: &str, region_off: u64, b: &[u8]) -> Result<Metadata> {
        let bad = |o: u64, r: String| Error::corrupt(path, "metadata", region_off + o, r);
        if b.len() < TABLE_SIZE {
            return Err(bad(0, "region smaller than its 64 KiB table".into()));
        }
        if &b[0..8] != b"metadata" {
            return Err(bad(0, "bad metadata table signature".into()));
        }
        let count = le16(b, 10) as usize;
        if count > MAX_ENTRIES {
            return Err(bad(
                10,
                format!("entry count {count} exceeds {MAX_ENTRIES}"),
            ));
        }
        let mut items: Vec<MetadataItem> = Vec::with_capacity(count);
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for i in 0..count {
            let e = 32 + i * 32;
            let id = guid(b, e);
            let offset = le32(b, e + 16) as u64;
            let length = le32(b, e + 20) as u64;
            let flags = le32(b, e + 24);
            if items.iter().any(|it| it.id == id) {
                return Err(bad(e as u64, format!("item {id} listed twice")));
            }
            if length == 0 {
                items.push(MetadataItem {
                    id,
                    flags,
                    data: Vec::new(),
                });
                continue;
            }
            if offset < TABLE_SIZE as u64 || offset + length > b.len() as u64 {
                return Err(bad(
                    e as u64,
                    format!("item {id} at [{offset}, +{length}) lies outside the metadata region"),
                ));
            }
            spans.push((offset, offset + length));
            items.push(MetadataItem {
                id,
                flags,
                data: b[offset as usize..(offset + length) as usize].to_vec(),
            });
        }
        spans.sort();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(bad(0, "metadata items overlap".into()));
        }
        Ok(Metadata { items })
    }

    pub(crate) fn get(&self, id: &Uuid) -> Option<&MetadataItem> {
        self.items.iter().find(|i| i.id == *id)
    }

    /// Replaces an item's data (or appends it), keeping the order of all others.
    pub(crate) fn set(&mut self, id: Uuid, flags: u32, data: Vec<u8>) {
        if let Some(it) = self.items.iter_mut().find(|i| i.id == id) {
            it.data = data;
        } else {
            self.items.push(MetadataItem { id, flags, data });
        }
    }

    /// Interprets the known items; refuses unknown required items.
    pub(crate) fn params(&self, path: &str, region_off: u64) -> Result<DiskParams> {
        let bad = |r: String| Error::corrupt(path, "metadata", region_off, r);
        for it in &self.items {
            let known = [
                FILE_PARAMETERS,
                VIRTUAL_DISK_SIZE,
                PAGE83,
                LOGICAL_SECTOR,
                PHYSICAL_SECTOR,
                PARENT_LOCATOR,
            ]
            .contains(&it.id);
            if !known && it.flags & FLAG_REQUIRED != 0 && it.flags & FLAG_USER == 0 {
                return Err(Error::unsupported(
                    path,
                    format!("required metadata item {} is not known", it.id),
                ));
            }
        }
        let item = |id: &Uuid, name: &str, len: usize| -> Result<&[u8]> {
            let it = self
                .get(id)
                .ok_or_else(|| bad(format!("{name} item missing")))?;
            if it.data.len() < len {
                return Err(bad(format!(
                    "{name} item is {} bytes, needs {len}",
                    it.data.len()
                )));
            }
            Ok(&it.data)
        };
        let fp = item(&FILE_PARAMETERS, "file parameters", 8)?;
        let block_size = le32(fp, 0);
        let flags = le32(fp, 4);
        if !block_size.is_power_of_two() || !(MIB as u32..=256 * MIB as u32).contains(&block_size) {
            return Err(bad(format!(
                "block size {block_size} is not a power of two in 1 MiB..256 MiB"
            )));
        }
        let virtual_size = le64(item(&VIRTUAL_DISK_SIZE, "virtual disk size", 8)?, 0);
        let logical = le32(item(&LOGICAL_SECTOR, "logical sector size", 4)?, 0);
        let physical = le32(item(&PHYSICAL_SECTOR, "physical sector size", 4)?, 0);
        if logical != 512 && logical != 4096 {
            return Err(bad(format!(
                "logical sector size {logical} is not 512 or 4096"
            )));
        }
        if physical != 512 && physical != 4096 {
            return Err(bad(format!(
                "physical sector size {physical} is not 512 or 4096"
            )));
        }
        if virtual_size == 0
            || virtual_size > MAX_VIRTUAL_SIZE
            || !virtual_size.is_multiple_of(u64::from(logical))
        {
            return Err(bad(format!(
                "virtual disk size {virtual_size} is zero, above 64 TiB or not a multiple of the logical sector size"
            )));
        }
        let page83 = match self.get(&PAGE83) {
            Some(it) if it.data.len() >= 16 => guid(&it.data, 0),
            _ => Uuid::nil(),
        };
        let has_parent = flags & 2 != 0;
        if has_parent && self.get(&PARENT_LOCATOR).is_none() {
            return Err(bad("has-parent flag set but no parent locator".into()));
        }
        Ok(DiskParams {
            block_size,
            leave_blocks_allocated: flags & 1 != 0,
            has_parent,
            virtual_size,
            logical_sector_size: logical,
            physical_sector_size: physical,
            page83,
        })
    }

    /// Serializes into a region of `region_len` bytes: table, then items packed
    /// from 64 KiB on, in their original order with their original bytes.
    pub(crate) fn to_bytes(&self, path: &str, region_len: usize) -> Result<Vec<u8>> {
        let mut b = vec![0u8; region_len];
        if self.items.len() > MAX_ENTRIES {
            return Err(Error::InvalidArgument(format!(
                "{} metadata items exceed {MAX_ENTRIES}",
                self.items.len()
            )));
        }
        b[0..8].copy_from_slice(b"metadata");
        put16(&mut b, 10, self.items.len() as u16);
        let mut at = TABLE_SIZE;
        for (i, it) in self.items.iter().enumerate() {
            let e = 32 + i * 32;
            put_guid(&mut b, e, &it.id);
            let (off, len) = if it.data.is_empty() {
                (0, 0)
            } else {
                (at, it.data.len())
            };
            if off + len > region_len {
                return Err(Error::unsupported(
                    path,
                    "metadata items do not fit in the metadata region",
                ));
            }
            put32(&mut b, e + 16, off as u32);
            put32(&mut b, e + 20, len as u32);
            put32(&mut b, e + 24, it.flags);
            b[off..off + len].copy_from_slice(&it.data);
            at += len;
        }
        Ok(b)
    }

    /// Builds the items of a new image.
    pub(crate) fn new_image(p: &DiskParams, locator: Option<&ParentLocator>) -> Metadata {
        let mut fp = vec![0u8; 8];
        put32(&mut fp, 0, p.block_size);
        put32(
            &mut fp,
            4,
            u32::from(p.leave_blocks_allocated) | (u32::from(p.has_parent) << 1),
        );
        let mut vs = vec![0u8; 8];
        put64(&mut vs, 0, p.virtual_size);
        let mut p83 = vec![0u8; 16];
        put_guid(&mut p83, 0, &p.page83);
        let mut ls = vec![0u8; 4];
        put32(&mut ls, 0, p.logical_sector_size);
        let mut ps = vec![0u8; 4];
        put32(&mut ps, 0, p.physical_sector_size);
        let vd = FLAG_REQUIRED | FLAG_VIRTUAL_DISK;
        let mut items = vec![
            MetadataItem {
                id: FILE_PARAMETERS,
                flags: FLAG_REQUIRED,
                data: fp,
            },
            MetadataItem {
                id: VIRTUAL_DISK_SIZE,
                flags: vd,
                data: vs,
            },
            MetadataItem {
                id: PAGE83,
                flags: vd,
                data: p83,
            },
            MetadataItem {
                id: LOGICAL_SECTOR,
                flags: vd,
                data: ls,
            },
            MetadataItem {
                id: PHYSICAL_SECTOR,
                flags: vd,
                data: ps,
            },
        ];
        if let Some(l) = locator {
            items.push(MetadataItem {
                id: PARENT_LOCATOR,
                flags: FLAG_REQUIRED,
                data: l.to_bytes(),
            });
        }
        Metadata { items }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_keeps_user_items() {
        let p = DiskParams {
            block_size: 1 << 25,
            leave_blocks_allocated: false,
            has_parent: true,
            virtual_size: 1 << 30,
            logical_sector_size: 4096,
            physical_sector_size: 4096,
            page83: Uuid::new_v4(),
        };
        let loc = ParentLocator {
            entries: vec![
                (
                    "parent_linkage".into(),
                    "{00000000-0000-0000-0000-000000000001}".into(),
                ),
                ("relative_path".into(), ".\\p.vhdx".into()),
            ],
        };
        let mut m = Metadata::new_image(&p, Some(&loc));
        m.items.push(MetadataItem {
            id: Uuid::new_v4(),
            flags: FLAG_USER,
            data: vec![1, 2, 3, 4, 5],
        });
        let b = m.to_bytes("x", 1 << 20).unwrap();
        let m2 = Metadata::parse("x", 0, &b).unwrap();
        assert_eq!(m2.items, m.items);
        assert_eq!(m2.params("x", 0).unwrap(), p);
        let l2 = ParentLocator::parse("x", 0, &m2.get(&PARENT_LOCATOR).unwrap().data).unwrap();
        assert_eq!(l2, loc);
    }
}
