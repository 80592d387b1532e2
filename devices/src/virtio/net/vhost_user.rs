//! virtio-net over vhost-user: the guest's queues are served by another process (the
//! backend, e.g. `vireo-switch`), which maps guest memory from the memfds this VMM
//! sends it (`--memory shared=on`) and reads and writes the rings itself.
//!
//! The VMM keeps the PCI transport, the configuration space (MAC, link) and the
//! interrupts. At activation (DRIVER_OK) it sends the memory table and, per queue,
//! the ring's size, addresses and position, the kick eventfd (the queue's notify
//! ioeventfd, which KVM signals without an exit) and a call eventfd. A small thread
//! (`vireo-vu-call`) turns the backend's calls into the queue's MSI-X message (the
//! transport's `VirtioInterrupt`, so masking and the PBA keep working): one read and
//! one KVM_SIGNAL_MSI per batch of completions. Pause and reset ask the backend for
//! each ring's position (GET_VRING_BASE, which also stops it there).

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use net::MacAddr;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_net;
use virtio_queue::QueueT;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::feature;
use crate::virtio::workers::Workers;
use crate::virtio::{
    ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    VirtioInterruptKind, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_NET,
};

const F_MAC: u64 = feature(virtio_net::VIRTIO_NET_F_MAC);
const F_STATUS: u64 = feature(virtio_net::VIRTIO_NET_F_STATUS);
const F_MRG_RXBUF: u64 = feature(virtio_net::VIRTIO_NET_F_MRG_RXBUF);
const S_LINK_UP: u16 = virtio_net::VIRTIO_NET_S_LINK_UP as u16;
const F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// Receive and transmit queue.
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// Device features the VMM itself provides (the configuration space is its own).
const VMM_FEATURES: u64 = F_MAC | F_STATUS;
/// Ring and net features a backend may offer that this frontend passes to the guest.
const PASSED_FEATURES: u64 = F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | F_MRG_RXBUF;
/// How long the VMM waits for a backend's reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The protocol features used: replies to every request (errors are seen at once).
const PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::REPLY_ACK;

