//! PVH `hvm_start_info`, kernel command line, memory map and ACPI (MADT CPU count).

use core::cell::UnsafeCell;
use core::ptr::read_unaligned as rd;

pub const HVM_START_MAGIC: u32 = 0x336e_c578;

pub struct StartInfo {
    pub rsdp: u64,
    memmap_entries: usize,
}

/// Copy of the PVH memory map (so later allocations cannot overwrite it).
const MAX_MEMMAP: usize = 128;
struct MemmapCopy(UnsafeCell<[(u64, u64, u32); MAX_MEMMAP]>);
unsafe impl Sync for MemmapCopy {}
static MEMMAP: MemmapCopy = MemmapCopy(UnsafeCell::new([(0, 0, 0); MAX_MEMMAP]));

/// # Safety
/// `addr` must point at readable memory.
pub unsafe fn start_info(addr: u64) -> Option<StartInfo> {
    if addr == 0 || rd(addr as *const u32) != HVM_START_MAGIC {
        return None;
    }
    let version = rd((addr + 4) as *const u32);
    let (memmap, memmap_entries) = if version >= 1 {
        (rd((addr + 40) as *const u64), rd((addr + 48) as *const u32))
    } else {
        (0, 0)
    };
    let n = if memmap == 0 {
        0
    } else {
        (memmap_entries as usize).min(MAX_MEMMAP)
    };
    let copy = &mut *MEMMAP.0.get();
    for (i, slot) in copy.iter_mut().enumerate().take(n) {
        let e = memmap + i as u64 * 24;
        *slot = (
            rd(e as *const u64),
            rd((e + 8) as *const u64),
            rd((e + 16) as *const u32),
        );
    }
    let info = StartInfo {
        rsdp: rd((addr + 32) as *const u64),
        memmap_entries: n,
    };
    let cmdline = rd((addr + 24) as *const u64);
    if cmdline != 0 {
        CMDLINE.set_from(cmdline as *const u8);
    }
    Some(info)
}

pub struct MemEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl StartInfo {
    pub fn memmap(&self) -> impl Iterator<Item = MemEntry> + '_ {
        let copy = unsafe { &*MEMMAP.0.get() };
        copy[..self.memmap_entries]
            .iter()
            .map(|&(addr, size, kind)| MemEntry { addr, size, kind })
    }

    /// Total RAM (E820 type 1) in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.memmap().filter(|e| e.kind == 1).map(|e| e.size).sum()
    }
}

/// Kernel command line, copied out of guest memory before the heap is set up.
pub struct Cmdline {
    buf: UnsafeCell<([u8; 4096], usize)>,
}

unsafe impl Sync for Cmdline {}

pub static CMDLINE: Cmdline = Cmdline {
    buf: UnsafeCell::new(([0; 4096], 0)),
};

impl Cmdline {
    unsafe fn set_from(&self, p: *const u8) {
        let b = &mut *self.buf.get();
        let mut n = 0;
        while n < b.0.len() {
            let c = *p.add(n);
            if c == 0 {
                break;
            }
            b.0[n] = c;
            n += 1;
        }
        b.1 = n;
    }

    pub fn as_str(&self) -> &str {
        let b = unsafe { &*self.buf.get() };
        core::str::from_utf8(&b.0[..b.1]).unwrap_or("")
    }

    /// Value of `key=value` (last occurrence wins). A bare `key` yields `Some("")`.
    pub fn get(&self, key: &str) -> Option<&str> {
        let mut found = None;
        for word in self.as_str().split_ascii_whitespace() {
            match word.split_once('=') {
                Some((k, v)) if k == key => found = Some(v),
                None if word == key => found = Some(""),
                _ => {}
            }
        }
        found
    }

    /// Integer value: decimal, or hex with a `0x` prefix.
    pub fn num(&self, key: &str) -> Option<Result<u64, ()>> {
        self.get(key).map(parse_num)
    }

    /// Hex value, with or without `0x` prefix.
    pub fn hex(&self, key: &str) -> Option<Result<u64, ()>> {
        self.get(key).map(parse_hex)
    }
}

pub fn parse_num(s: &str) -> Result<u64, ()> {
    if s.starts_with("0x") || s.starts_with("0X") {
        parse_hex(s)
    } else {
        s.parse::<u64>().map_err(|_| ())
    }
}

pub fn parse_hex(s: &str) -> Result<u64, ()> {
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u64::from_str_radix(s, 16).map_err(|_| ())
}

// ------------------------------------------------------------------------------- ACPI

