//! The multiport worker: serves the control queues (2: to the driver, 3: from it) and
//! the guest agent port's queues (4: receive, 5: transmit), beside the console worker
//! that keeps port 0's queues (0, 1).

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::channel::AgentChannel;
use super::control::{Control, ControlMsg, AGENT_PORT, HEADER_LEN};
use super::worker::{fill_chain, take_chain};
use crate::virtio::{ActivatedQueue, GuestMemoryMmap, VirtioInterrupt, VirtioInterruptKind};

const TOKEN_CTRL_RX: u64 = 0;
const TOKEN_CTRL_TX: u64 = 1;
const TOKEN_PORT_RX: u64 = 2;
const TOKEN_PORT_TX: u64 = 3;
const TOKEN_STOP: u64 = 4;
const TOKEN_HOST: u64 = 5;
/// Control messages waiting for receive buffers; more are dropped (the protocol sends
/// at most six between resets, see [`Control::handle`]).
pub const MAX_PENDING_CONTROL: usize = 32;
/// Most bytes of one control chain read (a driver's message is 8 bytes).
pub const MAX_CONTROL_CHAIN: usize = 64;

/// The four queues of the worker, by role.
pub(super) struct PortQueues {
    pub ctrl_rx: ActivatedQueue,
    pub ctrl_tx: ActivatedQueue,
    pub port_rx: ActivatedQueue,
    pub port_tx: ActivatedQueue,
}

/// What a stopped port worker hands back.
pub(super) struct PortParts {
    pub queues: Vec<ActivatedQueue>,
    pub control: Control,
}

/// The protocol and port state without queues or threads, so that the fuzz target and
/// the tests drive it chain by chain.
pub struct PortState {
    pub control: Control,
    /// Control messages for the driver not yet delivered.
    pub pending: VecDeque<ControlMsg>,
    pub channel: AgentChannel,
    /// Control messages refused or dropped, and agent bytes dropped.
    pub refused: Arc<AtomicU64>,
}

impl PortState {
    pub fn new(control: Control, channel: AgentChannel) -> Self {
        channel.set_guest_open(control.guest_open[AGENT_PORT as usize]);
        Self {
            control,
            pending: VecDeque::new(),
            channel,
            refused: Arc::default(),
        }
    }

    /// One chain the driver put on the control transmit queue.
    pub fn control_chain<M>(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<M>,
    ) where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let mut buf = Vec::with_capacity(HEADER_LEN);
        let mut len = 0usize;
        for d in chain.filter(|d| !d.is_write_only()) {
            let want = (d.len() as usize).min(MAX_CONTROL_CHAIN - len);
            if want == 0 {
                break;
            }
            let start = buf.len();
            buf.resize(start + want, 0);
            if mem.read_slice(&mut buf[start..], d.addr()).is_err() {
                buf.truncate(start);
                break;
            }
            len += want;
        }
        let handled = ControlMsg::parse(&buf).and_then(|m| {
            let h = self.control.handle(&m)?;
            Ok((m, h))
        });
        match handled {
            Ok((m, h)) => {
                if let Some(why) = h.ignored {
                    crate::guest_warn!(
                        id = m.id,
                        event = m.event,
                        value = m.value,
                        "console control: {why}"
                    );
                }
                if m.id == AGENT_PORT {
                    self.channel
                        .set_guest_open(self.control.guest_open[AGENT_PORT as usize]);
                }
                for r in h.replies {
                    if self.pending.len() >= MAX_PENDING_CONTROL {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                        crate::guest_warn!(
                            cap = MAX_PENDING_CONTROL,
                            "console control: the driver takes no control messages; one dropped"
                        );
                        continue;
                    }
                    self.pending.push_back(r);
                }
            }
            Err(e) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                crate::guest_warn!(error = %e, "console control: message refused");
            }
        }
    }

    /// Puts the next pending control message into `chain`; returns the bytes written
    /// (0 when the chain is too small or outside guest memory: the message is dropped).
    pub fn control_reply<M>(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<M>,
    ) -> u32
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let Some(msg) = self.pending.pop_front() else {
            return 0;
        };
        let mut bytes: VecDeque<u8> = msg.to_bytes().into();
        let want = bytes.len();
        let written = fill_chain(mem, chain, &mut bytes);
        if written as usize != want {
            self.refused.fetch_add(1, Ordering::Relaxed);
            crate::guest_warn!(
                written,
                len = want,
                event = msg.event,
                "console control: receive buffer too small or outside guest memory; message dropped"
            );
        }
        written
    }

    /// One chain the driver put on the agent port's transmit queue: its bytes go to the
    /// host end (bounded; what does not fit is dropped and counted).
    pub fn port_chain<M>(&mut self, mem: &GuestMemoryMmap, chain: virtio_queue::DescriptorChain<M>)
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let mut buf = Vec::new();
        let t = take_chain(mem, chain, &mut buf);
        let dropped = self.channel.push_from_guest(&buf);
        if t.dropped > 0 || t.unreadable > 0 || dropped > 0 {
            self.refused.fetch_add(1, Ordering::Relaxed);
            crate::guest_warn!(
                kept = t.kept - dropped,
                over_chain_cap = t.dropped,
                unreadable = t.unreadable,
                host_full = dropped,
                "guest agent port: bytes from the guest dropped"
            );
        }
    }
}

