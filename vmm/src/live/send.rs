//! The source side of a live migration (runs on its own thread).

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use migration::protocol::{self, Hello, Message, PROTOCOL_VERSION};
use migration::transport::{MigrationUrl, Stream};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use api::{MigrationInfo, MigrationStatus};
use devices::virtio::GuestMemoryMmap;

use super::dirty::{self, Bitmaps, DirtyLog, PAGE_SIZE};
use super::MigrationEvent;
use crate::vcpu::{Throttle, ThrottleTicker};
use crate::vmm::ControlEvent;

/// A Pages frame is sent once it holds this much.
const BATCH_BYTES: usize = 4 << 20;
/// Pages read from guest memory at a time.
const CHUNK_PAGES: usize = 256;
/// After this many rounds without convergence the switch-over happens anyway.
pub const MAX_ROUNDS: u32 = 30;

pub struct SendJob {
    pub url: MigrationUrl,
    /// Shared-nothing: copy the disks over the connection first.
    pub copy_storage: bool,
    pub downtime: Duration,
    pub compress: bool,
    /// Bytes per second on the wire, at most.
    pub bandwidth_limit: Option<u64>,
    pub config: serde_json::Value,
    pub mem: Arc<GuestMemoryMmap>,
    pub vm: Arc<VmFd>,
    pub events: Sender<ControlEvent>,
    pub info: Arc<Mutex<MigrationInfo>>,
    pub seccomp: crate::seccomp::Filters,
    /// Auto-converge: the VM's vCPU throttle and its vCPU threads.
    pub throttle: Arc<Throttle>,
    pub vcpu_threads: Vec<libc::pthread_t>,
}

/// Throttle steps: the first when a round leaves at least as much as the one before,
/// then more each round that still does not converge (QEMU's 20% + 10%).
const THROTTLE_INITIAL: u64 = 20;
const THROTTLE_STEP: u64 = 10;

/// Clears the throttle however the migration ends.
struct ThrottleGuard<'a>(&'a Throttle);
impl Drop for ThrottleGuard<'_> {
    fn drop(&mut self) {
        self.0.set(0);
    }
}

fn lock(info: &Mutex<MigrationInfo>) -> std::sync::MutexGuard<'_, MigrationInfo> {
    info.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the sender thread; its end is reported as [`MigrationEvent::SendFinished`].
pub fn spawn(job: SendJob) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vireo-migrate-send".into())
        .spawn(move || {
            job.seccomp
                .apply_or_exit(crate::seccomp::ThreadKind::Control);
            let result = run(&job);
            if let Err(e) = &result {
                tracing::warn!(error = %e, "migration failed before the commit");
            }
            let _ = job
                .events
                .send(ControlEvent::Migration(MigrationEvent::SendFinished(
                    result,
                )));
        })
        .map(|_| ())
}

/// Counts what went on the wire; compresses and paces it if asked.
struct Wire<'a> {
    stream: &'a mut dyn Stream,
    payload: Vec<u8>,
    pages: u64,
    bytes: u64,
    compress: bool,
    limiter: Option<devices::rate_limiter::RateLimiter>,
    /// Shared-nothing: disk operations (copy and mirrored guest writes) to forward.
    disk_ops: Option<std::sync::mpsc::Receiver<protocol::DiskOp>>,
}

