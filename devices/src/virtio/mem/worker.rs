//! The request queue: each chain is a driver-readable request (24 bytes) and a
//! device-writable response (10 bytes). Plugged blocks need nothing from the host (they
//! fault in when touched); unplugged ones go back with `madvise(MADV_DONTNEED)`.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vireo_util::sync::lock;
use virtio_queue::QueueT;
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::blocks::Response;
use super::device::Shared;
use super::{
    REQ_LEN, REQ_PLUG, REQ_STATE, REQ_UNPLUG, REQ_UNPLUG_ALL, RESP_ACK, RESP_ERROR, RESP_LEN,
};
use crate::virtio::memory::discard;
use crate::virtio::{ActivatedQueue, GuestMemoryMmap, VirtioInterrupt, VirtioInterruptKind};

const TOKEN_STOP: u64 = u64::MAX;
const TOKEN_QUEUE: u64 = 0;

/// One request as the driver sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Request {
    pub kind: u16,
    pub addr: u64,
    pub nb_blocks: u16,
}

impl Request {
    pub fn parse(b: &[u8; REQ_LEN]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[8..16]);
        Self {
            kind: u16::from_le_bytes([b[0], b[1]]),
            addr: u64::from_le_bytes(a),
            nb_blocks: u16::from_le_bytes([b[16], b[17]]),
        }
    }
}

/// Applies one request to the shared bitmap, discarding what it unplugs.
pub(super) fn execute(shared: &Shared, mem: &GuestMemoryMmap, r: Request) -> Response {
    let mut blocks = lock(&shared.blocks);
    let (resp, discard_ranges) = match r.kind {
        REQ_PLUG => {
            shared.plug_requests.fetch_add(1, Ordering::Relaxed);
            (blocks.plug(r.addr, r.nb_blocks), Vec::new())
        }
        REQ_UNPLUG => {
            shared.unplug_requests.fetch_add(1, Ordering::Relaxed);
            let resp = blocks.unplug(r.addr, r.nb_blocks);
            let len = u64::from(r.nb_blocks) * blocks.block_size;
            (resp, vec![(r.addr, len)])
        }
        REQ_UNPLUG_ALL => {
            shared.unplug_requests.fetch_add(1, Ordering::Relaxed);
            let ranges = blocks.runs(true);
            (blocks.unplug_all(), ranges)
        }
        REQ_STATE => (blocks.state(r.addr, r.nb_blocks), Vec::new()),
        other => {
            crate::guest_warn!(kind = other, "virtio-mem: unknown request type");
            (
                Response {
                    kind: RESP_ERROR,
                    state: 0,
                },
                Vec::new(),
            )
        }
    };
    drop(blocks);
    if resp.kind == RESP_ACK {
        for (gpa, len) in discard_ranges {
            if discard(mem, gpa, len) {
                shared.discarded_bytes.fetch_add(len, Ordering::Relaxed);
            } else {
                tracing::warn!(gpa, len, "virtio-mem: cannot discard unplugged memory");
            }
        }
    } else {
        shared.refused_requests.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(?r, response = resp.kind, "virtio-mem request refused");
    }
    resp
}

pub(super) struct MemWorker {
    q: ActivatedQueue,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    shared: Arc<Shared>,
    /// Kept open for the epoll interest (the device's workers share it; never read).
    _stop: EventFd,
    epoll: Epoll,
}

