//! `test=virtio-mem`: a virtio-mem driver of our own on virtio-drivers' transport and
//! virtqueue API (virtio-drivers has no virtio-mem driver).
//!
//! The guest reads the device's configuration, checks that the e820 map does not call
//! the hotplug region RAM, tries the requests the device must refuse (a PLUG beyond
//! `requested_size`: NACK; an UNPLUG of an unplugged block: ERROR; STATE of a range),
//! then follows `requested_size`: it plugs blocks, writes a pattern into every page of
//! each block it plugged and reads every plugged block back; it unplugs from the top
//! when the host asks for less, checking that an unplugged block reads zero (the host
//! dropped it). Lines on the serial port report each step. `plug_delay_ms=N` waits N ms
//! after each block it plugs and fills, so that a live migration finds it writing
//! plugged blocks (which only the dirty log of the hotplug region carries over).

use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};

use crate::io::rdtsc;
use crate::pci::{self, GuestHal};
use crate::{fail, println};

const F_VERSION_1: u64 = 1 << 32;
pub(crate) const QSIZE: usize = 16;
const PAGE: u64 = 4096;
const MARK: u64 = 0x3e30_0000_0000_0000;

pub(crate) const REQ_PLUG: u16 = 0;
pub(crate) const REQ_UNPLUG: u16 = 1;
pub(crate) const REQ_UNPLUG_ALL: u16 = 2;
const REQ_STATE: u16 = 3;
pub(crate) const RESP_ACK: u16 = 0;
const RESP_NACK: u16 = 1;
const RESP_ERROR: u16 = 3;
const STATE_UNPLUGGED: u16 = 1;

pub(crate) type Queue = VirtQueue<GuestHal, QSIZE>;

pub(crate) fn config_u64(t: &PciTransport, offset: usize) -> u64 {
    let lo = t.read_config_space::<u32>(offset).unwrap_or(0) as u64;
    let hi = t.read_config_space::<u32>(offset + 4).unwrap_or(0) as u64;
    lo | (hi << 32)
}

struct Config {
    block: u64,
    addr: u64,
    region: u64,
    usable: u64,
    plugged: u64,
    requested: u64,
}

fn config(t: &PciTransport) -> Config {
    Config {
        block: config_u64(t, 0),
        addr: config_u64(t, 16),
        region: config_u64(t, 24),
        usable: config_u64(t, 32),
        plugged: config_u64(t, 40),
        requested: config_u64(t, 48),
    }
}

/// Sends one request; the response's (type, state).
pub(crate) fn request(
    q: &mut Queue,
    t: &mut PciTransport,
    kind: u16,
    addr: u64,
    nb: u16,
) -> (u16, u16) {
    let mut req = [0u8; 24];
    req[0..2].copy_from_slice(&kind.to_le_bytes());
    req[8..16].copy_from_slice(&addr.to_le_bytes());
    req[16..18].copy_from_slice(&nb.to_le_bytes());
    let mut resp = [0xffu8; 10];
    if let Err(e) = q.add_notify_wait_pop(&[&req[..]], &mut [&mut resp[..]], t) {
        fail!("virtio-mem: queue {:?}", e);
    }
    (
        u16::from_le_bytes([resp[0], resp[1]]),
        u16::from_le_bytes([resp[8], resp[9]]),
    )
}

fn block_ptr(c: &Config, i: u64) -> u64 {
    crate::paging::virt(c.addr + i * c.block)
}

/// Writes the pattern into every page of block `i`.
fn fill(c: &Config, i: u64) {
    let base = block_ptr(c, i);
    let mut off = 0;
    while off < c.block {
        // SAFETY: a plugged block of the hotplug region, identity-mapped at start.
        unsafe {
            core::ptr::write_volatile(
                (base + off) as *mut u64,
                MARK | (c.addr + i * c.block + off),
            )
        };
        off += PAGE;
    }
}

/// Whether every page of block `i` holds the pattern.
fn check(c: &Config, i: u64) -> bool {
    let base = block_ptr(c, i);
    let mut off = 0;
    while off < c.block {
        // SAFETY: as in `fill`.
        let v = unsafe { core::ptr::read_volatile((base + off) as *const u64) };
        if v != MARK | (c.addr + i * c.block + off) {
            return false;
        }
        off += PAGE;
    }
    true
}

/// Whether the first word of every page of block `i` reads zero.
fn zeroed(c: &Config, i: u64) -> bool {
    let base = block_ptr(c, i);
    (0..c.block / PAGE)
        // SAFETY: as in `fill` (an unplugged block stays mapped and readable).
        .all(|p| unsafe { core::ptr::read_volatile((base + p * PAGE) as *const u64) } == 0)
}

