//! The destination side of a live migration (runs on its own thread).
//!
//! The VM is built from the configuration the caller of `vm.receive-migration` gave
//! (this host's disks, kernel, console and serial files, taps): the source's
//! configuration is only compared with it (`compare`), never opened. Streams get in
//! through the [`Gate`] (TLS allow-list, proof of the secret). A shared-nothing
//! migration's disks are created where this host says and written within the sizes its
//! configuration declares.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migration::protocol::{self, Message};
use migration::transport::{Listener, Stream};
use vm_memory::{Bytes, GuestAddress};

use api::{MigrationInfo, MigrationStatus, VmConfig};

use super::compare::{self, Side};
use super::gate::Gate;
use super::parallel_receive::{self, RoundBarrier};
use super::MigrationEvent;
use crate::control::ControlEvent;
use crate::vm::{IncomingVm, SavedVm};

pub struct ReceiveJob {
    /// Already bound: the API call returns only once a source can connect.
    pub listener: Listener,
    /// The VM to run here (the caller's; the source's is only compared with it).
    pub config: VmConfig,
    /// Each of the disks' size as this host knows it (None: not known here).
    pub disk_sizes: Vec<Option<u64>>,
    /// The migration's one-time secret (None: unix socket without one).
    pub secret: Option<migration::auth::Secret>,
    /// How long the gate waits for the source's streams.
    pub timeout: std::time::Duration,
    /// Where a shared-nothing migration's disks are written.
    pub storage_dir: Option<std::path::PathBuf>,
    pub events: Sender<ControlEvent>,
    pub info: Arc<Mutex<MigrationInfo>>,
    pub seccomp: crate::seccomp::Filters,
    /// A clustered VM's write lease while it arrives (`vm.lease` renews it): the VM
    /// is built with its deadline as it is then, and refused if it expired.
    pub write_lease: Option<Arc<devices::block::WriteLease>>,
}

use vireo_util::sync::lock;

/// Starts accepting (on this, the control thread: the accepting thread removes a
/// unix socket's file when it stops) and the receiver thread, which runs under the
/// `Receive` filter: it parses the stream and writes pages and disk blocks, and asks
/// this thread for everything else ([`on_control`]).
pub fn spawn(job: ReceiveJob) -> std::io::Result<()> {
    let ReceiveJob {
        listener,
        config,
        disk_sizes,
        secret,
        timeout,
        storage_dir,
        events,
        info,
        seccomp,
        write_lease,
    } = job;
    let gate = Gate::open(listener, secret, timeout, info.clone(), seccomp.clone())?;
    std::thread::Builder::new()
        .name("vireo-migrate-recv".into())
        .spawn(move || {
            seccomp.apply_or_exit(crate::seccomp::ThreadKind::Receive);
            #[cfg(feature = "test-hooks")]
            crate::test_hooks::probe_syscall("receive");
            let job = Job {
                config,
                disk_sizes,
                storage_dir,
                events,
                info,
                seccomp,
                write_lease,
            };
            if let Err(e) = run(gate, &job) {
                tracing::warn!(error = %e, "incoming migration failed");
                {
                    let mut i = lock(&job.info);
                    i.status = MigrationStatus::Failed;
                    i.error = Some(e.clone());
                }
                let _ = job
                    .events
                    .send(ControlEvent::Migration(MigrationEvent::IncomingFailed(e)));
            }
        })
        .map(|_| ())
}

/// Copies a Pages payload into guest memory; pages outside it are the peer's error.
pub fn apply_pages(mem: &devices::virtio::GuestMemoryMmap, payload: &[u8]) -> Result<u64, String> {
    let zeros = vec![0u8; 64 * protocol::PAGE_SIZE as usize];
    let mut pages = 0;
    for run in protocol::runs(payload).map_err(|e| e.to_string())? {
        let len = u64::from(run.pages) * protocol::PAGE_SIZE;
        let outside = || {
            format!(
                "source sent pages {:#x}+{len:#x} outside guest memory",
                run.gpa
            )
        };
        match run.data {
            Some(d) => mem
                .write_slice(d, GuestAddress(run.gpa))
                .map_err(|_| outside())?,
            None => {
                let mut at = run.gpa;
                let end = run.gpa.checked_add(len).ok_or_else(outside)?;
                while at < end {
                    let n = ((end - at) as usize).min(zeros.len());
                    mem.write_slice(&zeros[..n], GuestAddress(at))
                        .map_err(|_| outside())?;
                    at += n as u64;
                }
            }
        }
        pages += u64::from(run.pages);
    }
    Ok(pages)
}

