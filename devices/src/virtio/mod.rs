//! Virtio: the device trait, the PCI transport, and the devices.
//!
//! Each device lives in its own module with the same split: `device.rs` (what the
//! transport sees: features, config space, activation) and `worker.rs` (the thread that
//! serves its queues).

pub mod balloon;
pub mod block;
pub mod console;
pub mod dirty_bitmap;
pub mod guest_io;
mod kicks;
pub mod mem;
mod memory;
pub mod net;
pub mod rng;
mod transport;
mod workers;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use memory::{GuestMemoryMmap, GuestRegionMmap};
pub use transport::{
    QueueSnapshot, VirtioPciDevice, VirtioPciError, VirtioPciState, VirtioStateError,
    NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER, QUEUE_SELECT_OFFSET, VIRTIO_PCI_BAR_SIZE,
};

use virtio_bindings::{virtio_config, virtio_ids, virtio_ring};

/// Virtio device types (virtio 1.2, section 5), from the Linux UAPI headers.
pub const TYPE_NET: u32 = virtio_ids::VIRTIO_ID_NET;
pub const TYPE_BLOCK: u32 = virtio_ids::VIRTIO_ID_BLOCK;
pub const TYPE_CONSOLE: u32 = virtio_ids::VIRTIO_ID_CONSOLE;
pub const TYPE_RNG: u32 = virtio_ids::VIRTIO_ID_RNG;

/// Device status bits (the device status field is one byte).
pub const STATUS_ACKNOWLEDGE: u8 = virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
pub const STATUS_DRIVER: u8 = virtio_config::VIRTIO_CONFIG_S_DRIVER as u8;
pub const STATUS_DRIVER_OK: u8 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8;
pub const STATUS_FEATURES_OK: u8 = virtio_config::VIRTIO_CONFIG_S_FEATURES_OK as u8;
pub const STATUS_NEEDS_RESET: u8 = virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
pub const STATUS_FAILED: u8 = virtio_config::VIRTIO_CONFIG_S_FAILED as u8;

/// A feature bit number (as the UAPI headers give them) as a mask.
pub(crate) const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// Feature bits common to every device.
pub const F_VERSION_1: u64 = feature(virtio_config::VIRTIO_F_VERSION_1);
pub const F_RING_INDIRECT_DESC: u64 = feature(virtio_ring::VIRTIO_RING_F_INDIRECT_DESC);
pub const F_RING_EVENT_IDX: u64 = feature(virtio_ring::VIRTIO_RING_F_EVENT_IDX);

/// Which interrupt a device raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioInterruptKind {
    Config,
    Queue(u16),
}

/// A device's interrupt line(s), provided by the transport.
pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, kind: VirtioInterruptKind) -> std::io::Result<()>;
}

/// One queue handed to a device at activation.
pub struct ActivatedQueue {
    pub index: u16,
    pub queue: Queue,
    /// Written by the guest's notify (through the bus or an ioeventfd).
    pub kick: EventFd,
}

/// Errors of device activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("cannot start the {device} worker thread: {source}")]
    SpawnWorker {
        device: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{device}: {reason}")]
    BadConfig {
        device: &'static str,
        reason: String,
    },
    #[error("{device}: cannot set up the worker: {source}")]
    Setup {
        device: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    /// Short name for logs and thread names ("block", "rng").
    fn name(&self) -> &'static str;
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (including transport features such as VERSION_1).
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of `features`).
    fn ack_features(&mut self, features: u64);
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues (the driver set DRIVER_OK).
    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError>;
    /// Stops the worker and forgets the queues (the driver wrote status 0).
    fn reset(&mut self);
    /// Stops serving without forgetting: the workers finish the request in hand, stop,
    /// and hand back their queues (with the positions they reached). Activating the
    /// device again with them continues where it stopped (resume, restore).
    fn pause(&mut self) -> Vec<ActivatedQueue>;
    /// Flushes and closes the device's host storage, so another VMM can open it (the
    /// hand-over of a live migration). The device must be paused; until
    /// [`Self::reattach_storage`] its I/O fails.
    fn detach_storage(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Opens the storage again (a migration that did not complete).
    fn reattach_storage(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// The concrete device, for the VMM's device-specific operations (swapping a
    /// block device's backend during a storage migration).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
    /// Named counters for `vm.counters`.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Device state beyond the transport's that a snapshot keeps (e.g. the balloon's
    /// target); none for most devices.
    fn device_state(&self) -> Option<serde_json::Value> {
        None
    }
    /// Takes back what [`Self::device_state`] gave.
    fn restore_device_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
}
