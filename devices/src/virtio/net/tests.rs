//! The device and its worker end to end, on mock virtqueues in real guest memory and
//! a SOCK_SEQPACKET socket pair in place of the tap (it keeps frame boundaries and
//! polls like one).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use net::MacAddr;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::device::F_MRG_RXBUF;
use super::{Net, NetBackend, NetConfig};
use crate::virtio::{
    ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, VirtioInterruptKind,
};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const RXQ: u64 = 0x0;
const TXQ: u64 = 0x8000;

struct Seqpacket(OwnedFd);

impl AsRawFd for Seqpacket {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for Seqpacket {}

/// (the device's end, the test's end).
fn socket_pair() -> (Arc<Seqpacket>, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two fds we then own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both fds are fresh and ours.
    unsafe {
        (
            Arc::new(Seqpacket(OwnedFd::from_raw_fd(fds[0]))),
            OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

fn peer_send(fd: &OwnedFd, frame: &[u8]) {
    let mut msg = vec![0u8; 12];
    msg.extend_from_slice(frame);
    // SAFETY: send from a buffer we own.
    let r = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    assert_eq!(r as usize, msg.len());
}

fn peer_recv(fd: &OwnedFd) -> Vec<u8> {
    let mut buf = vec![0u8; 70_000];
    let n = wait_for("a frame from the device", || {
        // SAFETY: recv into a buffer we own.
        let r = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        (r >= 0).then_some(r as usize)
    });
    buf.truncate(n);
    buf
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[derive(Default)]
struct Interrupts(AtomicU32);

impl VirtioInterrupt for Interrupts {
    fn trigger(&self, _: VirtioInterruptKind) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn frame(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i * 7) as u8)).collect()
}

/// A queue of 256 entries at `addr`. Only the first 128 avail entries may be used:
/// virtio-queue 0.18's mock puts the used ring right after `len` *bytes* of avail
/// ring, so larger avail indices overlap the used ring's header.
fn mock(mem: &GuestMemoryMmap, addr: u64) -> MockSplitQueue<'_, GuestMemoryMmap> {
    MockSplitQueue::create(mem, GuestAddress(addr), 256)
}

/// Adds one chain of (addr, len, flags) at descriptor `first`.
fn add_chain(vq: &MockSplitQueue<'_, GuestMemoryMmap>, first: u16, descs: &[(u64, u32, u16)]) {
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(a, l, f))| {
            let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
            RawDescriptor::from(Descriptor::new(a, l, f | next, first + i as u16 + 1))
        })
        .collect();
    vq.add_desc_chains(&raw, first).unwrap();
}

fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap>, i: u16) -> (u32, u32) {
    let e = vq.used().ring().ref_at(i as usize).unwrap().load();
    (e.id(), e.len())
}

fn used_idx(vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
    vq.used().idx().load()
}

struct Rig {
    mem: Arc<GuestMemoryMmap>,
    net: Net,
    peer: OwnedFd,
    irq: Arc<Interrupts>,
    kicks: [EventFd; 2],
}

impl Rig {
    fn new() -> Self {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
        let (backend, peer) = socket_pair();
        let net = Net::new(
            backend,
            NetConfig {
                mac: MacAddr::new([0x52, 0x54, 0, 1, 2, 3]),
            },
        );
        Self {
            mem,
            net,
            peer,
            irq: Arc::new(Interrupts::default()),
            kicks: [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()],
        }
    }

