//! The source side of a live migration (runs on its own thread).

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use migration::protocol::{self, Hello, Message, PROTOCOL_VERSION};
use migration::tls::ClientTls;
use migration::transport::MigrationUrl;

use api::{MigrationInfo, MigrationStatus};
use devices::virtio::GuestMemoryMmap;

use super::dirty::{self, Bitmaps, DirtyLog};
use super::pages::{self, Wire};
use super::parallel_send::PageStreams;
use super::MigrationEvent;
use crate::control::ControlEvent;
use crate::vcpu::{Throttle, ThrottleTicker};

/// After this many rounds without convergence the switch-over happens anyway.
pub const MAX_ROUNDS: u32 = 30;

pub struct SendJob {
    pub url: MigrationUrl,
    /// Mutual TLS on every connection (loaded when the migration was requested).
    pub tls: Option<ClientTls>,
    /// The one-time secret every connection proves it knows when it joins.
    pub secret: Option<migration::auth::Secret>,
    /// What the Hello tells the destination beside the configuration.
    pub shape: protocol::GuestShape,
    /// Page streams: 1 = the one connection carries everything; N > 1 = N more
    /// connections carry the pages (`parallel_send`).
    pub connections: u32,
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
    /// KVM's dirty log is under manual protection (see `kvm::Hypervisor`).
    pub manual_dirty_log: bool,
}

/// Throttle steps: the first when a round leaves at least as much as the one before,
/// then more each round that still does not converge (QEMU's 20% + 10%).
const THROTTLE_INITIAL: u64 = 20;
const THROTTLE_STEP: u64 = 10;

/// The slowest copy rate a prediction assumes (1 MiB/s of whole pages), so a round that
/// sent nothing does not predict forever.
const MIN_PAGES_PER_S: f64 = 256.0;

/// Clears the throttle however the migration ends.
struct ThrottleGuard<'a>(&'a Throttle);
impl Drop for ThrottleGuard<'_> {
    fn drop(&mut self) {
        self.0.set(0);
    }
}

use vireo_util::sync::lock;

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

/// A random name for this migration: every stream's proof names it, so a stream of one
/// migration cannot join another.
fn session_token() -> Result<u64, String> {
    let mut b = [0u8; 8];
    // SAFETY: getrandom(2) writes at most b.len() bytes into the live buffer `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(format!("getrandom: {}", std::io::Error::last_os_error()));
    }
    Ok(u64::from_le_bytes(b))
}

fn run(job: &SendJob) -> Result<(), String> {
    let started = Instant::now();
    let mut stream = job
        .url
        .connect_with(job.tls.as_ref())
        .map_err(|e| e.to_string())?;
    let session = session_token()?;
    migration::auth::join(
        stream.as_mut(),
        job.secret.as_ref(),
        migration::auth::Claim { session, stream: 0 },
    )
    .map_err(|e| format!("{}: joining: {e}", job.url))?;
    protocol::send(
        &mut stream,
        &Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            vireo: env!("CARGO_PKG_VERSION").into(),
            config: job.config.clone(),
            copy_storage: job.copy_storage,
            connections: job.connections,
            session,
            shape: job.shape.clone(),
        }),
    )
    .map_err(|e| e.to_string())?;
    let _ticker = ThrottleTicker::start(job.vcpu_threads.clone(), job.throttle.clone())
        .map_err(|e| format!("cannot start the throttle ticker: {e}"))?;
    let _unthrottle = ThrottleGuard(&job.throttle);
    let log = DirtyLog::new(job.mem.clone(), job.vm.clone(), job.manual_dirty_log);
    log.take()?; // Start from a clean log: round 0 sends everything anyway.
                 // A bucket of 1/10 s of bandwidth, refilled every 100 ms, shared by every stream.
    let limiter = job.bandwidth_limit.and_then(|bps| {
        devices::rate_limiter::RateLimiter::new(&devices::rate_limiter::RateLimiterConfig {
            bandwidth: Some(devices::rate_limiter::TokenBucketConfig {
                size: (bps / 10).max(1),
                refill_time_ms: 100,
            }),
            ops: None,
        })
        .map(Arc::new)
    });
    let mut wire =
        Wire::new(stream.as_mut(), job.compress, limiter.clone()).report_to(job.info.clone());
    let result = std::thread::scope(|scope| {
        // Dropped (its streams cut, its threads ended) before the scope joins them.
        let mut streams = if job.connections > 1 {
            Some(PageStreams::open(scope, job, session, limiter)?)
        } else {
            None
        };
        migrate(job, &mut wire, streams.as_mut(), &log, started)
    });
    drop(wire);
    result.map_err(|e| match destination_reason(stream.as_mut()) {
        Some(why) => format!("{e} (the destination failed: {why})"),
        None => e,
    })
}

