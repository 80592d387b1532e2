//! The virtio-blk device as the transport sees it: features, configuration space,
//! activation of its worker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::on_error::{ErrorPolicy, StopSink};
use super::worker::{BlockWorker, Throttle};
use crate::block::{BlockBackend, IoBufs, IoBufsMut};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use crate::virtio::workers::Workers;
use virtio_bindings::virtio_blk;

use crate::virtio::feature;
use crate::virtio::{
    ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_BLOCK,
};

const F_SEG_MAX: u64 = feature(virtio_blk::VIRTIO_BLK_F_SEG_MAX);
const F_RO: u64 = feature(virtio_blk::VIRTIO_BLK_F_RO);
const F_BLK_SIZE: u64 = feature(virtio_blk::VIRTIO_BLK_F_BLK_SIZE);
const F_FLUSH: u64 = feature(virtio_blk::VIRTIO_BLK_F_FLUSH);
const F_TOPOLOGY: u64 = feature(virtio_blk::VIRTIO_BLK_F_TOPOLOGY);
const F_MQ: u64 = feature(virtio_blk::VIRTIO_BLK_F_MQ);
const F_DISCARD: u64 = feature(virtio_blk::VIRTIO_BLK_F_DISCARD);
const F_WRITE_ZEROES: u64 = feature(virtio_blk::VIRTIO_BLK_F_WRITE_ZEROES);

pub(super) const SECTOR_SHIFT: u32 = 9;
pub(super) const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Descriptors per request we accept (the config's seg_max + header + status).
pub(super) const SEG_MAX: u32 = 254;
const QUEUE_SIZE: u16 = 256;
/// Largest discard / write-zeroes in one request, in sectors (1 GiB).
pub(super) const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// What the user configured for one disk.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    pub read_only: bool,
    /// The serial number the guest reads with GET_ID (up to 20 bytes).
    pub serial: String,
    pub num_queues: u16,
    /// IOPS and bandwidth limits of the whole disk (all queues together).
    pub rate_limiter: RateLimiterConfig,
    /// How long a queue's worker keeps watching the ring for new requests after
    /// it ran dry, before it sleeps (0: sleep at once).
    pub poll_us: u32,
    /// What a host I/O error does (see `on_error.rs`).
    pub on_error: ErrorPolicy,
    /// Where the disk asks for the VM to pause (no sink: errors are reported).
    pub stop_sink: Option<StopSink>,
}

/// I/O counters served by `vm.counters`.
#[derive(Debug, Default)]
pub struct BlockCounters {
    pub read_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_ops: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flush_ops: AtomicU64,
    pub discard_ops: AtomicU64,
    pub write_zeroes_ops: AtomicU64,
    pub errors: AtomicU64,
    /// Times polling found new requests before the worker went to sleep.
    pub polled: AtomicU64,
    /// Times a guest notification woke a sleeping worker (polling makes these rare).
    pub wakeups: AtomicU64,
    /// Guest notifications (queue kicks, each an exit to the host), as counted by the
    /// ioeventfd; read when the worker wakes, so the last ones may not show yet.
    pub notifications: AtomicU64,
    /// Times a request had to wait for the rate limiter.
    pub throttled: AtomicU64,
    /// Times the worker found requests on its ring after it slept without a kick (a
    /// driver that read a held-off `avail_event`: see the worker's recheck).
    pub missed_kicks: AtomicU64,
    /// Nanoseconds the workers spent executing requests (the backend's I/O and the
    /// copies to and from guest memory), summed over every request.
    pub execute_ns: AtomicU64,
    /// Nanoseconds from taking each request off the available ring to returning it in
    /// the used ring (parsing, executing, the status byte), summed: with `execute_ns`
    /// and the guest's own latency it splits a request's cost into stages.
    pub service_ns: AtomicU64,
}

/// Opens a disk's image again (after a detach).
pub type Reopen = Box<dyn Fn() -> std::io::Result<Arc<dyn BlockBackend>> + Send>;

