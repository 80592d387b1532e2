//! The balloon's queues: inflate (PFNs the guest gives: their memory goes back to the
//! host), deflate (PFNs it takes back: nothing to do, they fault in again), stats (a
//! buffer the device holds and hands back every interval to get fresh values) and free
//! page reporting (ranges of free guest memory: back to the host, then returned).

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::{BalloonStats, Shared};
use super::{F_REPORTING, F_STATS_VQ, PAGE_SHIFT};
use crate::virtio::memory::discard;
use crate::virtio::{ActivatedQueue, GuestMemoryMmap, VirtioInterrupt, VirtioInterruptKind};

const TOKEN_STOP: u64 = u64::MAX;
/// Most PFNs read from one inflate/deflate buffer (Linux sends at most 256).
const MAX_PFNS: usize = 4096;
/// Most statistics entries read from one buffer.
const MAX_STATS: usize = 64;
/// One statistics entry: le16 tag, le64 value (packed).
const STAT_LEN: usize = 10;

/// The activated queues by role (queues of features not negotiated are absent, and
/// the others move down: Linux numbers the queues it uses consecutively).
pub(super) struct Queues {
    inflate: ActivatedQueue,
    deflate: ActivatedQueue,
    stats: Option<ActivatedQueue>,
    reporting: Option<ActivatedQueue>,
}

impl Queues {
    pub fn by_role(queues: Vec<ActivatedQueue>, acked: u64) -> Result<Self, String> {
        let mut it = queues.into_iter();
        let mut next = |what: &str| it.next().ok_or(format!("the {what} queue was not enabled"));
        let inflate = next("inflate")?;
        let deflate = next("deflate")?;
        let stats = if acked & F_STATS_VQ != 0 {
            Some(next("stats")?)
        } else {
            None
        };
        let reporting = if acked & F_REPORTING != 0 {
            Some(next("reporting")?)
        } else {
            None
        };
        Ok(Self {
            inflate,
            deflate,
            stats,
            reporting,
        })
    }

    fn all(&self) -> impl Iterator<Item = &ActivatedQueue> {
        [
            Some(&self.inflate),
            Some(&self.deflate),
            self.stats.as_ref(),
            self.reporting.as_ref(),
        ]
        .into_iter()
        .flatten()
    }

