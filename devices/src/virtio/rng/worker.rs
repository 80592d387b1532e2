//! Fills each device-writable buffer the guest offers with random bytes.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::{ActivatedQueue, GuestMemoryMmap, VirtioInterrupt, VirtioInterruptKind};

const TOKEN_KICK: u64 = 0;
const TOKEN_STOP: u64 = 1;
/// Most bytes handed out per request.
const MAX_REQUEST: usize = 64 << 10;

pub(super) struct RngWorker {
    q: ActivatedQueue,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    bytes: Arc<AtomicU64>,
    /// Kept open for the epoll interest (the device's workers share it; never read).
    _stop: EventFd,
    epoll: Epoll,
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl RngWorker {
    pub fn new(
        q: ActivatedQueue,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        bytes: Arc<AtomicU64>,
        stop: EventFd,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            q.kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_KICK),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_STOP),
        )?;
        Ok(Self {
            q,
            mem,
            interrupt,
            bytes,
            _stop: stop,
            epoll,
        })
    }

    /// Serves until stopped; hands back the queue (with its position) when it stops.
    pub fn run(mut self) -> ActivatedQueue {
        crate::threads::started(crate::threads::WorkerKind::Rng);
        let mut events = vec![EpollEvent::default(); 2];
        self.process();
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "rng worker epoll failed");
                    return self.q;
                }
            };
            for ev in &events[..n] {
                if ev.data() == TOKEN_STOP {
                    // Not read: the activation's other workers wait on it too (`Workers`).
                    return self.q;
                }
                let _ = self.q.kick.read();
                self.process();
            }
        }
    }

    fn process(&mut self) {
        let mem = self.mem.clone();
        let mem: &GuestMemoryMmap = &mem;
        let mut buf = Vec::new();
        let mut completed = false;
        while let Some(chain) = self.q.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut written = 0u32;
            for d in chain {
                if !d.is_write_only() {
                    continue;
                }
                let len = (d.len() as usize).min(MAX_REQUEST - written as usize);
                buf.resize(len, 0);
                if getrandom(&mut buf).is_err() || mem.write_slice(&buf, d.addr()).is_err() {
                    break;
                }
                written += len as u32;
                if written as usize >= MAX_REQUEST {
                    break;
                }
            }
            self.bytes.fetch_add(u64::from(written), Ordering::Relaxed);
            if let Err(e) = self.q.queue.add_used(mem, head, written) {
                crate::guest_warn!(error = ?e, "rng: cannot return a buffer");
            }
            completed = true;
        }
        if completed && self.q.queue.needs_notification(mem).unwrap_or(true) {
            let _ = self
                .interrupt
                .trigger(VirtioInterruptKind::Queue(self.q.index));
        }
    }
}
