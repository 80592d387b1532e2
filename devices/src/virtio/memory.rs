//! Guest memory as devices see it: vm-memory mappings with a dirty bitmap, so that
//! pages a device writes (DMA) are known to live migration.

use super::dirty_bitmap::DirtyBitmap;

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyBitmap>;
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<DirtyBitmap>;

/// Gives guest memory `[gpa, gpa + len)` back to the host (`MADV_DONTNEED`: the guest
/// reads zeros if it touches it again, as the balloon and virtio-mem protocols allow).
/// False when the range is not within one region of guest memory, or madvise refused.
pub(crate) fn discard(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> bool {
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    let Ok(len_usize) = usize::try_from(len) else {
        return false;
    };
    let Ok(slice) = mem.get_slice(GuestAddress(gpa), len_usize) else {
        return false;
    };
    // SAFETY: `slice` is `len` bytes of our guest memory mapping (checked by
    // get_slice); MADV_DONTNEED only drops those pages' contents, which the device's
    // protocol lets the guest lose.
    let rc = unsafe {
        libc::madvise(
            slice.ptr_guard_mut().as_ptr().cast(),
            len_usize,
            libc::MADV_DONTNEED,
        )
    };
    rc == 0
}
