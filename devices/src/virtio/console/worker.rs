//! Moves bytes between the console's queues and the host: transmit buffers to the
//! output, input bytes into receive buffers.

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vireo_util::sync;

use virtio_queue::QueueT;
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::ConsoleOutput;
use crate::virtio::{ActivatedQueue, GuestMemoryMmap, VirtioInterrupt, VirtioInterruptKind};

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_STOP: u64 = 2;
const TOKEN_INPUT: u64 = 3;
/// Input held for the guest before we stop reading the host side.
const MAX_PENDING_INPUT: usize = 64 << 10;
/// Most bytes of one transmit chain that reach the output (more is dropped).
pub const MAX_CHAIN_BYTES: usize = 64 << 10;
/// Most transmit bytes the host holds before it writes them out.
pub const MAX_BUFFERED: usize = 256 << 10;

/// What [`take_chain`] did with one transmit chain.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Taken {
    /// Bytes appended to the host buffer.
    pub kept: usize,
    /// Bytes the chain announced past [`MAX_CHAIN_BYTES`] (never read).
    pub dropped: u64,
    /// Bytes in descriptors that are not in guest memory.
    pub unreadable: u64,
}

/// Appends the device-readable bytes of `chain` to `buf`, at most [`MAX_CHAIN_BYTES`]:
/// each descriptor's length is checked against what is left of the cap before `buf`
/// grows, so a chain of 65,535 indirect descriptors of 4 GiB each costs the host
/// nothing but the walk.
pub(super) fn take_chain<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    buf: &mut Vec<u8>,
) -> Taken
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut t = Taken::default();
    for d in chain.filter(|d| !d.is_write_only()) {
        let len = d.len() as usize;
        let room = MAX_CHAIN_BYTES - t.kept;
        let take = len.min(room);
        t.dropped = t.dropped.saturating_add((len - take) as u64);
        if take == 0 {
            continue;
        }
        let start = buf.len();
        buf.resize(start + take, 0);
        if mem.read_slice(&mut buf[start..], d.addr()).is_err() {
            buf.truncate(start);
            t.unreadable = t.unreadable.saturating_add(take as u64);
            continue;
        }
        t.kept += take;
    }
    t
}

/// Moves bytes of `pending` into the device-writable descriptors of `chain`, in order,
/// until either runs out; returns how many reached the guest. A descriptor outside
/// guest memory ends the chain (its bytes are dropped, as a broken buffer's are).
pub(super) fn fill_chain<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    pending: &mut VecDeque<u8>,
) -> u32
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut written = 0u32;
    for d in chain.filter(|d| d.is_write_only()) {
        let n = (d.len() as usize).min(pending.len());
        let bytes: Vec<u8> = pending.drain(..n).collect();
        if mem.write_slice(&bytes, d.addr()).is_err() {
            break;
        }
        // At most MAX_PENDING_INPUT bytes in all: no overflow.
        written += n as u32;
        if pending.is_empty() {
            break;
        }
    }
    written
}

/// What a stopped worker hands back to the device.
pub(super) struct WorkerParts {
    pub input: Option<std::fs::File>,
    pub queues: Vec<ActivatedQueue>,
}

pub(super) struct ConsoleWorker {
    rx: ActivatedQueue,
    tx: ActivatedQueue,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    output: ConsoleOutput,
    input: Option<std::fs::File>,
    pending: VecDeque<u8>,
    /// Whether epoll reports input readiness (off while `pending` is full).
    input_watched: bool,
    bytes_out: Arc<AtomicU64>,
    bytes_in: Arc<AtomicU64>,
    /// Transmit chains cut short (over the cap or outside guest memory).
    truncated: Arc<AtomicU64>,
    /// Kept open for the epoll interest (the device's workers share it).
    _stop: EventFd,
    epoll: Epoll,
}

