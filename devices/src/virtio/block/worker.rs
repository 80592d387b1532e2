//! The thread that serves one virtio-blk queue: waits on the queue's notify eventfd,
//! runs every available request, returns them in the used ring, interrupts the guest.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use std::os::fd::AsRawFd;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::device::{BlockConfig, BlockCounters};
use super::poll::PollWindow;
use super::request::{Outcome, Request, S_IOERR};
use crate::block::BlockBackend;
use crate::rate_limiter::RateLimiter;
use crate::virtio::{ActivatedQueue, GuestMemoryMmap, VirtioInterrupt, VirtioInterruptKind};

const TOKEN_KICK: u64 = 0;
const TOKEN_STOP: u64 = 1;
const TOKEN_THROTTLE: u64 = 2;

/// How long after going to sleep a worker that held kicks off looks at its ring again.
const RECHECK_MS: i32 = 1;

/// The disk's rate limiter (shared by its queues) and this worker's wake-up timer.
pub(super) struct Throttle {
    pub limiter: Arc<RateLimiter>,
    timer: TimerFd,
    /// A request waits for tokens: kicks are ignored until the timer fires.
    waiting: bool,
}

impl Throttle {
    pub fn new(limiter: Arc<RateLimiter>) -> std::io::Result<Self> {
        Ok(Self {
            limiter,
            timer: TimerFd::new()?,
            waiting: false,
        })
    }
}

pub(super) struct BlockWorker {
    q: ActivatedQueue,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    disk: Arc<dyn BlockBackend>,
    config: BlockConfig,
    counters: Arc<BlockCounters>,
    throttle: Option<Throttle>,
    poll: PollWindow,
    /// A host I/O error stopped this queue (on_error): requests wait for a resume.
    stopped: bool,
    /// Kept open for the epoll interest (the device's workers share it; never read).
    _stop: EventFd,
    epoll: Epoll,
}

