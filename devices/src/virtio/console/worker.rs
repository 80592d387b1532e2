//! Moves bytes between the console's queues and the host: transmit buffers to the
//! output, input bytes into receive buffers.

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
    stop: EventFd,
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
        (bytes_out, bytes_in): (Arc<AtomicU64>, Arc<AtomicU64>),
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
            stop,
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
                    TOKEN_STOP => {
                        let _ = self.stop.read();
                        return self.into_parts();
                    }
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
            tracing::warn!(error = %e, "console: cannot interrupt the guest");
        }
    }

    fn transmit(&mut self) {
        let mem = self.mem.clone();
        let mem: &GuestMemoryMmap = &mem;
        let mut done = false;
        let mut buf = Vec::new();
        while let Some(chain) = self.tx.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            for d in chain.filter(|d| !d.is_write_only()) {
                let start = buf.len();
                buf.resize(start + d.len() as usize, 0);
                if mem.read_slice(&mut buf[start..], d.addr()).is_err() {
                    buf.truncate(start);
                }
            }
            let _ = self.tx.queue.add_used(mem, head, 0);
            done = true;
        }
        if !buf.is_empty() {
            let mut out = self.output.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = out.write_all(&buf).and_then(|_| out.flush()) {
                tracing::warn!(error = %e, "console output failed");
            }
            self.bytes_out
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        if done && self.tx.queue.needs_notification(mem).unwrap_or(true) {
            self.notify(self.tx.index);
        }
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
            let mut written = 0u32;
            for d in chain.filter(|d| d.is_write_only()) {
                let n = (d.len() as usize).min(self.pending.len());
                let bytes: Vec<u8> = self.pending.drain(..n).collect();
                if mem.write_slice(&bytes, d.addr()).is_err() {
                    break;
                }
                written += n as u32;
                if self.pending.is_empty() {
                    break;
                }
            }
            self.bytes_in
                .fetch_add(u64::from(written), Ordering::Relaxed);
            let _ = self.rx.queue.add_used(mem, head, written);
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