/// Why a vhost-user network device cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("vhost-user socket {path}: {reason}")]
    Socket { path: PathBuf, reason: String },
    #[error("vhost-user socket {path}: no backend accepted a connection within {secs} s ({last})")]
    NoBackend {
        path: PathBuf,
        secs: u64,
        last: String,
    },
    #[error("vhost-user backend at {path}: {what}: {source}")]
    Protocol {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-user backend at {path} lacks VIRTIO_F_VERSION_1 (offered {features:#x})")]
    NoVersion1 { path: PathBuf, features: u64 },
}

/// Connects to the backend listening on `path`, retrying until `deadline` passes
/// (the backend may be starting). A path that exists but is not a socket fails at once.
fn connect(path: &Path, deadline: Duration) -> Result<UnixStream, VhostUserError> {
    let start = Instant::now();
    loop {
        let last = match std::fs::metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(VhostUserError::Socket {
                    path: path.to_path_buf(),
                    reason: "not a unix socket".into(),
                })
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(s) => {
                    // A backend that stops answering fails the request, never hangs
                    // the VMM.
                    let timeout = Some(REPLY_TIMEOUT);
                    s.set_read_timeout(timeout)
                        .and_then(|()| s.set_write_timeout(timeout))
                        .map_err(|e| VhostUserError::Socket {
                            path: path.to_path_buf(),
                            reason: e.to_string(),
                        })?;
                    return Ok(s);
                }
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if start.elapsed() >= deadline {
            return Err(VhostUserError::NoBackend {
                path: path.to_path_buf(),
                secs: deadline.as_secs(),
                last,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The session with one backend, negotiated up to the point where the guest's
/// features are known.
struct Session {
    frontend: Frontend,
    /// The same socket, watched for the backend going away.
    watch: UnixStream,
    /// What the backend offers (virtio and the protocol-features bit).
    backend_features: u64,
    /// Protocol features both sides use (None: the backend has none).
    protocol: Option<VhostUserProtocolFeatures>,
}

impl Session {
    fn open(path: &Path, deadline: Duration) -> Result<Self, VhostUserError> {
        let stream = connect(path, deadline)?;
        let watch = stream.try_clone().map_err(|e| VhostUserError::Socket {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let proto = |what| {
            let path = path.to_path_buf();
            move |source| VhostUserError::Protocol { path, what, source }
        };
        let mut frontend = Frontend::from_stream(stream, QUEUE_SIZES.len() as u64);
        frontend.set_owner().map_err(proto("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(proto("GET_FEATURES"))?;
        if backend_features & F_VERSION_1 == 0 {
            return Err(VhostUserError::NoVersion1 {
                path: path.to_path_buf(),
                features: backend_features,
            });
        }
        let protocol = if backend_features & F_PROTOCOL_FEATURES != 0 {
            let theirs = frontend
                .get_protocol_features()
                .map_err(proto("GET_PROTOCOL_FEATURES"))?;
            let used = theirs & PROTOCOL;
            frontend
                .set_protocol_features(used)
                .map_err(proto("SET_PROTOCOL_FEATURES"))?;
            Some(used)
        } else {
            None
        };
        Ok(Self {
            frontend,
            watch,
            backend_features,
            protocol,
        })
    }
}

/// One ring as the VMM started it: what a new backend is given after a reconnect.
struct Ring {
    index: u16,
    size: u16,
    max_size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
}

/// The rings the backend serves now (None while the device is not active).
struct Started {
    mem: Arc<GuestMemoryMmap>,
    features: u64,
    rings: Vec<Ring>,
}

/// The connection and what was sent over it: shared by the device (activation, pause,
/// reset on the activator) and the link watcher (reconnect).
struct Link {
    path: PathBuf,
    session: Session,
    started: Option<Started>,
}

fn bad_msg(path: &Path, what: &'static str, e: vhost::Error) -> ActivateError {
    ActivateError::BadConfig {
        device: "net",
        reason: format!("vhost-user backend at {}: {what}: {e}", path.display()),
    }
}

/// The VMM's address of guest address `gpa` (vhost-user rings are given in the
/// frontend's addresses; the backend translates them by the memory table).
fn host_addr(mem: &GuestMemoryMmap, gpa: u64) -> Result<u64, ActivateError> {
    mem.get_host_address(GuestAddress(gpa))
        .map(|p| p as u64)
        .map_err(|_| ActivateError::BadConfig {
            device: "net",
            reason: format!("a ring at {gpa:#x} is outside guest memory"),
        })
}

/// The used index the backend last published for the ring whose used ring is at `used`.
fn used_idx(mem: &GuestMemoryMmap, used: u64) -> Option<u16> {
    use vm_memory::Bytes;
    let addr = GuestAddress(used).checked_add(2)?;
    mem.read_obj::<u16>(addr).ok().map(u16::from_le)
}

impl Link {
    /// Sends the features, the memory table and each ring (`base`: its next available
    /// index); on success the rings are what a reconnect replays.
    fn start(&mut self, started: Started, bases: &[u16]) -> Result<(), ActivateError> {
        let path = self.path.clone();
        let f = &mut self.session.frontend;
        f.set_features(started.features)
            .map_err(|e| bad_msg(&path, "SET_FEATURES", e))?;
        let regions = started
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| ActivateError::BadConfig {
                device: "net",
                reason: "vhost-user needs guest memory backed by files (--memory ...,shared=on)"
                    .into(),
            })?;
        f.set_mem_table(&regions)
            .map_err(|e| bad_msg(&path, "SET_MEM_TABLE", e))?;
        for (r, &base) in started.rings.iter().zip(bases) {
            let i = usize::from(r.index);
            let config = VringConfigData {
                queue_max_size: r.max_size,
                queue_size: r.size,
                flags: 0,
                desc_table_addr: host_addr(&started.mem, r.desc)?,
                used_ring_addr: host_addr(&started.mem, r.used)?,
                avail_ring_addr: host_addr(&started.mem, r.avail)?,
                log_addr: None,
            };
            f.set_vring_num(i, r.size)
                .map_err(|e| bad_msg(&path, "SET_VRING_NUM", e))?;
            f.set_vring_addr(i, &config)
                .map_err(|e| bad_msg(&path, "SET_VRING_ADDR", e))?;
            f.set_vring_base(i, base)
                .map_err(|e| bad_msg(&path, "SET_VRING_BASE", e))?;
            f.set_vring_call(i, &r.call)
                .map_err(|e| bad_msg(&path, "SET_VRING_CALL", e))?;
            f.set_vring_kick(i, &r.kick)
                .map_err(|e| bad_msg(&path, "SET_VRING_KICK", e))?;
            if self.session.protocol.is_some() {
                f.set_vring_enable(i, true)
                    .map_err(|e| bad_msg(&path, "SET_VRING_ENABLE", e))?;
            }
        }
        self.started = Some(started);
        Ok(())
    }

    /// Stops the rings; each one's next available index (None where the backend did
    /// not answer).
    fn stop(&mut self) -> Vec<Option<u16>> {
        let Some(started) = self.started.take() else {
            return Vec::new();
        };
        let f = &mut self.session.frontend;
        started
            .rings
            .iter()
            .map(|r| {
                let i = usize::from(r.index);
                if self.session.protocol.is_some() {
                    let _ = f.set_vring_enable(i, false);
                }
                match f.get_vring_base(i) {
                    Ok(base) => Some(base as u16),
                    Err(e) => {
                        tracing::warn!(path = %self.path.display(), queue = i, error = %e,
                            "GET_VRING_BASE failed; the ring continues from its used index");
                        None
                    }
                }
            })
            .collect()
    }

    /// A new session after the backend went away: the rings that were running start
    /// again where the backend left them (their used index in guest memory: this
    /// backend completes chains in order, so nothing it took is lost or repeated).
    fn reconnect(&mut self, session: Session) -> Result<(), ActivateError> {
        self.session = session;
        let Some(started) = self.started.take() else {
            return Ok(());
        };
        let bases: Vec<u16> = started
            .rings
            .iter()
            .map(|r| used_idx(&started.mem, r.used).unwrap_or(0))
            .collect();
        self.start(started, &bases)
    }
}

fn lock(link: &Mutex<Link>) -> std::sync::MutexGuard<'_, Link> {
    link.lock().unwrap_or_else(|e| e.into_inner())
}

/// Watches the backend's socket; when the backend goes away (a switch restarted or
/// killed), connects again until it is back and replays the rings. Ends on `stop`.
fn watch_link(link: Arc<Mutex<Link>>, stop: EventFd) {
    crate::threads::started(crate::threads::WorkerKind::VhostUserLink);
    let path = lock(&link).path.clone();
    let stop_fd = std::os::fd::AsRawFd::as_raw_fd(&stop);
    // Waits for the stop event up to `ms` (-1: forever) or, with `sock`, for the
    // socket's hang-up; true when stopped.
    let wait = |sock: Option<i32>, ms: i32| -> (bool, bool) {
        let mut fds = vec![libc::pollfd {
            fd: stop_fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(fd) = sock {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLRDHUP,
                revents: 0,
            });
        }
        // SAFETY: poll on a live array of pollfds for its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            return (false, false);
        }
        (
            fds[0].revents != 0,
            fds.get(1).is_some_and(|f| f.revents != 0),
        )
    };
    loop {
        let sock = match lock(&link).session.watch.try_clone() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "vhost-user link watcher cannot watch the socket");
                return;
            }
        };
        let (stopped, gone) = wait(Some(std::os::fd::AsRawFd::as_raw_fd(&sock)), -1);
        if stopped {
            return;
        }
        if !gone {
            continue;
        }
        tracing::warn!(path = %path.display(), "vhost-user backend went away; reconnecting");
        let mut tries = 0u64;
        loop {
            if wait(None, 100).0 {
                return;
            }
            tries += 1;
            let session = match Session::open(&path, Duration::ZERO) {
                Ok(s) => s,
                Err(e) => {
                    if tries.is_multiple_of(50) {
                        tracing::info!(path = %path.display(), error = %e, "vhost-user backend still away");
                    }
                    continue;
                }
            };
            match lock(&link).reconnect(session) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "vhost-user backend back; rings restarted");
                    break;
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "vhost-user reconnect failed; retrying")
                }
            }
        }
    }
}

/// A running activation: the queues (kept to hand back on pause) and the thread that
/// forwards the backend's calls.
struct Running {
    queues: Vec<ActivatedQueue>,
    mem: Arc<GuestMemoryMmap>,
    forwarder: Workers<()>,
}

pub struct VhostUserNet {
    mac: MacAddr,
    link: Arc<Mutex<Link>>,
    /// What the backend offered when first connected (a restarted backend is expected
    /// to offer the same).
    backend_features: u64,
    acked_features: u64,
    running: Option<Running>,
    watcher: Option<Workers<()>>,
}

impl VhostUserNet {
    /// Connects to the backend at `path` (retrying until `deadline`), negotiates the
    /// protocol and starts the thread that reconnects when the backend goes away.
    pub fn connect(path: &Path, mac: MacAddr, deadline: Duration) -> Result<Self, VhostUserError> {
        let session = Session::open(path, deadline)?;
        tracing::info!(
            path = %path.display(),
            features = format_args!("{:#x}", session.backend_features),
            protocol = ?session.protocol,
            "vhost-user backend connected"
        );
        let backend_features = session.backend_features;
        let link = Arc::new(Mutex::new(Link {
            path: path.to_path_buf(),
            session,
            started: None,
        }));
        let socket_err = |e: ActivateError| VhostUserError::Socket {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut watcher = Workers::new("net").map_err(socket_err)?;
        let stop = watcher.stop_fd().map_err(socket_err)?;
        let l = link.clone();
        watcher
            .spawn("vireo-vu-link".into(), move || watch_link(l, stop))
            .map_err(socket_err)?;
        Ok(Self {
            mac,
            link,
            backend_features,
            acked_features: 0,
            running: None,
            watcher: Some(watcher),
        })
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Stops the backend's rings and takes back their positions: the next available
    /// index from GET_VRING_BASE, the next used index from the used ring in guest
    /// memory (what the backend last published).
    fn stop_rings(&mut self) -> Vec<ActivatedQueue> {
        let Some(running) = self.running.take() else {
            return Vec::new();
        };
        running.forwarder.stop();
        let bases = lock(&self.link).stop();
        let mut queues = running.queues;
        for (q, base) in queues.iter_mut().zip(bases) {
            let used = used_idx(&running.mem, q.queue.used_ring());
            if let Some(u) = used {
                q.queue.set_next_used(u);
            }
            if let Some(b) = base.or(used) {
                q.queue.set_next_avail(b);
            }
        }
        queues
    }
}

/// Forwards the backend's calls (`calls[i]` is queue `i`'s) to the guest until `stop`.
fn forward_calls(
    calls: Vec<(u16, EventFd)>,
    interrupt: Arc<dyn VirtioInterrupt>,
    stop: EventFd,
) -> std::io::Result<impl FnOnce() + Send> {
    let epoll = Epoll::new()?;
    let stop_token = calls.len() as u64;
    for (i, (_, fd)) in calls.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(fd),
            EpollEvent::new(EventSet::IN, i as u64),
        )?;
    }
    epoll.ctl(
        ControlOperation::Add,
        std::os::fd::AsRawFd::as_raw_fd(&stop),
        EpollEvent::new(EventSet::IN, stop_token),
    )?;
    Ok(move || {
        crate::threads::started(crate::threads::WorkerKind::Net);
        let mut events = vec![EpollEvent::default(); calls.len() + 1];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "vhost-user call forwarder: epoll failed");
                    return;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == stop_token {
                    return;
                }
                let Some((queue, fd)) = calls.get(token as usize) else {
                    continue;
                };
                if fd.read().is_ok() {
                    if let Err(e) = interrupt.trigger(VirtioInterruptKind::Queue(*queue)) {
                        tracing::warn!(error = %e, queue, "cannot interrupt the guest");
                    }
                }
            }
        }
    })
}