impl MemWorker {
    pub fn new(
        q: ActivatedQueue,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        shared: Arc<Shared>,
        stop: EventFd,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            q.kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_QUEUE),
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
            shared,
            _stop: stop,
            epoll,
        })
    }

    /// Serves until stopped; hands back the queue.
    pub fn run(mut self) -> Vec<ActivatedQueue> {
        crate::threads::started(crate::threads::WorkerKind::Mem);
        let mut events = vec![EpollEvent::default(); 2];
        self.process();
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "virtio-mem worker epoll failed");
                    return vec![self.q];
                }
            };
            if events[..n].iter().any(|ev| ev.data() == TOKEN_STOP) {
                // Not read: the activation's other workers wait on it too (`Workers`).
                return vec![self.q];
            }
            let _ = self.q.kick.read();
            self.process();
        }
    }

    fn process(&mut self) {
        let mem = self.mem.clone();
        let mut any = false;
        while let Some(chain) = self.q.queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let mut req = None;
            let mut resp_at = None;
            for d in chain {
                if d.is_write_only() {
                    if resp_at.is_none() && d.len() as usize >= RESP_LEN {
                        resp_at = Some(d.addr());
                    }
                } else if req.is_none() && d.len() as usize >= REQ_LEN {
                    let mut b = [0u8; REQ_LEN];
                    if mem.read_slice(&mut b, d.addr()).is_ok() {
                        req = Some(Request::parse(&b));
                    }
                }
            }
            let mut written = 0u32;
            match (req, resp_at) {
                (Some(r), Some(at)) => {
                    let resp = execute(&self.shared, &mem, r);
                    let mut out = [0u8; RESP_LEN];
                    out[0..2].copy_from_slice(&resp.kind.to_le_bytes());
                    out[8..10].copy_from_slice(&resp.state.to_le_bytes());
                    if mem.write_slice(&out, at).is_ok() {
                        written = RESP_LEN as u32;
                    }
                }
                _ => crate::guest_warn!("virtio-mem: a request without request or response buffer"),
            }
            if let Err(e) = self.q.queue.add_used(&*mem, head, written) {
                crate::guest_warn!(error = ?e, "virtio-mem: cannot return a buffer");
            }
            any = true;
        }
        if any && self.q.queue.needs_notification(&*mem).unwrap_or(true) {
            if let Err(e) = self
                .interrupt
                .trigger(VirtioInterruptKind::Queue(self.q.index))
            {
                tracing::warn!(error = %e, "virtio-mem: cannot interrupt the guest");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mem::{Blocks, RESP_NACK};
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    const B: u64 = 2 << 20;
    const BASE: u64 = 0x1_0000_0000;

    fn req(kind: u16, addr: u64, nb_blocks: u16) -> Request {
        let mut b = [0u8; REQ_LEN];
        b[0..2].copy_from_slice(&kind.to_le_bytes());
        b[8..16].copy_from_slice(&addr.to_le_bytes());
        b[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
        let r = Request::parse(&b);
        assert_eq!(
            r,
            Request {
                kind,
                addr,
                nb_blocks
            }
        );
        r
    }

    #[test]
    fn unplugged_blocks_go_back_to_the_host() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), 4 * B as usize)]).unwrap();
        let mut blocks = Blocks::new(BASE, 4 * B, B).unwrap();
        blocks.set_requested(2 * B).unwrap();
        let shared = Shared {
            blocks: Mutex::new(blocks),
            plug_requests: AtomicU64::new(0),
            unplug_requests: AtomicU64::new(0),
            refused_requests: AtomicU64::new(0),
            discarded_bytes: AtomicU64::new(0),
        };
        assert_eq!(
            execute(&shared, &mem, req(REQ_PLUG, BASE, 2)).kind,
            RESP_ACK
        );
        assert_eq!(
            execute(&shared, &mem, req(REQ_PLUG, BASE + 2 * B, 1)).kind,
            RESP_NACK
        );
        mem.write_obj(0x5au64, GuestAddress(BASE + B)).unwrap();
        mem.write_obj(0x5bu64, GuestAddress(BASE)).unwrap();
        assert_eq!(
            execute(&shared, &mem, req(REQ_UNPLUG, BASE + B, 1)).kind,
            RESP_ACK
        );
        assert_eq!(mem.read_obj::<u64>(GuestAddress(BASE + B)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(BASE)).unwrap(), 0x5b);
        assert_eq!(
            execute(&shared, &mem, req(REQ_UNPLUG, BASE + B, 1)).kind,
            RESP_ERROR
        );
        assert_eq!(
            execute(&shared, &mem, req(REQ_STATE, BASE, 2)).state,
            super::super::STATE_MIXED
        );
        assert_eq!(
            execute(&shared, &mem, req(REQ_UNPLUG_ALL, 0, 0)).kind,
            RESP_ACK
        );
        assert_eq!(mem.read_obj::<u64>(GuestAddress(BASE)).unwrap(), 0);
        assert_eq!(execute(&shared, &mem, req(9, BASE, 1)).kind, RESP_ERROR);
        assert_eq!(shared.discarded_bytes.load(Ordering::Relaxed), 2 * B);
        assert_eq!(shared.refused_requests.load(Ordering::Relaxed), 3);
    }
}
