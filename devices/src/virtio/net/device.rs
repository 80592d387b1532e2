//! The virtio-net device as the transport sees it: features, configuration space
//! (MAC, link status), activation of its worker, hand-over of the tap.

use std::os::fd::AsRawFd;

use crate::block::{IoBufs, IoBufsMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use net::MacAddr;
use virtio_bindings::virtio_net;

use super::worker::NetWorker;
use crate::virtio::feature;
use crate::virtio::workers::Workers;
use crate::virtio::{
    ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_NET,
};

const F_MAC: u64 = feature(virtio_net::VIRTIO_NET_F_MAC);
pub(super) const F_MRG_RXBUF: u64 = feature(virtio_net::VIRTIO_NET_F_MRG_RXBUF);
const F_STATUS: u64 = feature(virtio_net::VIRTIO_NET_F_STATUS);
const S_LINK_UP: u16 = virtio_net::VIRTIO_NET_S_LINK_UP as u16;
/// Receive and transmit queue.
const QUEUE_SIZES: [u16; 2] = [256, 256];

/// Where frames go and come from: one frame per call, each after a 12-byte
/// virtio-net header, non-blocking (`WouldBlock` when nothing waits / no room), and
/// an fd that polls readable and writable (a tap, or a SOCK_SEQPACKET socket in tests).
///
/// The buffers are raw iovecs (guest memory, see `guest_io`); the defaults are one
/// `readv`/`writev` on the fd.
pub trait NetBackend: AsRawFd + Send + Sync {
    /// Reads one frame into `bufs`; a longer frame is cut short.
    fn recv(&self, bufs: &IoBufsMut<'_>) -> std::io::Result<usize> {
        let iov = bufs.iovecs();
        let n = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the iovecs come from an IoBufsMut: valid for writes while borrowed.
        let r = unsafe { libc::readv(self.as_raw_fd(), iov.as_ptr(), n) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(r as usize)
    }
    /// Writes one frame gathered from `bufs`.
    fn send(&self, bufs: &IoBufs<'_>) -> std::io::Result<usize> {
        let iov = bufs.iovecs();
        if iov.len() > libc::UIO_MAXIOV as usize {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "frame in more than UIO_MAXIOV pieces",
            ));
        }
        // SAFETY: the iovecs come from an IoBufs: valid for reads while borrowed.
        let r = unsafe { libc::writev(self.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

impl NetBackend for net::Tap {}

/// Opens the backend again (after a migration hand-over that did not complete).
pub type ReopenNet = Box<dyn Fn() -> std::io::Result<Arc<dyn NetBackend>> + Send>;

/// What the user configured for one network device.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub mac: MacAddr,
}

/// Traffic counters served by `vm.counters` (bytes are Ethernet frames, without the
/// virtio-net header).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Host → guest.
    pub rx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    /// Frames from the host the guest did not get: no buffer big enough, or a frame
    /// with offload metadata the guest did not negotiate.
    pub rx_dropped: AtomicU64,
    /// Guest → host.
    pub tx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    /// Frames of the guest the host refused (tap down, malformed buffer).
    pub tx_dropped: AtomicU64,
}

pub struct Net {
    /// None while detached (a migration's hand-over).
    backend: Option<Arc<dyn NetBackend>>,
    reopen: Option<ReopenNet>,
    config: NetConfig,
    acked_features: u64,
    counters: Arc<NetCounters>,
    running: Option<Workers<Vec<ActivatedQueue>>>,
}

impl Net {
    pub fn new(backend: Arc<dyn NetBackend>, config: NetConfig) -> Self {
        Self {
            backend: Some(backend),
            reopen: None,
            config,
            acked_features: 0,
            counters: Arc::new(NetCounters::default()),
            running: None,
        }
    }

    /// How to open the backend again after [`VirtioDevice::detach_storage`].
    pub fn with_reopen(mut self, reopen: ReopenNet) -> Self {
        self.reopen = Some(reopen);
        self
    }

    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    pub fn mac(&self) -> MacAddr {
        self.config.mac
    }

    /// `struct virtio_net_config`: mac, status, max_virtqueue_pairs (1), mtu (unused
    /// without VIRTIO_NET_F_MTU).
    fn config_space(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0..6].copy_from_slice(&self.config.mac.bytes());
        c[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&1500u16.to_le_bytes());
        c
    }

    fn stop_worker(&mut self) -> Vec<ActivatedQueue> {
        self.running
            .take()
            .map(|w| w.stop().into_iter().flatten().collect())
            .unwrap_or_default()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Net {
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
        F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | F_MAC | F_STATUS | F_MRG_RXBUF
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_space();
        for (i, d) in data.iter_mut().enumerate() {
            *d = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        self.stop_worker();
        let setup = |source| ActivateError::Setup {
            device: "net",
            source,
        };
        let backend = self.backend.clone().ok_or(ActivateError::BadConfig {
            device: "net",
            reason: "the tap is detached (handed over to a migration destination)".into(),
        })?;
        let (mut rx, mut tx) = (None, None);
        for q in queues {
            match q.index {
                0 => rx = Some(q),
                1 => tx = Some(q),
                _ => {}
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err(ActivateError::BadConfig {
                device: "net",
                reason: "both the receive and transmit queues must be enabled".into(),
            });
        };
        let mut workers = Workers::new("net")?;
        let worker = NetWorker::new(
            [rx, tx],
            mem,
            interrupt,
            backend,
            self.acked_features & F_MRG_RXBUF != 0,
            self.counters.clone(),
            workers.stop_fd()?,
        )
        .map_err(setup)?;
        workers.spawn("vireo-net".into(), move || worker.run())?;
        self.running = Some(workers);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.acked_features = 0;
    }

    fn pause(&mut self) -> Vec<ActivatedQueue> {
        self.stop_worker()
    }

    /// Closes the tap so the migration destination can attach to it (a single-queue
    /// tap takes one process at a time).
    fn detach_storage(&mut self) -> std::io::Result<()> {
        if self.backend.is_none() {
            return Ok(());
        }
        if self.running.is_some() {
            return Err(std::io::Error::other(
                "pause the network device before detaching it",
            ));
        }
        if self.reopen.is_none() {
            return Err(std::io::Error::other(
                "this network device cannot be reopened",
            ));
        }
        self.backend = None;
        Ok(())
    }

    fn reattach_storage(&mut self) -> std::io::Result<()> {
        if self.backend.is_some() {
            return Ok(());
        }
        let reopen = self
            .reopen
            .as_ref()
            .ok_or_else(|| std::io::Error::other("this network device cannot be reopened"))?;
        self.backend = Some(reopen()?);
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        vec![
            ("rx_bytes", c.rx_bytes.load(Ordering::Relaxed)),
            ("rx_packets", c.rx_packets.load(Ordering::Relaxed)),
            ("rx_dropped", c.rx_dropped.load(Ordering::Relaxed)),
            ("tx_bytes", c.tx_bytes.load(Ordering::Relaxed)),
            ("tx_packets", c.tx_packets.load(Ordering::Relaxed)),
            ("tx_dropped", c.tx_dropped.load(Ordering::Relaxed)),
        ]
    }
}
