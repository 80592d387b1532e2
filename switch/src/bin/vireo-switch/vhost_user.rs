//! A VM port served as a vhost-user backend (`vhost-user-backend`): the VMM connects to
//! the port's socket, sends its guest memory (memfds) and the virtio-net rings, and the
//! port's worker thread reads the guest's transmit ring and writes its receive ring
//! directly in guest memory.
//!
//! The switching core stays single-owner: the worker hands each transmitted frame to
//! the switch thread ([`Inbound`] over a channel, then the switch's wake eventfd); the
//! switch thread puts frames for the port in its backlog ([`PortShared::deliver`]) and
//! wakes the worker, which copies them into receive buffers. Drops on either side are
//! reported to the switch thread, which counts them on the port.
//!
//! Confinement: the port's listener thread runs under [`Role::VhostListener`]'s filter
//! (so do the library's connection threads it starts), and each vring worker adds
//! [`Role::VhostWorker`]'s at its first event, before it touches guest memory.
//!
//! A port outlives its VMs: when the VMM goes away (exit, SIGKILL) the worker stops,
//! the port drops what is sent to it as `port-down` and waits for the next connection
//! on the same socket.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};

use switch::extension::DropReason;
use switch::PortId;
use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{Filters, Role};

/// The virtio-net header with VIRTIO_F_VERSION_1 (`struct virtio_net_hdr_mrg_rxbuf`).
const VNET_HDR_LEN: usize = 12;
/// The largest frame a port takes from its guest (no GSO negotiated: an MTU-sized frame
/// plus tags fits many times over).
const MAX_FRAME: usize = 65_535;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
/// The worker's own event (after the queues and the library's exit event).
const BACKLOG_EVENT: u16 = 3;
/// Frames waiting for a port's worker before more are dropped.
const BACKLOG_MAX: usize = 256;
/// Transmitted frames handled before the worker looks at its backlog again.
const TX_BURST: usize = 64;

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// What a port's worker tells the switch thread.
pub enum Inbound {
    /// A frame the guest transmitted.
    Frame(PortId, Vec<u8>),
    /// A transmit chain that is not a frame: counted as received and dropped.
    RxDrop(PortId, DropReason),
    /// A frame for the port that the guest could not take.
    TxDrop(PortId, DropReason),
}

/// The switch thread's end: a channel and the eventfd its poll loop watches.
#[derive(Clone)]
pub struct ToSwitch {
    tx: Sender<Inbound>,
    wake: Arc<EventFd>,
}

impl ToSwitch {
    pub fn new(tx: Sender<Inbound>, wake: Arc<EventFd>) -> Self {
        Self { tx, wake }
    }

    fn send(&self, m: Inbound) {
        if self.tx.send(m).is_ok() {
            let _ = self.wake.write(1);
        }
    }
}

/// What the switch thread and a port's worker share.
pub struct PortShared {
    id: PortId,
    backlog: Mutex<VecDeque<Vec<u8>>>,
    /// Written when the backlog gains frames; the worker watches it.
    wake: EventFd,
    /// A VMM is connected and has started the rings.
    connected: AtomicBool,
}

impl PortShared {
    /// A VMM is connected and has sent its memory.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Queues `frame` for the guest; `Err` (with the reason to count) when it cannot.
    pub fn deliver(&self, frame: Vec<u8>) -> Result<(), DropReason> {
        if !self.connected.load(Ordering::Acquire) {
            return Err(DropReason::PORT_DOWN);
        }
        {
            let mut q = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= BACKLOG_MAX {
                return Err(DropReason::NO_RX_BUFFER);
            }
            q.push_back(frame);
        }
        let _ = self.wake.write(1);
        Ok(())
    }
}

/// The `VhostUserBackend` of one connection.
struct NetBackend {
    shared: Arc<PortShared>,
    to_switch: ToSwitch,
    mem: RwLock<Option<Memory>>,
    /// Rate limit for the log line about bad chains (one per connection).
    bad_logged: AtomicBool,
    filters: Filters<Role>,
}

