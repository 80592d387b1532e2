//! The virtio-pci modern transport (virtio 1.2, section 4.1): one 64-bit memory BAR
//! holding the common configuration, ISR, device configuration, notification area and
//! the MSI-X table and PBA.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, VirtioInterruptKind,
    F_VERSION_1, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};
use crate::interrupt::MsiSink;
use crate::pci::{
    BarKind, MsixCap, MsixState, MsixTable, PciBar, PciConfiguration, PciDevice, PciHeader,
};

/// BAR 0 layout.
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
/// `queue_select` in the common configuration (virtio 1.2, 4.1.4.3), from the BAR's start.
pub const QUEUE_SELECT_OFFSET: u64 = COMMON_OFFSET + 0x16;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
pub const VIRTIO_PCI_BAR_SIZE: u64 = 0x8000;
const BAR: usize = 0;

const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const NO_VECTOR: u16 = 0xffff;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("cannot create the notify eventfd of queue {queue}: {source}")]
    EventFd {
        queue: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create queue {queue}: {source:?}")]
    Queue {
        queue: usize,
        source: virtio_queue::Error,
    },
}

/// Interrupts of one function: MSI-X vectors chosen by the driver, plus the ISR byte.
struct Interrupts {
    msix: Mutex<MsixTable>,
    sink: Arc<dyn MsiSink>,
    config_vector: Mutex<u16>,
    queue_vectors: Mutex<Vec<u16>>,
    isr: Mutex<u8>,
}

impl VirtioInterrupt for Interrupts {
    fn trigger(&self, kind: VirtioInterruptKind) -> std::io::Result<()> {
        let (vector, isr_bit) = match kind {
            VirtioInterruptKind::Config => (*lock(&self.config_vector), ISR_CONFIG),
            VirtioInterruptKind::Queue(q) => (
                lock(&self.queue_vectors)
                    .get(usize::from(q))
                    .copied()
                    .unwrap_or(NO_VECTOR),
                ISR_QUEUE,
            ),
        };
        *lock(&self.isr) |= isr_bit;
        if vector == NO_VECTOR {
            return Ok(());
        }
        lock(&self.msix).signal(vector, self.sink.as_ref())
    }
}

/// One queue in a snapshot: what the driver programmed and where the device stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio-pci function in a snapshot: PCI configuration space, transport registers,
/// MSI-X, and each queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub device_type: u32,
    pub pci_registers: Vec<u32>,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    pub status: u8,
    pub config_generation: u8,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
    pub isr: u8,
    pub msix: MsixState,
    pub queues: Vec<QueueSnapshot>,
    pub activated: bool,
    /// The device's own state (e.g. the balloon's target), where it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<serde_json::Value>,
}

/// Why a saved function does not fit this one.
#[derive(Debug, thiserror::Error)]
pub enum VirtioStateError {
    #[error("{device}: snapshot state is for virtio device type {found}, this is type {expected}")]
    DeviceType {
        device: &'static str,
        found: u32,
        expected: u32,
    },
    #[error("{device}: {reason}")]
    Mismatch {
        device: &'static str,
        reason: String,
    },
    #[error("{device}: snapshot taken while the device was running (pause it first)")]
    NotPaused { device: &'static str },
}

/// Per-queue registers the driver programs before enabling a queue.
struct QueueSlot {
    queue: Queue,
    kick: EventFd,
    enabled: bool,
}

/// A virtio device behind the PCI transport.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    msix_cap_offset: usize,
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemoryMmap>,
    interrupts: Arc<Interrupts>,
    queues: Vec<QueueSlot>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    status: u8,
    config_generation: u8,
    activated: bool,
    /// Queues handed back by a paused device (activated again on resume).
    paused: Option<Vec<ActivatedQueue>>,
}

