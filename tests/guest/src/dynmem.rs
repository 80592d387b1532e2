//! `test=dynmem`: a guest for Dynamic Memory, with a balloon and a virtio-mem device at
//! once (the drivers of `balloon.rs` and `virtio_mem.rs`, cut down), whose use moves
//! over time: it wants `use_mib=` MiB at start and then `use_to_mib=` MiB, moving
//! `use_step_mib=` MiB every 250 ms.
//!
//! Memory: its boot RAM's heap is a pool of pages; the balloon takes pages from the
//! pool's top, the use fills the pool from the bottom, then the plugged virtio-mem
//! blocks. It uses what it wants as far as it has room (boot pool left by the balloon
//! plus plugged blocks); each page it comes to use is written (so the host backs it),
//! each plugged block with a pattern that is read back. Its balloon statistics say
//! total = boot RAM - ballooned + plugged, available = total - (boot RAM outside the
//! pool + use). A line `dynmem used_mib=... plugged_used_mib=... verified=...` on the
//! serial port reports every change.

use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};

use crate::hvm::CMDLINE;
use crate::io::rdtsc;
use crate::pci::{self, GuestHal};
use crate::virtio_mem::{
    self, config_u64, Queue as MemQueue, REQ_PLUG, REQ_UNPLUG, REQ_UNPLUG_ALL, RESP_ACK,
};
use crate::{fail, println};

const F_VERSION_1: u64 = 1 << 32;
const F_STATS_VQ: u64 = 1 << 1;
const PAGE: u64 = 4096;
const BATCH: usize = 256;
const MARK: u64 = 0xd7e3_0000_0000_0000;
/// The statistics queue comes right after inflate and deflate.
const STATS_QUEUE: u16 = 2;

type Queue = VirtQueue<GuestHal, 64>;

fn num(key: &str, default: u64) -> u64 {
    match CMDLINE.num(key) {
        Some(Ok(v)) => v,
        Some(Err(())) => fail!("bad {}= value", key),
        None => default,
    }
}

fn transport(root: &mut pci::Root, kind: DeviceType) -> Option<PciTransport> {
    let found = pci::functions(root).find(|(_, info)| virtio_device_type(info) == Some(kind));
    let (df, _) = found?;
    let mut t = PciTransport::new::<GuestHal, _>(root, df)
        .unwrap_or_else(|e| fail!("dynmem: {:?} transport: {:?}", kind, e));
    t.set_status(DeviceStatus::empty());
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    Some(t)
}

fn features_ok(t: &mut PciTransport, wanted: u64) -> u64 {
    let f = t.read_device_features() & wanted;
    t.write_driver_features(f);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    f
}

/// A virtio-mem request (`virtio_mem.rs`'s driver): the response's type.
fn mem_request(q: &mut MemQueue, t: &mut PciTransport, kind: u16, addr: u64, nb: u16) -> u16 {
    virtio_mem::request(q, t, kind, addr, nb).0
}

fn send_pfns(q: &mut Queue, t: &mut PciTransport, first: u64, n: usize) {
    let mut buf = [0u8; BATCH * 4];
    for i in 0..n {
        let pfn = ((first + i as u64 * PAGE) >> 12) as u32;
        buf[i * 4..i * 4 + 4].copy_from_slice(&pfn.to_le_bytes());
    }
    if let Err(e) = q.add_notify_wait_pop(&[&buf[..n * 4]], &mut [], t) {
        fail!("dynmem: balloon queue {:?}", e);
    }
}

fn stats_bytes(buf: &mut [u8; 30], available: u64, total: u64) {
    for (i, (tag, v)) in [(4u16, available), (5, total), (6, available)]
        .into_iter()
        .enumerate()
    {
        buf[i * 10..i * 10 + 2].copy_from_slice(&tag.to_le_bytes());
        buf[i * 10 + 2..i * 10 + 10].copy_from_slice(&v.to_le_bytes());
    }
}

