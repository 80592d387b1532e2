//! Extends the identity map above 4 GiB, from CPL3 (the page tables are ordinary
//! user-accessible memory; the entries written here were not present before, so no TLB
//! flush is needed).
//!
//! With CPUID pdpe1gb: 1 GiB pages up to 1 TiB. Without it (this PVM-style KVM rejects
//! 1 GiB pages with a reserved-bit #PF): 2 MiB pages, page directories taken from the heap,
//! up to `limit` (the caller passes max(64 GiB, top of RAM, end of the MMIO window and ECAM)).

use core::arch::x86_64::__cpuid;

extern "C" {
    static mut pdpt0: [u64; 512];
    static mut pdpt1: [u64; 512];
}

const GIB: u64 = 1 << 30;
const FLAGS_LEAF: u64 = 0x87; // present, writable, user, PS
const FLAGS_TABLE: u64 = 0x07; // present, writable, user

pub fn has_1g_pages() -> bool {
    __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).edx & (1 << 26) != 0
}

/// Maps [4 GiB, limit) (rounded up to 1 GiB, at most 1 TiB). Returns the end of the map.
pub fn map_high(limit: u64) -> u64 {
    let big = has_1g_pages();
    let end_gib = if big {
        1024
    } else {
        limit.div_ceil(GIB).clamp(4, 1024)
    };
    for g in 4..end_gib {
        let entry = if big {
            (g * GIB) | FLAGS_LEAF
        } else {
            let pd = crate::rt::HEAP.alloc_raw(4096, 4096) as *mut u64;
            if pd.is_null() {
                return g * GIB;
            }
            for i in 0..512u64 {
                unsafe {
                    pd.add(i as usize)
                        .write_volatile((g * GIB + (i << 21)) | FLAGS_LEAF)
                };
            }
            pd as u64 | FLAGS_TABLE
        };
        unsafe {
            let t = if g < 512 {
                &raw mut pdpt0
            } else {
                &raw mut pdpt1
            };
            (&raw mut (*t)[(g % 512) as usize]).write_volatile(entry);
        }
    }
    end_gib * GIB
}
