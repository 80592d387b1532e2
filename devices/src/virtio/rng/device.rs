//! The entropy device: one queue, no configuration space.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::worker::RngWorker;
use crate::virtio::{
    ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_RNG,
};

const QUEUE_SIZES: [u16; 1] = [256];

pub struct Rng {
    bytes: Arc<AtomicU64>,
    running: Option<(EventFd, JoinHandle<ActivatedQueue>)>,
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
        let Some((stop, t)) = self.running.take() else {
            return Vec::new();
        };
        let _ = stop.write(1);
        t.join().map(|q| vec![q]).unwrap_or_default()
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
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(setup)?;
        let worker = RngWorker::new(
            q,
            mem,
            interrupt,
            self.bytes.clone(),
            stop.try_clone().map_err(setup)?,
        )
        .map_err(setup)?;
        let t = std::thread::Builder::new()
            .name("vireo-rng".into())
            .spawn(move || worker.run())
            .map_err(|source| ActivateError::SpawnWorker {
                device: "rng",
                source,
            })?;
        self.running = Some((stop, t));
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
