//! virtio-mem as the transport sees it: no features of its own, one request queue,
//! the configuration space (block size, region, plugged and requested sizes), the
//! host's resize and the state snapshots keep.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vireo_util::sync::lock;

use super::blocks::{Blocks, BlocksError};
use super::worker::MemWorker;
use super::CONFIG_LEN;
use crate::virtio::memory::discard;
use crate::virtio::workers::Workers;
use crate::virtio::{
    ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    VirtioInterruptKind, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1,
};

/// virtio device type 24.
pub const TYPE_MEM: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_MEM;
const QUEUE_SIZES: [u16; 1] = [128];

/// The device's region, as the VMM reserved it.
#[derive(Clone, Copy, Debug)]
pub struct VirtioMemConfig {
    /// Guest-physical start of the hotplug region (block-aligned).
    pub addr: u64,
    pub region_size: u64,
    pub block_size: u64,
}

/// What a snapshot keeps: the region, the host's request and the plugged bitmap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemState {
    pub blocks: Blocks,
}

/// What the worker and the device share.
pub(super) struct Shared {
    pub blocks: Mutex<Blocks>,
    pub plug_requests: AtomicU64,
    pub unplug_requests: AtomicU64,
    /// Requests answered NACK or ERROR.
    pub refused_requests: AtomicU64,
    /// Bytes given back to the host (unplugged blocks).
    pub discarded_bytes: AtomicU64,
}

pub struct VirtioMem {
    shared: Arc<Shared>,
    /// Guest memory (holding the hotplug region): unplugged blocks are discarded in it
    /// at restore.
    mem: Arc<GuestMemoryMmap>,
    acked: u64,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    running: Option<Workers<Vec<ActivatedQueue>>>,
}

impl VirtioMem {
    pub fn new(config: VirtioMemConfig, mem: Arc<GuestMemoryMmap>) -> Result<Self, BlocksError> {
        let blocks = Blocks::new(config.addr, config.region_size, config.block_size)?;
        Ok(Self {
            shared: Arc::new(Shared {
                blocks: Mutex::new(blocks),
                plug_requests: AtomicU64::new(0),
                unplug_requests: AtomicU64::new(0),
                refused_requests: AtomicU64::new(0),
                discarded_bytes: AtomicU64::new(0),
            }),
            mem,
            acked: 0,
            interrupt: None,
            running: None,
        })
    }

    /// Asks the guest to have `bytes` of the region plugged and tells it (a
    /// configuration change interrupt). `bytes` is a multiple of the block size within
    /// the region.
    pub fn resize(&mut self, bytes: u64) -> Result<(), BlocksError> {
        lock(&self.shared.blocks).set_requested(bytes)?;
        tracing::info!(requested_size = bytes, "virtio-mem: new requested size");
        if let Some(i) = &self.interrupt {
            if let Err(e) = i.trigger(VirtioInterruptKind::Config) {
                tracing::warn!(error = %e, "virtio-mem: cannot signal the new size");
            }
        }
        Ok(())
    }

    /// (plugged_size, requested_size, region_size, block_size) in bytes.
    pub fn sizes(&self) -> (u64, u64, u64, u64) {
        let b = lock(&self.shared.blocks);
        (
            b.plugged_size(),
            b.requested_size,
            b.region_size,
            b.block_size,
        )
    }

    pub fn save(&self) -> MemState {
        MemState {
            blocks: lock(&self.shared.blocks).clone(),
        }
    }

    /// Takes back a saved state; the unplugged blocks are discarded (a migration's
    /// destination may hold pages of blocks the guest unplugged since they were sent).
    pub fn restore(&mut self, s: &MemState) -> Result<(), BlocksError> {
        let mut b = lock(&self.shared.blocks);
        b.restore(&s.blocks)?;
        for (gpa, len) in b.runs(false) {
            if !discard(&self.mem, gpa, len) {
                tracing::warn!(gpa, len, "virtio-mem: cannot discard an unplugged range");
            }
        }
        Ok(())
    }

    fn stop(&mut self) -> Vec<ActivatedQueue> {
        self.running
            .take()
            .map(Workers::stop)
            .unwrap_or_default()
            .into_iter()
            .flatten()
            .collect()
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let b = lock(&self.shared.blocks);
        let mut s = [0u8; CONFIG_LEN];
        s[0..8].copy_from_slice(&b.block_size.to_le_bytes());
        // 8..10: node_id (0: no ACPI PXM), 10..16: padding.
        s[16..24].copy_from_slice(&b.addr.to_le_bytes());
        s[24..32].copy_from_slice(&b.region_size.to_le_bytes());
        s[32..40].copy_from_slice(&b.usable_region_size().to_le_bytes());
        s[40..48].copy_from_slice(&b.plugged_size().to_le_bytes());
        s[48..56].copy_from_slice(&b.requested_size.to_le_bytes());
        s
    }
}