/// The backend of a detached disk: same geometry, every I/O fails.
struct Detached {
    size: u64,
    logical: u32,
    physical: u32,
}

impl BlockBackend for Detached {
    fn size(&self) -> u64 {
        self.size
    }
    fn logical_block_size(&self) -> u32 {
        self.logical
    }
    fn physical_block_size(&self) -> u32 {
        self.physical
    }
    fn read_vectored_at(&self, _: &IoBufsMut<'_>, _: u64) -> std::io::Result<()> {
        Err(detached())
    }
    fn write_vectored_at(&self, _: &IoBufs<'_>, _: u64) -> std::io::Result<()> {
        Err(detached())
    }
    fn flush(&self) -> std::io::Result<()> {
        Err(detached())
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Err(detached())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> std::io::Result<()> {
        Err(detached())
    }
}

fn detached() -> std::io::Error {
    std::io::Error::other("the disk is detached (handed over to a migration destination)")
}

pub struct Block {
    backend: Arc<dyn BlockBackend>,
    reopen: Option<Reopen>,
    detached: bool,
    config: BlockConfig,
    queue_sizes: Vec<u16>,
    acked_features: u64,
    counters: Arc<BlockCounters>,
    limiter: Option<Arc<RateLimiter>>,
    running: Option<Workers<ActivatedQueue>>,
    config_space: Vec<u8>,
}

impl Block {
    pub fn new(backend: Arc<dyn BlockBackend>, config: BlockConfig) -> Self {
        let num_queues = config.num_queues.max(1);
        let config_space = build_config_space(backend.as_ref(), num_queues);
        Self {
            backend,
            reopen: None,
            detached: false,
            queue_sizes: vec![QUEUE_SIZE; usize::from(num_queues)],
            limiter: RateLimiter::new(&config.rate_limiter).map(Arc::new),
            config,
            acked_features: 0,
            counters: Arc::new(BlockCounters::default()),
            running: None,
            config_space,
        }
    }

    /// The disk's backend now.
    pub fn backend(&self) -> Arc<dyn BlockBackend> {
        self.backend.clone()
    }

    /// Puts another backend under the device (same size; the device must be paused, so
    /// no worker holds the old one) and, if given, how to reopen it; returns the old.
    pub fn replace_backend(
        &mut self,
        backend: Arc<dyn BlockBackend>,
        reopen: Option<Reopen>,
    ) -> std::io::Result<Arc<dyn BlockBackend>> {
        if self.running.is_some() {
            return Err(std::io::Error::other(
                "pause the disk before replacing its image",
            ));
        }
        if backend.size() != self.backend.size() {
            return Err(std::io::Error::other("the new image has another size"));
        }
        if let Some(r) = reopen {
            self.reopen = Some(r);
        }
        Ok(std::mem::replace(&mut self.backend, backend))
    }

