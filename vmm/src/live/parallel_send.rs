//! The source's parallel page streams (`connections` > 1).
//!
//! Each stream has its own thread (reading guest memory, compressing, encrypting and
//! writing in parallel). A round's dirty bitmap is cut into spans of address space that
//! the threads take in turn, so a busy stream simply takes fewer; every page of a round
//! is in exactly one span. Each stream ends the round with `RoundEnd`, and
//! [`PageStreams::round`] returns only when all have: the next round (and the next look
//! at the dirty log) starts after every page of this one was read and sent. The
//! destination's barrier does the rest (see `parallel_receive`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::Scope;
use std::time::Duration;

use migration::protocol::Message;
use migration::transport::Cutter;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use devices::rate_limiter::RateLimiter;
use devices::virtio::GuestMemoryMmap;

use super::dirty::{Bitmaps, PAGE_SIZE};
use super::pages::{self, Wire};
use super::send::SendJob;

/// Pages per span: 1 MiB of address space (a multiple of 64: spans start on a word).
const SPAN_PAGES: usize = 256;

/// One round, shared by the stream threads.
struct RoundWork {
    bitmaps: Bitmaps,
    /// Guest address of each region.
    bases: Vec<u64>,
    /// (region, first page, end page) of every span with a dirty page.
    spans: Vec<(usize, usize, usize)>,
    next: AtomicUsize,
    round: u32,
    skip_zero: bool,
    last: bool,
}

impl RoundWork {
    fn take(&self) -> Option<(usize, usize, usize)> {
        self.spans
            .get(self.next.fetch_add(1, Ordering::Relaxed))
            .copied()
    }
}

/// What a stream thread reports after each round: (pages, bytes) or why it failed.
type Done = (usize, Result<(u64, u64), String>);

pub struct PageStreams {
    cmds: Vec<Sender<Arc<RoundWork>>>,
    done: Receiver<Done>,
    cutters: Vec<Cutter>,
    round: u32,
}

impl PageStreams {
    /// Opens `job.connections` page streams (each joins with `session`) and starts a
    /// thread for each in `scope`.
    pub fn open<'scope, 'env>(
        scope: &'scope Scope<'scope, 'env>,
        job: &'env SendJob,
        session: u64,
        limiter: Option<Arc<RateLimiter>>,
    ) -> Result<Self, String> {
        let (done_tx, done) = channel();
        let mut streams = Self {
            cmds: Vec::new(),
            done,
            cutters: Vec::new(),
            round: 0,
        };
        for lane in 0..job.connections {
            let mut s = job
                .url
                .connect_with(job.tls.as_ref())
                .map_err(|e| format!("page stream {lane}: {e}"))?;
            migration::auth::join(
                s.as_mut(),
                job.secret.as_ref(),
                migration::auth::Claim {
                    session,
                    stream: lane + 1,
                },
            )
            .map_err(|e| format!("page stream {lane}: joining: {e}"))?;
            streams
                .cutters
                .push(s.cutter().map_err(|e| format!("page stream {lane}: {e}"))?);
            let (tx, rx) = channel();
            streams.cmds.push(tx);
            let done = done_tx.clone();
            let mem: &'env GuestMemoryMmap = &job.mem;
            let compress = job.compress;
            let limiter = limiter.clone();
            let info = job.info.clone();
            let seccomp = job.seccomp.clone();
            std::thread::Builder::new()
                .name(format!("vireo-mig-out{lane}"))
                .spawn_scoped(scope, move || {
                    seccomp.apply_or_exit(crate::seccomp::ThreadKind::PageStream);
                    let wire = Wire::new(s.as_mut(), compress, limiter).report_to(info);
                    stream_thread(lane as usize, wire, rx, done, mem)
                })
                .map_err(|e| format!("cannot start page stream thread {lane}: {e}"))?;
        }
        tracing::debug!(streams = job.connections, "page streams open");
        Ok(streams)
    }

    /// Sends the pages set in `bitmaps` over all streams and waits until every stream
    /// has sent them and its `RoundEnd`; `idle` runs meanwhile (the control stream's
    /// disk operations). Returns (pages, bytes) sent.
    pub fn round(
        &mut self,
        mem: &GuestMemoryMmap,
        bitmaps: Bitmaps,
        skip_zero: bool,
        last: bool,
        mut idle: impl FnMut() -> Result<(), String>,
    ) -> Result<(u64, u64), String> {
        let mut spans = Vec::new();
        let mut bases = Vec::new();
        for (r, (region, bits)) in mem.iter().zip(&bitmaps).enumerate() {
            bases.push(region.start_addr().0);
            let pages = (region.len() / PAGE_SIZE) as usize;
            for from in (0..pages).step_by(SPAN_PAGES) {
                let to = (from + SPAN_PAGES).min(pages);
                if bits[from / 64..to.div_ceil(64)].iter().any(|&w| w != 0) {
                    spans.push((r, from, to));
                }
            }
        }
        let work = Arc::new(RoundWork {
            bitmaps,
            bases,
            spans,
            next: AtomicUsize::new(0),
            round: self.round,
            skip_zero,
            last,
        });
        self.round += 1;
        for tx in &self.cmds {
            tx.send(work.clone())
                .map_err(|_| "a page stream ended".to_string())?;
        }
        let (mut pages, mut bytes) = (0, 0);
        let mut waiting = self.cmds.len();
        while waiting > 0 {
            match self.done.recv_timeout(Duration::from_millis(10)) {
                Ok((_, Ok((p, b)))) => {
                    waiting -= 1;
                    pages += p;
                    bytes += b;
                }
                Ok((lane, Err(e))) => return Err(format!("page stream {lane}: {e}")),
                Err(RecvTimeoutError::Timeout) => idle()?,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("the page stream threads are gone".into())
                }
            }
        }
        Ok((pages, bytes))
    }
}

impl Drop for PageStreams {
    /// Ends the stream threads: idle ones see their command channel close, and a thread
    /// blocked on a write (the migration failed) sees its socket shut down.
    fn drop(&mut self) {
        self.cmds.clear();
        for c in &self.cutters {
            c.cut();
        }
    }
}

fn stream_thread(
    lane: usize,
    mut wire: Wire<'_>,
    cmds: Receiver<Arc<RoundWork>>,
    done: Sender<Done>,
    mem: &GuestMemoryMmap,
) {
    let mut buf = pages::chunk_buffer();
    for work in cmds {
        let (p0, b0) = (wire.pages, wire.bytes);
        let r = send_round(&mut wire, mem, &work, &mut buf);
        let failed = r.is_err();
        let _ = done.send((lane, r.map(|()| (wire.pages - p0, wire.bytes - b0))));
        if failed {
            return;
        }
    }
}

fn send_round(
    wire: &mut Wire<'_>,
    mem: &GuestMemoryMmap,
    work: &RoundWork,
    buf: &mut [u8],
) -> Result<(), String> {
    while let Some((r, from, to)) = work.take() {
        pages::send_span(
            wire,
            mem,
            work.bases[r],
            &work.bitmaps[r],
            from,
            to,
            work.skip_zero,
            buf,
        )?;
    }
    wire.flush()?;
    wire.send(
        &Message::RoundEnd {
            round: work.round,
            last: work.last,
        },
        17,
    )
}
