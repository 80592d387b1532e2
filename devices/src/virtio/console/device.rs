//! The console device: two queues (receive, transmit), emergency write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vireo_util::sync;

use super::worker::{ConsoleWorker, WorkerParts};
use crate::virtio::workers::Workers;
use crate::virtio::{
    ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    F_RING_EVENT_IDX, F_VERSION_1, TYPE_CONSOLE,
};

/// The driver may write characters through the config space (emerg_wr).
const F_EMERG_WRITE: u64 = 1 << 2;
const QUEUE_SIZES: [u16; 2] = [64, 64];
const EMERG_WR_OFFSET: u64 = 8;

/// Where guest output goes (shared with the worker).
pub type ConsoleOutput = Arc<Mutex<Box<dyn std::io::Write + Send>>>;
/// Where guest input comes from (a readable fd such as stdin), if anywhere.
pub type ConsoleInput = Option<std::fs::File>;

pub struct Console {
    output: ConsoleOutput,
    input: Option<std::fs::File>,
    bytes_out: Arc<AtomicU64>,
    bytes_in: Arc<AtomicU64>,
    tx_truncated: Arc<AtomicU64>,
    running: Option<Workers<WorkerParts>>,
}

impl Console {
    pub fn new(output: Box<dyn std::io::Write + Send>, input: ConsoleInput) -> Self {
        Self {
            output: Arc::new(Mutex::new(output)),
            input,
            bytes_out: Arc::new(AtomicU64::new(0)),
            bytes_in: Arc::new(AtomicU64::new(0)),
            tx_truncated: Arc::new(AtomicU64::new(0)),
            running: None,
        }
    }

    /// Stops the worker; returns its queues.
    fn stop(&mut self) -> Vec<ActivatedQueue> {
        let Some(workers) = self.running.take() else {
            return Vec::new();
        };
        // The worker hands the input back so a re-activated device keeps it.
        match workers.stop().pop() {
            Some(parts) => {
                self.input = parts.input;
                parts.queues
            }
            None => Vec::new(),
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for Console {
    fn name(&self) -> &'static str {
        "console"
    }
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_RING_EVENT_IDX | F_EMERG_WRITE
    }
    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: all zero (no size, one port).
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == EMERG_WR_OFFSET {
            if let Some(&c) = data.first() {
                let mut out = sync::lock(&self.output);
                let _ = out.write_all(&[c]).and_then(|_| out.flush());
                self.bytes_out.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        self.stop();
        let setup = |source| ActivateError::Setup {
            device: "console",
            source,
        };
        let mut rx = None;
        let mut tx = None;
        for q in queues {
            match q.index {
                0 => rx = Some(q),
                1 => tx = Some(q),
                _ => {}
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err(ActivateError::BadConfig {
                device: "console",
                reason: "both the receive and transmit queues must be enabled".into(),
            });
        };
        let mut workers = Workers::new("console")?;
        let worker = ConsoleWorker::new(
            rx,
            tx,
            mem,
            interrupt,
            self.output.clone(),
            self.input.take(),
            (
                self.bytes_out.clone(),
                self.bytes_in.clone(),
                self.tx_truncated.clone(),
            ),
            workers.stop_fd()?,
        )
        .map_err(setup)?;
        workers.spawn("vireo-console".into(), move || worker.run())?;
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
        vec![
            ("tx_bytes", self.bytes_out.load(Ordering::Relaxed)),
            ("rx_bytes", self.bytes_in.load(Ordering::Relaxed)),
            ("tx_truncated", self.tx_truncated.load(Ordering::Relaxed)),
        ]
    }
}