pub(super) struct PortWorker {
    q: PortQueues,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    state: PortState,
    /// Kept open for the epoll interest (the device's workers share it).
    _stop: EventFd,
    epoll: Epoll,
}

impl PortWorker {
    pub fn new(
        q: PortQueues,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        state: PortState,
        stop: EventFd,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (q.ctrl_rx.kick.as_raw_fd(), TOKEN_CTRL_RX),
            (q.ctrl_tx.kick.as_raw_fd(), TOKEN_CTRL_TX),
            (q.port_rx.kick.as_raw_fd(), TOKEN_PORT_RX),
            (q.port_tx.kick.as_raw_fd(), TOKEN_PORT_TX),
            (stop.as_raw_fd(), TOKEN_STOP),
            (state.channel.wake_fd(), TOKEN_HOST),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(Self {
            q,
            mem,
            interrupt,
            state,
            _stop: stop,
            epoll,
        })
    }

    /// Serves until stopped; hands back the queues and the protocol state.
    pub fn run(mut self) -> PortParts {
        crate::threads::started(crate::threads::WorkerKind::Console);
        let mut events = vec![EpollEvent::default(); 8];
        self.control_in();
        self.port_in();
        self.deliver();
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "console port worker epoll failed");
                    return self.into_parts();
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    // Not read (it would reset the count): the console worker
                    // waits on the same eventfd.
                    TOKEN_STOP => return self.into_parts(),
                    TOKEN_CTRL_TX => {
                        let _ = self.q.ctrl_tx.kick.read();
                        self.control_in();
                    }
                    TOKEN_CTRL_RX => {
                        let _ = self.q.ctrl_rx.kick.read();
                        self.control_out();
                    }
                    TOKEN_PORT_TX => {
                        let _ = self.q.port_tx.kick.read();
                        self.port_in();
                    }
                    TOKEN_PORT_RX => {
                        let _ = self.q.port_rx.kick.read();
                        self.deliver();
                    }
                    _ => {
                        self.state.channel.clear_wake();
                        self.deliver();
                    }
                }
            }
        }
    }

    fn into_parts(self) -> PortParts {
        PortParts {
            queues: vec![
                self.q.ctrl_rx,
                self.q.ctrl_tx,
                self.q.port_rx,
                self.q.port_tx,
            ],
            control: self.state.control,
        }
    }

    fn notify(&self, q: u16) {
        if let Err(e) = self.interrupt.trigger(VirtioInterruptKind::Queue(q)) {
            crate::guest_warn!(error = %e, "console: cannot interrupt the guest");
        }
    }

    /// Control messages from the driver, then what they made the device say.
    fn control_in(&mut self) {
        let mem = self.mem.clone();
        let mut done = false;
        while let Some(chain) = self.q.ctrl_tx.queue.pop_descriptor_chain(mem.as_ref()) {
            let head = chain.head_index();
            self.state.control_chain(&mem, chain);
            if let Err(e) = self.q.ctrl_tx.queue.add_used(mem.as_ref(), head, 0) {
                crate::guest_warn!(error = ?e, "console: cannot return a control buffer");
            }
            done = true;
        }
        if done
            && self
                .q
                .ctrl_tx
                .queue
                .needs_notification(mem.as_ref())
                .unwrap_or(true)
        {
            self.notify(self.q.ctrl_tx.index);
        }
        self.control_out();
        // A PORT_OPEN may have made held bytes deliverable.
        self.deliver();
    }

    /// Pending control messages into the driver's control receive buffers.
    fn control_out(&mut self) {
        let mem = self.mem.clone();
        let mut done = false;
        while !self.state.pending.is_empty() {
            let Some(chain) = self.q.ctrl_rx.queue.pop_descriptor_chain(mem.as_ref()) else {
                break;
            };
            let head = chain.head_index();
            let written = self.state.control_reply(&mem, chain);
            if let Err(e) = self.q.ctrl_rx.queue.add_used(mem.as_ref(), head, written) {
                crate::guest_warn!(error = ?e, "console: cannot return a control buffer");
            }
            done = true;
        }
        if done
            && self
                .q
                .ctrl_rx
                .queue
                .needs_notification(mem.as_ref())
                .unwrap_or(true)
        {
            self.notify(self.q.ctrl_rx.index);
        }
    }

    /// Bytes the guest agent wrote.
    fn port_in(&mut self) {
        let mem = self.mem.clone();
        let mut done = false;
        while let Some(chain) = self.q.port_tx.queue.pop_descriptor_chain(mem.as_ref()) {
            let head = chain.head_index();
            self.state.port_chain(&mem, chain);
            if let Err(e) = self.q.port_tx.queue.add_used(mem.as_ref(), head, 0) {
                crate::guest_warn!(error = ?e, "console: cannot return an agent port buffer");
            }
            done = true;
        }
        if done
            && self
                .q
                .port_tx
                .queue
                .needs_notification(mem.as_ref())
                .unwrap_or(true)
        {
            self.notify(self.q.port_tx.index);
        }
    }

    /// Bytes for the guest agent, once a guest program has the port open (a Linux
    /// driver drops what arrives on a closed port).
    fn deliver(&mut self) {
        if !self.state.control.guest_open[AGENT_PORT as usize] {
            return;
        }
        let mem = self.mem.clone();
        let rx = &mut self.q.port_rx;
        let done = self.state.channel.with_to_guest(|pending| {
            let mut done = false;
            while !pending.is_empty() {
                let Some(chain) = rx.queue.pop_descriptor_chain(mem.as_ref()) else {
                    break;
                };
                let head = chain.head_index();
                let written = fill_chain(&mem, chain, pending);
                if let Err(e) = rx.queue.add_used(mem.as_ref(), head, written) {
                    crate::guest_warn!(error = ?e, "console: cannot return an agent port buffer");
                }
                done = true;
            }
            done
        });
        if done
            && self
                .q
                .port_rx
                .queue
                .needs_notification(mem.as_ref())
                .unwrap_or(true)
        {
            self.notify(self.q.port_rx.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::super::control::event;
    use super::*;
    use crate::log_limit::tests::Captured;

    const WRITE: u16 = 2;
    const BUF: u64 = 0x20_0000;

    struct NoIrq;
    impl VirtioInterrupt for NoIrq {
        fn trigger(&self, _: VirtioInterruptKind) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    struct Rig<'a> {
        mem: Arc<GuestMemoryMmap>,
        qs: Vec<MockSplitQueue<'a, GuestMemoryMmap>>,
        worker: PortWorker,
        channel: AgentChannel,
        /// Descriptors added per queue so far (each chain is one descriptor).
        added: [u16; 4],
    }

    impl<'a> Rig<'a> {
        fn new(mem: &'a Arc<GuestMemoryMmap>) -> Self {
            let qs: Vec<_> = (0..4u64)
                .map(|i| MockSplitQueue::create(mem.as_ref(), GuestAddress(i * 0x1_0000), 16))
                .collect();
            let aq = |i: usize| ActivatedQueue {
                index: 2 + i as u16,
                queue: qs[i].create_queue().unwrap(),
                kick: EventFd::new(0).unwrap(),
            };
            let channel = AgentChannel::new().unwrap();
            let worker = PortWorker::new(
                PortQueues {
                    ctrl_rx: aq(0),
                    ctrl_tx: aq(1),
                    port_rx: aq(2),
                    port_tx: aq(3),
                },
                mem.clone(),
                Arc::new(NoIrq),
                PortState::new(Control::default(), channel.clone()),
                EventFd::new(0).unwrap(),
            )
            .unwrap();
            Rig {
                mem: mem.clone(),
                qs,
                worker,
                channel,
                added: [0; 4],
            }
        }

        /// Adds one single-descriptor chain at `addr` to queue `q` (0..4 = 2..6).
        fn add(&mut self, q: usize, addr: u64, len: u32, flags: u16) {
            let n = self.added[q];
            self.qs[q]
                .add_desc_chains(&[desc(addr, len, flags)], n)
                .unwrap();
            self.added[q] += 1;
        }

        /// The driver sends one control message.
        fn send_control(&mut self, m: ControlMsg, at: u64) {
            self.mem
                .write_slice(&m.to_bytes(), GuestAddress(at))
                .unwrap();
            self.add(1, at, HEADER_LEN as u32, 0);
            self.worker.control_in();
        }

        /// The control messages the device wrote into receive buffers so far (each
        /// buffer 64 bytes at BUF + i * 64).
        fn received_control(&self) -> Vec<ControlMsg> {
            let used = self.qs[0].used().idx().load();
            (0..u64::from(used))
                .map(|i| {
                    let mut b = [0u8; 64];
                    self.mem
                        .read_slice(&mut b, GuestAddress(BUF + i * 64))
                        .unwrap();
                    let mut m = ControlMsg::parse(&b).unwrap();
                    if m.event == event::PORT_NAME {
                        let end = b[8..].iter().position(|&c| c == 0).unwrap_or(56);
                        m.name = b[8..8 + end].to_vec();
                    }
                    m
                })
                .collect()
        }
    }

    fn guest_memory() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap())
    }

    #[test]
    fn handshake_then_a_command_and_its_reply_cross_the_agent_port() {
        let mem = guest_memory();
        let mut r = Rig::new(&mem);
        for i in 0..8 {
            r.add(0, BUF + i * 64, 64, WRITE);
        }
        r.send_control(ControlMsg::new(u32::MAX, event::DEVICE_READY, 1), 0x30_0000);
        r.send_control(ControlMsg::new(0, event::PORT_READY, 1), 0x30_0100);
        r.send_control(ControlMsg::new(1, event::PORT_READY, 1), 0x30_0200);
        let got = r.received_control();
        assert_eq!(
            got.iter().map(|m| (m.id, m.event)).collect::<Vec<_>>(),
            vec![
                (0, event::DEVICE_ADD),
                (1, event::DEVICE_ADD),
                (0, event::CONSOLE_PORT),
                (0, event::PORT_OPEN),
                (1, event::PORT_NAME),
                (1, event::PORT_OPEN),
            ]
        );
        assert_eq!(got[4].name, b"org.qemu.guest_agent.0");

        // A command queued before the guest opens the port waits for the open.
        r.add(2, 0x40_0000, 256, WRITE);
        r.channel.send(b"{\"execute\":\"guest-ping\"}\n").unwrap();
        r.worker.deliver();
        assert_eq!(r.qs[2].used().idx().load(), 0);
        assert!(!r.channel.guest_open());
        r.send_control(ControlMsg::new(1, event::PORT_OPEN, 1), 0x30_0300);
        assert!(r.channel.guest_open());
        assert_eq!(r.qs[2].used().idx().load(), 1);
        let mut cmd = [0u8; 25];
        mem.read_slice(&mut cmd, GuestAddress(0x40_0000)).unwrap();
        assert_eq!(&cmd, b"{\"execute\":\"guest-ping\"}\n");

        // The guest's reply reaches the host end.
        mem.write_slice(b"{\"return\": {}}\n", GuestAddress(0x50_0000))
            .unwrap();
        r.add(3, 0x50_0000, 15, 0);
        r.worker.port_in();
        let reply = r
            .channel
            .recv_until(b'\n', Instant::now() + Duration::from_secs(60))
            .unwrap();
        assert_eq!(reply, b"{\"return\": {}}\n");
    }

    #[test]
    fn hostile_control_traffic_is_refused_with_a_bounded_log_and_the_port_still_works() {
        let mem = guest_memory();
        let mut r = Rig::new(&mem);
        let lines = Captured::run(|| {
            // Unknown ports, driver-only events, short messages, one per chain.
            for i in 0..12u64 {
                let m = ControlMsg::new(7 + i as u32, event::PORT_OPEN, 1);
                r.send_control(m, 0x30_0000 + i * 0x100);
            }
            // A 1 MiB control chain: only its first MAX_CONTROL_CHAIN bytes are read.
            r.mem
                .write_slice(
                    &ControlMsg::new(1, event::PORT_OPEN, 1).to_bytes(),
                    GuestAddress(0x60_0000),
                )
                .unwrap();
            r.add(1, 0x60_0000, 1 << 20, 0);
            r.worker.control_in();
        });
        assert_eq!(r.worker.state.refused.load(Ordering::Relaxed), 12);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("names port 7, which does not exist")),
            "{lines:#?}"
        );
        assert!(lines.len() <= 12, "{} lines", lines.len());
        // The big chain's message still counted, and no control reply was due.
        assert!(r.channel.guest_open());
        assert_eq!(r.qs[1].used().idx().load(), 13);
        assert_eq!(r.qs[0].used().idx().load(), 0);
    }

    #[test]
    fn the_guest_cannot_make_the_host_hold_more_than_its_bound() {
        let mem = guest_memory();
        let mut r = Rig::new(&mem);
        // Twelve chains of 256 KiB (each capped at 64 KiB) against an empty reader,
        // then more until the host end is full.
        for round in 0..2 {
            for _ in 0..12 {
                r.add(3, 0x80_0000, 256 << 10, 0);
            }
            r.worker.port_in();
            r.qs[3].avail().idx().store(0);
            r.worker.q.port_tx.queue.set_next_avail(0);
            r.worker.q.port_tx.queue.set_next_used(0);
            r.added[3] = 0;
            let _ = round;
        }
        // 24 chains x 64 KiB = 1.5 MiB offered: 1 MiB held, the rest dropped.
        assert_eq!(
            r.channel.dropped(),
            (24 * (64 << 10) - super::super::channel::MAX_FROM_GUEST) as u64
        );
    }
}