impl Drop for VirtioMem {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for VirtioMem {
    fn name(&self) -> &'static str {
        "mem"
    }
    fn device_type(&self) -> u32 {
        TYPE_MEM
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        // No VIRTIO_MEM_F_ACPI_PXM (no NUMA node for the region) and no
        // F_UNPLUGGED_INACCESSIBLE: unplugged blocks stay mapped and read zero.
        F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space = self.config_space();
        data.fill(0);
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(src) = space.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        crate::guest_warn!(
            offset,
            len = data.len(),
            "virtio-mem: the configuration space is read-only"
        );
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        self.stop();
        let Some(queue) = queues.into_iter().next() else {
            return Err(ActivateError::BadConfig {
                device: "mem",
                reason: "the request queue was not enabled".into(),
            });
        };
        self.interrupt = Some(interrupt.clone());
        let mut workers = Workers::new("mem")?;
        let worker = MemWorker::new(
            queue,
            mem,
            interrupt,
            self.shared.clone(),
            workers.stop_fd()?,
        )
        .map_err(|source| ActivateError::Setup {
            device: "mem",
            source,
        })?;
        workers.spawn("vireo-mem".into(), move || worker.run())?;
        self.running = Some(workers);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
        self.interrupt = None;
    }

    fn pause(&mut self) -> Vec<ActivatedQueue> {
        self.stop()
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let (plugged, requested, region, block) = self.sizes();
        let s = &self.shared;
        vec![
            ("plugged_bytes", plugged),
            ("requested_bytes", requested),
            ("region_bytes", region),
            ("block_bytes", block),
            ("plug_requests", s.plug_requests.load(Ordering::Relaxed)),
            ("unplug_requests", s.unplug_requests.load(Ordering::Relaxed)),
            (
                "refused_requests",
                s.refused_requests.load(Ordering::Relaxed),
            ),
            ("discarded_bytes", s.discarded_bytes.load(Ordering::Relaxed)),
        ]
    }

    fn device_state(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.save()).ok()
    }

    fn restore_device_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s: MemState =
            serde_json::from_value(state.clone()).map_err(|e| format!("virtio-mem state: {e}"))?;
        self.restore(&s).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    const B: u64 = 2 << 20;
    const BASE: u64 = 0x1_0000_0000;

    fn device() -> VirtioMem {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(BASE), 8 * B as usize),
        ])
        .unwrap();
        VirtioMem::new(
            VirtioMemConfig {
                addr: BASE,
                region_size: 8 * B,
                block_size: B,
            },
            Arc::new(mem),
        )
        .unwrap()
    }

    fn word(d: &VirtioMem, offset: u64) -> u64 {
        let mut w = [0u8; 8];
        d.read_config(offset, &mut w);
        u64::from_le_bytes(w)
    }

    #[test]
    fn the_config_space_describes_the_region() {
        let mut d = device();
        assert_eq!(word(&d, 0), B);
        assert_eq!(word(&d, 16), BASE);
        assert_eq!(word(&d, 24), 8 * B);
        assert_eq!(word(&d, 32), 8 * B);
        assert_eq!(word(&d, 40), 0);
        assert_eq!(word(&d, 48), 0);
        d.resize(4 * B).unwrap();
        assert_eq!(word(&d, 48), 4 * B);
        assert!(d.resize(B / 2).is_err());
        assert!(d.resize(9 * B).is_err());
        // The guest cannot write it; reads past it are zeros.
        d.write_config(48, &0u64.to_le_bytes());
        assert_eq!(word(&d, 48), 4 * B);
        assert_eq!(word(&d, 56), 0);
        assert_eq!(word(&d, u64::MAX), 0);
        assert_eq!(d.device_type(), 24);
        assert_eq!(d.queue_max_sizes().len(), 1);
    }

    #[test]
    fn a_restored_state_is_the_saved_one_and_unplugged_blocks_read_zero() {
        let mut d = device();
        d.resize(4 * B).unwrap();
        lock(&d.shared.blocks).plug(BASE + 2 * B, 2);
        let saved = d.device_state().unwrap();
        let mut e = device();
        e.mem.write_obj(0xabcdu64, GuestAddress(BASE)).unwrap();
        e.mem
            .write_obj(0x1234u64, GuestAddress(BASE + 2 * B))
            .unwrap();
        e.restore_device_state(&saved).unwrap();
        assert_eq!(e.sizes(), (2 * B, 4 * B, 8 * B, B));
        assert_eq!(
            e.mem.read_obj::<u64>(GuestAddress(BASE)).unwrap(),
            0,
            "unplugged"
        );
        assert_eq!(
            e.mem.read_obj::<u64>(GuestAddress(BASE + 2 * B)).unwrap(),
            0x1234,
            "plugged"
        );
        assert!(e
            .restore_device_state(&serde_json::json!({"x": 1}))
            .is_err());
    }
}