/// Writes page `addr`'s mark.
fn touch(addr: u64) {
    // SAFETY: a page of the pool or of a plugged block, identity-mapped.
    unsafe { core::ptr::write_volatile(crate::paging::virt(addr) as *mut u64, MARK | addr) };
}

fn marked(addr: u64) -> bool {
    // SAFETY: as in `touch`.
    unsafe { core::ptr::read_volatile(crate::paging::virt(addr) as *const u64) == MARK | addr }
}

pub fn run(si: &crate::hvm::StartInfo) -> ! {
    let mut root = pci::root();
    pci::assign_bars(&mut root, CMDLINE.get("verbose").is_some());
    let Some(mut bt) = transport(&mut root, DeviceType::MemoryBalloon) else {
        fail!("dynmem: no virtio-balloon device on bus 0");
    };
    let bf = features_ok(&mut bt, F_VERSION_1 | F_STATS_VQ);
    if bf & F_STATS_VQ == 0 {
        fail!("dynmem: the balloon offers no statistics queue");
    }
    let q = |t: &mut PciTransport, i: u16| {
        Queue::new(t, i, false, false).unwrap_or_else(|e| fail!("dynmem: queue {}: {:?}", i, e))
    };
    let mut inflate = q(&mut bt, 0);
    let mut deflate = q(&mut bt, 1);
    let mut stats = q(&mut bt, STATS_QUEUE);
    bt.finish_init();
    // virtio-mem, if the VM has a hotplug region (maximum > startup).
    let mut mem = transport(&mut root, DeviceType::Memory).map(|mut mt| {
        features_ok(&mut mt, F_VERSION_1);
        let mut mq = MemQueue::new(&mut mt, 0, false, false)
            .unwrap_or_else(|e| fail!("dynmem: virtio-mem queue: {:?}", e));
        mt.finish_init();
        if mem_request(&mut mq, &mut mt, REQ_UNPLUG_ALL, 0, 0) != RESP_ACK {
            fail!("dynmem: UNPLUG_ALL refused");
        }
        (mt, mq)
    });
    let (block, region_addr, usable) = match &mem {
        Some((mt, _)) => (config_u64(mt, 0), config_u64(mt, 16), config_u64(mt, 32)),
        None => (2 << 20, 0, 0),
    };
    if block == 0 || block % PAGE != 0 {
        fail!("dynmem: bad virtio-mem block {}", block);
    }
    if usable > 0 {
        crate::paging::ensure_mapped(region_addr, usable);
    }

    // The pool: the heap but a few MiB for what the drivers still allocate.
    let boot = si.ram_bytes();
    let pool_pages = (crate::rt::HEAP.remaining() as u64).saturating_sub(4 << 20) / PAGE;
    let pool = crate::rt::HEAP.alloc_raw((pool_pages * PAGE) as usize, PAGE as usize) as u64;
    if pool == 0 || pool_pages == 0 {
        fail!("dynmem: no pool");
    }
    let base = boot - pool_pages * PAGE;
    let stats_buf: &'static mut [u8; 30] =
        alloc::boxed::Box::leak(alloc::boxed::Box::new([0u8; 30]));
    stats_bytes(stats_buf, boot - base, boot);
    // SAFETY: the buffer is leaked (lives for ever) and only read again after pop_used.
    let mut token = unsafe { stats.add(&[&stats_buf[..]], &mut []) }
        .unwrap_or_else(|e| fail!("dynmem: stats {:?}", e));
    bt.notify(STATS_QUEUE);
    println!(
        "dynmem ready boot_mib={} pool_mib={} region_mib={} block={}",
        boot >> 20,
        (pool_pages * PAGE) >> 20,
        usable >> 20,
        block
    );

    let (use_from, use_to, step) = (
        num("use_mib", 16),
        num("use_to_mib", 16),
        num("use_step_mib", 16),
    );
    let mut want_mib = use_from;
    let khz = crate::timer::tsc_khz().khz;
    let mut next_step = rdtsc() + khz * 250;
    let block_pages = block / PAGE;
    let mut ballooned = 0u64; // pool pages, from the top
    let mut plugged = 0u64; // blocks 0..plugged
    let mut touched = 0u64; // pages in use, in order: pool bottom up, then plugged blocks
    let mut announced = (u64::MAX, u64::MAX, u64::MAX);
    let mut last_boot_part = pool_pages;
    loop {
        // The host's balloon target.
        let target = (bt.read_config_space::<u32>(0).unwrap_or(0) as u64).min(pool_pages);
        if target > ballooned {
            let n = (target - ballooned).min(BATCH as u64);
            send_pfns(
                &mut inflate,
                &mut bt,
                pool + (pool_pages - ballooned - n) * PAGE,
                n as usize,
            );
            ballooned += n;
        } else if target < ballooned {
            let n = (ballooned - target).min(BATCH as u64);
            send_pfns(
                &mut deflate,
                &mut bt,
                pool + (pool_pages - ballooned) * PAGE,
                n as usize,
            );
            ballooned -= n;
        }
        let _ = bt.write_config_space::<u32>(4, ballooned as u32);
        // The host's virtio-mem request.
        let want_blocks = mem.as_ref().map_or(0, |(mt, _)| config_u64(mt, 48) / block);
        if let Some((mt, mq)) = mem.as_mut() {
            if want_blocks > plugged {
                if mem_request(mq, mt, REQ_PLUG, region_addr + plugged * block, 1) == RESP_ACK {
                    plugged += 1;
                }
            } else if want_blocks < plugged
                && mem_request(mq, mt, REQ_UNPLUG, region_addr + (plugged - 1) * block, 1)
                    == RESP_ACK
            {
                plugged -= 1;
            }
        }
        // Use what it wants, as far as it has room; drop what it has no room for.
        let room = (pool_pages - ballooned) + plugged * block_pages;
        let held = (want_mib << 20) / PAGE;
        let held = held.min(room);
        let boot_part = pool_pages - ballooned;
        if boot_part != last_boot_part {
            // Where the plugged part of the use starts moved: write it again.
            touched = touched.min(boot_part.min(last_boot_part));
            last_boot_part = boot_part;
        }
        while touched < held {
            let i = touched;
            touch(if i < boot_part {
                pool + i * PAGE
            } else {
                region_addr + (i - boot_part) * PAGE
            });
            touched += 1;
        }
        touched = touched.min(held);
        if rdtsc() >= next_step {
            next_step = rdtsc() + khz * 250;
            want_mib = if want_mib < use_to {
                (want_mib + step).min(use_to)
            } else {
                want_mib.saturating_sub(step).max(use_to)
            };
        }
        let total = boot - ballooned * PAGE + plugged * block;
        let used = base + touched * PAGE;
        if stats.can_pop() {
            // SAFETY: the same buffer as added; it stays alive (leaked).
            unsafe { stats.pop_used(token, &[&stats_buf[..]], &mut []) }
                .unwrap_or_else(|e| fail!("dynmem: stats {:?}", e));
            stats_bytes(stats_buf, total.saturating_sub(used), total);
            // SAFETY: as above.
            token = unsafe { stats.add(&[&stats_buf[..]], &mut []) }
                .unwrap_or_else(|e| fail!("dynmem: stats {:?}", e));
            bt.notify(STATS_QUEUE);
        }
        let now = (touched, plugged, ballooned);
        if now != announced && target == ballooned && want_blocks == plugged {
            let in_plugged = touched.saturating_sub(boot_part);
            let verified = (0..in_plugged).all(|i| marked(region_addr + i * PAGE));
            println!(
                "dynmem used_mib={} want_mib={} total_mib={} plugged_mib={} plugged_used_mib={} balloon_mib={} verified={}",
                (touched * PAGE) >> 20,
                want_mib,
                total >> 20,
                (plugged * block) >> 20,
                (in_plugged * PAGE) >> 20,
                (ballooned * PAGE) >> 20,
                verified as u8
            );
            announced = now;
        }
        if target == ballooned && want_blocks == plugged && touched == held {
            let t0 = rdtsc();
            while rdtsc() - t0 < khz * 2 {
                core::hint::spin_loop();
            }
        }
    }
}