impl Wire<'_> {
    fn pace(&self, len: u64) {
        if let Some(l) = &self.limiter {
            while let Err(wait) = l.admit(len) {
                std::thread::sleep(wait);
            }
        }
    }

    /// Sends every queued disk operation, in order.
    fn drain_disk_ops(&mut self) -> Result<(), String> {
        let Some(rx) = &self.disk_ops else {
            return Ok(());
        };
        let ops: Vec<protocol::DiskOp> = rx.try_iter().collect();
        for op in ops {
            let len = match &op {
                protocol::DiskOp::Write { data, .. } => data.len() as u64 + 24,
                protocol::DiskOp::Zeroes { .. } => 32,
            };
            self.pace(len);
            self.bytes += len;
            protocol::send(self.stream, &Message::Disk(op)).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        self.drain_disk_ops()?;
        if self.payload.is_empty() {
            return Ok(());
        }
        let p = std::mem::take(&mut self.payload);
        let msg = if self.compress {
            Message::PagesZstd(protocol::compress_pages(&p).map_err(|e| e.to_string())?)
        } else {
            Message::Pages(p)
        };
        let len = match &msg {
            Message::Pages(p) | Message::PagesZstd(p) => p.len() as u64 + 12,
            _ => 0,
        };
        self.pace(len);
        self.bytes += len;
        protocol::send(self.stream, &msg).map_err(|e| e.to_string())
    }

    fn push(&mut self, gpa: u64, pages: u32, data: Option<&[u8]>) -> Result<(), String> {
        protocol::push_run(&mut self.payload, gpa, pages, data);
        self.pages += u64::from(pages);
        if self.payload.len() >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: reading u64 words out of bytes; every bit pattern is a valid u64.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Sends the pages set in `bitmaps` as they are now. Zero pages go as zero runs, or not
/// at all with `skip_zero` (round 0: the destination's memory starts zeroed).
fn send_pages(
    wire: &mut Wire<'_>,
    mem: &GuestMemoryMmap,
    bitmaps: &Bitmaps,
    skip_zero: bool,
) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK_PAGES * PAGE_SIZE as usize];
    for (region, bits) in mem.iter().zip(bitmaps) {
        let base = region.start_addr().0;
        let pages = (region.len() / PAGE_SIZE) as usize;
        let mut p = 0usize;
        while p < pages {
            if bits[p / 64] == 0 && p.is_multiple_of(64) {
                p += 64;
                continue;
            }
            if bits[p / 64] & (1 << (p % 64)) == 0 {
                p += 1;
                continue;
            }
            // A run of dirty pages from p, at most CHUNK_PAGES long.
            let mut end = p + 1;
            while end < pages && end - p < CHUNK_PAGES && bits[end / 64] & (1 << (end % 64)) != 0 {
                end += 1;
            }
            let n = end - p;
            let chunk = &mut buf[..n * PAGE_SIZE as usize];
            let gpa = base + p as u64 * PAGE_SIZE;
            mem.read_slice(chunk, GuestAddress(gpa))
                .map_err(|e| format!("reading guest memory at {gpa:#x}: {e}"))?;
            // Split the run where pages switch between zero and data.
            let mut i = 0;
            while i < n {
                let page = |k: usize| &chunk[k * PAGE_SIZE as usize..(k + 1) * PAGE_SIZE as usize];
                let zero = is_zero(page(i));
                let mut j = i + 1;
                while j < n && is_zero(page(j)) == zero {
                    j += 1;
                }
                let at = gpa + i as u64 * PAGE_SIZE;
                let data = &chunk[i * PAGE_SIZE as usize..j * PAGE_SIZE as usize];
                if !zero {
                    wire.push(at, (j - i) as u32, Some(data))?;
                } else if !skip_zero {
                    wire.push(at, (j - i) as u32, None)?;
                }
                i = j;
            }
            p = end;
        }
    }
    wire.flush()
}

/// Shared-nothing: mirrors every disk into the connection and copies it whole; guest
/// writes keep flowing (in order) until the switch-over.
fn copy_disks(job: &SendJob, wire: &mut Wire<'_>) -> Result<(), String> {
    let (ops_tx, ops_rx) = channel();
    let (tx, rx) = channel();
    job.events
        .send(ControlEvent::Migration(MigrationEvent::MirrorDisks(
            ops_tx, tx,
        )))
        .map_err(|_| "the control loop is gone".to_string())?;
    let disks = rx
        .recv()
        .map_err(|_| "the control loop did not mirror the disks".to_string())??;
    wire.disk_ops = Some(ops_rx);
    for (_, begin) in &disks {
        protocol::send(wire.stream, &Message::DiskBegin(begin.clone()))
            .map_err(|e| e.to_string())?;
    }
    let mut buf = Vec::new();
    for (mirror, begin) in &disks {
        for chunk in 0..mirror.chunks() {
            mirror
                .copy_chunk(chunk, &mut buf)
                .map_err(|e| format!("copying disk {} chunk {chunk}: {e}", begin.index))?;
            wire.drain_disk_ops()?;
            if let Some(f) = mirror.failure() {
                return Err(f);
            }
        }
        tracing::debug!(
            disk = begin.index,
            bytes = mirror.copied_bytes(),
            "disk copied"
        );
    }
    Ok(())
}

