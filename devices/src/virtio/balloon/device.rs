//! The balloon as the transport sees it: features, the configuration space (the host's
//! target `num_pages`, the guest's `actual`), queues by role, resize requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vireo_util::sync::lock;

use super::worker::{BalloonWorker, Queues};
use super::{F_DEFLATE_ON_OOM, F_MUST_TELL_HOST, F_REPORTING, F_STATS_VQ, PAGE_SHIFT, STAT_NAMES};
use crate::virtio::workers::Workers;
use crate::virtio::{
    ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    VirtioInterruptKind, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1,
};

/// virtio device type 5.
pub const TYPE_BALLOON: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
/// inflateq, deflateq, statsq, reporting_vq (the queues of the features offered).
const QUEUE_SIZES: [u16; 4] = [256, 256, 256, 256];

/// What the VM configuration asks of the balloon.
#[derive(Clone, Copy, Debug, Default)]
pub struct BalloonConfig {
    /// The target at start, in bytes.
    pub size: u64,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take pages back when it
    /// runs out of memory.
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_REPORTING: the guest reports free pages, which go back
    /// to the host.
    pub free_page_reporting: bool,
    /// Seconds between statistics requests (0: no statistics queue).
    pub stats_interval_s: u32,
}

/// The guest's last statistics, by tag (`STAT_NAMES`); None until it sent some.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    pub values: Vec<(u16, u64)>,
}

/// What a snapshot keeps: the host's target and the guest's reported size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    pub num_pages: u32,
    pub actual: u32,
}

/// Counters the worker and the device share.
#[derive(Default)]
pub(super) struct Shared {
    pub inflated_pages: AtomicU64,
    pub deflated_pages: AtomicU64,
    pub reported_bytes: AtomicU64,
    /// Pages the guest named that are not guest RAM, or that madvise refused.
    pub refused_pages: AtomicU64,
    pub stats: Mutex<BalloonStats>,
}

pub struct Balloon {
    config: BalloonConfig,
    /// Host's target, in 4 KiB pages.
    num_pages: u32,
    /// Guest's count of pages in the balloon (it writes this field).
    actual: u32,
    acked: u64,
    shared: Arc<Shared>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    running: Option<Workers<Vec<ActivatedQueue>>>,
}

impl Balloon {
    pub fn new(config: BalloonConfig) -> Self {
        Self {
            config,
            num_pages: pages(config.size),
            actual: 0,
            acked: 0,
            shared: Arc::new(Shared::default()),
            interrupt: None,
            running: None,
        }
    }

    /// Asks the guest for a balloon of `bytes` (the guest inflates or deflates to it).
    pub fn resize(&mut self, bytes: u64) {
        self.num_pages = pages(bytes);
        if let Some(i) = &self.interrupt {
            if let Err(e) = i.trigger(VirtioInterruptKind::Config) {
                tracing::warn!(error = %e, "balloon: cannot signal the new target");
            }
        }
    }

    /// The target and what the guest reports, in bytes.
    pub fn sizes(&self) -> (u64, u64) {
        (
            u64::from(self.num_pages) << PAGE_SHIFT,
            u64::from(self.actual) << PAGE_SHIFT,
        )
    }

    pub fn stats(&self) -> BalloonStats {
        lock(&self.shared.stats).clone()
    }

    pub fn save(&self) -> BalloonState {
        BalloonState {
            num_pages: self.num_pages,
            actual: self.actual,
        }
    }