    fn into_vec(self) -> Vec<ActivatedQueue> {
        [
            Some(self.inflate),
            Some(self.deflate),
            self.stats,
            self.reporting,
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

pub(super) struct BalloonWorker {
    q: Queues,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    shared: Arc<Shared>,
    stats_interval: Option<Duration>,
    /// The statistics buffer the device holds (its head index) until the next request.
    stats_held: Option<u16>,
    /// Kept open for the epoll interest (the device's workers share it; never read).
    _stop: EventFd,
    epoll: Epoll,
}

impl BalloonWorker {
    pub fn new(
        q: Queues,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        shared: Arc<Shared>,
        stats_interval_s: u32,
        stop: EventFd,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        for aq in q.all() {
            epoll.ctl(
                ControlOperation::Add,
                aq.kick.as_raw_fd(),
                EpollEvent::new(EventSet::IN, u64::from(aq.index)),
            )?;
        }
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
            stats_interval: (stats_interval_s > 0)
                .then(|| Duration::from_secs(u64::from(stats_interval_s))),
            stats_held: None,
            _stop: stop,
            epoll,
        })
    }

    /// Serves until stopped; hands back the queues when it stops. A held statistics
    /// buffer is given back first, so a restored or resumed guest can send it again.
    pub fn run(mut self) -> Vec<ActivatedQueue> {
        crate::threads::started(crate::threads::WorkerKind::Balloon);
        let mut events = vec![EpollEvent::default(); 5];
        let mut next_stats = Instant::now();
        self.process_all();
        loop {
            let timeout = match self.stats_interval {
                Some(_) if self.stats_held.is_some() => {
                    let left = next_stats.saturating_duration_since(Instant::now());
                    i32::try_from(left.as_millis()).unwrap_or(i32::MAX)
                }
                _ => -1,
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "balloon worker epoll failed");
                    return self.finish();
                }
            };
            for ev in &events[..n] {
                if ev.data() == TOKEN_STOP {
                    // Not read: the activation's other workers wait on it too (`Workers`).
                    return self.finish();
                }
            }
            for aq in self.q.all() {
                let _ = aq.kick.read();
            }
            self.process_all();
            if let Some(interval) = self.stats_interval {
                if self.stats_held.is_some() && Instant::now() >= next_stats {
                    self.request_stats();
                    next_stats = Instant::now() + interval;
                }
            }
        }
    }

    fn finish(mut self) -> Vec<ActivatedQueue> {
        self.request_stats();
        self.q.into_vec()
    }

    fn process_all(&mut self) {
        let mem = self.mem.clone();
        let inflated = Self::pfn_queue(&mut self.q.inflate, &mem, &self.shared, true);
        let deflated = Self::pfn_queue(&mut self.q.deflate, &mem, &self.shared, false);
        let reported = match &mut self.q.reporting {
            Some(q) => Self::reporting_queue(q, &mem, &self.shared),
            None => false,
        };
        let stats = self.take_stats(&mem);
        for (done, q) in [
            (inflated, Some(&self.q.inflate)),
            (deflated, Some(&self.q.deflate)),
            (reported, self.q.reporting.as_ref()),
            (stats, self.q.stats.as_ref()),
        ] {
            if let (true, Some(q)) = (done, q) {
                self.notify(q.index);
            }
        }
    }

    fn notify(&self, index: u16) {
        if let Err(e) = self.interrupt.trigger(VirtioInterruptKind::Queue(index)) {
            tracing::warn!(error = %e, "balloon: cannot interrupt the guest");
        }
    }

    /// Inflate (`give`: the pages go back to the host) or deflate (counted only).
    fn pfn_queue(
        aq: &mut ActivatedQueue,
        mem: &GuestMemoryMmap,
        shared: &Shared,
        give: bool,
    ) -> bool {
        let mut any = false;
        while let Some(chain) = aq.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let pfns = read_pfns(chain, mem);
            let mut refused = 0u64;
            if give {
                // Runs of consecutive PFNs go back in one madvise each.
                let mut i = 0;
                while i < pfns.len() {
                    let mut j = i + 1;
                    while j < pfns.len() && pfns[j] == pfns[j - 1].wrapping_add(1) {
                        j += 1;
                    }
                    let gpa = u64::from(pfns[i]) << PAGE_SHIFT;
                    let len = ((j - i) as u64) << PAGE_SHIFT;
                    if !discard(mem, gpa, len) {
                        refused += (j - i) as u64;
                    }
                    i = j;
                }
                shared
                    .inflated_pages
                    .fetch_add(pfns.len() as u64 - refused, Ordering::Relaxed);
            } else {
                shared
                    .deflated_pages
                    .fetch_add(pfns.len() as u64, Ordering::Relaxed);
            }
            if refused > 0 {
                shared.refused_pages.fetch_add(refused, Ordering::Relaxed);
                crate::guest_warn!(
                    refused,
                    "balloon: inflate named pages that are not guest RAM"
                );
            }
            if let Err(e) = aq.queue.add_used(mem, head, 0) {
                crate::guest_warn!(error = ?e, "balloon: cannot return a buffer");
            }
            any = true;
        }
        any && aq.queue.needs_notification(mem).unwrap_or(true)
    }

    /// Free page reporting: each device-writable descriptor is a free range.
    fn reporting_queue(aq: &mut ActivatedQueue, mem: &GuestMemoryMmap, shared: &Shared) -> bool {
        let mut any = false;
        while let Some(chain) = aq.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            for d in chain {
                let len = u64::from(d.len());
                if discard(mem, d.addr().0, len) {
                    shared.reported_bytes.fetch_add(len, Ordering::Relaxed);
                } else {
                    shared
                        .refused_pages
                        .fetch_add(len >> PAGE_SHIFT, Ordering::Relaxed);
                    crate::guest_warn!(
                        addr = d.addr().0,
                        len,
                        "balloon: reported range is not guest RAM"
                    );
                }
            }
            if let Err(e) = aq.queue.add_used(mem, head, 0) {
                crate::guest_warn!(error = ?e, "balloon: cannot return a buffer");
            }
            any = true;
        }
        any && aq.queue.needs_notification(mem).unwrap_or(true)
    }

    /// Reads a statistics buffer the guest sent and keeps it until the next request.
    fn take_stats(&mut self, mem: &GuestMemoryMmap) -> bool {
        let Some(aq) = &mut self.q.stats else {
            return false;
        };
        let mut returned = false;
        while let Some(chain) = aq.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut values = Vec::new();
            for d in chain {
                if d.is_write_only() {
                    continue;
                }
                let n = (d.len() as usize / STAT_LEN).min(MAX_STATS - values.len());
                let mut buf = vec![0u8; n * STAT_LEN];
                if mem.read_slice(&mut buf, d.addr()).is_err() {
                    break;
                }
                for e in buf.chunks_exact(STAT_LEN) {
                    let tag = u16::from_le_bytes([e[0], e[1]]);
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&e[2..10]);
                    values.push((tag, u64::from_le_bytes(v)));
                }
            }
            *vireo_util::sync::lock(&self.shared.stats) = BalloonStats { values };
            // A second buffer while one is held: give the older one back.
            if let Some(old) = self.stats_held.replace(head) {
                if aq.queue.add_used(mem, old, 0).is_ok() {
                    returned = true;
                }
            }
        }
        returned && aq.queue.needs_notification(mem).unwrap_or(true)
    }

    /// Hands the held statistics buffer back: the guest refills and sends it again.
    fn request_stats(&mut self) {
        let mem = self.mem.clone();
        let (Some(aq), Some(head)) = (&mut self.q.stats, self.stats_held.take()) else {
            return;
        };
        match aq.queue.add_used(&*mem, head, 0) {
            Ok(()) => {
                if aq.queue.needs_notification(&*mem).unwrap_or(true) {
                    let index = aq.index;
                    self.notify(index);
                }
            }
            Err(e) => crate::guest_warn!(error = ?e, "balloon: cannot return the stats buffer"),
        }
    }
}

