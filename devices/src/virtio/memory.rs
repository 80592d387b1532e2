//! Guest memory as devices see it: vm-memory mappings with a dirty bitmap, so that
//! pages a device writes (DMA) are known to live migration.

use vm_memory::bitmap::AtomicBitmap;

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;