pub fn run(si: &crate::hvm::StartInfo) -> ! {
    let mut root = pci::root();
    pci::assign_bars(&mut root, crate::hvm::CMDLINE.get("verbose").is_some());
    let found = pci::functions(&root)
        .find(|(_, info)| virtio_device_type(info) == Some(DeviceType::Memory));
    let Some((df, _)) = found else {
        fail!("no virtio-mem device on bus 0");
    };
    let mut t = match PciTransport::new::<GuestHal, _>(&mut root, df) {
        Ok(t) => t,
        Err(e) => fail!("virtio-mem: transport: {:?}", e),
    };
    t.set_status(DeviceStatus::empty());
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let features = t.read_device_features() & F_VERSION_1;
    t.write_driver_features(features);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    let mut q =
        Queue::new(&mut t, 0, false, false).unwrap_or_else(|e| fail!("virtio-mem: queue: {:?}", e));
    t.finish_init();

    let c = config(&t);
    if c.block == 0 || c.region == 0 || c.region % c.block != 0 {
        fail!(
            "virtio-mem: bad config block={} region={}",
            c.block,
            c.region
        );
    }
    let in_e820 = si
        .memmap()
        .filter(|e| e.kind == 1)
        .any(|e| e.addr < c.addr + c.region && c.addr < e.addr + e.size);
    println!(
        "virtio-mem config block={} addr={:#x} region={} usable={} plugged={} requested={} in_e820={}",
        c.block, c.addr, c.region, c.usable, c.plugged, c.requested, in_e820 as u8
    );
    crate::paging::ensure_mapped(c.addr, c.region);

    // Start clean, as Linux does; then what the device must refuse.
    if request(&mut q, &mut t, REQ_UNPLUG_ALL, 0, 0).0 != RESP_ACK {
        fail!("virtio-mem: UNPLUG_ALL refused");
    }
    let last = c.addr + c.usable - c.block;
    let beyond = request(
        &mut q,
        &mut t,
        REQ_PLUG,
        c.addr,
        (c.usable / c.block).min(u16::MAX as u64) as u16,
    )
    .0;
    let unplugged = request(&mut q, &mut t, REQ_UNPLUG, last, 1).0;
    let unaligned = request(&mut q, &mut t, REQ_PLUG, c.addr + PAGE, 1).0;
    let outside = request(&mut q, &mut t, REQ_STATE, c.addr + c.usable, 1).0;
    let state = request(&mut q, &mut t, REQ_STATE, c.addr, 1);
    println!(
        "virtio-mem checks beyond_nack={} unplug_error={} unaligned_error={} outside_error={} state_unplugged={}",
        (beyond == RESP_NACK || c.requested >= c.usable) as u8,
        (unplugged == RESP_ERROR) as u8,
        (unaligned == RESP_ERROR) as u8,
        (outside == RESP_ERROR) as u8,
        (state == (RESP_ACK, STATE_UNPLUGGED)) as u8
    );

    let khz = crate::timer::tsc_khz().khz;
    let delay_ms = match crate::hvm::CMDLINE.num("plug_delay_ms") {
        Some(Ok(v)) => v,
        Some(Err(())) => fail!("bad plug_delay_ms= value"),
        None => 0,
    };
    let spin = |ms: u64| {
        let t0 = rdtsc();
        while rdtsc() - t0 < khz * ms {
            core::hint::spin_loop();
        }
    };
    let nblocks = c.usable / c.block;
    let mut plugged = 0u64; // blocks 0..plugged are plugged
    let mut announced = u64::MAX;
    let mut unplugged_zeroed = 0u64;
    let mut unplugged_total = 0u64;
    loop {
        let now = config(&t);
        let want = (now.requested / c.block).min(nblocks);
        if want > plugged {
            match request(&mut q, &mut t, REQ_PLUG, c.addr + plugged * c.block, 1).0 {
                RESP_ACK => {
                    fill(&c, plugged);
                    plugged += 1;
                    spin(delay_ms);
                }
                // The host lowered its request meanwhile: look again.
                RESP_NACK => {}
                other => fail!("virtio-mem: PLUG of block {} answered {}", plugged, other),
            }
            continue;
        } else if want < plugged {
            let i = plugged - 1;
            match request(&mut q, &mut t, REQ_UNPLUG, c.addr + i * c.block, 1).0 {
                RESP_ACK => {
                    plugged -= 1;
                    unplugged_total += 1;
                    if zeroed(&c, i) {
                        unplugged_zeroed += 1;
                    }
                }
                other => fail!("virtio-mem: UNPLUG of block {} answered {}", i, other),
            }
            continue;
        }
        if announced != plugged {
            let verified = (0..plugged).filter(|&i| check(&c, i)).count();
            let device = config(&t).plugged / c.block;
            println!(
                "virtio-mem plugged={} device={} verified={} unplugged={} zeroed={}",
                plugged, device, verified, unplugged_total, unplugged_zeroed
            );
            announced = plugged;
        }
        spin(2);
    }
}