thread_local! {
    /// Whether this vring worker has its own filter already.
    static WORKER_CONFINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Why a transmit chain is refused.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("a device-writable descriptor in a transmit chain")]
    Writable,
    #[error("descriptor outside guest memory")]
    Memory,
    #[error("chain of {0} bytes is shorter than the virtio-net header")]
    Short(usize),
    #[error("chain longer than {MAX_FRAME} bytes")]
    Long,
    #[error("a receive descriptor the guest cannot have meant (device-readable)")]
    Readable,
    #[error("receive chain of {have} bytes for a frame of {need}")]
    Small { have: usize, need: usize },
}

type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;

/// The frame in a transmit chain, without its virtio-net header.
fn read_tx(chain: Chain, mem: &GuestMemoryMmap) -> Result<Vec<u8>, ChainError> {
    let mut buf = Vec::new();
    for d in chain {
        if d.is_write_only() {
            return Err(ChainError::Writable);
        }
        let len = d.len() as usize;
        if buf.len() + len > VNET_HDR_LEN + MAX_FRAME {
            return Err(ChainError::Long);
        }
        let at = buf.len();
        buf.resize(at + len, 0);
        mem.read_slice(&mut buf[at..], d.addr())
            .map_err(|_| ChainError::Memory)?;
    }
    if buf.len() < VNET_HDR_LEN {
        return Err(ChainError::Short(buf.len()));
    }
    buf.drain(..VNET_HDR_LEN);
    Ok(buf)
}

/// Writes the header (`num_buffers` = 1) and `frame` into a receive chain; the bytes
/// written.
fn write_rx(chain: Chain, mem: &GuestMemoryMmap, frame: &[u8]) -> Result<u32, ChainError> {
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[10] = 1;
    let need = VNET_HDR_LEN + frame.len();
    let descs: Vec<_> = chain.collect();
    let mut have = 0usize;
    for d in &descs {
        if !d.is_write_only() {
            return Err(ChainError::Readable);
        }
        have += d.len() as usize;
    }
    if have < need {
        return Err(ChainError::Small { have, need });
    }
    let mut src = hdr.iter().chain(frame).copied();
    let mut left = need;
    let mut piece = Vec::new();
    for d in &descs {
        if left == 0 {
            break;
        }
        let n = (d.len() as usize).min(left);
        piece.clear();
        piece.extend(src.by_ref().take(n));
        mem.write_slice(&piece, d.addr())
            .map_err(|_| ChainError::Memory)?;
        left -= n;
    }
    Ok(need as u32)
}

