//! The tests selected by `test=<name>`.

use crate::hvm::CMDLINE;
use crate::io::{self, rdtsc};
use crate::pattern::{self, Crc32, SECTOR_SIZE};
use crate::pci::{self, GuestHal};
use crate::{fail, println};
use alloc::vec;
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::DeviceType;

type Blk = VirtIOBlk<GuestHal, PciTransport>;

/// Sectors per virtio-blk request in blk-write/blk-read (64 KiB).
const CHUNK_SECTORS: u64 = 128;

fn num(key: &str, default: Option<u64>) -> u64 {
    match CMDLINE.num(key) {
        Some(Ok(v)) => v,
        Some(Err(())) => fail!("bad {}= value", key),
        None => match default {
            Some(d) => d,
            None => fail!("missing {}=", key),
        },
    }
}

pub fn pci() -> ! {
    let mut root = pci::root();
    let mut n = 0;
    for (df, info) in pci::functions(&root) {
        println!(
            "pci {} vendor={:04x} device={:04x} class={:02x}{:02x}{:02x}",
            pci::bdf(&df),
            info.vendor_id,
            info.device_id,
            info.class,
            info.subclass,
            info.prog_if
        );
        n += 1;
    }
    if n == 0 {
        fail!("no PCI functions on bus 0 (ecam={:#x})", pci::ecam_base());
    }
    pci::assign_bars(&mut root, true);
    println!("bus 00 functions={}", n);
    io::result_ok()
}

/// Assigns BARs and opens the first virtio-blk function on bus 0.
fn open_blk() -> Blk {
    open_blk_at().0
}

fn open_blk_at() -> (Blk, virtio_drivers::transport::pci::bus::DeviceFunction) {
    let mut root = pci::root();
    pci::assign_bars(&mut root, CMDLINE.get("verbose").is_some());
    let found =
        pci::functions(&root).find(|(_, info)| virtio_device_type(info) == Some(DeviceType::Block));
    let Some((df, _)) = found else {
        fail!("no virtio-blk device on bus 0");
    };
    let transport = match PciTransport::new::<GuestHal, _>(&mut root, df) {
        Ok(t) => t,
        Err(e) => fail!("virtio-blk {}: transport: {:?}", pci::bdf(&df), e),
    };
    match Blk::new(transport) {
        Ok(b) => (b, df),
        Err(e) => fail!("virtio-blk {}: init: {:?}", pci::bdf(&df), e),
    }
}

fn blk_range(blk: &Blk) -> (u64, u64, u64) {
    let seed = num("seed", Some(0));
    let sectors = num("sectors", None);
    let offset = num("offset", Some(0));
    if sectors == 0 {
        fail!("sectors=0");
    }
    let cap = blk.capacity();
    if offset.checked_add(sectors).is_none_or(|end| end > cap) {
        fail!(
            "range offset={} sectors={} beyond capacity={}",
            offset,
            sectors,
            cap
        );
    }
    (seed, sectors, offset)
}

pub fn blk_write() -> ! {
    let mut blk = open_blk();
    let (seed, sectors, offset) = blk_range(&blk);
    if blk.readonly() {
        fail!("device is read-only (VIRTIO_BLK_F_RO)");
    }
    let mut buf = vec![0u8; (CHUNK_SECTORS as usize) * SECTOR_SIZE];
    let mut crc = Crc32::new();
    let mut done = 0;
    while done < sectors {
        let n = (sectors - done).min(CHUNK_SECTORS);
        let b = &mut buf[..n as usize * SECTOR_SIZE];
        pattern::fill(seed, offset + done, b);
        crc.update(b);
        if let Err(e) = blk.write_blocks((offset + done) as usize, b) {
            fail!("write at sector {}: {:?}", offset + done, e);
        }
        done += n;
    }
    if let Err(e) = blk.flush() {
        fail!("flush: {:?}", e);
    }
    println!(
        "blk capacity={} wrote={} crc32={:08x}",
        blk.capacity(),
        sectors,
        crc.finish()
    );
    if num("hold", Some(0)) != 0 {
        // Stay up (the host agent's metering test reads the VMM's counters afterwards).
        println!("blk-write holding");
        loop {
            core::hint::spin_loop();
        }
    }
    io::result_ok()
}

pub fn blk_read() -> ! {
    let mut blk = open_blk();
    let (seed, sectors, offset) = blk_range(&blk);
    let mut buf = vec![0u8; (CHUNK_SECTORS as usize) * SECTOR_SIZE];
    let mut crc = Crc32::new();
    let mut mismatches = 0u64;
    let mut first_bad = None;
    let mut done = 0;
    while done < sectors {
        let n = (sectors - done).min(CHUNK_SECTORS);
        let b = &mut buf[..n as usize * SECTOR_SIZE];
        if let Err(e) = blk.read_blocks((offset + done) as usize, b) {
            fail!("read at sector {}: {:?}", offset + done, e);
        }
        crc.update(b);
        for (i, s) in b.chunks_exact(SECTOR_SIZE).enumerate() {
            let lba = offset + done + i as u64;
            if !pattern::check_sector(seed, lba, s) {
                mismatches += 1;
                first_bad.get_or_insert(lba);
            }
        }
        done += n;
    }
    println!(
        "blk read={} mismatches={} crc32={:08x}",
        sectors,
        mismatches,
        crc.finish()
    );
    if let Some(lba) = first_bad {
        fail!(
            "{} mismatching sectors, first at sector {}",
            mismatches,
            lba
        );
    }
    io::result_ok()
}

pub fn blk_ro() -> ! {
    let mut blk = open_blk();
    let ro = blk.readonly();
    println!("blk capacity={} readonly={}", blk.capacity(), ro as u8);
    let mut before = vec![0u8; SECTOR_SIZE];
    if let Err(e) = blk.read_blocks(0, &mut before) {
        fail!("read of sector 0: {:?}", e);
    }
    let mut data = vec![0u8; SECTOR_SIZE];
    // Something that certainly differs from sector 0.
    for (i, b) in data.iter_mut().enumerate() {
        *b = !before[i];
    }
    let res = blk.write_blocks(0, &data);
    let mut after = vec![0u8; SECTOR_SIZE];
    if let Err(e) = blk.read_blocks(0, &mut after) {
        fail!("re-read of sector 0: {:?}", e);
    }
    let unchanged = before == after;
    match res {
        Ok(()) => println!("blk-ro write=accepted unchanged={}", unchanged as u8),
        Err(e) => println!(
            "blk-ro write=refused error={:?} unchanged={}",
            e, unchanged as u8
        ),
    }
    if res.is_ok() {
        fail!("write to read-only disk was accepted");
    }
    if !unchanged {
        fail!("sector 0 changed although the write was refused");
    }
    if !ro {
        fail!("write refused but VIRTIO_BLK_F_RO not offered");
    }
    io::result_ok()
}

/// `test=cpuid`: prints the feature registers of the CPUID feature leaves as the VMM
/// set them (read at CPL0 at boot), `cpuid F.I eax=.. ebx=.. ecx=.. edx=..`, and leaf
/// 0xd.0's XSAVE components (`cpuid d.0 xcr0=..`); then runs `counter` (a host can
/// migrate it and see it go on).
pub fn cpuid_features() -> ! {
    for (f, i) in [(1, 0), (7, 0), (7, 1), (0x8000_0001, 0), (0x8000_0007, 0)] {
        let e = crate::cpuid::cpuid_sub(f, i);
        println!(
            "cpuid {:x}.{:x} eax={:08x} ebx={:08x} ecx={:08x} edx={:08x}",
            f, i, e.eax, e.ebx, e.ecx, e.edx
        );
    }
    let d = crate::cpuid::cpuid_sub(0xd, 0);
    println!("cpuid d.0 xcr0={:08x}{:08x}", d.edx, d.eax);
    counter()
}

