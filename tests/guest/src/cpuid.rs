//! CPUID as the VMM defines it. The CPL0 set-up (boot.rs) runs CPUID for the leaves
//! below and stores the answers here before dropping to CPL3; CPL3 code reads them.
//!
//! Why not run CPUID at CPL3: on a PVM-style KVM on AMD hosts (no CPUID faulting), CPUID
//! at CPL3 executes natively and returns the *host's* values (e.g. pdpe1gb, which that
//! KVM does not support, and no hypervisor TSC leaf). At CPL0 it is always intercepted.

/// One leaf: inputs (leaf, subleaf) and the four outputs, 24 bytes (boot.rs's layout).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CpuidEntry {
    leaf: u32,
    subleaf: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

const fn leaf(leaf: u32) -> CpuidEntry {
    CpuidEntry {
        leaf,
        subleaf: 0,
        eax: 0,
        ebx: 0,
        ecx: 0,
        edx: 0,
    }
}

const fn sub(leaf: u32, subleaf: u32) -> CpuidEntry {
    CpuidEntry {
        leaf,
        subleaf,
        eax: 0,
        ebx: 0,
        ecx: 0,
        edx: 0,
    }
}

/// Filled at CPL0 by boot.rs; the 0xffff_ffff entry ends the list.
#[no_mangle]
static mut CPUID_TABLE: [CpuidEntry; 16] = [
    leaf(0),
    leaf(1),
    leaf(7),
    sub(7, 1),
    sub(0xb, 0),
    sub(0xb, 1),
    sub(0xd, 0),
    leaf(0x15),
    leaf(0x16),
    leaf(0x4000_0000),
    leaf(0x4000_0010),
    leaf(0x8000_0000),
    leaf(0x8000_0001),
    leaf(0x8000_0007),
    leaf(0x8000_0008),
    leaf(0xffff_ffff),
];

/// CPUID `leaf` (subleaf 0) as seen at CPL0; all zeros for a leaf beyond the range
/// its base leaf (0, 0x4000_0000, 0x8000_0000) reports, or one not in the table.
pub fn cpuid(leaf: u32) -> CpuidEntry {
    cpuid_sub(leaf, 0)
}

/// CPUID `leaf`, `subleaf` as seen at CPL0 (zeros as for [`cpuid`]).
pub fn cpuid_sub(leaf: u32, subleaf: u32) -> CpuidEntry {
    // SAFETY: written once at CPL0 before any Rust code runs; only read afterwards.
    let table = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(CPUID_TABLE)) };
    let base = leaf & 0xffff_0000;
    let in_range = table
        .iter()
        .find(|e| e.leaf == base)
        .is_some_and(|b| leaf <= b.eax);
    let zero = self::leaf(leaf);
    if !in_range {
        return zero;
    }
    table
        .iter()
        .find(|e| e.leaf == leaf && e.subleaf == subleaf)
        .copied()
        .unwrap_or(zero)
}
