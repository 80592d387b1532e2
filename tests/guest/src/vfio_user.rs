//! `test=vfio-user` and `test=vfio-user-dead`: drive the e2e tests' vfio-user server
//! function (5652:0001, `tests/src/bin/vireo-test-vfio-user`) through its BAR0.
//!
//! `vfio-user`: scratch register write/read, MSI-X vector 0 programmed (vector 0x40),
//! a DMA of `len=` bytes (default 4096) of the pattern seeded by `seed=` into a heap
//! buffer, the interrupt awaited, the bytes checked. Prints
//! `vfio-user scratch=.. status=.. counter=.. irqs=.. dma_bytes=.. mismatches=..`.
//!
//! `vfio-user-dead`: scratch check, prints `vfio-user ready`, then reads the ID
//! register every millisecond until it reads all ones (the server was killed) and
//! prints `vfio-user gone id=0xffffffff after_ms=N` (then runs on for `hold_ms=`).

use crate::hvm::CMDLINE;
use crate::io::{self, rdtsc};
use crate::{fail, pci, println};
use core::sync::atomic::Ordering;

const VENDOR: u16 = 0x5652;
const DEVICE: u16 = 0x0001;
const ID_VALUE: u32 = 0x5652_5546;
const SCRATCH: u64 = 0x04;
const DMA_ADDR_LO: u64 = 0x08;
const DMA_ADDR_HI: u64 = 0x0c;
const DMA_LEN: u64 = 0x10;
const DMA_SEED: u64 = 0x14;
const CMD: u64 = 0x18;
const STATUS: u64 = 0x1c;
const COUNTER: u64 = 0x20;
const SCRATCH_VALUE: u32 = 0x5eed_c0de;

/// What the server writes: byte i = seed + 3 i (mod 256).
fn pattern_byte(seed: u32, i: usize) -> u8 {
    (seed as u8).wrapping_add((i as u8).wrapping_mul(3))
}

struct Function {
    cfg: u64,
    bar0: u64,
}

impl Function {
    fn cfg32(&self, off: u64) -> u32 {
        unsafe { ((self.cfg + off) as *const u32).read_volatile() }
    }
    fn read(&self, reg: u64) -> u32 {
        unsafe { ((self.bar0 + reg) as *const u32).read_volatile() }
    }
    fn write(&self, reg: u64, v: u32) {
        unsafe { ((self.bar0 + reg) as *mut u32).write_volatile(v) }
    }
}

fn find() -> Function {
    let mut root = pci::root();
    pci::assign_bars(&mut root, CMDLINE.get("verbose").is_some());
    let found = pci::functions(&root).find(|(_, i)| i.vendor_id == VENDOR && i.device_id == DEVICE);
    let Some((df, _)) = found else {
        fail!("no {:04x}:{:04x} function on bus 0", VENDOR, DEVICE);
    };
    let cfg = crate::paging::virt(pci::ecam_base())
        + (((df.bus as u64) << 20) | ((df.device as u64) << 15) | ((df.function as u64) << 12));
    let lo = unsafe { ((cfg + 0x10) as *const u32).read_volatile() };
    let bar0 = (lo & !0xf) as u64;
    if bar0 == 0 {
        fail!("vfio-user function {} has no BAR0 address", pci::bdf(&df));
    }
    crate::paging::ensure_mapped(bar0, 0x2000);
    println!("vfio-user found {} bar0={:#x}", pci::bdf(&df), bar0);
    Function {
        cfg,
        bar0: crate::paging::virt(bar0),
    }
}

fn check_scratch(f: &Function) {
    let id = f.read(0);
    if id != ID_VALUE {
        fail!(
            "vfio-user ID register reads {:#x}, expected {:#x}",
            id,
            ID_VALUE
        );
    }
    f.write(SCRATCH, SCRATCH_VALUE);
    let back = f.read(SCRATCH);
    if back != SCRATCH_VALUE {
        fail!(
            "vfio-user scratch reads back {:#x}, wrote {:#x}",
            back,
            SCRATCH_VALUE
        );
    }
}