/// `test=counter [period_ms=P] [ticks=T]`: forever (or T ticks) print `tick <n> tsc=<tsc>`
/// every P ms. A tick that is late (VM paused) is not caught up: the next one is scheduled P
/// ms after it, so a pause shows as a gap in the tsc values, not as a burst of ticks.
pub fn counter() -> ! {
    let period_ms = num("period_ms", Some(100)).max(1);
    let limit = num("ticks", Some(0));
    let f = crate::timer::tsc_khz();
    println!(
        "counter tsc_khz={} source={} period_ms={}",
        f.khz, f.source, period_ms
    );
    let period = f.khz * period_ms;
    let mut next = rdtsc();
    let mut n = 0u64;
    loop {
        let mut now = rdtsc();
        while now < next {
            core::hint::spin_loop();
            now = rdtsc();
        }
        println!("tick {} tsc={}", n, now);
        n += 1;
        if limit != 0 && n >= limit {
            io::result_ok();
        }
        next += period;
        if now > next {
            next = now + period;
        }
    }
}

/// `test=touch mib=N`: backs N MiB of guest RAM (non-zero pages) spread evenly over its largest region
/// (a 1 TiB guest with mib=1024 touches one page in every 1,024), then counts like
/// `test=counter`: what the VMM overhead and migration benches of large guests run.
pub fn touch(si: &crate::hvm::StartInfo) -> ! {
    let pages = num("mib", None) * 256;
    let (first, stride) = spread_pages(si, pages);
    // Data, not zeros: each page's first word is its address (a zero page is cheap to
    // migrate, a touched one is not).
    for i in 0..pages {
        let at = first + i * stride;
        // SAFETY: page i of the pages just mapped and zeroed.
        unsafe { (crate::paging::virt(at) as *mut u64).write_volatile(at) };
    }
    println!(
        "touch pages={} first={:#x} stride={:#x}",
        pages, first, stride
    );
    counter()
}

/// Value of word `k` of page `i` after pass `p` in `test=dirty`.
fn dirty_word(p: u64, i: u64, k: u64) -> u64 {
    if p == 0 {
        return 0;
    }
    p.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i << 20) ^ k
}

/// `test=dirty pages=N [rate=R] [passes=P] [report_ms=M]`: see README.md.
pub fn dirty() -> ! {
    let pages = num("pages", None);
    let rate = num("rate", Some(0));
    let passes = num("passes", Some(0));
    let report_ms = num("report_ms", Some(1000)).max(1);
    if pages == 0 {
        fail!("pages=0");
    }
    let bytes = pages as usize * 4096;
    if crate::rt::HEAP.remaining() < bytes + (1 << 20) {
        fail!("pages={} does not fit in the heap", pages);
    }
    let base = crate::rt::HEAP.alloc_raw(bytes, 4096) as *mut u64;
    // Fresh RAM is zero; make sure (pass 0 = all zero).
    unsafe { core::ptr::write_bytes(base as *mut u8, 0, bytes) };
    let f = crate::timer::tsc_khz();
    println!(
        "dirty pages={} rate={} tsc_khz={} source={} base={:#x}",
        pages, rate, f.khz, f.source, base as u64
    );
    let start = rdtsc();
    let report_every = f.khz * report_ms;
    let mut written = 0u64;
    let mut last_report = start;
    let mut p = 1u64;
    loop {
        for i in 0..pages {
            // Stamped reports in the middle of a pass too: the interval between two
            // is what the guest sees of a pause (e.g. a migration's downtime).
            if i % 64 == 0 {
                let now = rdtsc();
                if now - last_report >= report_every {
                    println!("dirty pass={} written={} tsc={}", p, written, now);
                    last_report = now;
                }
            }
            let page = unsafe { base.add(i as usize * 512) };
            for k in 0..512u64 {
                let got = unsafe { page.add(k as usize).read_volatile() };
                let want = dirty_word(p - 1, i, k);
                if got != want {
                    println!(
                        "dirty mismatch pass={} page={} word={} got={:#x} want={:#x}",
                        p, i, k, got, want
                    );
                    fail!("memory mismatch");
                }
            }
            for k in 0..512u64 {
                unsafe { page.add(k as usize).write_volatile(dirty_word(p, i, k)) };
            }
            written += 1;
            if let Some(per_page) = (f.khz * 1000).checked_div(rate) {
                let due = start + written * per_page;
                while rdtsc() < due {
                    core::hint::spin_loop();
                }
            }
        }
        if passes != 0 && p >= passes {
            println!("dirty pass={} written={} tsc={}", p, written, rdtsc());
            io::result_ok();
        }
        p += 1;
    }
}

/// One in-flight request of blk-bench: its header, status and data buffer stay put
/// (the device reads and writes them) until it completes.
struct BenchSlot {
    req: virtio_drivers::device::blk::BlkReq,
    resp: virtio_drivers::device::blk::BlkResp,
    buf: alloc::vec::Vec<u8>,
    token: Option<u16>,
    /// TSC when its submission returned (the request was in the ring, notified).
    submitted: u64,
}

/// Next LBA of a phase: xorshift-random 4K-aligned slots, or sequential ones.
struct LbaGen {
    x: u64,
    seq: u64,
    slots: u64,
    secs: u64,
    random: bool,
}

impl LbaGen {
    fn next(&mut self) -> u64 {
        if self.random {
            self.x ^= self.x >> 12;
            self.x ^= self.x << 25;
            self.x ^= self.x >> 27;
            (self.x.wrapping_mul(0x2545_F491_4F6C_DD1D) % self.slots) * self.secs
        } else {
            let l = (self.seq % self.slots) * self.secs;
            self.seq += 1;
            l
        }
    }
}