fn checksum_ok(p: u64, len: usize) -> bool {
    let mut sum = 0u8;
    for i in 0..len as u64 {
        sum = sum.wrapping_add(unsafe { *((p + i) as *const u8) });
    }
    sum == 0
}

fn sig_at(p: u64, sig: &[u8]) -> bool {
    (0..sig.len()).all(|i| unsafe { *((p + i as u64) as *const u8) } == sig[i])
}

/// Finds the RSDP: from hvm_start_info, else by scanning 0xE0000..0xFFFFF.
pub fn find_rsdp(hint: u64) -> Option<u64> {
    if hint != 0 && sig_at(hint, b"RSD PTR ") {
        return Some(hint);
    }
    (0xE0000u64..0x100000)
        .step_by(16)
        .find(|&p| sig_at(p, b"RSD PTR ") && checksum_ok(p, 20))
}

/// The address of the ACPI table with signature `sig` (through the RSDP's XSDT or RSDT).
pub fn find_table(rsdp_hint: u64, sig: &[u8; 4]) -> Option<u64> {
    let rsdp = find_rsdp(rsdp_hint)?;
    unsafe {
        let revision = *((rsdp + 15) as *const u8);
        let (table, entry_size) = if revision >= 2 && rd((rsdp + 24) as *const u64) != 0 {
            (rd((rsdp + 24) as *const u64), 8u64)
        } else {
            (rd((rsdp + 16) as *const u32) as u64, 4u64)
        };
        if table == 0 {
            return None;
        }
        let len = rd((table + 4) as *const u32) as u64;
        let count = len.saturating_sub(36) / entry_size;
        (0..count)
            .map(|i| {
                let e = table + 36 + i * entry_size;
                if entry_size == 8 {
                    rd(e as *const u64)
                } else {
                    rd(e as *const u32) as u64
                }
            })
            .find(|&t| {
                t != 0 && sig_at(t, sig) && checksum_ok(t, rd((t + 4) as *const u32) as usize)
            })
    }
}

pub struct Madt {
    pub cpus: u32,
    /// APIC IDs of the enabled CPUs, in table order (the first 256).
    pub apic_ids: [u32; 256],
}

impl Madt {
    pub fn ids(&self) -> &[u32] {
        &self.apic_ids[..(self.cpus as usize).min(256)]
    }
}

/// Counts enabled Local APIC (type 0) and Local x2APIC (type 9) entries of the MADT.
pub fn madt_cpus(rsdp_hint: u64) -> Option<Madt> {
    let rsdp = find_rsdp(rsdp_hint)?;
    unsafe {
        let revision = *((rsdp + 15) as *const u8);
        let (table, entry_size) = if revision >= 2 && rd((rsdp + 24) as *const u64) != 0 {
            (rd((rsdp + 24) as *const u64), 8u64)
        } else {
            (rd((rsdp + 16) as *const u32) as u64, 4u64)
        };
        if table == 0 {
            return None;
        }
        let len = rd((table + 4) as *const u32) as u64;
        let count = len.saturating_sub(36) / entry_size;
        for i in 0..count {
            let e = table + 36 + i * entry_size;
            let t = if entry_size == 8 {
                rd(e as *const u64)
            } else {
                rd(e as *const u32) as u64
            };
            if t != 0 && sig_at(t, b"APIC") {
                let mlen = rd((t + 4) as *const u32) as u64;
                let mut p = t + 44;
                let mut cpus = 0u32;
                let mut apic_ids = [0u32; 256];
                let mut add = |id: u32| {
                    if (cpus as usize) < apic_ids.len() {
                        apic_ids[cpus as usize] = id;
                    }
                    cpus += 1;
                };
                while p + 2 <= t + mlen {
                    let ty = *(p as *const u8);
                    let l = *((p + 1) as *const u8) as u64;
                    if l < 2 {
                        break;
                    }
                    match ty {
                        // Local APIC: flags at 4; Local x2APIC: flags at 8; bit 0 = enabled.
                        // Local APIC: APIC ID at 3; Local x2APIC: x2APIC ID at 4.
                        0 if l >= 8 && rd((p + 4) as *const u32) & 1 != 0 => {
                            add(u32::from(*((p + 3) as *const u8)))
                        }
                        9 if l >= 16 && rd((p + 8) as *const u32) & 1 != 0 => {
                            add(rd((p + 4) as *const u32))
                        }
                        _ => {}
                    }
                    p += l;
                }
                return Some(Madt { cpus, apic_ids });
            }
        }
    }
    None
}