impl Drop for VhostUserNet {
    fn drop(&mut self) {
        self.stop_rings();
        if let Some(w) = self.watcher.take() {
            w.stop();
        }
    }
}

impl VirtioDevice for VhostUserNet {
    fn name(&self) -> &'static str {
        "net"
    }

    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        (self.backend_features & PASSED_FEATURES) | VMM_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 12];
        c[0..6].copy_from_slice(&self.mac.bytes());
        c[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&1500u16.to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        self.stop_rings();
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::BadConfig {
                device: "net",
                reason: "both the receive and transmit queues must be enabled".into(),
            });
        }
        queues.sort_by_key(|q| q.index);
        let setup = |source| ActivateError::Setup {
            device: "net",
            source,
        };
        let mut link = lock(&self.link);
        let mut features = self.acked_features & link.session.backend_features & PASSED_FEATURES;
        if link.session.protocol.is_some() {
            features |= F_PROTOCOL_FEATURES;
        }
        let mut rings = Vec::new();
        let mut calls = Vec::new();
        for q in &queues {
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(setup)?;
            rings.push(Ring {
                index: q.index,
                size: q.queue.size(),
                max_size: q.queue.max_size(),
                desc: q.queue.desc_table(),
                avail: q.queue.avail_ring(),
                used: q.queue.used_ring(),
                kick: q.kick.try_clone().map_err(setup)?,
                call: call.try_clone().map_err(setup)?,
            });
            calls.push((q.index, call));
        }
        let bases: Vec<u16> = queues.iter().map(|q| q.queue.next_avail()).collect();
        link.start(
            Started {
                mem: mem.clone(),
                features,
                rings,
            },
            &bases,
        )?;
        let path = link.path.clone();
        drop(link);
        let mut workers = Workers::new("net")?;
        let forward = forward_calls(calls, interrupt, workers.stop_fd()?).map_err(setup)?;
        workers.spawn("vireo-vu-call".into(), forward)?;
        tracing::info!(path = %path.display(), features = format_args!("{features:#x}"), "vhost-user rings started");
        self.running = Some(Running {
            queues,
            mem,
            forwarder: workers,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_rings();
        self.acked_features = 0;
    }

    fn pause(&mut self) -> Vec<ActivatedQueue> {
        self.stop_rings()
    }

    /// A live migration would need the backend's dirty log (not done): refused.
    fn detach_storage(&mut self) -> std::io::Result<()> {
        Err(std::io::Error::other(
            "a vhost-user network device cannot be migrated yet (no dirty logging)",
        ))
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}