/// `test=blk-bench [ms=D] [span_mib=M] [seed=S] [qd=Q] [phases=P1+P2..]`: I/O benchmarks
/// at queue depth Q (1..=32, default 1; 32 is the vendored virtio-drivers' block queue
/// size) — destroys disk contents. `phases` picks some of rand4k-read, rand4k-write,
/// seq1m-write, seq1m-read (default all, in that order). Each phase's line also splits a
/// request's time as the guest sees it: `submit_ns`, in the driver's submit call (the
/// descriptors, the available ring and the notification, an exit to the host), and
/// `wait_ns`, from its return until the guest finds the request in the used ring (it
/// polls the ring: no interrupt is in this path).
pub fn blk_bench() -> ! {
    let mut blk = open_blk();
    if blk.readonly() {
        fail!("device is read-only");
    }
    let ms = num("ms", Some(1000)).max(1);
    let qd = num("qd", Some(1));
    if qd == 0 || qd > u64::from(blk.virt_queue_size()) {
        fail!("qd must be 1..={}", blk.virt_queue_size());
    }
    let cap = blk.capacity();
    let span = (num("span_mib", Some(256)) * 2048).min(cap);
    if span < 2048 {
        fail!("disk too small for blk-bench (need >= 1 MiB)");
    }
    let f = crate::timer::tsc_khz();
    println!(
        "bench capacity={} span_sectors={} ms={} qd={} tsc_khz={} source={}",
        cap, span, ms, qd, f.khz, f.source
    );
    let seed = num("seed", Some(1)) | 1;
    let mut slots: alloc::vec::Vec<BenchSlot> = (0..qd)
        .map(|i| {
            let mut buf = vec![0u8; 1 << 20];
            pattern::fill(seed + i, 0, &mut buf);
            BenchSlot {
                req: Default::default(),
                resp: Default::default(),
                buf,
                token: None,
                submitted: 0,
            }
        })
        .collect();
    let dur = f.khz * ms;
    let phases = CMDLINE.get("phases");
    for (name, write, bs) in [
        ("rand4k-read", false, 4096usize),
        ("rand4k-write", true, 4096),
        ("seq1m-write", true, 1 << 20),
        ("seq1m-read", false, 1 << 20),
    ] {
        if phases.is_some_and(|p| !p.split('+').any(|one| one == name)) {
            continue;
        }
        let secs = (bs / SECTOR_SIZE) as u64;
        let mut lbas = LbaGen {
            x: seed,
            seq: 0,
            slots: span / secs,
            secs,
            random: bs == 4096,
        };
        let mut submit_cycles = 0u64;
        let mut wait_cycles = 0u64;
        let mut submit = |blk: &mut Blk, slot: &mut BenchSlot, lba: u64| {
            let start = rdtsc();
            let b = &mut slot.buf[..bs];
            // SAFETY: the slot's req, resp and buffer are not touched until the request
            // completes (`complete` below), and the slots outlive every request.
            let r = unsafe {
                if write {
                    blk.write_blocks_nb(lba as usize, &mut slot.req, b, &mut slot.resp)
                } else {
                    blk.read_blocks_nb(lba as usize, &mut slot.req, b, &mut slot.resp)
                }
            };
            match r {
                Ok(t) => slot.token = Some(t),
                Err(e) => fail!("{} at sector {}: {:?}", name, lba, e),
            }
            slot.submitted = rdtsc();
            submit_cycles += slot.submitted - start;
        };
        let t0 = rdtsc();
        let mut ops = 0u64;
        for slot in slots.iter_mut() {
            submit(&mut blk, slot, lbas.next());
        }
        let mut in_flight = slots.len();
        while in_flight > 0 {
            let Some(done) = blk.peek_used() else {
                core::hint::spin_loop();
                continue;
            };
            let seen = rdtsc();
            let Some(slot) = slots.iter_mut().find(|s| s.token == Some(done)) else {
                fail!("{}: completion for unknown token {}", name, done);
            };
            wait_cycles += seen - slot.submitted;
            let b = &mut slot.buf[..bs];
            // SAFETY: the same buffers as the submission of this token.
            let r = unsafe {
                if write {
                    blk.complete_write_blocks(done, &slot.req, b, &mut slot.resp)
                } else {
                    blk.complete_read_blocks(done, &slot.req, b, &mut slot.resp)
                }
            };
            slot.token = None;
            if let Err(e) = r {
                fail!("{}: {:?}", name, e);
            }
            ops += 1;
            if rdtsc() - t0 < dur {
                submit(&mut blk, slot, lbas.next());
            } else {
                in_flight -= 1;
            }
        }
        let cycles = rdtsc() - t0;
        let us = cycles * 1000 / f.khz;
        let iops = ops * 1_000_000 / us.max(1);
        // 1 byte/us = 1 MB/s (10^6 bytes per second); keep three decimals.
        let milli_mbps = ops * bs as u64 * 1000 / us.max(1);
        let per_op_ns = |c: u64| c * 1_000_000 / f.khz / ops.max(1);
        println!(
            "bench {} ops={} iops={} mbps={}.{:03} avg_us={} submit_ns={} wait_ns={}",
            name,
            ops,
            iops,
            milli_mbps / 1000,
            milli_mbps % 1000,
            us * qd / ops.max(1),
            per_op_ns(submit_cycles),
            per_op_ns(wait_cycles)
        );
    }
    if let Err(e) = blk.flush() {
        fail!("flush: {:?}", e);
    }
    io::result_ok()
}

/// `test=fault [kind=pf|gp|ud|de]`: provokes a CPU exception at CPL3; the CPL0 handler must
/// print it and exit with 0x7f.
pub fn fault() -> ! {
    let kind = CMDLINE.get("kind").unwrap_or("pf");
    println!("fault kind={}", kind);
    unsafe {
        match kind {
            "pf" => {
                // 2 TiB: beyond the identity map (PML4 entry 4 is not present).
                let v = core::ptr::read_volatile(0x200_0000_0000 as *const u64);
                println!("read {:#x}?", v);
            }
            "gp" => core::arch::asm!("hlt"),
            "ud" => core::arch::asm!("ud2"),
            "de" => {
                core::arch::asm!("xor edx, edx", "xor eax, eax", "xor ecx, ecx", "div ecx", out("eax") _, out("edx") _, out("ecx") _)
            }
            _ => fail!("unknown fault kind"),
        }
    }
    fail!("no exception happened");
}

/// `test=irq`: does an interrupt reach the guest while it runs at CPL3? Arms the LAPIC timer
/// (xAPIC MMIO at 0xfee00000, one-shot, vector 0x40), sets IF through `guest_sti` (a UD2 the CPL0 #UD handler turns into STI) and waits until
/// the CPL0 handler counts it (the host bounds the run; no guest-side deadline).
pub fn irq() -> ! {
    use core::sync::atomic::Ordering;
    const LAPIC: u64 = 0xfee0_0000;
    let reg = |off: u64| (LAPIC + off) as *mut u32;
    let f = crate::timer::tsc_khz();
    unsafe {
        let id = reg(0x20).read_volatile();
        let ver = reg(0x30).read_volatile();
        println!("irq lapic id={:#x} version={:#x}", id >> 24, ver);
        reg(0x80).write_volatile(0); // TPR
        reg(0xf0).write_volatile(0x1ff); // SVR: enable, spurious vector 0xff
        reg(0x3e0).write_volatile(0xb); // divide by 1
        reg(0x320).write_volatile(0x40); // LVT timer: one-shot, vector 0x40
        reg(0x380).write_volatile(1_000_000); // initial count
        let t0 = rdtsc();
        crate::boot::guest_sti();
        wait_for_irq_probe();
        crate::boot::guest_cli();
        let n = crate::boot::IRQ_PROBE_COUNT.load(Ordering::SeqCst);
        let waited_us = (rdtsc() - t0) * 1000 / f.khz;
        println!(
            "irq lapic-timer vector=0x40 delivered={} waited_us={}",
            n, waited_us
        );
    }
    io::result_ok()
}