impl VirtioPciDevice {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemoryMmap>,
        msi: Arc<dyn MsiSink>,
    ) -> Result<Self, VirtioPciError> {
        let num_queues = device.queue_max_sizes().len();
        // One vector per queue plus one for configuration changes.
        let vectors = (num_queues + 1) as u16;
        let mut queues = Vec::with_capacity(num_queues);
        for (i, &max) in device.queue_max_sizes().iter().enumerate() {
            let queue =
                Queue::new(max).map_err(|source| VirtioPciError::Queue { queue: i, source })?;
            let kick = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|source| VirtioPciError::EventFd { queue: i, source })?;
            queues.push(QueueSlot {
                queue,
                kick,
                enabled: false,
            });
        }

        let dtype = device.device_type();
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR,
            device_id: VIRTIO_PCI_DEVICE_BASE + dtype as u16,
            class_code: class_of(dtype),
            subclass: 0x00,
            prog_if: 0,
            revision: 1,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR,
            subsystem_id: 0x40,
        });
        config.add_bar(PciBar {
            index: BAR,
            kind: BarKind::Memory64,
            size: VIRTIO_PCI_BAR_SIZE,
            prefetchable: false,
        });
        for (cfg_type, offset, len) in [
            (CFG_COMMON, COMMON_OFFSET, COMMON_LEN),
            (CFG_ISR, ISR_OFFSET, 1),
            (CFG_DEVICE, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN),
        ] {
            config.add_capability(&virtio_cap(cfg_type, offset, len, None), &[]);
        }
        config.add_capability(
            &virtio_cap(
                CFG_NOTIFY,
                NOTIFY_OFFSET,
                u64::from(NOTIFY_OFF_MULTIPLIER) * num_queues as u64,
                Some(NOTIFY_OFF_MULTIPLIER),
            ),
            &[],
        );
        let (body, writable) = MsixCap::build(
            vectors,
            BAR as u8,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_cap_offset = config.add_capability(&body, &writable);

        Ok(Self {
            config,
            msix_cap_offset,
            device,
            mem,
            interrupts: Arc::new(Interrupts {
                msix: Mutex::new(MsixTable::new(vectors)),
                sink: msi,
                config_vector: Mutex::new(NO_VECTOR),
                queue_vectors: Mutex::new(vec![NO_VECTOR; num_queues]),
                isr: Mutex::new(0),
            }),
            queues,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            paused: None,
        })
    }

    /// The eventfds the guest's notifications write, with their offsets in BAR 0
    /// (the VMM registers them as ioeventfds so notifications do not exit to user space).
    pub fn notify_eventfds(&self) -> Vec<(u64, &EventFd)> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                (
                    NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                    &q.kick,
                )
            })
            .collect()
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Stops the device's workers, keeping their queues (VM pause, snapshot). True if
    /// this call stopped them (false: not activated, or already paused).
    pub fn pause(&mut self) -> bool {
        if self.activated && self.paused.is_none() {
            self.paused = Some(self.device.pause());
            return true;
        }
        false
    }

    /// Starts the device again where [`Self::pause`] stopped it.
    pub fn resume(&mut self) {
        let Some(queues) = self.paused.take() else {
            return;
        };
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupts.clone();
        if let Err(e) = self.device.activate(self.mem.clone(), interrupt, queues) {
            tracing::error!(device = self.device.name(), error = %e, "resume failed");
            self.status |= STATUS_NEEDS_RESET;
        }
    }

    /// See [`VirtioDevice::detach_storage`].
    pub fn detach_storage(&mut self) -> std::io::Result<()> {
        self.device.detach_storage()
    }

    pub fn reattach_storage(&mut self) -> std::io::Result<()> {
        self.device.reattach_storage()
    }

    /// The function's whole state; an activated device must be paused first.
    pub fn state(&self) -> Result<VirtioPciState, VirtioStateError> {
        let device = self.device.name();
        if self.activated && self.paused.is_none() {
            return Err(VirtioStateError::NotPaused { device });
        }
        let paused = self.paused.as_deref().unwrap_or(&[]);
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                // A running queue's position lives in the worker's copy.
                let live = paused.iter().find(|q| usize::from(q.index) == i);
                let mut q = QueueSnapshot::from(match live {
                    Some(q) => q.queue.state(),
                    None => slot.queue.state(),
                });
                q.ready = slot.enabled;
                q
            })
            .collect();
        Ok(VirtioPciState {
            device_type: self.device.device_type(),
            pci_registers: self.config.registers(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            status: self.status,
            config_generation: self.config_generation,
            config_vector: *lock(&self.interrupts.config_vector),
            queue_vectors: lock(&self.interrupts.queue_vectors).clone(),
            isr: *lock(&self.interrupts.isr),
            msix: lock(&self.interrupts.msix).state(),
            queues,
            activated: self.activated,
            device: self.device.device_state(),
        })
    }

    /// Takes a saved state (a freshly created function of the same device); an activated
    /// device starts serving its queues from where they were.
    pub fn restore(&mut self, s: &VirtioPciState) -> Result<(), VirtioStateError> {
        let device = self.device.name();
        let mismatch = |reason: String| VirtioStateError::Mismatch { device, reason };
        if s.device_type != self.device.device_type() {
            return Err(VirtioStateError::DeviceType {
                device,
                found: s.device_type,
                expected: self.device.device_type(),
            });
        }
        if s.queues.len() != self.queues.len() || s.queue_vectors.len() != self.queues.len() {
            return Err(mismatch(format!(
                "{} queues in the snapshot, {} here",
                s.queues.len(),
                self.queues.len()
            )));
        }
        if s.driver_features & !self.device.features() != 0 {
            return Err(mismatch(format!(
                "driver features {:#x} include some this device does not offer ({:#x})",
                s.driver_features,
                self.device.features()
            )));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, q) in s.queues.iter().enumerate() {
            let queue = Queue::try_from(QueueState::from(*q))
                .map_err(|e| mismatch(format!("queue {i}: {e:?}")))?;
            queues.push(queue);
        }
        self.config
            .restore_registers(&s.pci_registers)
            .map_err(mismatch)?;
        lock(&self.interrupts.msix)
            .restore(&s.msix)
            .map_err(mismatch)?;
        for (slot, (queue, saved)) in self
            .queues
            .iter_mut()
            .zip(queues.into_iter().zip(&s.queues))
        {
            slot.queue = queue;
            slot.enabled = saved.ready;
        }
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.queue_select = s.queue_select;
        self.status = s.status;
        self.config_generation = s.config_generation;
        *lock(&self.interrupts.config_vector) = s.config_vector;
        lock(&self.interrupts.queue_vectors).clone_from(&s.queue_vectors);
        *lock(&self.interrupts.isr) = s.isr;
        if s.status & STATUS_FEATURES_OK != 0 {
            self.device.ack_features(s.driver_features);
        }
        if let Some(state) = &s.device {
            self.device.restore_device_state(state).map_err(mismatch)?;
        }
        if s.activated {
            self.activate();
            if !self.activated {
                return Err(mismatch("the saved queues cannot be activated".into()));
            }
        }
        Ok(())
    }

    fn selected(&mut self) -> Option<&mut QueueSlot> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let qsel = usize::from(self.queue_select);
        let value: u64 = match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(*lock(&self.interrupts.config_vector)),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => self
                .queues
                .get(qsel)
                .map_or(0, |q| u64::from(q.queue.size())),
            0x1a => lock(&self.interrupts.queue_vectors)
                .get(qsel)
                .map_or(u64::from(NO_VECTOR), |v| u64::from(*v)),
            0x1c => self.queues.get(qsel).map_or(0, |q| u64::from(q.enabled)),
            0x1e => qsel as u64,
            0x20 => self.queues.get(qsel).map_or(0, |q| q.queue.desc_table()),
            0x24 => self
                .queues
                .get(qsel)
                .map_or(0, |q| q.queue.desc_table() >> 32),
            0x28 => self.queues.get(qsel).map_or(0, |q| q.queue.avail_ring()),
            0x2c => self
                .queues
                .get(qsel)
                .map_or(0, |q| q.queue.avail_ring() >> 32),
            0x30 => self.queues.get(qsel).map_or(0, |q| q.queue.used_ring()),
            0x34 => self
                .queues
                .get(qsel)
                .map_or(0, |q| q.queue.used_ring() >> 32),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(bytes);
        let v32 = v as u32;
        let v16 = v as u16;
        match offset {
            0x00 => self.device_feature_select = v32,
            0x08 => self.driver_feature_select = v32,
            0x0c => {
                if self.status & STATUS_FEATURES_OK != 0 {
                    return; // Features are frozen once accepted.
                }
                let offered = self.device.features();
                match self.driver_feature_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | (u64::from(v32) & offered)
                    }
                    1 => {
                        self.driver_features = (self.driver_features & 0xffff_ffff)
                            | ((u64::from(v32) << 32) & offered)
                    }
                    _ => {}
                }
            }
            0x10 => *lock(&self.interrupts.config_vector) = v16,
            0x14 => self.write_status(v as u8),
            0x16 => self.queue_select = v16,
            0x18 => {
                if let Some(q) = self.selected() {
                    q.queue.set_size(v16);
                }
            }
            0x1a => {
                let qsel = usize::from(self.queue_select);
                if let Some(slot) = lock(&self.interrupts.queue_vectors).get_mut(qsel) {
                    *slot = v16;
                }
            }
            0x1c => {
                if let Some(q) = self.selected() {
                    q.enabled = v16 == 1;
                    q.queue.set_ready(q.enabled);
                }
            }
            0x20 => self.with_queue(|q| q.set_desc_table_address(Some(v32), None)),
            0x24 => self.with_queue(|q| q.set_desc_table_address(None, Some(v32))),
            0x28 => self.with_queue(|q| q.set_avail_ring_address(Some(v32), None)),
            0x2c => self.with_queue(|q| q.set_avail_ring_address(None, Some(v32))),
            0x30 => self.with_queue(|q| q.set_used_ring_address(Some(v32), None)),
            0x34 => self.with_queue(|q| q.set_used_ring_address(None, Some(v32))),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if self.activated {
            return;
        }
        if let Some(q) = self.selected() {
            f(&mut q.queue);
        }
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            // Stops the workers and flushes: on the activation thread, not the vCPU's.
            if crate::threads::run_activation(|| self.reset()).is_none() {
                self.status |= STATUS_NEEDS_RESET;
            }
            return;
        }
        if status & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            if self.driver_features & F_VERSION_1 == 0 {
                // A legacy driver: refuse FEATURES_OK so it sees the failure.
                crate::guest_warn!(
                    device = self.device.name(),
                    "driver did not accept VERSION_1"
                );
                self.status = status & !STATUS_FEATURES_OK;
                return;
            }
            self.device.ack_features(self.driver_features);
        }
        self.status = status;
        if status & STATUS_DRIVER_OK != 0 && !self.activated {
            // Starts the workers: on the activation thread, not the vCPU's.
            if crate::threads::run_activation(|| self.activate()).is_none() {
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn activate(&mut self) {
        let mut activated = Vec::new();
        for (i, slot) in self.queues.iter_mut().enumerate() {
            if !slot.enabled {
                continue;
            }
            if !slot.queue.is_valid(self.mem.as_ref()) {
                crate::guest_warn!(
                    device = self.device.name(),
                    queue = i,
                    "queue set up outside guest memory"
                );
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
            let kick = match slot.kick.try_clone() {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!(error = %e, "cannot clone the notify eventfd");
                    self.status |= STATUS_FAILED;
                    return;
                }
            };
            let mut queue = match Queue::try_from(slot.queue.state()) {
                Ok(q) => q,
                Err(e) => {
                    crate::guest_warn!(device = self.device.name(), queue = i, error = ?e, "invalid queue");
                    self.status |= STATUS_NEEDS_RESET;
                    return;
                }
            };
            queue.set_event_idx(self.driver_features & super::F_RING_EVENT_IDX != 0);
            activated.push(ActivatedQueue {
                index: i as u16,
                queue,
                kick,
            });
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupts.clone();
        match self.device.activate(self.mem.clone(), interrupt, activated) {
            Ok(()) => {
                self.activated = true;
                tracing::debug!(device = self.device.name(), "activated");
            }
            Err(e) => {
                tracing::error!(device = self.device.name(), error = %e, "activation failed");
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.paused = None;
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.queue.reset();
            q.enabled = false;
        }
        *lock(&self.interrupts.config_vector) = NO_VECTOR;
        for v in lock(&self.interrupts.queue_vectors).iter_mut() {
            *v = NO_VECTOR;
        }
    }

    fn sync_msix_control(&mut self) {
        let reg = self.config.read_reg(self.msix_cap_offset / 4);
        let (enabled, masked) = MsixCap::control(reg);
        lock(&self.interrupts.msix).set_control(enabled, masked, self.interrupts.sink.as_ref());
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
        if reg == self.msix_cap_offset / 4 {
            self.sync_msix_control();
        }
    }

    fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.read_common(o - COMMON_OFFSET, data),
            ISR_OFFSET => {
                // Reading the ISR acknowledges it.
                let mut isr = lock(&self.interrupts.isr);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = *isr;
                }
                *isr = 0;
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.interrupts.msix).read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..VIRTIO_PCI_BAR_SIZE).contains(&o) => {
                lock(&self.interrupts.msix).read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn write_bar(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.write_common(o - COMMON_OFFSET, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // Without an ioeventfd the notification arrives here.
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                if let Some(slot) = self.queues.get(q) {
                    let _ = slot.kick.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                let sink = self.interrupts.sink.clone();
                lock(&self.interrupts.msix).write_table(o - MSIX_TABLE_OFFSET, data, sink.as_ref())
            }
            _ => {}
        }
    }
}

use vireo_util::sync::lock;

/// PCI class of each virtio device type (what `lspci` shows).
fn class_of(device_type: u32) -> u8 {
    match device_type {
        super::TYPE_NET => 0x02,
        super::TYPE_BLOCK => 0x01,
        super::TYPE_CONSOLE => 0x07,
        // Memory controller, "other".
        super::balloon::TYPE_BALLOON => 0x05,
        _ => 0xff,
    }
}

/// `struct virtio_pci_cap` (and `virtio_pci_notify_cap` when `multiplier` is given).
fn virtio_cap(cfg_type: u8, offset: u64, len: u64, multiplier: Option<u32>) -> Vec<u8> {
    let cap_len: u8 = if multiplier.is_some() { 20 } else { 16 };
    let mut b = vec![CAP_VENDOR, 0, cap_len, cfg_type, BAR as u8, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(len as u32).to_le_bytes());
    if let Some(m) = multiplier {
        b.extend_from_slice(&m.to_le_bytes());
    }
    b
}
