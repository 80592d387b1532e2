//! Block allocation table: entry encoding, geometry (chunk ratio, interleaved
//! sector bitmap entries) and validation against the file.

use crate::bytes::MIB;

pub const PAYLOAD_NOT_PRESENT: u8 = 0;
pub const PAYLOAD_UNDEFINED: u8 = 1;
pub const PAYLOAD_ZERO: u8 = 2;
pub const PAYLOAD_UNMAPPED: u8 = 3;
pub const PAYLOAD_FULLY_PRESENT: u8 = 6;
pub const PAYLOAD_PARTIALLY_PRESENT: u8 = 7;
pub const SB_NOT_PRESENT: u8 = 0;
pub const SB_PRESENT: u8 = 6;

/// Sectors described by one sector bitmap block (1 MiB of bits).
pub const SECTORS_PER_CHUNK: u64 = 1 << 23;
/// Size of a sector bitmap block.
pub const SECTOR_BITMAP_SIZE: u64 = MIB;

pub fn state(e: u64) -> u8 {
    (e & 7) as u8
}
pub fn offset(e: u64) -> u64 {
    (e >> 20) << 20
}
pub fn entry(state: u8, file_offset: u64) -> u64 {
    (file_offset & !((1 << 20) - 1)) | u64::from(state & 7)
}

/// Name of a payload state, for `map`/`info`.
pub fn payload_state_name(s: u8) -> &'static str {
    match s {
        PAYLOAD_NOT_PRESENT => "not_present",
        PAYLOAD_UNDEFINED => "undefined",
        PAYLOAD_ZERO => "zero",
        PAYLOAD_UNMAPPED => "unmapped",
        PAYLOAD_FULLY_PRESENT => "fully_present",
        PAYLOAD_PARTIALLY_PRESENT => "partially_present",
        _ => "invalid",
    }
}

/// Sizes derived from the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub virtual_size: u64,
    pub block_size: u64,
    pub logical_sector_size: u64,
    pub chunk_ratio: u64,
    pub data_blocks: u64,
    pub bitmap_blocks: u64,
    pub has_parent: bool,
}

impl Geometry {
    pub fn new(virtual_size: u64, block_size: u32, logical: u32, has_parent: bool) -> Geometry {
        let block_size = u64::from(block_size);
        let logical = u64::from(logical);
        let chunk_ratio = (SECTORS_PER_CHUNK * logical) / block_size;
        let data_blocks = virtual_size.div_ceil(block_size);
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        Geometry {
            virtual_size,
            block_size,
            logical_sector_size: logical,
            chunk_ratio,
            data_blocks,
            bitmap_blocks,
            has_parent,
        }
    }

    /// Number of BAT entries the image needs.
    pub fn bat_entries(&self) -> u64 {
        if self.has_parent {
            self.bitmap_blocks * (self.chunk_ratio + 1)
        } else if self.data_blocks == 0 {
            0
        } else {
            self.data_blocks + (self.data_blocks - 1) / self.chunk_ratio
        }
    }

    /// BAT bytes rounded up to 1 MiB (the region length).
    pub fn bat_region_len(&self) -> u64 {
        (self.bat_entries() * 8).div_ceil(MIB).max(1) * MIB
    }

    pub fn payload_index(&self, block: u64) -> usize {
        (block + block / self.chunk_ratio) as usize
    }

    pub fn bitmap_index(&self, chunk: u64) -> usize {
        (chunk * (self.chunk_ratio + 1) + self.chunk_ratio) as usize
    }

    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.logical_sector_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_spec_examples() {
        // 32 MiB blocks, 512-byte sectors: chunk ratio 128.
        let g = Geometry::new(1 << 30, 32 << 20, 512, false);
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.data_blocks, 32);
        assert_eq!(g.bat_entries(), 32);
        assert_eq!(g.payload_index(128), 129);
        let g = Geometry::new(10 << 30, 1 << 20, 512, true);
        assert_eq!(g.chunk_ratio, 4096);
        assert_eq!(g.bitmap_blocks, 3);
        assert_eq!(g.bat_entries(), 3 * 4097);
        assert_eq!(g.bitmap_index(0), 4096);
        let e = entry(PAYLOAD_FULLY_PRESENT, 5 << 20);
        assert_eq!(state(e), 6);
        assert_eq!(offset(e), 5 << 20);
    }
}