    pub fn restore(&mut self, s: BalloonState) {
        self.num_pages = s.num_pages;
        self.actual = s.actual;
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
}

/// Bytes to 4 KiB pages, saturating at the 32-bit field's limit.
fn pages(bytes: u64) -> u32 {
    u32::try_from(bytes >> PAGE_SHIFT).unwrap_or(u32::MAX)
}

impl Drop for Balloon {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for Balloon {
    fn name(&self) -> &'static str {
        "balloon"
    }
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }
    fn queue_max_sizes(&self) -> &[u16] {
        let n = 2
            + usize::from(self.config.stats_interval_s > 0)
            + usize::from(self.config.free_page_reporting);
        &QUEUE_SIZES[..n]
    }
    fn features(&self) -> u64 {
        let mut f = F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | F_MUST_TELL_HOST;
        if self.config.stats_interval_s > 0 {
            f |= F_STATS_VQ;
        }
        if self.config.deflate_on_oom {
            f |= F_DEFLATE_ON_OOM;
        }
        if self.config.free_page_reporting {
            f |= F_REPORTING;
        }
        f
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; 16];
        space[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        space[4..8].copy_from_slice(&self.actual.to_le_bytes());
        data.fill(0);
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(src) = space.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4, 4 bytes) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            let mut b = [0u8; 4];
            b.copy_from_slice(data);
            self.actual = u32::from_le_bytes(b);
            tracing::debug!(
                actual = self.actual,
                target = self.num_pages,
                "balloon size"
            );
        } else {
            crate::guest_warn!(
                offset,
                len = data.len(),
                "balloon: write to a read-only config field"
            );
        }
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        self.stop();
        let roles =
            Queues::by_role(queues, self.acked).map_err(|reason| ActivateError::BadConfig {
                device: "balloon",
                reason,
            })?;
        self.interrupt = Some(interrupt.clone());
        let mut workers = Workers::new("balloon")?;
        let worker = BalloonWorker::new(
            roles,
            mem,
            interrupt,
            self.shared.clone(),
            self.config.stats_interval_s,
            workers.stop_fd()?,
        )
        .map_err(|source| ActivateError::Setup {
            device: "balloon",
            source,
        })?;
        workers.spawn("vireo-balloon".into(), move || worker.run())?;
        self.running = Some(workers);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
        self.actual = 0;
        self.interrupt = None;
    }

    fn pause(&mut self) -> Vec<ActivatedQueue> {
        self.stop()
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let (target, actual) = self.sizes();
        let s = &self.shared;
        let mut v = vec![
            ("target_bytes", target),
            ("actual_bytes", actual),
            ("inflated_pages", s.inflated_pages.load(Ordering::Relaxed)),
            ("deflated_pages", s.deflated_pages.load(Ordering::Relaxed)),
            ("reported_bytes", s.reported_bytes.load(Ordering::Relaxed)),
            ("refused_pages", s.refused_pages.load(Ordering::Relaxed)),
        ];
        for &(tag, value) in &lock(&s.stats).values {
            if let Some(name) = STAT_NAMES.get(usize::from(tag)) {
                v.push((name, value));
            }
        }
        v
    }

    fn device_state(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.save()).ok()
    }

    fn restore_device_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s: BalloonState =
            serde_json::from_value(state.clone()).map_err(|e| format!("balloon state: {e}"))?;
        self.restore(s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balloon(stats: u32, reporting: bool) -> Balloon {
        Balloon::new(BalloonConfig {
            size: 8 << 20,
            deflate_on_oom: true,
            free_page_reporting: reporting,
            stats_interval_s: stats,
        })
    }

    #[test]
    fn the_config_space_holds_the_target_and_the_guests_actual_size() {
        let mut b = balloon(1, true);
        let mut word = [0u8; 4];
        b.read_config(0, &mut word);
        assert_eq!(u32::from_le_bytes(word), 2048, "8 MiB in 4 KiB pages");
        b.write_config(4, &100u32.to_le_bytes());
        b.read_config(4, &mut word);
        assert_eq!(u32::from_le_bytes(word), 100);
        // The target is the host's: a guest write there changes nothing.
        b.write_config(0, &7u32.to_le_bytes());
        b.read_config(0, &mut word);
        assert_eq!(u32::from_le_bytes(word), 2048);
        // Reads past the fields are zeros, never a panic.
        let mut far = [0xffu8; 8];
        b.read_config(u64::MAX, &mut far);
        assert_eq!(far, [0; 8]);
        b.resize(1 << 30);
        assert_eq!(b.sizes(), (1 << 30, 100 << 12));
        assert_eq!(
            b.save(),
            BalloonState {
                num_pages: 262144,
                actual: 100
            }
        );
    }

    #[test]
    fn queues_and_features_follow_the_configuration() {
        assert_eq!(balloon(1, true).queue_max_sizes().len(), 4);
        assert_eq!(balloon(0, true).queue_max_sizes().len(), 3);
        assert_eq!(balloon(0, false).queue_max_sizes().len(), 2);
        let f = balloon(0, false).features();
        assert_eq!(f & (F_STATS_VQ | F_REPORTING), 0);
        assert_ne!(f & F_DEFLATE_ON_OOM, 0);
    }

    #[test]
    fn a_restored_state_is_the_saved_one() {
        let mut b = balloon(1, false);
        b.restore_device_state(&serde_json::json!({"num_pages": 5, "actual": 3}))
            .unwrap();
        assert_eq!(b.sizes(), (5 << 12, 3 << 12));
        assert!(b
            .restore_device_state(&serde_json::json!({"pages": 5}))
            .is_err());
        assert_eq!(
            b.device_state(),
            Some(serde_json::json!({"num_pages": 5, "actual": 3}))
        );
    }
}