/// `test=msi`: does a device MSI reach the guest while it runs at CPL3? Programs MSI-X entry
/// 0 of the first virtio-blk (address 0xfee00000, data 0x40 = vector 0x40, fixed, edge),
/// enables MSI-X, routes virtqueue 0 to entry 0 through the virtio common config, enables
/// IF and submits one read; the CPL0 vector 0x40 handler counts the interrupt, and only then
/// is the read completed.
pub fn msi() -> ! {
    use core::sync::atomic::Ordering;
    let (mut blk, df) = open_blk_at();
    let cfg = crate::paging::virt(pci::ecam_base())
        + (((df.bus as u64) << 20) | ((df.device as u64) << 15) | ((df.function as u64) << 12));
    let r32 = |off: u64| unsafe { ((cfg + off) as *const u32).read_volatile() };
    let bar_addr = |bir: u64| -> u64 {
        let lo = r32(0x10 + 4 * bir);
        let mut a = (lo & !0xf) as u64;
        if lo & 0b110 == 0b100 {
            a |= (r32(0x14 + 4 * bir) as u64) << 32;
        }
        crate::paging::virt(a)
    };
    let mut msix = None;
    let mut common = None;
    let mut cap = (r32(0x34) & 0xfc) as u64;
    while cap != 0 {
        let w = r32(cap);
        match w & 0xff {
            0x11 => msix = Some(cap),
            0x09 if (w >> 24) & 0xff == 1 => {
                let bir = (r32(cap + 4) & 0xff) as u64;
                common = Some(bar_addr(bir) + r32(cap + 8) as u64);
            }
            _ => {}
        }
        cap = ((w >> 8) & 0xfc) as u64;
    }
    let (Some(msix), Some(common)) = (msix, common) else {
        fail!("virtio-blk has no MSI-X capability or no common config");
    };
    let tbl = r32(msix + 4);
    let table = bar_addr((tbl & 7) as u64) + (tbl & !7) as u64;
    crate::paging::ensure_mapped(table & 0x0000_ffff_ffff_ffff, 16);
    unsafe {
        let e = table as *mut u32;
        e.write_volatile(0xfee0_0000);
        e.add(1).write_volatile(0);
        e.add(2).write_volatile(0x40);
        e.add(3).write_volatile(0); // unmasked
        let ctl = (cfg + msix + 2) as *mut u16;
        ctl.write_volatile((ctl.read_volatile() | 0x8000) & !0x4000);
        ((common + 0x16) as *mut u16).write_volatile(0); // queue_select
        ((common + 0x1a) as *mut u16).write_volatile(0); // queue_msix_vector
    }
    let vec_back = unsafe { ((common + 0x1a) as *const u16).read_volatile() };
    println!(
        "msi msix_cap={:#x} table={:#x} common={:#x} queue0_vector={:#x}",
        msix, table, common, vec_back
    );
    // LAPIC: software-enable so it accepts fixed interrupts.
    unsafe {
        ((0xfee0_0000u64 + 0x80) as *mut u32).write_volatile(0);
        ((0xfee0_0000u64 + 0xf0) as *mut u32).write_volatile(0x1ff);
    }
    blk.enable_interrupts();
    let mut buf = vec![0u8; SECTOR_SIZE];
    let mut req = virtio_drivers::device::blk::BlkReq::default();
    let mut resp = virtio_drivers::device::blk::BlkResp::default();
    unsafe { crate::boot::guest_sti() };
    // Submit, wait for the interrupt, then take the completion, as an interrupt-driven
    // driver does. A driver that polled the used ring first would move `used_event` past
    // the request (EVENT_IDX) and rightly get no interrupt for it.
    // SAFETY: req, buf and resp are not touched until complete_read_blocks below.
    let token = match unsafe { blk.read_blocks_nb(0, &mut req, &mut buf, &mut resp) } {
        Ok(t) => t,
        Err(e) => fail!("virtio-blk read submit failed: {:?}", e),
    };
    println!("msi read submitted, waiting for vector 0x40");
    wait_for_irq_probe();
    unsafe { crate::boot::guest_cli() };
    // SAFETY: the same req, buf and resp as submitted with `token`.
    let r = unsafe { blk.complete_read_blocks(token, &req, &mut buf, &mut resp) };
    if let Err(e) = &r {
        fail!("virtio-blk read failed: {:?}", e);
    }
    let n = crate::boot::IRQ_PROBE_COUNT.load(Ordering::SeqCst);
    println!("msi vector=0x40 delivered={} read={:?}", n, r);
    io::result_ok()
}

/// The workload's pages in one heap allocation, zeroed: (first page, stride).
fn heap_pages(pages: u64) -> (u64, u64) {
    let bytes = pages as usize * 4096;
    if pages == 0 || crate::rt::HEAP.remaining() < bytes + (1 << 20) {
        fail!("pages={} must be > 0 and fit in the heap", pages);
    }
    let base = crate::rt::HEAP.alloc_raw(bytes, 4096) as *mut u64;
    // SAFETY: `base` is a fresh heap allocation of `bytes` bytes.
    unsafe { core::ptr::write_bytes(base as *mut u8, 0, bytes) };
    (base as u64, 4096)
}

/// `spread=on`: the workload's pages spread evenly over the largest RAM region that
/// does not hold this image and its heap (a 1 TiB guest touches a page every GiB,
/// nothing in between), mapped and zeroed: (first page, stride). A guest with no such
/// region large enough (all its RAM below 3 GiB) takes them from the heap instead.
fn spread_pages(si: &crate::hvm::StartInfo, pages: u64) -> (u64, u64) {
    let heap = crate::rt::HEAP.alloc_raw(0, 4096) as u64;
    let Some(region) = si
        .memmap()
        .filter(|e| e.kind == 1 && !(e.addr <= heap && heap < e.addr + e.size))
        .filter(|e| e.size / 4096 >= pages)
        .max_by_key(|e| e.size)
    else {
        return heap_pages(pages);
    };
    let first = (region.addr + 0xfff) & !0xfff;
    let stride = if pages == 0 {
        0
    } else {
        (region.size / pages) & !0xfff
    };
    if pages == 0 || stride < 4096 {
        fail!(
            "pages={} must be > 0 and fit in {:#x} bytes",
            pages,
            region.size
        );
    }
    for i in 0..pages {
        let at = first + i * stride;
        crate::paging::ensure_mapped(at, 4096);
        // SAFETY: a RAM page of the memory map, identity-mapped just above.
        unsafe { core::ptr::write_bytes(crate::paging::virt(at) as *mut u8, 0, 4096) };
    }
    (first, stride)
}

/// Waits until the CPL0 vector 0x40 handler has counted an interrupt. No deadline here: a
/// guest-side deadline measures the host's load, not the VMM. The host test bounds the
/// whole run (seconds) as a hang guard, so an interrupt that never comes still fails it.
fn wait_for_irq_probe() {
    use core::sync::atomic::Ordering;
    while crate::boot::IRQ_PROBE_COUNT.load(Ordering::SeqCst) == 0 {
        core::hint::spin_loop();
    }
}

/// `test=mem`: for every E820 RAM entry, write, verify and restore one u64 in the first,
/// middle and last page and at every 1 GiB boundary inside it: checks the VMM's memory
/// layout against the memory map, including RAM above 4 GiB (mapped with 1 GiB pages).
pub fn mem(si: &crate::hvm::StartInfo) -> ! {
    let mut probes = 0u64;
    let mut regions = 0u64;
    for e in si.memmap().filter(|e| e.kind == 1 && e.size >= 4096) {
        let first = (e.addr + 0xfff) & !0xfff;
        let last = (e.addr + e.size - 8) & !7;
        let mut addrs = alloc::vec![first, (first + e.size / 2) & !7, last];
        let mut g = (e.addr + (1 << 30)) & !((1 << 30) - 1);
        while g < e.addr + e.size {
            addrs.push(g);
            g += 1 << 30;
        }
        for a in addrs {
            if a == 0 {
                continue; // keep null out of it
            }
            let p = a as *mut u64;
            let want = a ^ 0x5a5a_5a5a_5a5a_5a5a;
            let got = unsafe {
                let old = p.read_volatile();
                p.write_volatile(want);
                let got = p.read_volatile();
                p.write_volatile(old);
                got
            };
            if got != want {
                fail!(
                    "memory at {:#x} reads back {:#x}, wrote {:#x}",
                    a,
                    got,
                    want
                );
            }
            probes += 1;
        }
        regions += 1;
        println!("mem ram {:#x}..{:#x} ok", e.addr, e.addr + e.size);
    }
    println!("mem regions={} probes={}", regions, probes);
    io::result_ok()
}

/// `test=console [ms=M]`: writes a line through the first virtio-console (driven by
/// virtio-drivers' `VirtIOConsole`), then collects input bytes up to a newline or for
/// at most M ms (default 2000) and reports them on the serial port.
pub fn console() -> ! {
    use virtio_drivers::device::console::VirtIOConsole;
    let mut root = pci::root();
    pci::assign_bars(&mut root, CMDLINE.get("verbose").is_some());
    let found = pci::functions(&root)
        .find(|(_, info)| virtio_device_type(info) == Some(DeviceType::Console));
    let Some((df, _)) = found else {
        fail!("no virtio-console device on bus 0");
    };
    let transport = match PciTransport::new::<GuestHal, _>(&mut root, df) {
        Ok(t) => t,
        Err(e) => fail!("virtio-console {}: transport: {:?}", pci::bdf(&df), e),
    };
    let mut con = match VirtIOConsole::<GuestHal, _>::new(transport) {
        Ok(c) => c,
        Err(e) => fail!("virtio-console: init: {:?}", e),
    };
    if let Err(e) = con.send_bytes(b"vireo-guest: hello through virtio-console\n") {
        fail!("virtio-console send: {:?}", e);
    }
    let ms = num("ms", Some(2000));
    let f = crate::timer::tsc_khz();
    let t0 = rdtsc();
    let mut got = alloc::vec::Vec::new();
    while rdtsc() - t0 < f.khz * ms {
        match con.recv(true) {
            Ok(Some(b'\n')) => break,
            Ok(Some(b)) => got.push(b),
            Ok(None) => core::hint::spin_loop(),
            Err(e) => fail!("virtio-console recv: {:?}", e),
        }
    }
    println!(
        "console got={}",
        core::str::from_utf8(&got).unwrap_or("<not utf-8>")
    );
    io::result_ok()
}

