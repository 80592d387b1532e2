//! Dirty pages of guest RAM, per region: bit i of a region's bitmap = its page i.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use devices::virtio::GuestMemoryMmap;

pub const PAGE_SIZE: u64 = 4096;

/// Reads and clears both dirty records. KVM's log must be on (the control loop turns it
/// on before the sender starts).
pub struct DirtyLog {
    mem: Arc<GuestMemoryMmap>,
    vm: Arc<VmFd>,
    /// KVM's log is under manual protection: what `take` reads it clears itself.
    manual: bool,
}

/// One bitmap per region (same order as the guest memory's regions).
pub type Bitmaps = Vec<Vec<u64>>;

impl DirtyLog {
    pub fn new(mem: Arc<GuestMemoryMmap>, vm: Arc<VmFd>, manual: bool) -> Self {
        Self { mem, vm, manual }
    }

    /// Pages written since the last call, by vCPUs or by devices.
    pub fn take(&self) -> Result<Bitmaps, String> {
        let mut out = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let mut kvm = self
                .vm
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|e| format!("KVM_GET_DIRTY_LOG (slot {slot}): {e}"))?;
            if self.manual {
                let pages = region.len() / PAGE_SIZE;
                clear_dirty_log(&self.vm, slot as u32, pages, &mut kvm)
                    .map_err(|e| format!("KVM_CLEAR_DIRTY_LOG (slot {slot}): {e}"))?;
            }
            // The mapping's own bitmap (the region-level `bitmap()` is a slice view).
            let devices = std::ops::Deref::deref(region).bitmap().get_and_reset();
            for (k, d) in kvm.iter_mut().zip(devices) {
                *k |= d;
            }
            out.push(kvm);
        }
        Ok(out)
    }
}

vmm_sys_util::ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_bindings::kvm_clear_dirty_log
);

/// Clears (and write-protects again) exactly the pages set in `bitmap` of `slot`,
/// the log just read: a page the guest writes after this is logged again.
fn clear_dirty_log(vm: &VmFd, slot: u32, pages: u64, bitmap: &mut [u64]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if (bitmap.len() as u64) * 64 < pages {
        return Err(std::io::Error::other("dirty bitmap shorter than the slot"));
    }
    let arg = kvm_bindings::kvm_clear_dirty_log {
        slot,
        num_pages: u32::try_from(pages)
            .map_err(|_| std::io::Error::other("memory slot too large to clear at once"))?,
        first_page: 0,
        __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: KVM_CLEAR_DIRTY_LOG on our VM descriptor with a struct that points to a
    // live bitmap of `num_pages` bits, which the kernel only reads.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG(), &arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The pages of guest RAM that hold anything: present or swapped out, per
/// /proc/self/pagemap. A page the guest never touched is neither (and reads as zero),
/// so round 0 skips it without reading it — which for an idle 1 GiB guest is almost
/// everything. Falls back to every page if pagemap cannot be read.
pub fn populated_pages(mem: &GuestMemoryMmap) -> Bitmaps {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") else {
        return all_pages(mem);
    };
    let host_page = 4096u64;
    let mut out = Vec::new();
    for region in mem.iter() {
        let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            return all_pages(mem);
        };
        let pages = region.len().div_ceil(PAGE_SIZE) as usize;
        let mut bits = vec![0u64; pages.div_ceil(64)];
        let first = host as u64 / host_page;
        let mut buf = vec![0u8; 8 * 4096];
        let mut p = 0usize;
        while p < pages {
            let n = (pages - p).min(4096);
            let bytes = &mut buf[..n * 8];
            if pagemap
                .read_exact_at(bytes, (first + p as u64) * 8)
                .is_err()
            {
                return all_pages(mem);
            }
            for (i, e) in bytes.chunks_exact(8).enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(e);
                if u64::from_le_bytes(w) & (PRESENT | SWAPPED) != 0 {
                    let k = p + i;
                    bits[k / 64] |= 1 << (k % 64);
                }
            }
            p += n;
        }
        out.push(bits);
    }
    out
}

/// Every page of every region.
pub fn all_pages(mem: &GuestMemoryMmap) -> Bitmaps {
    mem.iter()
        .map(|r| {
            let pages = r.len().div_ceil(PAGE_SIZE) as usize;
            let mut v = vec![u64::MAX; pages.div_ceil(64)];
            if !pages.is_multiple_of(64) {
                if let Some(last) = v.last_mut() {
                    *last = (1u64 << (pages % 64)) - 1;
                }
            }
            v
        })
        .collect()
}

pub fn count(b: &Bitmaps) -> u64 {
    b.iter()
        .flat_map(|r| r.iter())
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// `a |= b`.
pub fn merge(a: &mut Bitmaps, b: &Bitmaps) {
    for (ra, rb) in a.iter_mut().zip(b) {
        for (wa, wb) in ra.iter_mut().zip(rb) {
            *wa |= wb;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_helpers() {
        let mut a: Bitmaps = vec![vec![0b1010, 0], vec![1]];
        let b: Bitmaps = vec![vec![0b0101, 1 << 63], vec![0]];
        merge(&mut a, &b);
        assert_eq!(a, vec![vec![0b1111, 1 << 63], vec![1]]);
        assert_eq!(count(&a), 6);
    }
}
