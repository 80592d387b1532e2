//! TSC frequency: cmdline `tsc_khz=`, CPUID 0x15, CPUID 0x16, hypervisor leaf 0x40000010,
//! else calibration against PIT channel 2.

use crate::io::{inb, outb, rdtsc};
use core::arch::x86_64::__cpuid;

pub struct TscFreq {
    pub khz: u64,
    pub source: &'static str,
}

pub fn tsc_khz() -> TscFreq {
    if let Some(Ok(k)) = crate::hvm::CMDLINE.num("tsc_khz") {
        if k > 0 {
            return TscFreq { khz: k, source: "cmdline" };
        }
    }
    let max = __cpuid(0).eax;
    if max >= 0x15 {
        let l = __cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return TscFreq {
                khz: l.ecx as u64 * l.ebx as u64 / l.eax as u64 / 1000,
                source: "cpuid15",
            };
        }
    }
    if max >= 0x16 {
        let l = __cpuid(0x16);
        if l.eax & 0xffff != 0 {
            return TscFreq {
                khz: (l.eax & 0xffff) as u64 * 1000,
                source: "cpuid16",
            };
        }
    }
    let hv = __cpuid(0x4000_0000).eax;
    if (0x4000_0010..0x4001_0000).contains(&hv) {
        let l = __cpuid(0x4000_0010);
        if l.eax != 0 {
            return TscFreq {
                khz: l.eax as u64,
                source: "cpuid40000010",
            };
        }
    }
    match pit_calibrate() {
        Some(k) => TscFreq { khz: k, source: "pit" },
        None => TscFreq {
            khz: 2_000_000,
            source: "guess",
        },
    }
}

/// Measures the TSC over 20 ms of PIT channel 2 (mode 0, gate on, speaker off), as Linux's
/// `pit_calibrate_tsc` does. Needs a PIT (QEMU microvm: pit=on; KVM_CREATE_PIT2).
fn pit_calibrate() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const MS: u64 = 20;
    let latch = (PIT_HZ * MS / 1000) as u16;
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0);
    outb(0x42, latch as u8);
    outb(0x42, (latch >> 8) as u8);
    let t0 = rdtsc();
    let mut spins = 0u64;
    while inb(0x61) & 0x20 == 0 {
        spins += 1;
        if spins > 10_000_000 {
            return None;
        }
    }
    let t1 = rdtsc();
    if spins == 0 {
        return None; // OUT2 already high: no working PIT.
    }
    Some((t1 - t0) / MS)
}