/// One numbered 64-byte line of flood output.
fn flood_line(i: u64) -> [u8; 64] {
    let mut l = [b'x'; 64];
    let head = alloc::format!("flood {:010} ", i);
    l[..head.len()].copy_from_slice(head.as_bytes());
    l[63] = b'\n';
    l
}

/// `test=flood-console bytes=N [hold=1]`: sends N bytes of numbered 64-byte lines
/// through the first virtio-console (one 4 KiB chain per send), then `flood done
/// lines=L` on serial; with hold=1 it then stays up (the host measures the VMM).
pub fn flood_console() -> ! {
    use virtio_drivers::device::console::VirtIOConsole;
    let bytes = num("bytes", Some(32 << 20));
    let mut root = pci::root();
    pci::assign_bars(&mut root, CMDLINE.get("verbose").is_some());
    let found = pci::functions(&root)
        .find(|(_, info)| virtio_device_type(info) == Some(DeviceType::Console));
    let Some((df, _)) = found else {
        fail!("no virtio-console device on bus 0");
    };
    let transport = match PciTransport::new::<GuestHal, _>(&mut root, df) {
        Ok(t) => t,
        Err(e) => fail!("virtio-console {}: transport: {:?}", pci::bdf(&df), e),
    };
    let mut con = match VirtIOConsole::<GuestHal, _>::new(transport) {
        Ok(c) => c,
        Err(e) => fail!("virtio-console: init: {:?}", e),
    };
    let lines = bytes / 64;
    let mut buf = alloc::vec::Vec::with_capacity(4096);
    for i in 0..lines {
        buf.extend_from_slice(&flood_line(i));
        if buf.len() == 4096 || i + 1 == lines {
            if let Err(e) = con.send_bytes(&buf) {
                fail!("virtio-console send: {:?}", e);
            }
            buf.clear();
        }
    }
    flood_end(lines)
}

/// `test=flood-serial bytes=N [hold=1]`: the same through the serial port.
pub fn flood_serial() -> ! {
    let bytes = num("bytes", Some(1 << 20));
    let lines = bytes / 64;
    for i in 0..lines {
        let l = flood_line(i);
        crate::print!("{}", core::str::from_utf8(&l).unwrap_or(""));
    }
    flood_end(lines)
}

fn flood_end(lines: u64) -> ! {
    println!("flood done lines={}", lines);
    if num("hold", Some(0)) != 0 {
        println!("flood holding");
        loop {
            core::hint::spin_loop();
        }
    }
    io::result_ok()
}

/// `test=power-button [ged=ADDR] [pm=PORT] [ms=M]`: waits (up to M ms, default 30000)
/// for the power-button flag (bit 3) in the ACPI Generic Event Device's register at ADDR
/// (default 0xfeb00000, Vireo's GED; reading clears it, as the DSDT's `_EVT` does), then
/// powers off as an ACPI OS would: SLP_TYP=5 | SLP_EN to the hardware-reduced sleep
/// control register at PORT (default 0x600, from Vireo's FADT).
pub fn power_button() -> ! {
    let ged = num("ged", Some(0xfeb0_0000));
    let pm = num("pm", Some(0x600)) as u16;
    let ms = num("ms", Some(30_000));
    let f = crate::timer::tsc_khz();
    println!("power-button waiting ged={:#x}", ged);
    let t0 = rdtsc();
    let events = loop {
        // SAFETY: 0..4 GiB is identity-mapped, user-accessible; the GED register is MMIO.
        let e = unsafe { (ged as *const u8).read_volatile() };
        if e & (1 << 3) != 0 {
            break e;
        }
        if rdtsc() - t0 > f.khz * ms {
            fail!("no power-button event within {} ms", ms);
        }
        core::hint::spin_loop();
    };
    println!("power-button pressed events={:#04x}", events);
    println!("vireo-guest: result ok");
    io::outb(pm, (5 << 2) | (1 << 5));
    loop {
        core::hint::spin_loop();
    }
}

/// `test=workload pages=N [blocks=B] [ops=K] [report=R]`: the mobility workload. Each
/// iteration n = 1, 2, ... checks and rewrites N pages of memory (as `dirty` does: every
/// word holds a function of the pass), writes 4 KiB block `n % B` (default B = 64) with
/// the pattern of seed n through virtio-blk, and reads back the block of iteration n-1
/// to check it. Prints `work iter=<n> tsc=<rdtsc> max_write_us=<slowest write since the
/// last report>` every R iterations (default 1000);
/// with `ops=K`, stops after iteration K with `work done iter=K` and `result ok`.
/// A snapshot, restore or migration in between must be invisible: any lost page or
/// block fails with the first mismatch.
pub fn workload(si: &crate::hvm::StartInfo) -> ! {
    let pages = num("pages", None);
    let blocks = num("blocks", Some(64)).max(2);
    let ops = num("ops", Some(0));
    let report = num("report", Some(1000)).max(1);
    let spread = CMDLINE.get("spread") == Some("on");
    let mut blk = open_blk();
    if blk.capacity() < blocks * 8 {
        fail!("disk too small for blocks={}", blocks);
    }
    let (first, stride) = if spread {
        spread_pages(si, pages)
    } else {
        heap_pages(pages)
    };
    let page_at = |i: u64| crate::paging::virt(first + i * stride) as *mut u64;
    let tsc = crate::timer::tsc_khz();
    println!(
        "work pages={} blocks={} ops={} tsc_khz={} first={:#x} last={:#x}",
        pages,
        blocks,
        ops,
        tsc.khz,
        page_at(0) as u64,
        page_at(pages - 1) as u64
    );
    // The slowest block write since the last report (storage-migration latency).
    let mut max_write_cycles = 0u64;
    let mut wbuf = vec![0u8; 4096];
    let mut rbuf = vec![0u8; 4096];
    let mut want = vec![0u8; 4096];
    let mut n = 1u64;
    loop {
        for i in 0..pages {
            let page = page_at(i);
            for k in 0..512u64 {
                let got = unsafe { page.add(k as usize).read_volatile() };
                if got != dirty_word(n - 1, i, k) {
                    println!(
                        "work mismatch memory iter={} page={} word={} got={:#x}",
                        n, i, k, got
                    );
                    fail!("memory mismatch");
                }
                unsafe { page.add(k as usize).write_volatile(dirty_word(n, i, k)) };
            }
        }
        let lba = (n % blocks) * 8;
        pattern::fill(n, lba, &mut wbuf);
        let t0 = rdtsc();
        if let Err(e) = blk.write_blocks(lba as usize, &wbuf) {
            fail!("work write iter={} lba={}: {:?}", n, lba, e);
        }
        max_write_cycles = max_write_cycles.max(rdtsc() - t0);
        if n > 1 {
            let prev = ((n - 1) % blocks) * 8;
            if let Err(e) = blk.read_blocks(prev as usize, &mut rbuf) {
                fail!("work read iter={} lba={}: {:?}", n, prev, e);
            }
            pattern::fill(n - 1, prev, &mut want);
            if rbuf != want {
                println!("work mismatch block iter={} lba={}", n - 1, prev);
                fail!("block mismatch");
            }
        }
        if n.is_multiple_of(report) {
            println!(
                "work iter={} tsc={} max_write_us={}",
                n,
                rdtsc(),
                max_write_cycles * 1000 / tsc.khz.max(1)
            );
            max_write_cycles = 0;
        }
        if ops != 0 && n >= ops {
            if let Err(e) = blk.flush() {
                fail!("flush: {:?}", e);
            }
            println!("work done iter={}", n);
            io::result_ok();
        }
        n += 1;
    }
}