/// Programs MSI-X entry 0 (vector 0x40, fixed, edge, to the BSP) and enables MSI-X.
fn enable_msix(f: &Function) {
    let mut cap = (f.cfg32(0x34) & 0xfc) as u64;
    let mut msix = None;
    while cap != 0 {
        let w = f.cfg32(cap);
        if w & 0xff == 0x11 {
            msix = Some(cap);
        }
        cap = ((w >> 8) & 0xfc) as u64;
    }
    let Some(msix) = msix else {
        fail!("vfio-user function has no MSI-X capability");
    };
    let tbl = f.cfg32(msix + 4);
    if tbl & 7 != 0 {
        fail!("vfio-user MSI-X table in BAR {}, expected 0", tbl & 7);
    }
    let table = f.bar0 + (tbl & !7) as u64;
    unsafe {
        let e = table as *mut u32;
        e.write_volatile(0xfee0_0000);
        e.add(1).write_volatile(0);
        e.add(2).write_volatile(0x40);
        e.add(3).write_volatile(0); // unmasked
        let ctl = (f.cfg + msix + 2) as *mut u16;
        ctl.write_volatile((ctl.read_volatile() | 0x8000) & !0x4000);
        // LAPIC: software-enable so it accepts fixed interrupts.
        ((0xfee0_0000u64 + 0x80) as *mut u32).write_volatile(0);
        ((0xfee0_0000u64 + 0xf0) as *mut u32).write_volatile(0x1ff);
    }
}

fn num(key: &str, default: u64) -> u64 {
    match CMDLINE.get(key).map(|v| v.parse::<u64>()) {
        None => default,
        Some(Ok(v)) => v,
        Some(Err(_)) => fail!("bad {}= value", key),
    }
}

pub fn run() -> ! {
    let f = find();
    check_scratch(&f);
    enable_msix(&f);
    let len = num("len", 4096) as usize;
    let seed = num("seed", 0x5a) as u32;
    let buf = alloc::vec![0u8; len];
    let addr = buf.as_ptr() as u64;
    f.write(DMA_ADDR_LO, addr as u32);
    f.write(DMA_ADDR_HI, (addr >> 32) as u32);
    f.write(DMA_LEN, len as u32);
    f.write(DMA_SEED, seed);
    let khz = crate::timer::tsc_khz().khz;
    unsafe { crate::boot::guest_sti() };
    f.write(CMD, 1);
    let t0 = rdtsc();
    while crate::boot::IRQ_PROBE_COUNT.load(Ordering::SeqCst) == 0 {
        if (rdtsc() - t0) / khz > 10_000 {
            unsafe { crate::boot::guest_cli() };
            fail!("vfio-user: no MSI-X interrupt within 10 s of the DMA command");
        }
        core::hint::spin_loop();
    }
    unsafe { crate::boot::guest_cli() };
    let irqs = crate::boot::IRQ_PROBE_COUNT.load(Ordering::SeqCst);
    // The bytes arrived through the server's mapping of guest memory.
    let got = unsafe { core::ptr::read_volatile(&buf) };
    let mismatches = (0..len)
        .filter(|&i| got[i] != pattern_byte(seed, i))
        .count();
    let status = f.read(STATUS);
    let counter = f.read(COUNTER);
    println!(
        "vfio-user scratch={:#x} status={} counter={} irqs={} dma_bytes={} mismatches={}",
        f.read(SCRATCH),
        status,
        counter,
        irqs,
        len,
        mismatches
    );
    if mismatches != 0 || status != 1 {
        fail!(
            "vfio-user DMA: status {} and {} bytes differ",
            status,
            mismatches
        );
    }
    io::result_ok()
}

pub fn dead() -> ! {
    let f = find();
    check_scratch(&f);
    println!("vfio-user ready");
    let khz = crate::timer::tsc_khz().khz;
    let t0 = rdtsc();
    loop {
        let id = f.read(0);
        let ms = (rdtsc() - t0) / khz;
        if id == 0xffff_ffff {
            println!("vfio-user gone id={:#x} after_ms={}", id, ms);
            break;
        }
        if ms > 30_000 {
            fail!(
                "vfio-user: the device still answers (id {:#x}) after 30 s",
                id
            );
        }
        let t = rdtsc();
        while (rdtsc() - t) / khz < 1 {
            core::hint::spin_loop();
        }
    }
    // Writes to a dead device are dropped; reads stay all ones.
    f.write(SCRATCH, 1);
    println!("vfio-user after scratch={:#x}", f.read(SCRATCH));
    // `hold_ms=`: keep running a while, so the host can look at the VM.
    let hold = num("hold_ms", 0);
    let t = rdtsc();
    while (rdtsc() - t) / khz < hold {
        core::hint::spin_loop();
    }
    io::result_ok()
}