    fn activate(&mut self, queues: [Queue; 2]) {
        let [rx, tx] = queues;
        let q = |index: u16, queue: Queue, kick: &EventFd| ActivatedQueue {
            index,
            queue,
            kick: kick.try_clone().unwrap(),
        };
        let qs = vec![q(0, rx, &self.kicks[0]), q(1, tx, &self.kicks[1])];
        self.net
            .activate(self.mem.clone(), self.irq.clone(), qs)
            .unwrap();
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

#[test]
fn config_space_has_the_mac_and_link_up() {
    let rig = Rig::new();
    let mut c = [0u8; 8];
    rig.net.read_config(0, &mut c);
    assert_eq!(c, [0x52, 0x54, 0, 1, 2, 3, 1, 0]);
    let f = rig.net.features();
    assert_ne!(f & (1 << 5), 0, "MAC");
    assert_ne!(f & (1 << 16), 0, "STATUS");
    assert_eq!(f & 0x7fc7, 0, "no offloads");
}

#[test]
fn host_frames_reach_guest_buffers_with_a_clean_header() {
    let mut rig = Rig::new();
    let mem = rig.mem.clone();
    let rx = mock(&mem, RXQ);
    let tx = mock(&mem, TXQ);
    add_chain(&rx, 0, &[(0x10_0000, 1526, F_WRITE)]);
    // A buffer whose header spans two descriptors.
    add_chain(
        &rx,
        2,
        &[(0x20_0000, 4, F_WRITE), (0x20_1000, 2000, F_WRITE)],
    );
    let f1 = frame(1, 100);
    let f2 = frame(2, 1514);
    peer_send(&rig.peer, &f1);
    peer_send(&rig.peer, &f2);
    rig.activate([rx.create_queue().unwrap(), tx.create_queue().unwrap()]);
    wait_for("two used receive buffers", || {
        (used_idx(&rx) == 2).then_some(())
    });
    assert_eq!(used(&rx, 0), (0, 112));
    assert_eq!(used(&rx, 1), (2, 1526));
    let mut hdr = rig.read(0x10_0000, 12);
    assert_eq!(hdr[10..], [1, 0], "num_buffers = 1");
    hdr.truncate(10);
    assert_eq!(hdr, vec![0; 10]);
    assert_eq!(rig.read(0x10_0000 + 12, 100), f1);
    let h2 = [rig.read(0x20_0000, 4), rig.read(0x20_1000, 8)].concat();
    assert_eq!(h2[10..], [1, 0]);
    assert_eq!(rig.read(0x20_1000 + 8, 1514), f2);
    let c: std::collections::HashMap<_, _> = rig.net.counters_list();
    assert_eq!((c["rx_packets"], c["rx_bytes"]), (2, 1614));
    assert!(rig.irq.0.load(Ordering::SeqCst) >= 1);
    // The device marked what it wrote for live migration.
    let region = mem.iter().next().unwrap();
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestMemoryBackend;
    assert!(region.bitmap().dirty_at(0x10_0000) && region.bitmap().dirty_at(0x20_1000));
}

#[test]
fn guest_frames_reach_the_host_byte_exact() {
    let mut rig = Rig::new();
    let mem = rig.mem.clone();
    let rx = mock(&mem, RXQ);
    let tx = mock(&mem, TXQ);
    rig.activate([rx.create_queue().unwrap(), tx.create_queue().unwrap()]);
    let f = frame(9, 60);
    mem.write_slice(&[0u8; 12], GuestAddress(0x30_0000))
        .unwrap();
    mem.write_slice(&f[..20], GuestAddress(0x30_1000)).unwrap();
    mem.write_slice(&f[20..], GuestAddress(0x30_2000)).unwrap();
    add_chain(
        &tx,
        0,
        &[(0x30_0000, 12, 0), (0x30_1000, 20, 0), (0x30_2000, 40, 0)],
    );
    rig.kicks[1].write(1).unwrap();
    let got = peer_recv(&rig.peer);
    assert_eq!(got[..12], [0; 12]);
    assert_eq!(got[12..], f[..]);
    wait_for("the transmit buffer back", || {
        (used_idx(&tx) == 1).then_some(())
    });
    assert_eq!(used(&tx, 0), (0, 0));
    // A buffer the device may write is not a frame: returned, counted, not sent.
    add_chain(&tx, 4, &[(0x30_0000, 12, 0), (0x30_1000, 20, F_WRITE)]);
    rig.kicks[1].write(1).unwrap();
    wait_for("the bad buffer back", || (used_idx(&tx) == 2).then_some(()));
    let c = rig.net.counters_list();
    assert_eq!(
        (c["tx_packets"], c["tx_bytes"], c["tx_dropped"]),
        (1, 60, 1)
    );
}

#[test]
fn frames_merge_over_buffers_and_a_pause_gives_unused_ones_back() {
    let mut rig = Rig::new();
    rig.net.ack_features(rig.net.features());
    assert_ne!(rig.net.features() & F_MRG_RXBUF, 0);
    let mem = rig.mem.clone();
    let rx = mock(&mem, RXQ);
    let tx = mock(&mem, TXQ);
    for i in 0..4u16 {
        add_chain(
            &rx,
            i,
            &[(0x10_0000 + u64::from(i) * 0x1000, 1024, F_WRITE)],
        );
    }
    let big = frame(3, 3000);
    peer_send(&rig.peer, &big);
    rig.activate([rx.create_queue().unwrap(), tx.create_queue().unwrap()]);
    wait_for("three merged buffers", || {
        (used_idx(&rx) == 3).then_some(())
    });
    assert_eq!(used(&rx, 0), (0, 1024));
    assert_eq!(used(&rx, 1), (1, 1024));
    assert_eq!(used(&rx, 2), (2, 3012 - 2048));
    assert_eq!(rig.read(0x10_0000 + 10, 2), [3, 0], "num_buffers = 3");
    let got = [
        rig.read(0x10_0000 + 12, 1012),
        rig.read(0x10_1000, 1024),
        rig.read(0x10_2000, 3012 - 2048),
    ]
    .concat();
    assert_eq!(got, big);

    // Buffer 3 was taken but not used: pausing puts it back in the ring.
    let queues = rig.net.pause();
    assert_eq!(queues.len(), 2);
    use virtio_queue::QueueT;
    assert_eq!(queues[0].queue.next_avail(), 3);
    // Resumed with the same queues, the next frame lands in it.
    let small = frame(4, 50);
    peer_send(&rig.peer, &small);
    rig.net
        .activate(rig.mem.clone(), rig.irq.clone(), queues)
        .unwrap();
    wait_for("the fourth buffer", || (used_idx(&rx) == 4).then_some(()));
    assert_eq!(used(&rx, 3), (3, 62));
    assert_eq!(rig.read(0x10_3000 + 12, 50), small);
}

#[test]
fn without_buffers_frames_wait_and_too_big_ones_are_dropped() {
    let mut rig = Rig::new();
    let mem = rig.mem.clone();
    let rx = mock(&mem, RXQ);
    let tx = mock(&mem, TXQ);
    rig.activate([rx.create_queue().unwrap(), tx.create_queue().unwrap()]);
    // No receive buffer yet: the frames wait in the backend.
    peer_send(&rig.peer, &frame(5, 500));
    peer_send(&rig.peer, &frame(6, 40));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(used_idx(&rx), 0);
    // A 100-byte buffer: the 500-byte frame does not fit (dropped), the next does.
    add_chain(&rx, 0, &[(0x10_0000, 100, F_WRITE)]);
    rig.kicks[0].write(1).unwrap();
    wait_for("the small frame", || (used_idx(&rx) == 1).then_some(()));
    assert_eq!(used(&rx, 0), (0, 52));
    assert_eq!(rig.read(0x10_0000 + 12, 40), frame(6, 40));
    let c = rig.net.counters_list();
    assert_eq!((c["rx_packets"], c["rx_dropped"]), (1, 1));
}

#[test]
fn a_detached_device_does_not_start_and_reattaches() {
    let mut rig = Rig::new();
    assert!(rig.net.detach_storage().is_err(), "no way to reopen yet");
    let (spare, _peer) = socket_pair();
    let mut net = std::mem::replace(
        &mut rig.net,
        Net::new(
            spare.clone(),
            NetConfig {
                mac: MacAddr::new([2, 0, 0, 0, 0, 1]),
            },
        ),
    )
    .with_reopen(Box::new(move || Ok(spare.clone() as Arc<dyn NetBackend>)));
    net.detach_storage().unwrap();
    let mem = rig.mem.clone();
    let rx = mock(&mem, RXQ);
    let tx = mock(&mem, TXQ);
    let qs = |rx: &MockSplitQueue<'_, GuestMemoryMmap>,
              tx: &MockSplitQueue<'_, GuestMemoryMmap>| {
        vec![
            ActivatedQueue {
                index: 0,
                queue: rx.create_queue().unwrap(),
                kick: EventFd::new(0).unwrap(),
            },
            ActivatedQueue {
                index: 1,
                queue: tx.create_queue().unwrap(),
                kick: EventFd::new(0).unwrap(),
            },
        ]
    };
    let e = net
        .activate(mem.clone(), rig.irq.clone(), qs(&rx, &tx))
        .unwrap_err();
    assert!(e.to_string().contains("detached"), "{e}");
    net.reattach_storage().unwrap();
    net.activate(mem.clone(), rig.irq.clone(), qs(&rx, &tx))
        .unwrap();
    assert_eq!(net.pause().len(), 2);
}

impl Net {
    fn counters_list(&self) -> std::collections::HashMap<&'static str, u64> {
        VirtioDevice::counters(self).into_iter().collect()
    }
}