/// Every virtio-blk device on bus 0, in bus order, up to `max`.
fn open_blks(max: usize) -> alloc::vec::Vec<Blk> {
    let mut root = pci::root();
    pci::assign_bars(&mut root, CMDLINE.get("verbose").is_some());
    let found: alloc::vec::Vec<_> = pci::functions(&root)
        .filter(|(_, info)| virtio_device_type(info) == Some(DeviceType::Block))
        .map(|(df, _)| df)
        .take(max)
        .collect();
    let mut blks = alloc::vec::Vec::new();
    for df in found {
        let transport = match PciTransport::new::<GuestHal, _>(&mut root, df) {
            Ok(t) => t,
            Err(e) => fail!("virtio-blk {}: transport: {:?}", pci::bdf(&df), e),
        };
        match Blk::new(transport) {
            Ok(b) => blks.push(b),
            Err(e) => fail!("virtio-blk {}: init: {:?}", pci::bdf(&df), e),
        }
    }
    blks
}

/// `test=replica-writer disks=D blocks=B [count=N] [resume]`: iteration n = 1, 2, ... writes
/// 4 KiB block n % B (pattern seed n) to each of the first D disks in order, then
/// prints `rw n=<n>`: every write of iteration n has completed. Write n on disk d+1
/// starts only after write n on disk d completed, so any crash-consistent cut that
/// holds disk d+1's write n holds disk d's too. With `resume`, it first reads the first
/// disk's blocks back, prints `rw resume n=<M>` (M: the highest sequence found there,
/// 0 on a fresh disk) and continues at M + 1: the guest of a failed-over VM carries on
/// where the last writer's completed writes end.
///
/// `rate=W random` (the RPO bench): W iterations per second, paced by the TSC (an
/// iteration late for its slot starts at once; the pace does not drift), each to a
/// pseudo-random block (seed n, block = a hash of n % B), and the line is
/// `rw n=<n> us=<µs>`: the iteration's write latency, all disks.
pub fn replica_writer() -> ! {
    let disks = num("disks", Some(1)).max(1) as usize;
    let blocks = num("blocks", Some(64)).max(1);
    let count = num("count", Some(0));
    let rate = num("rate", Some(0));
    let random = CMDLINE.get("random").is_some();
    let khz = if rate != 0 {
        crate::timer::tsc_khz().khz.max(1)
    } else {
        1
    };
    let period = if rate != 0 { khz * 1000 / rate } else { 0 };
    let mut blks = open_blks(disks);
    if blks.len() != disks {
        fail!("disks={} but {} virtio-blk devices", disks, blks.len());
    }
    for b in &blks {
        if b.capacity() < blocks * 8 {
            fail!("disk too small for blocks={}", blocks);
        }
    }
    println!("rw start disks={} blocks={}", disks, blocks);
    // With `agent`: a guest agent on the console's agent port, served between writes;
    // while frozen no block is written.
    let mut agent = CMDLINE
        .get("agent")
        .is_some()
        .then(crate::agent::Agent::open);
    let mut buf = vec![0u8; 4096];
    let mut n = 1u64;
    if CMDLINE.get("resume").is_some() {
        let last = last_sequence(&mut blks[0], blocks, &mut buf);
        println!("rw resume n={}", last);
        n = last + 1;
    }
    let (first, start) = (n, rdtsc());
    loop {
        let block = if random {
            // splitmix64 of n: spread over the disk, the same on every run.
            let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) % blocks
        } else {
            n % blocks
        };
        let lba = block * 8;
        if rate != 0 {
            let due = start + (n - first) * period;
            while rdtsc() < due {
                core::hint::spin_loop();
            }
        }
        if let Some(a) = &mut agent {
            let mut w = Writer(&mut blks);
            a.poll(&mut w);
            while a.frozen {
                a.poll(&mut w);
                core::hint::spin_loop();
            }
        }
        pattern::fill(n, lba, &mut buf);
        let t0 = rdtsc();
        for (d, b) in blks.iter_mut().enumerate() {
            if let Err(e) = b.write_blocks(lba as usize, &buf) {
                fail!("rw write n={} disk={} lba={}: {:?}", n, d, lba, e);
            }
        }
        if rate != 0 {
            println!("rw n={} us={}", n, (rdtsc() - t0) * 1000 / khz);
        } else {
            println!("rw n={}", n);
        }
        if count != 0 && n >= count {
            for b in blks.iter_mut() {
                if let Err(e) = b.flush() {
                    fail!("flush: {:?}", e);
                }
            }
            io::result_ok();
        }
        n += 1;
    }
}

/// The replica writer's disks as the guest agent freezes them: a freeze flushes every
/// disk (the writer then writes nothing until the thaw).
struct Writer<'a>(&'a mut alloc::vec::Vec<Blk>);

impl crate::agent::Freezable for Writer<'_> {
    fn freeze(&mut self) -> usize {
        for (d, b) in self.0.iter_mut().enumerate() {
            if let Err(e) = b.flush() {
                fail!("agent freeze: flush disk={}: {:?}", d, e);
            }
        }
        self.0.len()
    }
    fn thaw(&mut self) -> usize {
        self.0.len()
    }
}

/// The highest sequence number on `blk`'s first `blocks` 4 KiB blocks (0: none),
/// read back through the pattern's seed (block n % B holds seed n).
fn last_sequence(blk: &mut Blk, blocks: u64, buf: &mut [u8]) -> u64 {
    let mut last = 0;
    for b in 0..blocks {
        let lba = b * 8;
        if let Err(e) = blk.read_blocks(lba as usize, buf) {
            fail!("rw resume: read lba={}: {:?}", lba, e);
        }
        if let Some(seed) = pattern::seed_of(lba, buf) {
            if seed % blocks == b && seed > last {
                last = seed;
            }
        }
    }
    last
}

/// `test=echo`: reads COM1's receiver (polling the line status register's data-ready
/// bit) and prints every line it got as `echo <line>`; the line `quit` ends the test.
pub fn echo() -> ! {
    println!("echo ready");
    let mut line = alloc::vec::Vec::new();
    loop {
        if io::inb(io::COM1 + 5) & 1 == 0 {
            // Nothing yet: wait a little before the next (exiting) port read.
            for _ in 0..20_000 {
                core::hint::spin_loop();
            }
            continue;
        }
        match io::inb(io::COM1) {
            b'\r' | b'\n' => {
                if line.is_empty() {
                    continue;
                }
                let text = core::str::from_utf8(&line).unwrap_or("(not UTF-8)");
                println!("echo {}", text);
                if text == "quit" {
                    io::result_ok();
                }
                line.clear();
            }
            b if line.len() < 256 => line.push(b),
            _ => {}
        }
    }
}

type Nic = virtio_drivers::device::net::VirtIONet<GuestHal, PciTransport, 16>;

/// Opens the first virtio-net function on bus 0 (virtio-drivers' `VirtIONet`, 16
/// buffers of 2 KiB per queue).
fn open_net() -> Nic {
    let mut root = pci::root();
    pci::assign_bars(&mut root, CMDLINE.get("verbose").is_some());
    let found = pci::functions(&root)
        .find(|(_, info)| virtio_device_type(info) == Some(DeviceType::Network));
    let Some((df, _)) = found else {
        fail!("no virtio-net device on bus 0");
    };
    let transport = match PciTransport::new::<GuestHal, _>(&mut root, df) {
        Ok(t) => t,
        Err(e) => fail!("virtio-net {}: transport: {:?}", pci::bdf(&df), e),
    };
    match Nic::new(transport, 2048) {
        Ok(n) => n,
        Err(e) => fail!("virtio-net: init: {:?}", e),
    }
}

