//! The thread that serves a virtio-net device: frames from the backend into the
//! guest's receive buffers, the guest's transmit buffers out to the backend.
//!
//! Frames move straight between guest memory and the tap (readv/writev of iovecs
//! that point into guest memory); only the 12-byte header is copied, so the device
//! can give the guest a clean one. Without receive buffers the worker stops watching
//! the tap (frames wait in the tap's queue) until the guest kicks the receive queue;
//! a full tap pauses transmission until the tap is writable again.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{plain_frame, rx_header, spread, Chain, MAX_FRAME_LEN, VNET_HDR_LEN};
use super::device::{NetBackend, NetCounters};
use crate::block::IoBufsMut;
use crate::virtio::guest_io::{guest_bufs, guest_bufs_mut};
use crate::virtio::{ActivatedQueue, GuestMemoryMmap, VirtioInterrupt, VirtioInterruptKind};

const TOKEN_RX_KICK: u64 = 0;
const TOKEN_TX_KICK: u64 = 1;
const TOKEN_BACKEND: u64 = 2;
const TOKEN_STOP: u64 = 3;
/// Frames moved before the guest is interrupted in the middle of a burst.
const BATCH: u32 = 64;

pub(super) struct NetWorker {
    rx: ActivatedQueue,
    tx: ActivatedQueue,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    backend: Arc<dyn NetBackend>,
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may span several receive buffers.
    mergeable: bool,
    counters: Arc<NetCounters>,
    /// Kept open for the epoll interest (the device's workers share it; never read).
    _stop: EventFd,
    epoll: Epoll,
    /// Receive buffers taken from the ring but not used yet (in ring order). A
    /// stopped worker puts them back (rewinds the ring) so nothing is lost.
    held: VecDeque<Chain>,
    held_bytes: u64,
    /// The guest has no receive buffer: the tap is not watched until it kicks.
    rx_starved: bool,
    /// Reading the backend failed: not watched until the next receive kick.
    rx_failed: bool,
    /// The backend was full: transmission waits until it is writable.
    tx_blocked: bool,
    /// What epoll watches on the backend now.
    interest: EventSet,
    /// Where the rest of a frame that no buffer could hold goes (then dropped).
    overflow: Vec<u8>,
    tx_error_logged: bool,
}