impl NetBackend {
    fn memory(&self) -> Option<GuestMemoryLoadGuard<GuestMemoryMmap>> {
        self.mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|m| m.memory())
    }

    fn bad_chain(&self, what: &str, e: &ChainError) {
        if !self.bad_logged.swap(true, Ordering::Relaxed) {
            warn!(port = self.shared.id, error = %e, "{what}: bad descriptor chain (counted; further ones only counted)");
        }
    }

    /// Takes every frame the guest queued for transmission to the switch.
    fn transmit(&self, vring: &VringRwLock) {
        let Some(mem) = self.memory() else { return };
        let port = self.shared.id;
        loop {
            let mut any = false;
            for _ in 0..TX_BURST {
                let chain = {
                    let mut state = vring.get_mut();
                    match state.get_queue_mut().iter(mem.clone()) {
                        Ok(mut it) => it.next(),
                        Err(e) => {
                            // The available ring itself is broken (an index beyond
                            // the ring): nothing more can be taken until a reset.
                            if !self.bad_logged.swap(true, Ordering::Relaxed) {
                                warn!(port, error = %e, "transmit ring unusable");
                            }
                            self.to_switch
                                .send(Inbound::RxDrop(port, DropReason::BAD_DESCRIPTOR));
                            return;
                        }
                    }
                };
                let Some(chain) = chain else { break };
                any = true;
                let head = chain.head_index();
                match read_tx(chain, &mem) {
                    Ok(frame) => self.to_switch.send(Inbound::Frame(port, frame)),
                    Err(e) => {
                        self.bad_chain("transmit", &e);
                        self.to_switch
                            .send(Inbound::RxDrop(port, DropReason::BAD_DESCRIPTOR));
                    }
                }
                if let Err(e) = vring.add_used(head, 0) {
                    warn!(port, error = %e, "cannot return a transmit buffer");
                    return;
                }
            }
            if any {
                let _ = vring.signal_used_queue();
            } else {
                return;
            }
        }
    }

    /// Copies the backlog into the guest's receive buffers, in order, while it has
    /// some; the rest waits for the guest's next receive kick (the backlog is bounded:
    /// past [`BACKLOG_MAX`] frames the switch drops and counts them).
    fn receive(&self, vring: &VringRwLock) {
        let port = self.shared.id;
        let Some(mem) = self.memory() else { return };
        if !vring.get_ref().get_queue().ready() {
            return;
        }
        let mut used = false;
        loop {
            let Some(frame) = self
                .shared
                .backlog
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front()
            else {
                break;
            };
            let chain = {
                let mut state = vring.get_mut();
                state
                    .get_queue_mut()
                    .iter(mem.clone())
                    .ok()
                    .and_then(|mut it| it.next())
            };
            let Some(chain) = chain else {
                // No buffer now: the frame waits at the front for the next kick.
                self.shared
                    .backlog
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_front(frame);
                break;
            };
            let head = chain.head_index();
            let len = match write_rx(chain, &mem, &frame) {
                Ok(n) => n,
                Err(e) => {
                    self.bad_chain("receive", &e);
                    self.to_switch
                        .send(Inbound::TxDrop(port, DropReason::NO_RX_BUFFER));
                    0
                }
            };
            if vring.add_used(head, len).is_err() {
                break;
            }
            used = true;
        }
        if used {
            let _ = vring.signal_used_queue();
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {}

    /// Without an exit event the library cannot stop the worker when the VMM leaves
    /// (dropping the daemon would wait for it forever).
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!(port = self.shared.id, error = %e, "no exit event for the port's worker");
                None
            }
        }
    }

    fn update_memory(&self, mem: Memory) -> std::io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        self.shared.connected.store(true, Ordering::Release);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if !WORKER_CONFINED.get() {
            // The library started this thread; its first event is the first moment
            // our code runs on it, before any guest memory is read.
            self.filters.apply_or_exit(Role::VhostWorker);
            WORKER_CONFINED.set(true);
            #[cfg(feature = "test-hooks")]
            crate::test_hooks::probe_syscall("worker");
        }
        #[cfg(feature = "test-hooks")]
        crate::test_hooks::maybe_panic("worker");
        let (Some(rx), Some(tx)) = (
            vrings.get(usize::from(RX_QUEUE)),
            vrings.get(usize::from(TX_QUEUE)),
        ) else {
            return Ok(());
        };
        match device_event {
            TX_QUEUE => self.transmit(tx),
            RX_QUEUE => {}
            BACKLOG_EVENT => {
                let _ = self.shared.wake.read();
            }
            _ => return Ok(()),
        }
        self.receive(rx);
        Ok(())
    }
}

/// A vhost-user port: its shared state and the thread that accepts VMMs on its socket.
pub struct VhostUserPort {
    pub shared: Arc<PortShared>,
    path: PathBuf,
    /// What the listener thread needs, until [`VhostUserPort::start`] starts it.
    pending: Option<Pending>,
}

/// A bound port whose listener thread has not started yet.
struct Pending {
    listener: Listener,
    name: String,
    to_switch: ToSwitch,
    filters: Filters<Role>,
}

#[derive(Debug, thiserror::Error)]
pub enum VhostPortError {
    #[error("vhost-user socket {path}: {reason}")]
    Socket { path: PathBuf, reason: String },
}