impl BlockWorker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        q: ActivatedQueue,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        disk: Arc<dyn BlockBackend>,
        config: BlockConfig,
        counters: Arc<BlockCounters>,
        throttle: Option<Throttle>,
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
        if let Some(t) = &throttle {
            epoll.ctl(
                ControlOperation::Add,
                t.timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_THROTTLE),
            )?;
        }
        Ok(Self {
            q,
            mem,
            interrupt,
            disk,
            poll: PollWindow::new(config.poll_us),
            stopped: false,
            config,
            counters,
            throttle,
            _stop: stop,
            epoll,
        })
    }

    pub fn queue_index(&self) -> u16 {
        self.q.index
    }

    /// Serves until stopped; hands back the queue (with its position) when it stops.
    pub fn run(mut self) -> ActivatedQueue {
        crate::threads::started(crate::threads::WorkerKind::Block);
        let mut events = vec![EpollEvent::default(); 4];
        // After the worker held kicks off (`kicks.rs`) it looks at the ring once more a
        // moment after it went to sleep: a driver that reads `avail_event` without a full
        // barrier after publishing its index (the spec asks for one; virtio-drivers 0.13
        // has none) can read the held-off value and not kick, and its request would
        // otherwise wait for the next kick. Counted as `missed_kicks`.
        let holds_off = self.q.queue.event_idx_enabled();
        // Requests may already be waiting (activation after the driver queued some).
        self.serve();
        let mut recheck = holds_off;
        loop {
            self.poll.sleeping();
            let timeout = if recheck { RECHECK_MS } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "block worker epoll failed");
                    return self.q;
                }
            };
            recheck = false;
            if n == 0 {
                if self.has_unseen_requests() && !self.throttled() {
                    self.counters.missed_kicks.fetch_add(1, Ordering::Relaxed);
                    self.serve();
                    recheck = holds_off;
                }
                continue;
            }
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => {
                        // Not read: the activation's other workers wait on it too (`Workers`).
                        return self.q;
                    }
                    TOKEN_THROTTLE => {
                        if let Some(t) = &mut self.throttle {
                            let _ = t.timer.wait();
                            t.waiting = false;
                        }
                        self.serve();
                        recheck = holds_off;
                    }
                    _ => {
                        self.poll.woke_for_kick();
                        self.counters.wakeups.fetch_add(1, Ordering::Relaxed);
                        if let Ok(n) = self.q.kick.read() {
                            self.counters.notifications.fetch_add(n, Ordering::Relaxed);
                        }
                        if !self.throttled() {
                            self.serve();
                            recheck = holds_off;
                        }
                    }
                }
            }
        }
    }

    /// A request waits for the rate limiter's tokens (kicks are ignored meanwhile).
    fn throttled(&self) -> bool {
        self.throttle.as_ref().is_some_and(|t| t.waiting)
    }

    /// The driver made requests available that the worker has not taken.
    fn has_unseen_requests(&self) -> bool {
        let mem = self.mem.clone();
        self.q
            .queue
            .avail_idx(mem.as_ref(), Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != self.q.queue.next_avail())
    }

    /// Serves requests until the ring stays empty for the poll window, then asks the
    /// guest for kicks again. While the worker serves or polls, the guest's notifications
    /// stay off: with VIRTIO_F_EVENT_IDX avail_event is held a ring ahead of what the
    /// worker took (`kicks.rs`), so a driver submits without a kick, which is an exit to
    /// the host, whether it compares as the spec says (Linux's vring_need_event) or as
    /// virtio-drivers 0.13 does (`avail_idx >= avail_event + 1`, which a stale event left
    /// behind would answer with a kick on every request).
    /// A throttled queue returns at once, with notifications off; the rate limiter's
    /// timer wakes it.
    fn serve(&mut self) {
        if self.stopped {
            // A host error stopped the disk: nothing runs until the VM is paused and
            // resumed (which starts a new worker at the kept request).
            return;
        }
        let mem = self.mem.clone();
        loop {
            if self.process_queue() != Drained::Empty {
                return;
            }
            if self.poll_for_more() {
                continue;
            }
            // A request that slipped in before notifications came back on is served now.
            match self.q.queue.enable_notification(mem.as_ref()) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    crate::guest_warn!(error = ?e, "cannot enable queue notifications");
                    return;
                }
            }
        }
    }

    /// After the queue ran dry, watches the available ring for up to the
    /// current poll window (see `poll.rs`) before the thread goes to sleep;
    /// true when requests arrived.
    fn poll_for_more(&mut self) -> bool {
        let window = self.poll.current();
        if window.is_zero() || self.throttled() {
            return false;
        }
        let mem = self.mem.clone();
        let start = Instant::now();
        loop {
            match self.q.queue.avail_idx(mem.as_ref(), Ordering::Acquire) {
                Ok(idx) if idx.0 != self.q.queue.next_avail() => {
                    self.counters.polled.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Ok(_) => {}
                Err(_) => return false,
            }
            if start.elapsed() >= window {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Runs every available request (notifications off meanwhile) and interrupts the
    /// guest if it asked for it; leaves notifications off.
    fn process_queue(&mut self) -> Drained {
        let mem = self.mem.clone();
        let mem: &GuestMemoryMmap = &mem;
        if let Err(e) = self.q.queue.disable_notification(mem) {
            crate::guest_warn!(error = ?e, "cannot disable queue notifications");
        }
        if let Err(e) = crate::virtio::kicks::hold_off(&self.q.queue, mem) {
            crate::guest_warn!(error = ?e, "cannot hold off queue notifications");
        }
        let mut completed = 0;
        let mut throttled = false;
        let mut service = StageClock::default();
        while let Some(chain) = self.q.queue.pop_descriptor_chain(mem) {
            let taken = Instant::now();
            // Each request taken moves the held-off event a ring past it: in a long pass
            // (a deep queue refilled as requests complete) the driver's new requests
            // would otherwise pass the event written at the pass's start and kick again,
            // one exit per request.
            if let Err(e) = crate::virtio::kicks::hold_off(&self.q.queue, mem) {
                crate::guest_warn!(error = ?e, "cannot hold off queue notifications");
            }
            let head = chain.head_index();
            let parsed = Request::parse(mem, chain);
            if let (Ok(req), Some(t)) = (&parsed, &mut self.throttle) {
                if let Err(wait) = t.limiter.admit(req.rate_limited_bytes()) {
                    // Put the request back and sleep until the buckets allow it.
                    self.q.queue.go_to_previous_position();
                    if let Err(e) = t.timer.reset(wait, None) {
                        crate::guest_warn!(error = %e, "cannot arm the rate-limit timer");
                    }
                    t.waiting = true;
                    throttled = true;
                    self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            let (status_addr, status, len) = match parsed {
                Ok(req) => match service
                    .execute(|| req.execute(mem, self.disk.as_ref(), &self.config, &self.counters))
                {
                    Outcome::Done { status, written } => {
                        (Some(req.status), status, written.saturating_add(1))
                    }
                    Outcome::Stop(stopped) => {
                        // Keep the request: it stays first in the queue, not completed,
                        // and runs again when the VM resumes (a new worker).
                        self.q.queue.go_to_previous_position();
                        self.stopped = true;
                        if let Some(sink) = &self.config.stop_sink {
                            (sink.0)(stopped);
                        }
                        break;
                    }
                },
                Err(e) => {
                    crate::guest_warn!(error = %e, "malformed virtio-blk request");
                    (None, S_IOERR, 0)
                }
            };
            if let Some(addr) = status_addr {
                if mem.write_obj(status, addr).is_err() {
                    crate::guest_warn!("cannot write virtio-blk status byte");
                }
            }
            if let Err(e) = self.q.queue.add_used(mem, head, len) {
                crate::guest_warn!(error = ?e, "cannot return a descriptor to the used ring");
            }
            service.served(taken);
            completed += 1;
        }
        service.add_to(&self.counters);
        if completed > 0 {
            match self.q.queue.needs_notification(mem) {
                Ok(true) => {
                    if let Err(e) = self
                        .interrupt
                        .trigger(VirtioInterruptKind::Queue(self.q.index))
                    {
                        crate::guest_warn!(error = %e, "cannot interrupt the guest");
                    }
                }
                Ok(false) => {}
                Err(e) => crate::guest_warn!(error = ?e, "needs_notification failed"),
            }
        }
        if self.stopped {
            // Notifications stay off: after the VM resumes, a new worker runs the kept
            // request.
            Drained::Stopped
        } else if throttled {
            // Notifications stay off: the timer, not the guest, wakes us.
            Drained::Throttled
        } else {
            Drained::Empty
        }
    }
}

/// The time one pass over the queue spent per stage, added to the counters once
/// per pass (two clock reads per request, no shared writes per request).
#[derive(Default)]
struct StageClock {
    execute: std::time::Duration,
    service: std::time::Duration,
}

impl StageClock {
    fn execute<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.execute += start.elapsed();
        out
    }

    /// A request taken off the ring at `taken` is back in the used ring.
    fn served(&mut self, taken: Instant) {
        self.service += taken.elapsed();
    }

    fn add_to(&self, counters: &BlockCounters) {
        let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if !self.service.is_zero() {
            counters
                .execute_ns
                .fetch_add(ns(self.execute), Ordering::Relaxed);
            counters
                .service_ns
                .fetch_add(ns(self.service), Ordering::Relaxed);
        }
    }
}

/// How [`BlockWorker::process_queue`] stopped.
#[derive(Debug, PartialEq, Eq)]
enum Drained {
    /// The available ring is empty.
    Empty,
    /// A request waits for the rate limiter's tokens.
    Throttled,
    /// A host I/O error stopped the queue (on_error=stop).
    Stopped,
}