impl NetWorker {
    pub fn new(
        [rx, tx]: [ActivatedQueue; 2],
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        backend: Arc<dyn NetBackend>,
        mergeable: bool,
        counters: Arc<NetCounters>,
        stop: EventFd,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (rx.kick.as_raw_fd(), TOKEN_RX_KICK),
            (tx.kick.as_raw_fd(), TOKEN_TX_KICK),
            (stop.as_raw_fd(), TOKEN_STOP),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            backend.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_BACKEND),
        )?;
        Ok(Self {
            rx,
            tx,
            mem,
            interrupt,
            backend,
            mergeable,
            counters,
            _stop: stop,
            epoll,
            held: VecDeque::new(),
            held_bytes: 0,
            rx_starved: false,
            rx_failed: false,
            tx_blocked: false,
            interest: EventSet::IN,
            overflow: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN],
            tx_error_logged: false,
        })
    }

    /// Serves until stopped; hands back both queues (with their positions).
    pub fn run(mut self) -> Vec<ActivatedQueue> {
        crate::threads::started(crate::threads::WorkerKind::Net);
        let mut events = vec![EpollEvent::default(); 4];
        // Work may be waiting (activation after the driver queued buffers, resume).
        self.transmit();
        self.receive();
        self.update_interest();
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "net worker epoll failed");
                    return self.into_queues();
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => {
                        // Not read: the activation's other workers wait on it too (`Workers`).
                        return self.into_queues();
                    }
                    TOKEN_RX_KICK => {
                        let _ = self.rx.kick.read();
                        self.rx_starved = false;
                        self.rx_failed = false;
                        self.receive();
                    }
                    TOKEN_TX_KICK => {
                        let _ = self.tx.kick.read();
                        if !self.tx_blocked {
                            self.transmit();
                        }
                    }
                    _ => {
                        let set = ev.event_set();
                        if set.contains(EventSet::OUT) && self.tx_blocked {
                            self.tx_blocked = false;
                            self.transmit();
                        }
                        if set.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
                            self.receive();
                        }
                    }
                }
            }
            self.update_interest();
        }
    }

    /// The queues, with the receive buffers taken but not used given back.
    fn into_queues(mut self) -> Vec<ActivatedQueue> {
        let unused = self.held.len() as u16;
        let next = self.rx.queue.next_avail().wrapping_sub(unused);
        self.rx.queue.set_next_avail(next);
        vec![self.rx, self.tx]
    }

    fn update_interest(&mut self) {
        let mut want = EventSet::empty();
        if !self.rx_starved && !self.rx_failed {
            want |= EventSet::IN;
        }
        if self.tx_blocked {
            want |= EventSet::OUT;
        }
        if want == self.interest {
            return;
        }
        match self.epoll.ctl(
            ControlOperation::Modify,
            self.backend.as_raw_fd(),
            EpollEvent::new(want, TOKEN_BACKEND),
        ) {
            Ok(()) => self.interest = want,
            Err(e) => crate::guest_warn!(error = %e, "net: cannot change what epoll watches"),
        }
    }

    /// Interrupts the guest for the receive (`rx`) or transmit queue if it wants one.
    fn signal(&mut self, rx: bool) {
        let queue = if rx { &mut self.rx } else { &mut self.tx };
        match queue.queue.needs_notification(self.mem.as_ref()) {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                if let Err(e) = self
                    .interrupt
                    .trigger(VirtioInterruptKind::Queue(queue.index))
                {
                    crate::guest_warn!(error = %e, "net: cannot interrupt the guest");
                }
            }
        }
    }

    /// Takes receive buffers from the ring: one (a frame must fit in it), or with
    /// mergeable buffers enough for the largest frame. False when there is none.
    fn take_rx_buffers(&mut self) -> bool {
        let mem = self.mem.clone();
        let mem: &GuestMemoryMmap = &mem;
        let enough = |w: &Self| {
            if w.mergeable {
                w.held_bytes >= (VNET_HDR_LEN + MAX_FRAME_LEN) as u64
            } else {
                !w.held.is_empty()
            }
        };
        let mut returned = false;
        while !enough(self) {
            let Some(chain) = self.rx.queue.pop_descriptor_chain(mem) else {
                break;
            };
            match Chain::rx(chain) {
                Ok(c) => {
                    self.held_bytes += c.len;
                    self.held.push_back(c);
                }
                Err((head, e)) => {
                    crate::guest_warn!(error = %e, "net: unusable receive buffer");
                    if let Err(e) = self.rx.queue.add_used(mem, head, 0) {
                        crate::guest_warn!(error = ?e, "net: cannot return a receive buffer");
                    }
                    returned = true;
                }
            }
        }
        if returned {
            self.signal(true);
        }
        !self.held.is_empty()
    }

    fn receive(&mut self) {
        let mut delivered = 0u32;
        loop {
            if !self.take_rx_buffers() {
                // Ask for a kick when buffers come; they may have come meanwhile.
                match self.rx.queue.enable_notification(self.mem.as_ref()) {
                    Ok(true) => continue,
                    _ => {
                        self.rx_starved = true;
                        break;
                    }
                }
            }
            match self.receive_one() {
                Ok(true) => {
                    delivered += 1;
                    if delivered.is_multiple_of(BATCH) {
                        self.signal(true);
                    }
                }
                Ok(false) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    crate::guest_warn!(error = %e, "net: reading the tap failed; waiting for the guest");
                    self.rx_failed = true;
                    break;
                }
            }
        }
        if !delivered.is_multiple_of(BATCH) {
            self.signal(true);
        }
    }

    /// Reads one frame into the held buffers; true when the guest got it, false when
    /// it was dropped.
    fn receive_one(&mut self) -> std::io::Result<bool> {
        let mem = self.mem.clone();
        let mem: &GuestMemoryMmap = &mem;
        let mut header = [0u8; VNET_HDR_LEN];
        let mut parts = Vec::with_capacity(self.held.len() + 2);
        parts.push(IoBufsMut::from_slice(&mut header));
        for (i, c) in self.held.iter().enumerate() {
            let skip = if i == 0 { VNET_HDR_LEN as u64 } else { 0 };
            match guest_bufs_mut(mem, c.ranges(skip).into_iter()) {
                Ok((bufs, _)) => parts.push(bufs),
                Err(e) => {
                    // Not in guest memory: give it back empty and try again.
                    crate::guest_warn!(error = %e, "net: receive buffer outside guest memory");
                    if let Some(bad) = self.held.remove(i) {
                        self.held_bytes -= bad.len;
                        if let Err(e) = self.rx.queue.add_used(mem, bad.head, 0) {
                            crate::guest_warn!(error = ?e, "net: cannot return a receive buffer");
                        }
                    }
                    return Ok(false);
                }
            }
        }
        parts.push(IoBufsMut::from_slice(&mut self.overflow));
        let n = self.backend.recv(&IoBufsMut::join(parts))?;
        if n < VNET_HDR_LEN {
            self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        if !plain_frame(&header) {
            tracing::debug!("net: dropping a frame with offload metadata");
            self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        let Some(lens) = spread(self.held.iter().map(|c| c.len), n as u64) else {
            tracing::debug!(
                len = n - VNET_HDR_LEN,
                "net: frame larger than the receive buffers"
            );
            self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        };
        let first = &self.held[0];
        if let Err(e) = first.write_at(mem, 0, &rx_header(lens.len() as u16)) {
            crate::guest_warn!(error = %e, "net: cannot write the virtio-net header");
        }
        let mut scratch = Vec::new();
        for len in lens {
            let Some(c) = self.held.pop_front() else {
                break;
            };
            self.held_bytes -= c.len;
            // Marked after the write, so a migration round in between cannot miss it.
            scratch.clear();
            let _ = c.host_slices(mem, 0, true, &mut scratch);
            if let Err(e) = self.rx.queue.add_used(mem, c.head, len) {
                crate::guest_warn!(error = ?e, "net: cannot return a receive buffer");
            }
        }
        self.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.counters
            .rx_bytes
            .fetch_add((n - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        Ok(true)
    }

    fn transmit(&mut self) {
        let mem = self.mem.clone();
        let mem: &GuestMemoryMmap = &mem;
        let mut done = 0u32;
        'ring: loop {
            if let Err(e) = self.tx.queue.disable_notification(mem) {
                crate::guest_warn!(error = ?e, "net: cannot disable transmit notifications");
            }
            while let Some(chain) = self.tx.queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                match Chain::tx(chain) {
                    Ok(c) => {
                        if !self.send_one(mem, &c) {
                            // The tap is full: this frame goes again when it drains.
                            self.tx.queue.go_to_previous_position();
                            self.tx_blocked = true;
                            break 'ring;
                        }
                    }
                    Err((_, e)) => {
                        crate::guest_warn!(error = %e, "net: malformed transmit buffer");
                        self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Err(e) = self.tx.queue.add_used(mem, head, 0) {
                    crate::guest_warn!(error = ?e, "net: cannot return a transmit buffer");
                }
                done += 1;
                if done.is_multiple_of(BATCH) {
                    self.signal(false);
                }
            }
            match self.tx.queue.enable_notification(mem) {
                Ok(true) => continue, // More came while notifications were off.
                _ => break,
            }
        }
        if !done.is_multiple_of(BATCH) {
            self.signal(false);
        }
    }

    /// Sends one frame; false when the backend is full (nothing was sent).
    fn send_one(&mut self, mem: &GuestMemoryMmap, c: &Chain) -> bool {
        let bufs = match guest_bufs(mem, c.ranges(0).into_iter()) {
            Ok(bufs) => bufs,
            Err(e) => {
                crate::guest_warn!(error = %e, "net: transmit buffer outside guest memory");
                self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        };
        loop {
            match self.backend.send(&bufs) {
                Ok(_) => {
                    self.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .tx_bytes
                        .fetch_add(c.len - VNET_HDR_LEN as u64, Ordering::Relaxed);
                    return true;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) => {
                    // e.g. EIO while the tap's link is down: the frame is lost, as on a wire.
                    if !self.tx_error_logged {
                        crate::guest_warn!(error = %e, "net: the tap refused a frame (further refusals are counted in tx_dropped)");
                        self.tx_error_logged = true;
                    }
                    self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
            }
        }
    }
}