#[test]
fn a_full_backend_holds_transmission_until_it_drains() {
    let mut rig = Rig::new();
    let mem = rig.mem.clone();
    let rx = mock(&mem, RXQ);
    let tx = mock(&mem, TXQ);
    rig.activate([rx.create_queue().unwrap(), tx.create_queue().unwrap()]);
    // 12 frames of 60,000 bytes: more than the socket buffer takes at once.
    let frames: Vec<Vec<u8>> = (0..12u8).map(|i| frame(i, 60_000)).collect();
    for (i, f) in frames.iter().enumerate() {
        let at = 0x10_0000 + i as u64 * 0x1_0000;
        mem.write_slice(&[0u8; 12], GuestAddress(at)).unwrap();
        mem.write_slice(f, GuestAddress(at + 12)).unwrap();
        add_chain(&tx, i as u16, &[(at, 60_012, 0)]);
    }
    rig.kicks[1].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let stalled = used_idx(&tx);
    assert!(
        stalled < 12,
        "the socket took everything; the test proves nothing"
    );
    for (i, f) in frames.iter().enumerate() {
        let got = peer_recv(&rig.peer);
        assert_eq!(got.len(), 60_012, "frame {i}");
        assert!(
            got[12..] == f[..],
            "frame {i} arrives in order (got seed {})",
            got[12]
        );
    }
    wait_for("every transmit buffer back", || {
        (used_idx(&tx) == 12).then_some(())
    });
    let c = rig.net.counters_list();
    assert_eq!((c["tx_packets"], c["tx_dropped"]), (12, 0));
}
