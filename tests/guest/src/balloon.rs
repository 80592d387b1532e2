//! `test=balloon`: a virtio-balloon driver of our own on virtio-drivers' transport and
//! virtqueue API (virtio-drivers has no balloon driver).
//!
//! The guest touches a pool of pages (so the host backs them), reports a separate
//! region as free (free page reporting) and then follows the host's target: it inflates
//! with pool pages (their PFNs go to the host, which drops them) and deflates by taking
//! pages back, checking that a deflated page reads zero (the host really dropped it).
//! It answers statistics requests with its free and total memory.

use alloc::vec::Vec;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};

use crate::hvm::CMDLINE;
use crate::io::rdtsc;
use crate::pci::{self, GuestHal};
use crate::{fail, println};

const F_VERSION_1: u64 = 1 << 32;
const F_STATS_VQ: u64 = 1 << 1;
const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const F_REPORTING: u64 = 1 << 5;
const PAGE: usize = 4096;
const QSIZE: usize = 64;
/// PFNs per inflate/deflate buffer (Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX).
const BATCH: usize = 256;
const STAT_FREE: u16 = 4;
const STAT_TOTAL: u16 = 5;
const STAT_AVAILABLE: u16 = 6;
/// Seeded page contents: a touched page holds its own address in its first word.
const MARK: u64 = 0xba11_0000_0000_0000;

type Queue = VirtQueue<GuestHal, QSIZE>;
/// The statistics queue comes right after inflate and deflate when negotiated.
const STATS_QUEUE: u16 = 2;

fn num(key: &str, default: u64) -> u64 {
    match CMDLINE.num(key) {
        Some(Ok(v)) => v,
        Some(Err(())) => fail!("bad {}= value", key),
        None => default,
    }
}

/// Page-aligned memory from the heap, every page touched (backed by the host).
fn touched_pages(mib: u64) -> Vec<u64> {
    let bytes = (mib << 20) as usize;
    let base = crate::rt::HEAP.alloc_raw(bytes, PAGE) as u64;
    if base == 0 {
        fail!("balloon: cannot allocate {} MiB", mib);
    }
    let pages: Vec<u64> = (0..bytes / PAGE)
        .map(|i| base + (i * PAGE) as u64)
        .collect();
    for &p in &pages {
        // SAFETY: the page is ours (just allocated, identity-mapped).
        unsafe { core::ptr::write_volatile(p as *mut u64, MARK | p) };
    }
    pages
}

fn stats_bytes(buf: &mut [u8; 30], free: u64, total: u64) {
    for (i, (tag, v)) in [
        (STAT_FREE, free),
        (STAT_TOTAL, total),
        (STAT_AVAILABLE, free),
    ]
    .into_iter()
    .enumerate()
    {
        buf[i * 10..i * 10 + 2].copy_from_slice(&tag.to_le_bytes());
        buf[i * 10 + 2..i * 10 + 10].copy_from_slice(&v.to_le_bytes());
    }
}

fn send_pfns(q: &mut Queue, t: &mut PciTransport, pages: &[u64]) {
    let mut buf = [0u8; BATCH * 4];
    for (i, p) in pages.iter().enumerate() {
        buf[i * 4..i * 4 + 4].copy_from_slice(&((p >> 12) as u32).to_le_bytes());
    }
    if let Err(e) = q.add_notify_wait_pop(&[&buf[..pages.len() * 4]], &mut [], t) {
        fail!("balloon: queue {:?}", e);
    }
}

