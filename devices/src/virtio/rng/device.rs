//! The entropy device: one queue, no configuration space.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::worker::RngWorker;
use crate::virtio::workers::Workers;
use crate::virtio::{
    ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_RNG,
};

const QUEUE_SIZES: [u16; 1] = [256];

pub struct Rng {
    bytes: Arc<AtomicU64>,
    running: Option<Workers<ActivatedQueue>>,
}

impl Rng {
    pub fn new() -> Self {
        Self {
            bytes: Arc::new(AtomicU64::new(0)),
            running: None,
        }
    }

    /// Stops the worker; returns its queue.
    fn stop(&mut self) -> Vec<ActivatedQueue> {
        self.running.take().map(Workers::stop).unwrap_or_default()
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for Rng {
    fn name(&self) -> &'static str {
        "rng"
    }
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX
    }
    fn ack_features(&mut self, _features: u64) {}
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        self.stop();
        let setup = |source| ActivateError::Setup {
            device: "rng",
            source,
        };
        let q = queues.into_iter().next().ok_or(ActivateError::BadConfig {
            device: "rng",
            reason: "the request queue was not enabled".into(),
        })?;
        let mut workers = Workers::new("rng")?;
        let worker = RngWorker::new(q, mem, interrupt, self.bytes.clone(), workers.stop_fd()?)
            .map_err(setup)?;
        workers.spawn("vireo-rng".into(), move || worker.run())?;
        self.running = Some(workers);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }

    fn pause(&mut self) -> Vec<ActivatedQueue> {
        self.stop()
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("bytes", self.bytes.load(Ordering::Relaxed))]
    }
}