/// The PFNs (le32) of a driver-readable chain, at most [`MAX_PFNS`].
fn read_pfns<M: std::ops::Deref<Target = GuestMemoryMmap>>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
) -> Vec<u32> {
    let mut pfns = Vec::new();
    for d in chain {
        if d.is_write_only() {
            continue;
        }
        let n = (d.len() as usize / 4).min(MAX_PFNS - pfns.len());
        let mut buf = vec![0u8; n * 4];
        if mem.read_slice(&mut buf, d.addr()).is_err() {
            break;
        }
        pfns.extend(
            buf.chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        if pfns.len() >= MAX_PFNS {
            break;
        }
    }
    pfns
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;

    fn q(index: u16) -> ActivatedQueue {
        ActivatedQueue {
            index,
            queue: Queue::new(16).unwrap(),
            kick: EventFd::new(0).unwrap(),
        }
    }

    #[test]
    fn queues_take_their_roles_from_the_negotiated_features() {
        // Stats not negotiated: the reporting queue is the third one.
        let r = Queues::by_role(vec![q(0), q(1), q(2)], F_REPORTING).unwrap();
        assert!(r.stats.is_none());
        assert_eq!(r.reporting.as_ref().map(|q| q.index), Some(2));
        let r = Queues::by_role(vec![q(0), q(1), q(2), q(3)], F_STATS_VQ | F_REPORTING).unwrap();
        assert_eq!(r.stats.as_ref().map(|q| q.index), Some(2));
        assert_eq!(r.reporting.as_ref().map(|q| q.index), Some(3));
        assert_eq!(r.into_vec().len(), 4);
        let e = Queues::by_role(vec![q(0), q(1)], F_STATS_VQ).err().unwrap();
        assert!(e.contains("stats queue was not enabled"), "{e}");
    }

    #[test]
    fn only_guest_ram_is_discarded() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_obj(0xabcdu64, GuestAddress(8192)).unwrap();
        assert!(discard(&mem, 8192, 4096));
        assert_eq!(mem.read_obj::<u64>(GuestAddress(8192)).unwrap(), 0);
        assert!(!discard(&mem, 1 << 20, 4096), "beyond RAM");
        assert!(!discard(&mem, (1 << 20) - 4096, 8192), "runs past the end");
    }
}
