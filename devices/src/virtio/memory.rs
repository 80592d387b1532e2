//! Guest memory as devices see it: vm-memory mappings with a dirty bitmap, so that
//! pages a device writes (DMA) are known to live migration.

use super::dirty_bitmap::DirtyBitmap;

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyBitmap>;
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<DirtyBitmap>;