/// What the receiver needs once connected.
struct Job {
    config: VmConfig,
    disk_sizes: Vec<Option<u64>>,
    storage_dir: Option<std::path::PathBuf>,
    events: Sender<ControlEvent>,
    info: Arc<Mutex<MigrationInfo>>,
    seccomp: crate::seccomp::Filters,
    write_lease: Option<Arc<devices::block::WriteLease>>,
}

/// Runs `work` on the control thread and returns its result: what the receive
/// thread's filter does not allow (opening /dev/kvm, disks and taps, KVM ioctls,
/// removing files) is done there, on this thread's request. Nothing the source sent
/// decides what is opened: paths come from this host's configuration and storage_dir.
/// How long an arrived clustered VM waits for a renewal of a write lease that lapsed
/// while it arrived (vireod renews it only while the host holds its cluster lease; a
/// loaded host can be late) before the migration is refused.
const LEASE_GRACE: Duration = Duration::from_secs(2);

/// Whether `lease` is in force, or renewed within `grace` (it is still unused: the
/// arrived VM has not run here, so a renewal after its deadline is taken).
fn renewed_within(lease: &devices::block::WriteLease, grace: Duration) -> bool {
    let start = Instant::now();
    loop {
        if !lease.expired() {
            return true;
        }
        if start.elapsed() >= grace {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn on_control<T: Send + 'static>(
    events: &Sender<ControlEvent>,
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = channel();
    let job = Box::new(move || {
        let _ = tx.send(work());
    });
    events
        .send(ControlEvent::Migration(MigrationEvent::OnControl(job)))
        .map_err(|_| "the control loop is gone".to_string())?;
    rx.recv()
        .map_err(|_| "the control loop dropped the request".to_string())?
}

fn run(mut gate: Gate, job: &Job) -> Result<(), String> {
    let (session, mut stream) = gate.control()?;
    let started = Instant::now();
    let mut disks = IncomingDisks::default();
    let result = receive(job, gate, session, stream.as_mut(), started, &mut disks);
    if result.is_err() {
        disks.discard(&job.events);
    }
    if let Err(e) = &result {
        // Best effort: tell the source why, so it resumes with a reason.
        let _ = protocol::send(stream.as_mut(), &Message::Error(e.clone()));
    }
    result
}

/// The disks a shared-nothing migration writes here (deleted if it fails).
#[derive(Default)]
struct IncomingDisks {
    open: Vec<Option<std::sync::Arc<dyn devices::block::BlockBackend>>>,
    /// Each open disk's size (this host's configuration's): no write goes beyond it.
    sizes: Vec<u64>,
    created: Vec<std::path::PathBuf>,
}

impl IncomingDisks {
    fn discard(&mut self, events: &Sender<ControlEvent>) {
        self.open.clear();
        let created = std::mem::take(&mut self.created);
        if created.is_empty() {
            return;
        }
        let removed = on_control(events, move || {
            for p in &created {
                let _ = crate::confinement::remove_file(p);
            }
            Ok(())
        });
        if let Err(e) = removed {
            tracing::warn!(error = %e, "cannot remove the incomplete disk copies");
        }
    }

    /// Creates and opens the image for `b` in `dir`, named and sized as this host's
    /// configuration says; the VM's disk now points there.
    fn begin(
        &mut self,
        events: &Sender<ControlEvent>,
        dir: &std::path::Path,
        b: &protocol::DiskBegin,
        config: &mut VmConfig,
    ) -> Result<(), String> {
        let i = b.index as usize;
        let count = config.disks.len();
        let disk = config.disks.get_mut(i).ok_or_else(|| {
            format!("the source announced disk {i}; this VM's configuration has {count} disks")
        })?;
        if self.open.get(i).is_some_and(Option::is_some) {
            return Err(format!("the source announced disk {i} twice"));
        }
        let size = disk.size.ok_or_else(|| {
            format!(
                "disks[{i}]: a shared-nothing migration needs the disk's size in the \
                 destination's configuration"
            )
        })?;
        if b.size != size {
            return Err(format!(
                "disks[{i}].size: source {}, destination {size}",
                b.size
            ));
        }
        let name = disk
            .path
            .file_name()
            .ok_or_else(|| format!("disks[{i}]: {} names no file", disk.path.display()))?;
        let path = dir.join(name);
        if path.exists() {
            return Err(format!("{} exists; not overwriting it", path.display()));
        }
        let format: api::config::DiskFormat = b.format.parse()?;
        let writable = api::config::DiskConfig {
            readonly: false,
            path: path.clone(),
            format: Some(format),
            ..disk.clone()
        };
        let (size_b, logical, physical) = (b.size, b.logical_sector, b.physical_sector);
        let created = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let created_there = created.clone();
        let opened = on_control(events, move || {
            crate::confinement::create_image(&writable.path, format, size_b, logical, physical)?;
            created_there.store(true, std::sync::atomic::Ordering::SeqCst);
            crate::device_manager::open_disk(&writable).map_err(|e| e.to_string())
        });
        if created.load(std::sync::atomic::Ordering::SeqCst) {
            self.created.push(path.clone());
        }
        let backend = opened?;
        disk.path = path;
        disk.format = Some(format);
        if self.open.len() <= i {
            self.open.resize(i + 1, None);
            self.sizes.resize(i + 1, 0);
        }
        self.open[i] = Some(backend);
        self.sizes[i] = size;
        Ok(())
    }

    /// The disk `index`'s size, if `len` bytes at `offset` fit within it.
    fn within(&self, index: u32, offset: u64, len: u64) -> Result<(), String> {
        let size = self.sizes.get(index as usize).copied().unwrap_or(0);
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(format!(
                "the source wrote {len} bytes at {offset} of disk {index}, beyond its {size} bytes"
            )),
        }
    }

    fn apply(&self, op: protocol::DiskOp) -> Result<(), String> {
        let (index, r) = match op {
            protocol::DiskOp::Write {
                index,
                offset,
                data,
            } => {
                let b = self.get(index)?;
                self.within(index, offset, data.len() as u64)?;
                (
                    index,
                    b.write_vectored_at(&devices::block::IoBufs::from_slice(&data), offset),
                )
            }
            protocol::DiskOp::Zeroes { index, offset, len } => {
                let b = self.get(index)?;
                self.within(index, offset, len)?;
                (index, b.write_zeroes(offset, len))
            }
        };
        r.map_err(|e| format!("writing disk {index}: {e}"))
    }

    fn get(&self, index: u32) -> Result<&dyn devices::block::BlockBackend, String> {
        self.open
            .get(index as usize)
            .and_then(|b| b.as_deref())
            .ok_or_else(|| format!("disk {index} was not announced"))
    }

    /// Flushes and closes every image (the VM's devices open them again).
    fn finish(&mut self, expected: usize) -> Result<(), String> {
        if self.open.len() != expected || self.open.iter().any(|b| b.is_none()) {
            return Err(format!(
                "the source sent {} of {expected} disks",
                self.open.iter().flatten().count()
            ));
        }
        for (i, b) in self.open.iter().flatten().enumerate() {
            b.flush().map_err(|e| format!("flushing disk {i}: {e}"))?;
        }
        self.open.clear();
        Ok(())
    }
}

fn receive(
    job: &Job,
    mut gate: Gate,
    session: u64,
    stream: &mut dyn Stream,
    started: Instant,
    disks: &mut IncomingDisks,
) -> Result<(), String> {
    let hello = match protocol::recv(stream).map_err(|e| e.to_string())? {
        Message::Hello(h) => h,
        other => return Err(format!("expected Hello, source sent {}", other.name())),
    };
    if !(1..=protocol::MAX_CONNECTIONS).contains(&hello.connections) {
        return Err(format!(
            "the source asks for {} page streams (1..={})",
            hello.connections,
            protocol::MAX_CONNECTIONS
        ));
    }
    if hello.session != session {
        return Err(format!(
            "the source's Hello names session {:#x}, its stream joined as {session:#x}",
            hello.session
        ));
    }
    if hello.copy_storage && job.storage_dir.is_none() {
        return Err("a shared-nothing migration needs storage_dir on vm.receive-migration".into());
    }
    let copy_storage = hello.copy_storage;
    // Only compared: nothing the source's configuration names is ever opened.
    let source_config: VmConfig = serde_json::from_value(hello.config)
        .map_err(|e| format!("the source's VM configuration: {e}"))?;
    let config = job.config.clone();
    let (mut incoming, cpuid) = on_control(&job.events, move || {
        let incoming = IncomingVm::new(config).map_err(|e| crate::vmm::error_chain(&e))?;
        let cpuid = incoming
            .cpu_features()
            .map_err(|e| crate::vmm::error_chain(&e))?;
        Ok((incoming, cpuid))
    })?;
    let disk_sizes = job
        .disk_sizes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.ok_or_else(|| {
                format!(
                    "disks[{i}]: its size is not known here (declare size in the \
                     configuration, or have the image at its path)"
                )
            })
        })
        .collect::<Result<Vec<u64>, String>>()?;
    let here = protocol::GuestShape { disk_sizes, cpuid };
    compare::same_guest(
        &Side {
            config: &source_config,
            shape: &hello.shape,
        },
        &Side {
            config: &job.config,
            shape: &here,
        },
    )
    .map_err(|m| format!("the source's VM differs from this host's configuration: {m}"))?;
    let page_streams = if hello.connections > 1 {
        gate.page_streams(session, hello.connections)?
    } else {
        Vec::new()
    };
    drop(gate); // Every connection of this migration is in.
    tracing::info!(
        source_vireo = %hello.vireo,
        page_streams = page_streams.len(),
        "receiving a VM"
    );
    let state = if page_streams.is_empty() {
        copy_in(job, stream, &mut incoming, disks, false)?
    } else {
        copy_in_parallel(job, stream, page_streams, &mut incoming, disks)?
    };
    if copy_storage {
        disks.finish(incoming.config.disks.len())?;
    }
    let saved: SavedVm =
        serde_json::from_slice(&state).map_err(|e| format!("the source's VM state: {e}"))?;
    // A clustered VM runs here under this host's write lease as renewed while it
    // arrived (the deadline it was received with is long past after a slow copy).
    if let Some(lease) = &job.write_lease {
        let (ahead_ms, renewed_ms_ago) = lease.timing_ms(devices::block::monotonic_ns());
        tracing::info!(
            ahead_ms,
            renewed_ms_ago,
            "the VM's state is in; its write lease"
        );
        if !renewed_within(lease, LEASE_GRACE) {
            return Err(
                "the write lease expired while the VM arrived: this host may not run it".into(),
            );
        }
        incoming.config.write_lease = Some(api::WriteLease {
            deadline_monotonic_ns: lease.deadline_ns(),
        });
    }
    // Devices, taps, vCPU threads: made on the control thread, so they run under its
    // filter and their own, never under this thread's.
    let (events, seccomp, running) = (job.events.clone(), job.seccomp.clone(), saved.running);
    let vm = on_control(&job.events, move || {
        incoming
            .finish(&saved, events, seccomp)
            .map_err(|e| crate::vmm::error_chain(&e))
    })?;
    let (tx, rx) = channel();
    job.events
        .send(ControlEvent::Migration(MigrationEvent::Incoming(
            Box::new(vm),
            running,
            tx,
        )))
        .map_err(|_| "the control loop is gone".to_string())?;
    rx.recv()
        .map_err(|_| "the control loop did not take the VM".to_string())??;
    // From here the VM owns the copied images; a failure before Go drops
    // the VM (in the control loop) and the images with it.
    protocol::send(stream, &Message::Ready).map_err(|e| e.to_string())?;
    match protocol::recv(stream).map_err(|e| e.to_string())? {
        Message::Go => {
            {
                let mut i = lock(&job.info);
                i.status = MigrationStatus::Completed;
                i.total_ms = started.elapsed().as_secs_f64() * 1e3;
            }
            job.events
                .send(ControlEvent::Migration(MigrationEvent::IncomingGo))
                .map_err(|_| "the control loop is gone".to_string())
        }
        Message::Error(e) => Err(format!("source aborted: {e}")),
        other => Err(format!("expected Go, source sent {}", other.name())),
    }
}

