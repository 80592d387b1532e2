//! TSC frequency: cmdline `tsc_khz=`, CPUID 0x15, CPUID 0x16, hypervisor leaf 0x40000010,
//! else calibration against PIT channel 0; found once per boot.

use crate::cpuid::cpuid;
use crate::io::{inb, outb, rdtsc};

pub struct TscFreq {
    pub khz: u64,
    pub source: &'static str,
}

/// The TSC frequency, found once per boot (every caller sees the same value).
pub fn tsc_khz() -> TscFreq {
    use core::sync::atomic::{AtomicU64, Ordering};
    const SOURCES: [&str; 6] = [
        "cmdline",
        "cpuid15",
        "cpuid16",
        "cpuid40000010",
        "pit",
        "guess",
    ];
    static KHZ: AtomicU64 = AtomicU64::new(0);
    static SOURCE: AtomicU64 = AtomicU64::new(0);
    let khz = KHZ.load(Ordering::Acquire);
    if khz != 0 {
        let source = SOURCES[SOURCE.load(Ordering::Relaxed) as usize % SOURCES.len()];
        return TscFreq { khz, source };
    }
    let found = find_tsc_khz();
    let index = SOURCES.iter().position(|s| *s == found.source).unwrap_or(0);
    SOURCE.store(index as u64, Ordering::Relaxed);
    KHZ.store(found.khz, Ordering::Release);
    found
}

fn find_tsc_khz() -> TscFreq {
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
///
/// A vCPU can be descheduled at any point for longer than the counter takes to wrap
/// (55 ms) on a loaded host, so the 50 ms are summed from the short steps between
/// consecutive reads (the counter keeps counting down through 0 to 0xffff in mode 0),
/// and a step the vCPU may have been away for is left out of both sums: one whose TSC
/// span (or a read's own) is too long for a wrap to be ruled out. (Comparing the first
/// read with a later one instead could never finish when the first read came late, and
/// came out several times too fast after an unseen wrap.)
fn pit_calibrate() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const TICKS: u64 = PIT_HZ * 50 / 1000;
    /// A step longer than this many TSC cycles is left out: even at 10 GHz it is
    /// 2 ms; a wrap takes 55 ms, i.e. more than this for any TSC above 370 MHz.
    const STEP_MAX_CYCLES: u64 = 20_000_000;
    /// A read longer than this (the vCPU left during it) is not used.
    const READ_MAX_CYCLES: u64 = 2_000_000;
    /// Latches and reads channel 0; returns the count and the TSC midpoint of the read,
    /// None if the read itself took too long to place it in time.
    fn sample() -> Option<(u16, u64)> {
        let a = rdtsc();
        outb(0x43, 0x00); // latch channel 0
        let lo = inb(0x40) as u16;
        let hi = inb(0x40) as u16;
        let b = rdtsc();
        (b - a <= READ_MAX_CYCLES).then_some((lo | (hi << 8), a + (b - a) / 2))
    }
    outb(0x43, 0x30); // channel 0, lobyte/hibyte, mode 0, binary
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    let (mut ticks, mut cycles) = (0u64, 0u64);
    let mut prev = sample();
    let mut still = 0u64;
    while ticks < TICKS {
        let now = sample();
        if let (Some((c0, t0)), Some((c1, t1))) = (prev, now) {
            let step = t1.wrapping_sub(t0);
            if step <= STEP_MAX_CYCLES {
                let counted = u64::from(c0.wrapping_sub(c1));
                ticks += counted;
                cycles += step;
                // A PIT counts down ~1.19 per microsecond, so a count that has not
                // moved over thousands of reads (each a VM exit) means there is no PIT.
                still = if counted == 0 { still + 1 } else { 0 };
                if still > 10_000 {
                    return None;
                }
            }
        }
        prev = now;
    }
    Some(cycles * PIT_HZ / ticks / 1000)
}