impl VhostUserPort {
    /// Binds `path` (a stale socket file is replaced; another kind of file is refused);
    /// [`VhostUserPort::start`] then starts the thread that serves one VMM after
    /// another on it.
    pub fn open(
        id: PortId,
        name: &str,
        path: &Path,
        to_switch: ToSwitch,
        filters: Filters<Role>,
    ) -> Result<Self, VhostPortError> {
        let err = |reason: String| VhostPortError::Socket {
            path: path.to_path_buf(),
            reason,
        };
        if let Ok(m) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return Err(err("exists and is not a socket".into()));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err("in use by another backend".into()));
            }
        }
        let listener = Listener::new(path, true).map_err(|e| err(e.to_string()))?;
        let shared = Arc::new(PortShared {
            id,
            backlog: Mutex::new(VecDeque::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(|e| err(e.to_string()))?,
            connected: AtomicBool::new(false),
        });
        Ok(Self {
            shared,
            path: path.to_path_buf(),
            pending: Some(Pending {
                listener,
                name: name.to_string(),
                to_switch,
                filters,
            }),
        })
    }

    /// Starts the port's listener thread (once; later calls do nothing), and returns
    /// once it has installed its filter.
    pub fn start(&mut self) -> Result<(), VhostPortError> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let shared = self.shared.clone();
        let path = self.path.clone();
        let (confined, ready) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(format!("vu-{}", shared.id))
            .spawn(move || {
                p.filters.apply_or_exit(Role::VhostListener);
                let _ = confined.send(());
                #[cfg(feature = "test-hooks")]
                crate::test_hooks::probe_syscall("listener");
                serve(p.listener, p.name, path, shared, p.to_switch, p.filters)
            })
            .map_err(|e| VhostPortError::Socket {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        // Err only if the thread ended, which apply_or_exit does not allow.
        let _ = ready.recv();
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Serves VMMs on `listener`, one at a time, for as long as the process runs.
fn serve(
    mut listener: Listener,
    name: String,
    path: PathBuf,
    shared: Arc<PortShared>,
    to_switch: ToSwitch,
    filters: Filters<Role>,
) {
    loop {
        let backend = Arc::new(NetBackend {
            shared: shared.clone(),
            to_switch: to_switch.clone(),
            mem: RwLock::new(None),
            bad_logged: AtomicBool::new(false),
            filters: filters.clone(),
        });
        let mut daemon = match VhostUserDaemon::new(
            format!("vu-{name}"),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        ) {
            Ok(d) => d,
            Err(e) => {
                warn!(port = %name, error = %e, "vhost-user port cannot start");
                return;
            }
        };
        for h in daemon.get_epoll_handlers() {
            if let Err(e) = h.register_listener(
                shared.wake.as_raw_fd(),
                EventSet::IN,
                u64::from(BACKLOG_EVENT),
            ) {
                warn!(port = %name, error = %e, "vhost-user port cannot watch its backlog");
                return;
            }
        }
        debug!(port = %name, path = %path.display(), "vhost-user port waiting for a VMM");
        if let Err(e) = daemon.start(&mut listener) {
            warn!(port = %name, error = %e, "vhost-user connection failed");
            continue;
        }
        info!(port = %name, "vhost-user VMM connected");
        let result = daemon.wait();
        shared.connected.store(false, Ordering::Release);
        let dropped = {
            let mut q = shared.backlog.lock().unwrap_or_else(|e| e.into_inner());
            let n = q.len();
            q.clear();
            n
        };
        for _ in 0..dropped {
            to_switch.send(Inbound::TxDrop(shared.id, DropReason::PORT_DOWN));
        }
        match result {
            Ok(()) => info!(port = %name, "vhost-user VMM disconnected; waiting for the next"),
            Err(e) => {
                info!(port = %name, error = %e, "vhost-user VMM connection ended; waiting for the next")
            }
        }
    }
}
