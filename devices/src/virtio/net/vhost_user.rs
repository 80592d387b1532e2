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
use std::sync::Arc;
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
    /// What the backend offers (virtio and the protocol-features bit).
    backend_features: u64,
    /// Protocol features both sides use (None: the backend has none).
    protocol: Option<VhostUserProtocolFeatures>,
}

impl Session {
    fn open(path: &Path, deadline: Duration) -> Result<Self, VhostUserError> {
        let stream = connect(path, deadline)?;
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
            backend_features,
            protocol,
        })
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
    path: PathBuf,
    mac: MacAddr,
    session: Session,
    acked_features: u64,
    running: Option<Running>,
}

impl VhostUserNet {
    /// Connects to the backend at `path` (retrying until `deadline`) and negotiates
    /// the protocol.
    pub fn connect(path: &Path, mac: MacAddr, deadline: Duration) -> Result<Self, VhostUserError> {
        let session = Session::open(path, deadline)?;
        tracing::info!(
            path = %path.display(),
            features = format_args!("{:#x}", session.backend_features),
            protocol = ?session.protocol,
            "vhost-user backend connected"
        );
        Ok(Self {
            path: path.to_path_buf(),
            mac,
            session,
            acked_features: 0,
            running: None,
        })
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    fn bad(&self, what: &'static str) -> impl Fn(vhost::Error) -> ActivateError + '_ {
        move |e| ActivateError::BadConfig {
            device: "net",
            reason: format!("vhost-user backend at {}: {what}: {e}", self.path.display()),
        }
    }

    /// Sends the memory table: each RAM region's memfd and where it is mapped here.
    fn send_mem_table(&self, mem: &GuestMemoryMmap) -> Result<(), ActivateError> {
        let regions = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| ActivateError::BadConfig {
                device: "net",
                reason: "vhost-user needs guest memory backed by files (--memory ...,shared=on)"
                    .into(),
            })?;
        self.session
            .frontend
            .set_mem_table(&regions)
            .map_err(self.bad("SET_MEM_TABLE"))?;
        Ok(())
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

    fn send_vring(
        &mut self,
        mem: &GuestMemoryMmap,
        q: &ActivatedQueue,
        call: &EventFd,
    ) -> Result<(), ActivateError> {
        let i = usize::from(q.index);
        let queue = &q.queue;
        let config = VringConfigData {
            queue_max_size: queue.max_size(),
            queue_size: queue.size(),
            flags: 0,
            desc_table_addr: Self::host_addr(mem, queue.desc_table())?,
            used_ring_addr: Self::host_addr(mem, queue.used_ring())?,
            avail_ring_addr: Self::host_addr(mem, queue.avail_ring())?,
            log_addr: None,
        };
        let f = &mut self.session.frontend;
        f.set_vring_num(i, queue.size())
            .map_err(|e| bad_msg(&self.path, "SET_VRING_NUM", e))?;
        f.set_vring_addr(i, &config)
            .map_err(|e| bad_msg(&self.path, "SET_VRING_ADDR", e))?;
        f.set_vring_base(i, queue.next_avail())
            .map_err(|e| bad_msg(&self.path, "SET_VRING_BASE", e))?;
        f.set_vring_call(i, call)
            .map_err(|e| bad_msg(&self.path, "SET_VRING_CALL", e))?;
        f.set_vring_kick(i, &q.kick)
            .map_err(|e| bad_msg(&self.path, "SET_VRING_KICK", e))?;
        if self.session.protocol.is_some() {
            f.set_vring_enable(i, true)
                .map_err(|e| bad_msg(&self.path, "SET_VRING_ENABLE", e))?;
        }
        Ok(())
    }

    /// Stops the backend's rings and takes back their positions: the next available
    /// index from GET_VRING_BASE, the next used index from the used ring in guest
    /// memory (what the backend last published).
    fn stop_rings(&mut self) -> Vec<ActivatedQueue> {
        let Some(running) = self.running.take() else {
            return Vec::new();
        };
        running.forwarder.stop();
        let mut queues = running.queues;
        for q in &mut queues {
            let i = usize::from(q.index);
            if self.session.protocol.is_some() {
                let _ = self.session.frontend.set_vring_enable(i, false);
            }
            match self.session.frontend.get_vring_base(i) {
                Ok(base) => {
                    q.queue.set_next_avail(base as u16);
                    sync_used(&running.mem, q);
                }
                Err(e) => tracing::warn!(
                    path = %self.path.display(),
                    queue = i,
                    error = %e,
                    "GET_VRING_BASE failed; keeping the VMM's ring position"
                ),
            }
        }
        queues
    }
}

fn bad_msg(path: &Path, what: &'static str, e: vhost::Error) -> ActivateError {
    ActivateError::BadConfig {
        device: "net",
        reason: format!("vhost-user backend at {}: {what}: {e}", path.display()),
    }
}

/// The used index the backend last published for `q` (in guest memory).
fn used_idx(mem: &GuestMemoryMmap, q: &ActivatedQueue) -> Option<u16> {
    use vm_memory::Bytes;
    let addr = GuestAddress(q.queue.used_ring()).checked_add(2)?;
    mem.read_obj::<u16>(addr).ok().map(u16::from_le)
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
        (self.session.backend_features & PASSED_FEATURES) | VMM_FEATURES
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
        let mut features = self.acked_features & self.session.backend_features & PASSED_FEATURES;
        if self.session.protocol.is_some() {
            features |= F_PROTOCOL_FEATURES;
        }
        self.session
            .frontend
            .set_features(features)
            .map_err(self.bad("SET_FEATURES"))?;
        self.send_mem_table(&mem)?;
        let setup = |source| ActivateError::Setup {
            device: "net",
            source,
        };
        let mut calls = Vec::new();
        for q in &queues {
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(setup)?;
            self.send_vring(&mem, q, &call)?;
            calls.push((q.index, call));
        }
        let mut workers = Workers::new("net")?;
        let forward = forward_calls(calls, interrupt, workers.stop_fd()?).map_err(setup)?;
        workers.spawn("vireo-vu-call".into(), forward)?;
        tracing::info!(path = %self.path.display(), features = format_args!("{features:#x}"), "vhost-user rings started");
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

/// Sets a queue's next used index from the used ring in guest memory (after the
/// backend stopped, its last published position).
fn sync_used(mem: &GuestMemoryMmap, q: &mut ActivatedQueue) {
    if let Some(idx) = used_idx(mem, q) {
        q.queue.set_next_used(idx);
    }
}