pub fn run(si: &crate::hvm::StartInfo) -> ! {
    let mut root = pci::root();
    pci::assign_bars(&mut root, CMDLINE.get("verbose").is_some());
    let found = pci::functions(&root)
        .find(|(_, info)| virtio_device_type(info) == Some(DeviceType::MemoryBalloon));
    let Some((df, _)) = found else {
        fail!("no virtio-balloon device on bus 0");
    };
    let mut t = match PciTransport::new::<GuestHal, _>(&mut root, df) {
        Ok(t) => t,
        Err(e) => fail!("virtio-balloon: transport: {:?}", e),
    };
    let pool = touched_pages(num("touch_mib", 64));
    let report_mib = num("report_mib", 0);
    let reported = touched_pages(report_mib);

    // Initialisation (virtio 1.2, 3.1.1) by hand: no feature-flag type to hand over.
    t.set_status(DeviceStatus::empty());
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let offered = t.read_device_features();
    let features = offered & (F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING);
    t.write_driver_features(features);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    let mut next = 0u16;
    let mut queue = |t: &mut PciTransport| -> Queue {
        let q = Queue::new(t, next, false, false)
            .unwrap_or_else(|e| fail!("balloon: queue {}: {:?}", next, e));
        next += 1;
        q
    };
    let mut inflate = queue(&mut t);
    let mut deflate = queue(&mut t);
    let mut stats = (features & F_STATS_VQ != 0).then(|| queue(&mut t));
    let mut reporting = (features & F_REPORTING != 0).then(|| queue(&mut t));
    t.finish_init();

    let total = si.ram_bytes();
    let stats_buf: &'static mut [u8; 30] =
        alloc::boxed::Box::leak(alloc::boxed::Box::new([0u8; 30]));
    let mut stats_token = None;
    let mut stats_sent = 0u64;
    if let Some(q) = &mut stats {
        stats_bytes(stats_buf, (pool.len() * PAGE) as u64, total);
        // SAFETY: the buffer is leaked (lives for ever) and only read again after pop_used.
        stats_token = Some(
            unsafe { q.add(&[&stats_buf[..]], &mut []) }
                .unwrap_or_else(|e| fail!("balloon: stats {:?}", e)),
        );
        t.notify(STATS_QUEUE);
    }
    if let Some(q) = &mut reporting {
        for chunk in reported.chunks(256) {
            // SAFETY: a run of consecutive pages of ours (allocated in one piece).
            let buf =
                unsafe { core::slice::from_raw_parts_mut(chunk[0] as *mut u8, chunk.len() * PAGE) };
            if let Err(e) = q.add_notify_wait_pop(&[], &mut [buf], &mut t) {
                fail!("balloon: reporting {:?}", e);
            }
        }
        println!("balloon reported mib={}", report_mib);
    }
    println!(
        "balloon ready features={:#x} pool_mib={}",
        features,
        (pool.len() * PAGE) >> 20
    );

    let khz = crate::timer::tsc_khz().khz;
    let mut actual = 0usize;
    let mut announced = usize::MAX;
    // Pages taken back since the last report, and how many of them read zero.
    let (mut deflated, mut deflated_zeroed) = (0usize, 0usize);
    loop {
        let target = t.read_config_space::<u32>(0).unwrap_or(0) as usize;
        let want = target.min(pool.len());
        if want > actual {
            let n = (want - actual).min(BATCH);
            send_pfns(&mut inflate, &mut t, &pool[actual..actual + n]);
            actual += n;
        } else if want < actual {
            let n = (actual - want).min(BATCH);
            let back = &pool[actual - n..actual];
            send_pfns(&mut deflate, &mut t, back);
            actual -= n;
            for &p in back {
                // SAFETY: our page, back from the balloon.
                unsafe {
                    if core::ptr::read_volatile(p as *const u64) == 0 {
                        deflated_zeroed += 1;
                    }
                    core::ptr::write_volatile(p as *mut u64, MARK | p);
                }
            }
            deflated += n;
        }
        if let Err(e) = t.write_config_space::<u32>(4, actual as u32) {
            fail!("balloon: cannot write actual: {:?}", e);
        }
        if actual == want && announced != actual {
            if deflated > 0 {
                println!(
                    "balloon deflated pages={} zeroed={}",
                    deflated, deflated_zeroed
                );
                (deflated, deflated_zeroed) = (0, 0);
            }
            println!("balloon actual={} target={}", actual, target);
            announced = actual;
        }
        if let (Some(q), Some(token)) = (&mut stats, stats_token) {
            if q.can_pop() {
                // SAFETY: the same buffer as added; it stays alive (leaked).
                unsafe { q.pop_used(token, &[&stats_buf[..]], &mut []) }
                    .unwrap_or_else(|e| fail!("balloon: stats {:?}", e));
                stats_bytes(stats_buf, ((pool.len() - actual) * PAGE) as u64, total);
                // SAFETY: as above.
                stats_token = Some(
                    unsafe { q.add(&[&stats_buf[..]], &mut []) }
                        .unwrap_or_else(|e| fail!("balloon: stats {:?}", e)),
                );
                t.notify(STATS_QUEUE);
                stats_sent += 1;
                if stats_sent <= 3 {
                    println!("balloon stats sent={}", stats_sent);
                }
            }
        }
        // Idle: look again in 2 ms; while following a target, go on at once.
        if actual == want {
            let t0 = rdtsc();
            while rdtsc() - t0 < khz * 2 {
                core::hint::spin_loop();
            }
        }
    }
}