    /// How to open the image again after [`VirtioDevice::detach_storage`].
    pub fn with_reopen(mut self, reopen: Reopen) -> Self {
        self.reopen = Some(reopen);
        self
    }

    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// Stops the workers; returns their queues.
    fn stop_workers(&mut self) -> Vec<ActivatedQueue> {
        self.running.take().map(Workers::stop).unwrap_or_default()
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_workers();
        // What the guest wrote reaches the disk even if it never flushed, as when
        // QEMU closes an image.
        if !self.detached {
            if let Err(e) = self.backend.flush() {
                tracing::warn!(error = %e, "flushing the disk on close failed");
            }
        }
    }
}

/// `struct virtio_blk_config` (little endian).
fn build_config_space(backend: &dyn BlockBackend, num_queues: u16) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    let capacity = backend.size() >> SECTOR_SHIFT;
    c[0..8].copy_from_slice(&capacity.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    let lbs = backend.logical_block_size().max(512);
    c[20..24].copy_from_slice(&lbs.to_le_bytes());
    let pbs = backend.physical_block_size().max(lbs);
    c[24] = (pbs / lbs).trailing_zeros() as u8; // physical_block_exp
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
    c[44..48].copy_from_slice(&(lbs >> SECTOR_SHIFT).to_le_bytes()); // discard alignment
    c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn name(&self) -> &'static str {
        "block"
    }

    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = F_VERSION_1
            | F_RING_INDIRECT_DESC
            | F_RING_EVENT_IDX
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_TOPOLOGY
            | F_FLUSH
            | F_DISCARD
            | F_WRITE_ZEROES;
        if self.queue_sizes.len() > 1 {
            f |= F_MQ;
        }
        if self.config.read_only {
            f |= F_RO;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self
                .config_space
                .get(offset as usize + i)
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        self.stop_workers();
        let mut workers = Workers::new("block")?;
        let setup = |source| ActivateError::Setup {
            device: "block",
            source,
        };
        for q in queues {
            let throttle = match &self.limiter {
                Some(l) => Some(Throttle::new(l.clone()).map_err(setup)?),
                None => None,
            };
            let worker = BlockWorker::new(
                q,
                mem.clone(),
                interrupt.clone(),
                self.backend.clone(),
                self.config.clone(),
                self.counters.clone(),
                throttle,
                workers.stop_fd()?,
            )
            .map_err(setup)?;
            let name = format!("vireo-blk-q{}", worker.queue_index());
            workers.spawn(name, move || worker.run())?;
        }
        self.running = Some(workers);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_workers();
        self.acked_features = 0;
    }

    fn pause(&mut self) -> Vec<ActivatedQueue> {
        self.stop_workers()
    }

    fn detach_storage(&mut self) -> std::io::Result<()> {
        if self.detached {
            return Ok(());
        }
        if self.running.is_some() {
            return Err(std::io::Error::other("pause the disk before detaching it"));
        }
        if self.reopen.is_none() {
            return Err(std::io::Error::other("this disk cannot be reopened"));
        }
        self.backend.flush()?;
        let placeholder = Arc::new(Detached {
            size: self.backend.size(),
            logical: self.backend.logical_block_size(),
            physical: self.backend.physical_block_size(),
        });
        // Dropping the last reference closes the image and releases its lock.
        self.backend = placeholder;
        self.detached = true;
        Ok(())
    }

    fn reattach_storage(&mut self) -> std::io::Result<()> {
        if !self.detached {
            return Ok(());
        }
        let reopen = self
            .reopen
            .as_ref()
            .ok_or_else(|| std::io::Error::other("this disk cannot be reopened"))?;
        let backend = reopen()?;
        if backend.size() != self.backend.size() {
            return Err(std::io::Error::other(format!(
                "the image changed size while detached ({} -> {} bytes)",
                self.backend.size(),
                backend.size()
            )));
        }
        self.backend = backend;
        self.detached = false;
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        vec![
            ("read_ops", c.read_ops.load(Ordering::Relaxed)),
            ("read_bytes", c.read_bytes.load(Ordering::Relaxed)),
            ("write_ops", c.write_ops.load(Ordering::Relaxed)),
            ("write_bytes", c.write_bytes.load(Ordering::Relaxed)),
            ("flush_ops", c.flush_ops.load(Ordering::Relaxed)),
            ("discard_ops", c.discard_ops.load(Ordering::Relaxed)),
            (
                "write_zeroes_ops",
                c.write_zeroes_ops.load(Ordering::Relaxed),
            ),
            ("errors", c.errors.load(Ordering::Relaxed)),
            ("throttled", c.throttled.load(Ordering::Relaxed)),
            ("polled", c.polled.load(Ordering::Relaxed)),
            ("wakeups", c.wakeups.load(Ordering::Relaxed)),
            ("notifications", c.notifications.load(Ordering::Relaxed)),
            ("missed_kicks", c.missed_kicks.load(Ordering::Relaxed)),
            ("execute_ns", c.execute_ns.load(Ordering::Relaxed)),
            ("service_ns", c.service_ns.load(Ordering::Relaxed)),
        ]
    }
}