fn run(job: &SendJob) -> Result<(), String> {
    let started = Instant::now();
    let mut stream = job.url.connect().map_err(|e| e.to_string())?;
    protocol::send(
        &mut stream,
        &Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            vireo: env!("CARGO_PKG_VERSION").into(),
            config: job.config.clone(),
            copy_storage: job.copy_storage,
        }),
    )
    .map_err(|e| e.to_string())?;
    let _ticker = ThrottleTicker::start(job.vcpu_threads.clone(), job.throttle.clone())
        .map_err(|e| format!("cannot start the throttle ticker: {e}"))?;
    let _unthrottle = ThrottleGuard(&job.throttle);
    let log = DirtyLog::new(job.mem.clone(), job.vm.clone());
    log.take()?; // Start from a clean log: round 0 sends everything anyway.
                 // A bucket of 1/10 s of bandwidth, refilled every 100 ms.
    let limiter = job.bandwidth_limit.and_then(|bps| {
        devices::rate_limiter::RateLimiter::new(&devices::rate_limiter::RateLimiterConfig {
            bandwidth: Some(devices::rate_limiter::TokenBucketConfig {
                size: (bps / 10).max(1),
                refill_time_ms: 100,
            }),
            ops: None,
        })
    });
    let mut wire = Wire {
        stream: stream.as_mut(),
        payload: Vec::new(),
        pages: 0,
        bytes: 0,
        compress: job.compress,
        limiter,
        disk_ops: None,
    };
    if job.copy_storage {
        copy_disks(job, &mut wire)?;
    }

    // Pre-copy: round 0 is all of memory; each next round what the guest dirtied
    // meanwhile, until the rest can go within the downtime target.
    let mut round = 0u32;
    let mut pending = dirty::populated_pages(&job.mem);
    let mut skip_zero = true;
    let mut last_remaining = u64::MAX;
    loop {
        let t = Instant::now();
        let bytes_before = wire.bytes;
        send_pages(&mut wire, &job.mem, &pending, skip_zero)?;
        skip_zero = false;
        let elapsed = t.elapsed().as_secs_f64().max(1e-6);
        let bandwidth = ((wire.bytes - bytes_before) as f64 / elapsed).max(1e6);
        pending = log.take()?;
        let remaining = dirty::count(&pending);
        let predicted = Duration::from_secs_f64(remaining as f64 * PAGE_SIZE as f64 / bandwidth);
        round += 1;
        {
            let mut i = lock(&job.info);
            i.rounds = round;
            i.pages_sent = wire.pages;
            i.bytes_sent = wire.bytes;
            i.remaining_pages = remaining;
            i.bandwidth_mib_s = bandwidth / f64::from(1 << 20);
            i.dirty_pages_per_s = remaining as f64 / elapsed;
            i.total_ms = started.elapsed().as_secs_f64() * 1e3;
        }
        tracing::debug!(
            round,
            remaining,
            predicted_ms = predicted.as_secs_f64() * 1e3,
            throttle = job.throttle.percent(),
            "pre-copy round"
        );
        if predicted <= job.downtime || round >= MAX_ROUNDS {
            break;
        }
        // The guest dirties about as fast as we copy: slow it down, a step per round.
        if round >= 2 && remaining >= last_remaining / 2 {
            let p = job.throttle.percent();
            let next = if p == 0 {
                THROTTLE_INITIAL
            } else {
                p + THROTTLE_STEP
            };
            job.throttle.set(next);
            lock(&job.info).throttle_percent = job.throttle.percent();
        }
        last_remaining = remaining;
    }

    // Switch-over: the control loop pauses the VM and releases the disks.
    let paused_at = Instant::now();
    let (tx, rx) = channel();
    job.events
        .send(ControlEvent::Migration(MigrationEvent::SwitchOver(tx)))
        .map_err(|_| "the control loop is gone".to_string())?;
    let state = rx
        .recv()
        .map_err(|_| "the control loop did not answer the switch-over".to_string())??;
    let last = log.take()?;
    dirty::merge(&mut pending, &last);
    // The VM is paused: the disk queue holds its last writes.
    wire.drain_disk_ops()?;
    send_pages(&mut wire, &job.mem, &pending, false)?;
    protocol::send(wire.stream, &Message::State(state)).map_err(|e| e.to_string())?;
    match protocol::recv(wire.stream).map_err(|e| e.to_string())? {
        Message::Ready => {}
        Message::Error(e) => return Err(format!("destination refused the VM: {e}")),
        other => return Err(format!("expected Ready, destination sent {}", other.name())),
    }
    // The commit point: once Go is on its way, the destination owns the VM.
    protocol::send(wire.stream, &Message::Go).map_err(|e| e.to_string())?;
    crate::fault::point("kill-after-commit");
    let mut i = lock(&job.info);
    i.status = MigrationStatus::Completed;
    i.pages_sent = wire.pages;
    i.bytes_sent = wire.bytes;
    i.remaining_pages = 0;
    i.downtime_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    i.total_ms = started.elapsed().as_secs_f64() * 1e3;
    tracing::info!(
        rounds = i.rounds,
        pages = i.pages_sent,
        downtime_ms = i.downtime_ms,
        total_ms = i.total_ms,
        "migration committed"
    );
    Ok(())
}
