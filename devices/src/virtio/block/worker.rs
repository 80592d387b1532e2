//! The thread that serves one virtio-blk queue: waits on the queue's notify eventfd,
//! runs every available request, returns them in the used ring, interrupts the guest.

use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::{BlockConfig, BlockCounters};
use super::request::{Request, S_IOERR};
use crate::block::BlockBackend;
use crate::virtio::{ActivatedQueue, GuestMemoryMmap, VirtioInterrupt, VirtioInterruptKind};

const TOKEN_KICK: u64 = 0;
const TOKEN_STOP: u64 = 1;

pub(super) struct BlockWorker {
    q: ActivatedQueue,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    disk: Arc<dyn BlockBackend>,
    config: BlockConfig,
    counters: Arc<BlockCounters>,
    stop: EventFd,
    epoll: Epoll,
}

impl BlockWorker {
    pub fn new(
        q: ActivatedQueue,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        disk: Arc<dyn BlockBackend>,
        config: BlockConfig,
        counters: Arc<BlockCounters>,
        stop: EventFd,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        use std::os::fd::AsRawFd;
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
            disk,
            config,
            counters,
            stop,
            epoll,
        })
    }

    pub fn queue_index(&self) -> u16 {
        self.q.index
    }

    pub fn run(mut self) {
        crate::threads::started(crate::threads::WorkerKind::Block);
        let mut events = vec![EpollEvent::default(); 4];
        // Requests may already be waiting (activation after the driver queued some).
        self.process_queue();
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "block worker epoll failed");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => {
                        let _ = self.stop.read();
                        return;
                    }
                    _ => {
                        let _ = self.q.kick.read();
                        self.process_queue();
                    }
                }
            }
        }
    }

    fn process_queue(&mut self) {
        let mem = self.mem.clone();
        let mem: &GuestMemoryMmap = &mem;
        loop {
            if let Err(e) = self.q.queue.disable_notification(mem) {
                tracing::warn!(error = ?e, "cannot disable queue notifications");
            }
            let mut completed = 0;
            while let Some(chain) = self.q.queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let (status_addr, status, len) = match Request::parse(mem, chain) {
                    Ok(req) => {
                        let (status, written) =
                            req.execute(mem, self.disk.as_ref(), &self.config, &self.counters);
                        (Some(req.status), status, written + 1)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "malformed virtio-blk request");
                        (None, S_IOERR, 0)
                    }
                };
                if let Some(addr) = status_addr {
                    if mem.write_obj(status, addr).is_err() {
                        tracing::warn!("cannot write virtio-blk status byte");
                    }
                }
                if let Err(e) = self.q.queue.add_used(mem, head, len) {
                    tracing::warn!(error = ?e, "cannot return a descriptor to the used ring");
                }
                completed += 1;
            }
            if completed > 0 {
                match self.q.queue.needs_notification(mem) {
                    Ok(true) => {
                        if let Err(e) = self
                            .interrupt
                            .trigger(VirtioInterruptKind::Queue(self.q.index))
                        {
                            tracing::warn!(error = %e, "cannot interrupt the guest");
                        }
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = ?e, "needs_notification failed"),
                }
            }
            match self.q.queue.enable_notification(mem) {
                Ok(true) => continue, // More arrived while notifications were off.
                _ => break,
            }
        }
    }
}