/// `test=net-bench [ms=D] [len=L]`: sends frames of L bytes (default 1514) as fast as
/// virtio-drivers' blocking `send` allows for D ms (default 2000), then counts the
/// frames it receives for D ms (the host floods the tap); prints
/// `bench net-tx frames=.. fps=.. mbps=..` and `bench net-rx frames=.. fps=.. mbps=..`
/// (MB/s = 10^6 bytes/s of Ethernet frames, three decimals).
pub fn net_bench() -> ! {
    use crate::netframe;
    let ms = num("ms", Some(2000)).max(1);
    let len = (num("len", Some(netframe::MAX_LEN as u64)) as usize)
        .clamp(netframe::MIN_LEN, netframe::MAX_LEN);
    let mut nic = open_net();
    let mac = nic.mac_address();
    let f = crate::timer::tsc_khz();
    println!(
        "bench net len={} ms={} tsc_khz={} source={}",
        len, ms, f.khz, f.source
    );
    let report = |phase: &str, frames: u64, bytes: u64, cycles: u64| {
        let us = (cycles * 1000 / f.khz).max(1);
        println!(
            "bench {} frames={} fps={} mbps={}.{:03}",
            phase,
            frames,
            frames * 1_000_000 / us,
            bytes / us,
            bytes * 1000 / us % 1000
        );
    };
    let mut frame = vec![0u8; len];
    netframe::fill(&mut frame, netframe::BROADCAST, mac, 1, 0);
    let t0 = rdtsc();
    let mut sent = 0u64;
    while rdtsc() - t0 < f.khz * ms {
        if let Err(e) = nic.send(virtio_drivers::device::net::TxBuffer::from(&frame)) {
            fail!("net send: {:?}", e);
        }
        sent += 1;
    }
    report("net-tx", sent, sent * len as u64, rdtsc() - t0);
    let t0 = rdtsc();
    let (mut frames, mut bytes) = (0u64, 0u64);
    while rdtsc() - t0 < f.khz * ms {
        match nic.receive() {
            Ok(rx) => {
                frames += 1;
                bytes += rx.packet().len() as u64;
                if let Err(e) = nic.recycle_rx_buffer(rx) {
                    fail!("net recycle: {:?}", e);
                }
            }
            Err(virtio_drivers::Error::NotReady) => core::hint::spin_loop(),
            Err(e) => fail!("net receive: {:?}", e),
        }
    }
    report("net-rx", frames, bytes, rdtsc() - t0);
    io::result_ok()
}

