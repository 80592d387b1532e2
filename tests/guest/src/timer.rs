//! TSC frequency: cmdline `tsc_khz=`, CPUID 0x15, CPUID 0x16, hypervisor leaf 0x40000010,
//! else calibration against PIT channel 2.

use crate::cpuid::cpuid;
use crate::io::{inb, outb, rdtsc};

pub struct TscFreq {
    pub khz: u64,
    pub source: &'static str,
}

pub fn tsc_khz() -> TscFreq {
    if let Some(Ok(k)) = crate::hvm::CMDLINE.num("tsc_khz") {
        if k > 0 {
            return TscFreq {
                khz: k,
                source: "cmdline",
            };
        }
    }
    let l15 = cpuid(0x15);
    if l15.eax != 0 && l15.ebx != 0 && l15.ecx != 0 {
        return TscFreq {
            khz: l15.ecx as u64 * l15.ebx as u64 / l15.eax as u64 / 1000,
            source: "cpuid15",
        };
    }
    let l16 = cpuid(0x16);
    if l16.eax & 0xffff != 0 {
        return TscFreq {
            khz: (l16.eax & 0xffff) as u64 * 1000,
            source: "cpuid16",
        };
    }
    let hv = cpuid(0x4000_0010);
    if hv.eax != 0 {
        return TscFreq {
            khz: hv.eax as u64,
            source: "cpuid40000010",
        };
    }
    match pit_calibrate() {
        Some(k) => TscFreq {
            khz: k,
            source: "pit",
        },
        None => TscFreq {
            khz: 2_000_000,
            source: "guess",
        },
    }
}

/// Measures the TSC against 50 ms of PIT channel 0 (mode 0, count 0xffff, read back with
/// the counter-latch command). Channel 0's gate is always on, so this does not depend on
/// port 0x61 (which QEMU microvm does not emulate). IF stays 0, so IRQ0 is never taken.
/// Needs a PIT (QEMU microvm: pit=on by default; Vireo: KVM_CREATE_PIT2).
fn pit_calibrate() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const TICKS: u16 = (PIT_HZ * 50 / 1000) as u16;
    /// Latches and reads channel 0; returns the count and the TSC midpoint of the read.
    fn sample() -> (u16, u64) {
        let a = rdtsc();
        outb(0x43, 0x00); // latch channel 0
        let lo = inb(0x40) as u16;
        let hi = inb(0x40) as u16;
        let b = rdtsc();
        (lo | (hi << 8), a + (b - a) / 2)
    }
    outb(0x43, 0x30); // channel 0, lobyte/hibyte, mode 0, binary
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    let (c0, t0) = sample();
    let mut spins = 0u64;
    loop {
        let (c, t) = sample();
        if c <= c0 && c0 - c >= TICKS {
            return Some((t - t0) * PIT_HZ / (c0 - c) as u64 / 1000);
        }
        // A PIT counts down ~1.19 per microsecond, so a count that has not moved over
        // thousands of reads (each a VM exit) means there is no PIT.
        if c == c0 {
            spins += 1;
            if spins > 10_000 {
                return None;
            }
        }
    }
}