/// The control stream up to `State` (returned): pages (unless they come on page
/// streams), and a shared-nothing migration's disks.
fn copy_in(
    job: &Job,
    stream: &mut dyn Stream,
    incoming: &mut IncomingVm,
    disks: &mut IncomingDisks,
    parallel: bool,
) -> Result<Vec<u8>, String> {
    loop {
        match protocol::recv(stream).map_err(|e| e.to_string())? {
            Message::Pages(_) if parallel => {
                return Err("the source sent pages on the control stream".into())
            }
            Message::Pages(p) => {
                let n = apply_pages(&incoming.mem, &p)?;
                let mut i = lock(&job.info);
                i.pages_sent += n;
                i.bytes_sent += p.len() as u64 + 12;
            }
            Message::DiskBegin(b) => {
                let dir = job.storage_dir.as_deref().ok_or("unexpected DiskBegin")?;
                disks.begin(&job.events, dir, &b, &mut incoming.config)?;
            }
            Message::Disk(op) => disks.apply(op)?,
            Message::State(s) => return Ok(s),
            Message::Error(e) => return Err(format!("source aborted: {e}")),
            other => return Err(format!("unexpected {} before the state", other.name())),
        }
    }
}

/// [`copy_in`] with the pages on their own streams, one thread each; returns the state
/// once every stream has delivered its last round, so nothing is acknowledged (Ready)
/// before all pages are in. Any failure ends every stream.
fn copy_in_parallel(
    job: &Job,
    stream: &mut dyn Stream,
    page_streams: Vec<Box<dyn Stream>>,
    incoming: &mut IncomingVm,
    disks: &mut IncomingDisks,
) -> Result<Vec<u8>, String> {
    let barrier = RoundBarrier::new(page_streams.len());
    let mem = incoming.mem.clone();
    let cutters = page_streams
        .iter()
        .map(|s| s.cutter())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("page streams: {e}"))?;
    std::thread::scope(|scope| {
        let mut threads = Vec::new();
        for (lane, mut s) in page_streams.into_iter().enumerate() {
            // A failed stream wakes the control stream's reader, which then fails too.
            let wake_control = stream
                .cutter()
                .map_err(|e| format!("control stream: {e}"))?;
            let (barrier, mem, info) = (&barrier, &*mem, &*job.info);
            let seccomp = &job.seccomp;
            let t = std::thread::Builder::new()
                .name(format!("vireo-mig-in{lane}"))
                .spawn_scoped(scope, move || {
                    seccomp.apply_or_exit(crate::seccomp::ThreadKind::PageStream);
                    let r = parallel_receive::receive_stream(lane, s.as_mut(), mem, barrier, info);
                    if let Err(e) = &r {
                        barrier.fail(e);
                        wake_control.stop_reading();
                    }
                    r
                })
                .map_err(|e| format!("cannot start page stream thread {lane}: {e}"))?;
            threads.push(t);
        }
        let r = copy_in(job, stream, incoming, disks, true);
        if let Err(e) = &r {
            barrier.fail(e);
            for c in &cutters {
                c.cut();
            }
        }
        let mut streams_ok = Ok(());
        for t in threads {
            let done = t
                .join()
                .unwrap_or_else(|_| Err("a page stream thread panicked".into()));
            streams_ok = streams_ok.and(done);
        }
        // A stream's own failure explains the control stream's better than "EOF".
        let state = r.map_err(|e| barrier.failure().unwrap_or(e))?;
        streams_ok.map(|()| state)
    })
}