/// `test=net [send=N] [recv=M] [seed=S] [len=L] [ms=T]`: through the first virtio-net
/// function (virtio-drivers' `VirtIONet`), sends N test frames (netframe.rs: seed S,
/// lengths varying up to L, broadcast, from the device's MAC), then receives M test
/// frames of seed S+1 within T ms (default 10000; other frames are counted and
/// ignored), and prints what it sent and got (CRC-32 over the frames in order). With
/// `hold=1` it then spins instead of powering off.
pub fn net() -> ! {
    use crate::netframe;
    let send = num("send", Some(8));
    let recv = num("recv", Some(0));
    let seed = num("seed", Some(1));
    let max_len = num("len", Some(netframe::MAX_LEN as u64)) as usize;
    let ms = num("ms", Some(10_000));
    let mut nic = open_net();
    let mac = nic.mac_address();
    println!(
        "net mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    );
    let mut crc = Crc32::new();
    let mut bytes = 0u64;
    let mut frame = vec![0u8; netframe::MAX_LEN];
    for i in 0..send as u32 {
        let f = &mut frame[..netframe::frame_len(i, max_len)];
        netframe::fill(f, netframe::BROADCAST, mac, seed, i);
        crc.update(f);
        bytes += f.len() as u64;
        if let Err(e) = nic.send(virtio_drivers::device::net::TxBuffer::from(f)) {
            fail!("net send {}: {:?}", i, e);
        }
    }
    println!(
        "net sent={} bytes={} crc32={:08x}",
        send,
        bytes,
        crc.finish()
    );
    let f = crate::timer::tsc_khz();
    let t0 = rdtsc();
    let (mut got, mut bytes, mut bad, mut ignored) = (0u64, 0u64, 0u64, 0u64);
    let mut crc = Crc32::new();
    // Hosts wait for this line (not for a while) before they snapshot or migrate the guest
    // in its receive loop.
    println!("net receiving recv={}", recv);
    while got < recv {
        if rdtsc() - t0 > f.khz * ms {
            println!(
                "net received={} bytes={} bad={} ignored={}",
                got, bytes, bad, ignored
            );
            fail!("only {} of {} frames within {} ms", got, recv, ms);
        }
        let rx = match nic.receive() {
            Ok(b) => b,
            Err(virtio_drivers::Error::NotReady) => {
                core::hint::spin_loop();
                continue;
            }
            Err(e) => fail!("net receive: {:?}", e),
        };
        match netframe::check(rx.packet(), seed + 1) {
            Some((index, ok)) => {
                if index as u64 != got || !ok {
                    bad += 1;
                }
                crc.update(rx.packet());
                bytes += rx.packet().len() as u64;
                got += 1;
            }
            None => ignored += 1,
        }
        if let Err(e) = nic.recycle_rx_buffer(rx) {
            fail!("net recycle: {:?}", e);
        }
    }
    println!(
        "net received={} bytes={} crc32={:08x} bad={} ignored={}",
        got,
        bytes,
        crc.finish(),
        bad,
        ignored
    );
    if bad != 0 {
        fail!("{} frames out of order or corrupted", bad);
    }
    if num("hold", Some(0)) != 0 {
        // Stay up: the host reads the VMM's counters (or snapshots the VM) now.
        println!("net holding");
        loop {
            core::hint::spin_loop();
        }
    }
    io::result_ok()
}

/// `test=smp [work=checksum|spin] [rounds=N] [init_us=N] [report_ms=N]`: starts every
/// application processor the MADT lists with INIT-SIPI-SIPI (smp.rs) and checks each one:
/// its LAPIC ID, the initial APIC ID and x2APIC ID CPUID gave it at CPL0, all distinct and
/// all in the MADT. `work=checksum` (default): each AP computes a checksum seeded by its
/// APIC ID at CPL3, which the boot CPU recomputes. `work=spin`: the APs count forever and
/// the boot CPU reports every `report_ms` how many of them advanced (for pause, snapshot
/// and migration with every vCPU busy).
pub fn smp(si: &crate::hvm::StartInfo) -> ! {
    use crate::smp::{self, Work};
    use core::sync::atomic::Ordering;
    let Some(madt) = crate::hvm::madt_cpus(si.rsdp) else {
        fail!("smp: no MADT");
    };
    let me = smp::apic_id();
    let ids = madt.ids();
    if !ids.contains(&me) {
        fail!("smp: boot CPU's APIC ID {} is not in the MADT", me);
    }
    let aps = ids.len() - 1;
    let work = match CMDLINE.get("work").unwrap_or("checksum") {
        "checksum" => Work::Checksum,
        "spin" => Work::Spin,
        other => fail!("smp: unknown work={}", other),
    };
    let rounds = num("rounds", Some(1 << 20));
    let init_us = num("init_us", Some(10_000));
    let tsc = crate::timer::tsc_khz();
    let khz = tsc.khz;
    println!("smp tsc khz={} source={}", khz, tsc.source);
    let started = smp::start_aps(aps, work, rounds, init_us, num("timeout_ms", Some(60_000)));
    println!(
        "smp online cpus={} aps={} us={}",
        aps + 1,
        aps,
        started.cycles * 1000 / khz
    );
    let mut seen = alloc::vec![me];
    for slot in started.slots {
        let lapic = slot.online.load(Ordering::Acquire) - 1;
        let initial = slot.cpuid1_ebx >> 24;
        let x2apic = slot.cpuid_b_edx;
        if !ids.contains(&lapic) || seen.contains(&lapic) {
            fail!(
                "smp: AP with APIC ID {} is not in the MADT or came up twice",
                lapic
            );
        }
        if initial != lapic & 0xff || x2apic != lapic {
            fail!(
                "smp: AP {}: CPUID says initial APIC ID {} and x2APIC ID {}",
                lapic,
                initial,
                x2apic
            );
        }
        seen.push(lapic);
    }
    let b0 = crate::cpuid::cpuid_sub(0xb, 0);
    let b1 = crate::cpuid::cpuid_sub(0xb, 1);
    let mut places = alloc::vec![smp::CpuPlace {
        id: b0.edx,
        topology: [b0.eax, b0.ebx, b1.eax, b1.ebx],
    }];
    for slot in started.slots {
        places.push(smp::CpuPlace {
            id: slot.cpuid_b_edx,
            topology: slot.topology,
        });
    }
    match smp::topology_of(&places) {
        Ok(t) => println!(
            "smp topology sockets={} cores={} threads={}",
            t.sockets, t.cores, t.threads
        ),
        Err(e) => fail!("smp: topology: {}", e),
    }
    if work == Work::Spin {
        let report_ms = num("report_ms", Some(500)).max(1);
        let mut last: alloc::vec::Vec<u64> = alloc::vec![0; aps];
        let mut round = 0u64;
        loop {
            let t0 = rdtsc();
            while rdtsc() - t0 < report_ms * khz {
                core::hint::spin_loop();
            }
            round += 1;
            let mut advanced = 0;
            for (slot, prev) in started.slots.iter().zip(last.iter_mut()) {
                let now = slot.iterations.load(Ordering::Relaxed);
                if now > *prev {
                    advanced += 1;
                }
                *prev = now;
            }
            println!(
                "smp progress round={} advanced={} of {}",
                round, advanced, aps
            );
        }
    }
    for slot in started.slots {
        while slot.iterations.load(Ordering::Acquire) == 0 {
            core::hint::spin_loop();
        }
        let lapic = slot.online.load(Ordering::Acquire) - 1;
        let got = slot.result.load(Ordering::Acquire);
        let want = smp::work_result(lapic, rounds);
        if got != want {
            fail!(
                "smp: AP {} computed {:#x}, expected {:#x}",
                lapic,
                got,
                want
            );
        }
        println!("smp cpu apic={} result={:#x} ok", lapic, got);
    }
    io::result_ok()
}

/// `test=numa`: reads the SRAT and SLIT: prints each node's APIC IDs and memory
/// (`numa node=<n> apics=<a,b,..> mib=<m> ranges=<k>`) and its SLIT row (`numa slit
/// node=<n> distances=<d,d,..>`), after `numa nodes=<n>`. ok iff every MADT CPU is on
/// exactly one node, every node range holds E820 RAM that reads back a word written at its
/// first and last page, and the SLIT is 10 on its diagonal. Without an SRAT: `numa srat
/// none`, ok.
pub fn numa(si: &crate::hvm::StartInfo) -> ! {
    use crate::hvm::find_table;
    use alloc::vec::Vec;
    let rd32 = |a: u64| unsafe { core::ptr::read_unaligned(a as *const u32) };
    let rd64 = |a: u64| unsafe { core::ptr::read_unaligned(a as *const u64) };
    let Some(srat) = find_table(si.rsdp, b"SRAT") else {
        println!("numa srat none");
        io::result_ok()
    };
    let Some(madt) = crate::hvm::madt_cpus(si.rsdp) else {
        fail!("numa: no MADT");
    };
    // (node, apic) and (node, base, len).
    let mut cpus: Vec<(u32, u32)> = Vec::new();
    let mut mems: Vec<(u32, u64, u64)> = Vec::new();
    let end = srat + rd32(srat + 4) as u64;
    let mut p = srat + 48;
    while p + 2 <= end {
        let (ty, len) = unsafe { (*(p as *const u8), *((p + 1) as *const u8) as u64) };
        if len < 2 || p + len > end {
            fail!("numa: SRAT structure at {:#x} runs past the table", p);
        }
        match ty {
            0 if len >= 16 && rd32(p + 4) & 1 != 0 => {
                let lo = unsafe { *((p + 2) as *const u8) } as u32;
                let hi = rd32(p + 8) >> 8; // bytes 9..11
                cpus.push((lo | hi << 8, unsafe { *((p + 3) as *const u8) } as u32));
            }
            1 if len >= 40 && rd32(p + 28) & 1 != 0 => {
                mems.push((rd32(p + 2), rd64(p + 8), rd64(p + 16)));
            }
            _ => {}
        }
        p += len;
    }
    let nodes = cpus
        .iter()
        .map(|c| c.0)
        .chain(mems.iter().map(|m| m.0))
        .max()
        .map_or(0, |m| m + 1);
    println!("numa nodes={}", nodes);
    for &id in madt.ids() {
        let on = cpus.iter().filter(|c| c.1 == id).count();
        if on != 1 {
            fail!("numa: CPU with APIC ID {} is on {} nodes", id, on);
        }
    }
    let ram: Vec<(u64, u64)> = si
        .memmap()
        .filter(|e| e.kind == 1)
        .map(|e| (e.addr, e.addr + e.size))
        .collect();
    for n in 0..nodes {
        let apics: Vec<alloc::string::String> = cpus
            .iter()
            .filter(|c| c.0 == n)
            .map(|c| alloc::format!("{}", c.1))
            .collect();
        let mut bytes = 0u64;
        let mut ranges = 0;
        for &(_, base, len) in mems.iter().filter(|m| m.0 == n) {
            // The RAM in the range (a range may also cover holes such as the legacy
            // video and BIOS area): its first and last page are probed.
            let parts: Vec<(u64, u64)> = ram
                .iter()
                .map(|&(s, e)| (s.max(base), e.min(base + len)))
                .filter(|&(s, e)| s < e)
                .collect();
            let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
                fail!("numa: node {} range {:#x}+{:#x} holds no RAM", n, base, len);
            };
            crate::paging::ensure_mapped(base, len);
            for addr in [first.0, last.1 - 4096] {
                let w = addr as *mut u64;
                let want = 0x6e75_6d61_0000_0000 | addr;
                unsafe {
                    let old = core::ptr::read_volatile(w);
                    core::ptr::write_volatile(w, want);
                    if core::ptr::read_volatile(w) != want {
                        fail!("numa: node {} memory at {:#x} does not read back", n, addr);
                    }
                    core::ptr::write_volatile(w, old);
                }
            }
            bytes += len;
            ranges += 1;
        }
        println!(
            "numa node={} apics={} mib={} ranges={}",
            n,
            apics.join(","),
            bytes >> 20,
            ranges
        );
    }
    match find_table(si.rsdp, b"SLIT") {
        Some(slit) => {
            let k = rd64(slit + 36);
            if k != nodes as u64 {
                fail!("numa: SLIT has {} localities for {} nodes", k, nodes);
            }
            for a in 0..k {
                let row: Vec<alloc::string::String> = (0..k)
                    .map(|b| {
                        alloc::format!("{}", unsafe { *((slit + 44 + a * k + b) as *const u8) })
                    })
                    .collect();
                if row[a as usize] != "10" {
                    fail!(
                        "numa: SLIT distance of node {} to itself is {}",
                        a,
                        row[a as usize]
                    );
                }
                println!("numa slit node={} distances={}", a, row.join(","));
            }
        }
        None => println!("numa slit none"),
    }
    io::result_ok()
}
