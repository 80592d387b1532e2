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
            // The mapping's own bitmap (the region-level `bitmap()` is a slice view):
            // what devices wrote, at the cost of what they wrote.
            std::ops::Deref::deref(region).bitmap().take_into(&mut kvm);
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

/// The pages of guest RAM that hold anything: present or swapped out, and not the
/// shared zero page. A page the guest never wrote reads as zero on the destination
/// too, so round 0 skips it without reading it — which for an idle guest, or a 1 TiB
/// guest that touched a few GiB, is almost everything. Asked of the kernel by
/// PAGEMAP_SCAN (Linux 6.7: ranges, so the cost follows the populated memory, not the
/// configured size), else by reading /proc/self/pagemap entry by entry, else every page.
///
/// Shared memory (`--memory shared=on`) counts as populated everywhere: a vhost-user
/// backend writes pages through its own mapping, which this process's page tables never
/// show.
pub fn populated_pages(mem: &GuestMemoryMmap) -> Bitmaps {
    if mem.iter().any(|r| r.file_offset().is_some()) {
        return all_pages(mem);
    }
    let opened = crate::file_broker::run(crate::file_broker::FileOp::OpenPagemap, || {
        std::fs::File::open("/proc/self/pagemap")
    });
    let Ok(pagemap) = opened else {
        return all_pages(mem);
    };
    match scan::populated(&pagemap, mem) {
        Ok(bits) => bits,
        Err(e) => {
            tracing::debug!(error = %e, "PAGEMAP_SCAN unavailable; reading pagemap entries");
            read_pagemap(&pagemap, mem).unwrap_or_else(|| all_pages(mem))
        }
    }
}

/// [`populated_pages`] by reading one pagemap entry per page (kernels before 6.7).
fn read_pagemap(pagemap: &std::fs::File, mem: &GuestMemoryMmap) -> Option<Bitmaps> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let host_page = 4096u64;
    let mut out = Vec::new();
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .ok()?;
        let pages = region.len().div_ceil(PAGE_SIZE) as usize;
        let mut bits = vec![0u64; pages.div_ceil(64)];
        let first = host as u64 / host_page;
        let mut buf = vec![0u8; 8 * 4096];
        let mut p = 0usize;
        while p < pages {
            let n = (pages - p).min(4096);
            let bytes = &mut buf[..n * 8];
            pagemap.read_exact_at(bytes, (first + p as u64) * 8).ok()?;
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
    Some(out)
}

/// PAGEMAP_SCAN (`linux/fs.h`): the kernel walks the page tables and returns the ranges
/// whose pages match, skipping holes a page-table level at a time.
pub(crate) mod scan {
    use std::os::fd::AsRawFd;

    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    use super::{Bitmaps, GuestMemoryMmap, PAGE_SIZE};

    const PAGE_IS_PRESENT: u64 = 1 << 3;
    const PAGE_IS_SWAPPED: u64 = 1 << 4;
    const PAGE_IS_PFNZERO: u64 = 1 << 5;

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct PageRegion {
        start: u64,
        end: u64,
        categories: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct PmScanArg {
        size: u64,
        flags: u64,
        start: u64,
        end: u64,
        walk_end: u64,
        vec: u64,
        vec_len: u64,
        max_pages: u64,
        category_inverted: u64,
        category_mask: u64,
        category_anyof_mask: u64,
        return_mask: u64,
    }

    /// `_IOWR('f', 16, struct pm_scan_arg)`.
    pub(crate) const PAGEMAP_SCAN: u64 = vmm_sys_util::ioctl::ioctl_expr(
        vmm_sys_util::ioctl::_IOC_READ | vmm_sys_util::ioctl::_IOC_WRITE,
        b'f' as u32,
        16,
        std::mem::size_of::<PmScanArg>() as u32,
    ) as u64;

    /// Ranges per call: 64 KiB of results.
    const RANGES: usize = 2730;

    pub(super) fn populated(
        pagemap: &std::fs::File,
        mem: &GuestMemoryMmap,
    ) -> std::io::Result<Bitmaps> {
        let mut ranges = vec![PageRegion::default(); RANGES];
        let mut out = Vec::new();
        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| std::io::Error::other(e.to_string()))? as u64;
            let pages = region.len().div_ceil(PAGE_SIZE) as usize;
            let mut bits = vec![0u64; pages.div_ceil(64)];
            let end = host + region.len();
            let mut at = host;
            while at < end {
                let mut arg = PmScanArg {
                    size: std::mem::size_of::<PmScanArg>() as u64,
                    start: at,
                    end,
                    vec: ranges.as_mut_ptr() as u64,
                    vec_len: ranges.len() as u64,
                    // Present or swapped, and not the shared zero page (read, never
                    // written: it reads as zero on the destination as well).
                    category_inverted: PAGE_IS_PFNZERO,
                    category_mask: PAGE_IS_PFNZERO,
                    category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                    return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                    ..Default::default()
                };
                // SAFETY: PAGEMAP_SCAN on our own pagemap with an argument of the size it
                // states, whose `vec` points to `vec_len` writable PageRegion entries
                // that outlive the call; it reads our page tables and writes only there.
                let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
                if n < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for r in &ranges[..n as usize] {
                    let first = ((r.start.max(host) - host) / PAGE_SIZE) as usize;
                    let last = ((r.end.min(end) - host).div_ceil(PAGE_SIZE) as usize).min(pages);
                    set_range(&mut bits, first, last);
                }
                if arg.walk_end <= at {
                    return Err(std::io::Error::other("PAGEMAP_SCAN made no progress"));
                }
                at = arg.walk_end;
            }
            out.push(bits);
        }
        Ok(out)
    }

    /// Sets bits `first..last`.
    fn set_range(bits: &mut [u64], first: usize, last: usize) {
        for k in first..last {
            bits[k / 64] |= 1 << (k % 64);
        }
    }
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

    /// Written pages are populated; pages only read (the shared zero page) and pages never
    /// touched are not; the kernel's scan and the entry-by-entry read agree on the
    /// written ones.
    #[test]
    fn populated_pages_are_the_written_ones() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = crate::memory::create_guest_memory(64 << 20, None, false, false, None).unwrap();
        let written = [0u64, 1, 513, 4096, 16383];
        for p in written {
            mem.write_obj(0xa5u8, GuestAddress(p * PAGE_SIZE + 7))
                .unwrap();
        }
        let read_only = 2000u64;
        let _: u8 = mem.read_obj(GuestAddress(read_only * PAGE_SIZE)).unwrap();
        let bits = populated_pages(&mem);
        let set: Vec<u64> = (0..(64 << 20) / PAGE_SIZE)
            .filter(|&k| bits[0][(k / 64) as usize] & (1 << (k % 64)) != 0)
            .collect();
        assert_eq!(set, written, "populated pages of the first region");
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let by_entry = read_pagemap(&pagemap, &mem).unwrap();
        for p in written {
            assert_ne!(
                by_entry[0][(p / 64) as usize] & (1 << (p % 64)),
                0,
                "page {p}"
            );
        }
    }

    #[test]
    fn bitmap_helpers() {
        let mut a: Bitmaps = vec![vec![0b1010, 0], vec![1]];
        let b: Bitmaps = vec![vec![0b0101, 1 << 63], vec![0]];
        merge(&mut a, &b);
        assert_eq!(a, vec![vec![0b1111, 1 << 63], vec![1]]);
        assert_eq!(count(&a), 6);
    }
}