/// A destination that fails sends an `Error` frame before it hangs up; a source
/// busy writing sees only a broken pipe. After a failure, reads what the
/// destination said, if it said anything (waiting at most 200 ms).
fn destination_reason(stream: &mut dyn migration::transport::Stream) -> Option<String> {
    let cutter = stream.cutter().ok()?;
    cutter.set_read_timeout(Duration::from_millis(200)).ok()?;
    for _ in 0..1024 {
        match protocol::recv(stream) {
            Ok(Message::Error(why)) => return Some(why),
            // Frames sent before the failure (acknowledgements) come first.
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// One round of pages: on the control stream, or split over the page streams (while
/// the control stream keeps forwarding disk operations).
fn send_round(
    wire: &mut Wire<'_>,
    streams: Option<&mut PageStreams>,
    mem: &GuestMemoryMmap,
    bitmaps: Bitmaps,
    skip_zero: bool,
    last: bool,
) -> Result<(), String> {
    match streams {
        None => pages::send_pages(wire, mem, &bitmaps, skip_zero),
        Some(s) => {
            wire.drain_disk_ops()?;
            let (p, b) = s.round(mem, bitmaps, skip_zero, last, || wire.drain_disk_ops())?;
            wire.pages += p;
            wire.bytes += b;
            Ok(())
        }
    }
}

fn migrate(
    job: &SendJob,
    wire: &mut Wire<'_>,
    mut streams: Option<&mut PageStreams>,
    log: &DirtyLog,
    started: Instant,
) -> Result<(), String> {
    if job.copy_storage {
        copy_disks(job, wire)?;
    }

    // Pre-copy: round 0 is all of memory; each next round what the guest dirtied
    // meanwhile, until the rest can go within the downtime target.
    let mut round = 0u32;
    let mut pending = dirty::populated_pages(&job.mem);
    let mut skip_zero = true;
    let mut last_remaining = u64::MAX;
    loop {
        // What this round sends counts as remaining until it is on the wire.
        lock(&job.info).remaining_pages = dirty::count(&pending);
        let t = Instant::now();
        let bytes_before = wire.bytes;
        let pages_before = wire.pages;
        send_round(
            wire,
            streams.as_deref_mut(),
            &job.mem,
            pending,
            skip_zero,
            false,
        )?;
        skip_zero = false;
        let elapsed = t.elapsed().as_secs_f64().max(1e-6);
        let bandwidth = ((wire.bytes - bytes_before) as f64 / elapsed).max(1e6);
        // The rest is predicted in pages, not bytes: zero pages and compressed ones are
        // cheap on the wire, and the last round's pages are like this round's. (Bytes
        // made a guest of zeroed pages look like 1 MB/s and never converge.)
        let pages_per_s = ((wire.pages - pages_before) as f64 / elapsed).max(MIN_PAGES_PER_S);
        let taking = Instant::now();
        pending = log.take()?;
        let take_ms = taking.elapsed().as_secs_f64() * 1e3;
        let remaining = dirty::count(&pending);
        let predicted = Duration::from_secs_f64(remaining as f64 / pages_per_s);
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
            send_ms = elapsed * 1e3,
            take_ms,
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
    send_round(wire, streams, &job.mem, pending, false, true)?;
    protocol::send(wire.stream, &Message::State(state)).map_err(|e| e.to_string())?;
    match protocol::recv(wire.stream).map_err(|e| e.to_string())? {
        Message::Ready => {}
        Message::Error(e) => return Err(format!("destination refused the VM: {e}")),
        other => return Err(format!("expected Ready, destination sent {}", other.name())),
    }
    // The commit point: once Go is on its way, the destination owns the VM.
    protocol::send(wire.stream, &Message::Go).map_err(|e| e.to_string())?;
    #[cfg(feature = "test-hooks")]
    crate::test_hooks::fault_point("kill-after-commit");
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
        bytes = i.bytes_sent,
        connections = job.connections,
        tls = job.tls.is_some(),
        downtime_ms = i.downtime_ms,
        total_ms = i.total_ms,
        "migration committed"
    );
    Ok(())
}