impl ConsoleWorker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rx: ActivatedQueue,
        tx: ActivatedQueue,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        output: ConsoleOutput,
        input: Option<std::fs::File>,
        (bytes_out, bytes_in, truncated): (Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>),
        stop: EventFd,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (rx.kick.as_raw_fd(), TOKEN_RX),
            (tx.kick.as_raw_fd(), TOKEN_TX),
            (stop.as_raw_fd(), TOKEN_STOP),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let mut input = input;
        if let Some(i) = &input {
            let watched = epoll.ctl(
                ControlOperation::Add,
                i.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_INPUT),
            );
            if let Err(e) = watched {
                // e.g. stdin redirected from a regular file, which epoll refuses (EPERM).
                tracing::warn!(error = %e, "console input cannot be polled; the guest gets no input");
                input = None;
            }
        }
        Ok(Self {
            rx,
            tx,
            mem,
            interrupt,
            output,
            input,
            pending: VecDeque::new(),
            input_watched: true,
            bytes_out,
            bytes_in,
            truncated,
            _stop: stop,
            epoll,
        })
    }

    /// Serves until stopped; hands back the input and the queues (with their positions)
    /// so the device can keep them.
    pub fn run(mut self) -> WorkerParts {
        crate::threads::started(crate::threads::WorkerKind::Console);
        let mut events = vec![EpollEvent::default(); 4];
        self.transmit();
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "console worker epoll failed");
                    return self.into_parts();
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    // Not read: the port worker waits on the same eventfd.
                    TOKEN_STOP => return self.into_parts(),
                    TOKEN_TX => {
                        let _ = self.tx.kick.read();
                        self.transmit();
                    }
                    TOKEN_RX => {
                        let _ = self.rx.kick.read();
                        self.receive();
                    }
                    _ => {
                        self.read_input(ev.event_set());
                        self.receive();
                    }
                }
            }
        }
    }

    fn into_parts(self) -> WorkerParts {
        WorkerParts {
            input: self.input,
            queues: vec![self.rx, self.tx],
        }
    }

    fn notify(&self, q: u16) {
        if let Err(e) = self.interrupt.trigger(VirtioInterruptKind::Queue(q)) {
            crate::guest_warn!(error = %e, "console: cannot interrupt the guest");
        }
    }

    /// Moves every transmit chain to the output. What a chain may make the host hold is
    /// capped before anything is allocated: a chain's descriptors are counted with
    /// checked arithmetic against [`MAX_CHAIN_BYTES`] (the rest is dropped and the chain
    /// reported as truncated), and the host buffer goes to the output whenever the next
    /// chain could take it past [`MAX_BUFFERED`].
    fn transmit(&mut self) {
        let mem = self.mem.clone();
        let mem: &GuestMemoryMmap = &mem;
        let mut done = false;
        let mut buf = Vec::new();
        while let Some(chain) = self.tx.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            if buf.len() + MAX_CHAIN_BYTES > MAX_BUFFERED {
                self.write_out(&mut buf);
            }
            let taken = take_chain(mem, chain, &mut buf);
            if taken.dropped > 0 || taken.unreadable > 0 {
                self.truncated.fetch_add(1, Ordering::Relaxed);
                crate::guest_warn!(
                    kept = taken.kept,
                    dropped = taken.dropped,
                    unreadable = taken.unreadable,
                    cap = MAX_CHAIN_BYTES,
                    "console: transmit chain truncated (over the cap or outside guest memory)"
                );
            }
            if let Err(e) = self.tx.queue.add_used(mem, head, 0) {
                crate::guest_warn!(error = ?e, "console: cannot return a transmit buffer");
            }
            done = true;
        }
        self.write_out(&mut buf);
        if done && self.tx.queue.needs_notification(mem).unwrap_or(true) {
            self.notify(self.tx.index);
        }
    }

    /// Writes and empties the host buffer.
    fn write_out(&mut self, buf: &mut Vec<u8>) {
        if buf.is_empty() {
            return;
        }
        let mut out = sync::lock(&self.output);
        if let Err(e) = out.write_all(buf).and_then(|_| out.flush()) {
            crate::guest_warn!(error = %e, "console output failed");
        }
        self.bytes_out
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        buf.clear();
    }

    fn read_input(&mut self, events: EventSet) {
        let Some(input) = &mut self.input else { return };
        let mut buf = [0u8; 4096];
        let room = MAX_PENDING_INPUT
            .saturating_sub(self.pending.len())
            .min(buf.len());
        match input.read(&mut buf[..room]) {
            Ok(0) if room > 0 => self.close_input(),
            Ok(n) => self.pending.extend(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => self.close_input(),
        }
        if events.contains(EventSet::HANG_UP) && !events.contains(EventSet::IN) {
            self.close_input();
        }
        if self.pending.len() >= MAX_PENDING_INPUT {
            // The guest is not taking input: stop reading the host side (the bytes wait
            // in the pipe or terminal) until it does.
            self.watch_input(false);
        }
    }

    /// Turns the epoll interest in the input on or off.
    fn watch_input(&mut self, on: bool) {
        if self.input_watched == on {
            return;
        }
        if let Some(i) = &self.input {
            let events = if on { EventSet::IN } else { EventSet::empty() };
            let _ = self.epoll.ctl(
                ControlOperation::Modify,
                i.as_raw_fd(),
                EpollEvent::new(events, TOKEN_INPUT),
            );
        }
        self.input_watched = on;
    }

    /// End of input (e.g. stdin closed): stop watching it.
    fn close_input(&mut self) {
        if let Some(i) = self.input.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                i.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn receive(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mem = self.mem.clone();
        let mem: &GuestMemoryMmap = &mem;
        let mut done = false;
        while !self.pending.is_empty() {
            let Some(chain) = self.rx.queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let written = fill_chain(mem, chain, &mut self.pending);
            self.bytes_in
                .fetch_add(u64::from(written), Ordering::Relaxed);
            if let Err(e) = self.rx.queue.add_used(mem, head, written) {
                crate::guest_warn!(error = ?e, "console: cannot return a receive buffer");
            }
            done = true;
        }
        if self.pending.len() < MAX_PENDING_INPUT {
            self.watch_input(true);
        }
        if done && self.rx.queue.needs_notification(mem).unwrap_or(true) {
            self.notify(self.rx.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::log_limit::tests::Captured;
    use crate::virtio::VirtioInterruptKind;

    const F_NEXT: u16 = 1;
    const F_INDIRECT: u16 = 4;
    const PAGE: u64 = 0x20_0000;
    const TABLE: u64 = 0x40_0000;

    struct NoIrq;
    impl VirtioInterrupt for NoIrq {
        fn trigger(&self, _: VirtioInterruptKind) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// An output that records the size of every write the worker makes.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<usize>>>);
    impl std::io::Write for Recorder {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(b.len());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Rig {
        mem: Arc<GuestMemoryMmap>,
        worker: ConsoleWorker,
        writes: Recorder,
        truncated: Arc<AtomicU64>,
    }

    fn rig(mem: Arc<GuestMemoryMmap>, rx: Queue, tx: Queue) -> Rig {
        let writes = Recorder::default();
        let truncated = Arc::new(AtomicU64::new(0));
        let q = |index, queue| ActivatedQueue {
            index,
            queue,
            kick: EventFd::new(0).unwrap(),
        };
        let worker = ConsoleWorker::new(
            q(0, rx),
            q(1, tx),
            mem.clone(),
            Arc::new(NoIrq),
            Arc::new(Mutex::new(Box::new(writes.clone()))),
            None,
            (Arc::default(), Arc::default(), truncated.clone()),
            EventFd::new(0).unwrap(),
        )
        .unwrap();
        Rig {
            mem,
            worker,
            writes,
            truncated,
        }
    }

    fn guest_memory() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap())
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    #[test]
    fn a_chain_of_65535_indirect_descriptors_on_one_page_is_capped_before_allocation() {
        let mem = guest_memory();
        mem.write_slice(&[b'x'; 4096], GuestAddress(PAGE)).unwrap();
        // 65,535 descriptors, each the same page announced as 4 GiB - 1 bytes: without
        // a cap the host would try to buffer ~256 TiB.
        const N: u32 = 65_535;
        let table: Vec<u8> = (0..N)
            .flat_map(|i| {
                let flags = if i + 1 < N { F_NEXT } else { 0 };
                let d = desc(PAGE, u32::MAX, flags, (i + 1) as u16);
                // SAFETY: a RawDescriptor is 16 plain bytes.
                unsafe { std::mem::transmute::<RawDescriptor, [u8; 16]>(d) }
            })
            .collect();
        mem.write_slice(&table, GuestAddress(TABLE)).unwrap();
        let rxq = MockSplitQueue::create(mem.as_ref(), GuestAddress(0), 16);
        let txq = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x1_0000), 16);
        txq.add_desc_chains(&[desc(TABLE, N * 16, F_INDIRECT, 0)], 0)
            .unwrap();
        // Then an ordinary chain: the console keeps working.
        mem.write_slice(b"still here\n", GuestAddress(PAGE + 0x1000))
            .unwrap();
        txq.add_desc_chains(&[desc(PAGE + 0x1000, 11, 0, 0)], 1)
            .unwrap();
        let mut r = rig(
            mem.clone(),
            rxq.create_queue().unwrap(),
            txq.create_queue().unwrap(),
        );

        let lines = Captured::run(|| r.worker.transmit());

        let writes = r.writes.0.lock().unwrap().clone();
        let total: usize = writes.iter().sum();
        assert_eq!(total, MAX_CHAIN_BYTES + 11, "writes: {writes:?}");
        assert!(writes.iter().all(|&w| w <= MAX_BUFFERED), "{writes:?}");
        assert_eq!(r.truncated.load(Ordering::Relaxed), 1);
        assert!(
            lines.iter().any(|l| l.contains("transmit chain truncated")),
            "{lines:#?}"
        );
        // Both chains were consumed and returned.
        assert_eq!(txq.used().idx().load(), 2);
        let _ = &r.mem;
    }

    #[test]
    fn the_host_buffer_never_holds_more_than_its_cap_however_many_chains_wait() {
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(mem.as_ref(), GuestAddress(0), 64);
        let txq = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x1_0000), 64);
        // 16 chains of two 64 KiB descriptors (128 KiB announced, 64 KiB kept each).
        for c in 0..16u16 {
            let a = PAGE + u64::from(c) * 0x2_0000;
            txq.add_desc_chains(
                &[
                    desc(a, 0x1_0000, F_NEXT, 2 * c + 1),
                    desc(a + 0x1_0000, 0x1_0000, 0, 0),
                ],
                2 * c,
            )
            .unwrap();
        }
        let mut r = rig(
            mem.clone(),
            rxq.create_queue().unwrap(),
            txq.create_queue().unwrap(),
        );
        r.worker.transmit();
        let writes = r.writes.0.lock().unwrap().clone();
        assert_eq!(writes.iter().sum::<usize>(), 16 * MAX_CHAIN_BYTES);
        assert!(writes.iter().all(|&w| w <= MAX_BUFFERED), "{writes:?}");
        assert_eq!(r.truncated.load(Ordering::Relaxed), 16);
        assert_eq!(txq.used().idx().load(), 16);
    }

    #[test]
    fn ten_thousand_bad_chains_make_a_bounded_number_of_log_lines() {
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(mem.as_ref(), GuestAddress(0), 16);
        let txq = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x1_0000), 16);
        let mut r = rig(
            mem.clone(),
            rxq.create_queue().unwrap(),
            txq.create_queue().unwrap(),
        );
        let lines = Captured::run(|| {
            for _ in 0..10_000u32 {
                // One chain outside guest memory, consumed before the next is added
                // (the mock's avail ring must not wrap).
                txq.add_desc_chains(&[desc(1 << 40, 512, 0, 0)], 0).unwrap();
                r.worker.transmit();
                txq.avail().idx().store(0);
                r.worker.tx.queue.set_next_avail(0);
                r.worker.tx.queue.set_next_used(0);
            }
        });
        assert_eq!(r.truncated.load(Ordering::Relaxed), 10_000);
        let truncations = lines
            .iter()
            .filter(|l| l.contains("transmit chain truncated"))
            .count();
        assert!(
            (1..=crate::log_limit::LINES_PER_WINDOW as usize).contains(&truncations),
            "{truncations} lines"
        );
        assert!(lines.len() < 20, "{} lines: {lines:#?}", lines.len());
    }
}
