//! Extends the identity map beyond the static 0..4 GiB, from CPL3: the page tables are
//! ordinary user-accessible memory, and every entry written here was not present before,
//! so no TLB flush is needed.
//!
//! With CPUID pdpe1gb, 1 GiB pages; without it (this PVM-style KVM faults 1 GiB pages with
//! a reserved-bit #PF), 2 MiB pages. New page-directory-pointer tables and page directories
//! come from the heap. Covered: RAM (at boot), ECAM (when first used), and every MMIO
//! region virtio-drivers maps (`Hal::mmio_phys_to_virt`), wherever the VMM put the BARs
//! (QEMU microvm's 64-bit PCIe window is the top quarter of the physical address space,
//! e.g. 0xc000_0000_0000 with 48 physical bits).

use crate::cpuid::cpuid;

extern "C" {
    static mut pml4: [u64; 512];
}

const GIB: u64 = 1 << 30;
const FLAGS_LEAF: u64 = 0x87; // present, writable, user, PS
const FLAGS_TABLE: u64 = 0x07; // present, writable, user
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// 4-level paging covers 48 physical address bits. Physical addresses from 128 TiB up are
/// reached at their sign-extended (canonical) virtual address: see `virt`.
const MAX_ADDR: u64 = 1 << 48;

/// Virtual address of physical address `paddr`: identical below 128 TiB; above, bit 47 is
/// sign-extended (the page-table indices are the same, so one map serves both).
pub fn virt(paddr: u64) -> u64 {
    if paddr & (1 << 47) != 0 {
        paddr | 0xffff_0000_0000_0000
    } else {
        paddr
    }
}

pub fn has_1g_pages() -> bool {
    cpuid(0x8000_0001).edx & (1 << 26) != 0
}

fn new_table() -> *mut u64 {
    let t = crate::rt::HEAP.alloc_raw(4096, 4096) as *mut u64;
    if t.is_null() {
        crate::fail!("out of memory for page tables");
    }
    unsafe { core::ptr::write_bytes(t, 0, 512) };
    t
}

/// Identity-maps [start, start + len) (rounded out to 1 GiB), keeping what is mapped.
pub fn ensure_mapped(start: u64, len: u64) {
    let end = start.saturating_add(len).min(MAX_ADDR);
    let big = has_1g_pages();
    let mut g = start / GIB;
    while g * GIB < end {
        unsafe {
            let l4 = &raw mut pml4[(g >> 9) as usize];
            if l4.read_volatile() == 0 {
                l4.write_volatile(new_table() as u64 | FLAGS_TABLE);
            }
            let pdpt = (l4.read_volatile() & ADDR_MASK) as *mut u64;
            let l3 = pdpt.add((g & 511) as usize);
            if l3.read_volatile() == 0 {
                let entry = if big {
                    (g * GIB) | FLAGS_LEAF
                } else {
                    let pd = new_table();
                    for i in 0..512u64 {
                        pd.add(i as usize)
                            .write_volatile((g * GIB + (i << 21)) | FLAGS_LEAF);
                    }
                    pd as u64 | FLAGS_TABLE
                };
                l3.write_volatile(entry);
            }
        }
        g += 1;
    }
}
