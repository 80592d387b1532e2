//! The console device: two queues (receive, transmit), emergency write; with a guest
//! agent, the multiport layout (virtio 1.2, 5.3.2): port 0's two queues, the control
//! queues, then the agent port's two queues.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vireo_util::sync;

use super::channel::AgentChannel;
use super::control::{Control, NR_PORTS};
use super::ports::{PortParts, PortQueues, PortState, PortWorker};
use super::worker::{ConsoleWorker, WorkerParts};
use crate::virtio::workers::Workers;
use crate::virtio::{
    ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    F_RING_EVENT_IDX, F_VERSION_1, TYPE_CONSOLE,
};

/// The driver may write characters through the config space (emerg_wr).
const F_EMERG_WRITE: u64 = 1 << 2;
/// Ports beyond port 0, announced through the control queues (virtio 1.2, 5.3.3).
const F_MULTIPORT: u64 = 1 << 1;
const QUEUE_SIZES: [u16; 2] = [64, 64];
/// Port 0 (receive, transmit), control (receive, transmit), port 1 (receive, transmit).
const MULTIPORT_QUEUE_SIZES: [u16; 6] = [64; 6];
const MAX_NR_PORTS_OFFSET: usize = 4;
const EMERG_WR_OFFSET: u64 = 8;

/// What one worker of the device hands back when stopped.
pub(super) enum Parts {
    Console(WorkerParts),
    Ports(PortParts),
}

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
    /// The guest agent's port (port 1), if the VM has one.
    agent: Option<AgentChannel>,
    /// The driver accepted MULTIPORT.
    multiport: bool,
    /// What the driver said on the control queues (kept across pause).
    control: Control,
    control_refused: Arc<AtomicU64>,
    running: Option<Workers<Parts>>,
}

impl Console {
    pub fn new(output: Box<dyn std::io::Write + Send>, input: ConsoleInput) -> Self {
        Self {
            output: Arc::new(Mutex::new(output)),
            input,
            bytes_out: Arc::new(AtomicU64::new(0)),
            bytes_in: Arc::new(AtomicU64::new(0)),
            tx_truncated: Arc::new(AtomicU64::new(0)),
            agent: None,
            multiport: false,
            control: Control::default(),
            control_refused: Arc::new(AtomicU64::new(0)),
            running: None,
        }
    }

    /// Adds the guest agent's port (port 1, `org.qemu.guest_agent.0`) with `channel`
    /// as its host end: the device offers MULTIPORT.
    pub fn with_guest_agent(mut self, channel: AgentChannel) -> Self {
        self.agent = Some(channel);
        self
    }

    /// Stops the worker; returns its queues.
    fn stop(&mut self) -> Vec<ActivatedQueue> {
        let Some(workers) = self.running.take() else {
            return Vec::new();
        };
        // The workers hand back the input and the protocol state so that a
        // re-activated device keeps them.
        let mut queues = Vec::new();
        for parts in workers.stop() {
            match parts {
                Parts::Console(p) => {
                    self.input = p.input;
                    queues.extend(p.queues);
                }
                Parts::Ports(p) => {
                    self.control = p.control;
                    queues.extend(p.queues);
                }
            }
        }
        queues
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
        if self.agent.is_some() {
            &MULTIPORT_QUEUE_SIZES
        } else {
            &QUEUE_SIZES
        }
    }
    fn features(&self) -> u64 {
        let multiport = if self.agent.is_some() { F_MULTIPORT } else { 0 };
        F_VERSION_1 | F_RING_EVENT_IDX | F_EMERG_WRITE | multiport
    }
    fn ack_features(&mut self, features: u64) {
        self.multiport = self.agent.is_some() && features & F_MULTIPORT != 0;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows (no size), max_nr_ports (with a guest agent), emerg_wr (zero).
        let mut config = [0u8; 12];
        if self.agent.is_some() {
            config[MAX_NR_PORTS_OFFSET..MAX_NR_PORTS_OFFSET + 4]
                .copy_from_slice(&NR_PORTS.to_le_bytes());
        }
        data.fill(0);
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(data.len()).min(config.len());
        data[..end - start].copy_from_slice(&config[start..end]);
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
        let mut by_index: [Option<ActivatedQueue>; 6] = Default::default();
        for q in queues {
            if let Some(slot) = by_index.get_mut(usize::from(q.index)) {
                *slot = Some(q);
            }
        }
        let [rx, tx, ctrl_rx, ctrl_tx, port_rx, port_tx] = by_index;
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err(ActivateError::BadConfig {
                device: "console",
                reason: "both the receive and transmit queues must be enabled".into(),
            });
        };
        let mut workers = Workers::new("console")?;
        if let (true, Some(channel)) = (self.multiport, &self.agent) {
            let (Some(ctrl_rx), Some(ctrl_tx), Some(port_rx), Some(port_tx)) =
                (ctrl_rx, ctrl_tx, port_rx, port_tx)
            else {
                return Err(ActivateError::BadConfig {
                    device: "console",
                    reason: "with MULTIPORT, the control and port 1 queues must be enabled".into(),
                });
            };
            let mut state = PortState::new(self.control.clone(), channel.clone());
            state.refused = self.control_refused.clone();
            let ports = PortWorker::new(
                PortQueues {
                    ctrl_rx,
                    ctrl_tx,
                    port_rx,
                    port_tx,
                },
                mem.clone(),
                interrupt.clone(),
                state,
                workers.stop_fd()?,
            )
            .map_err(setup)?;
            workers.spawn("vireo-console-ports".into(), move || {
                Parts::Ports(ports.run())
            })?;
        }
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
        workers.spawn("vireo-console".into(), move || Parts::Console(worker.run()))?;
        self.running = Some(workers);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
        self.control = Control::default();
        if let Some(a) = &self.agent {
            a.set_guest_open(false);
        }
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
            (
                "control_refused",
                self.control_refused.load(Ordering::Relaxed),
            ),
        ]
    }

    /// The control protocol's state, with a guest agent (the driver does not repeat
    /// the handshake after a restore).
    fn device_state(&self) -> Option<serde_json::Value> {
        self.agent.as_ref()?;
        serde_json::to_value(&self.control).ok()
    }

    fn restore_device_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        self.control = serde_json::from_value(state.clone())
            .map_err(|e| format!("console control state: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(c: &Console) -> [u8; 12] {
        let mut b = [0xAAu8; 12];
        c.read_config(0, &mut b);
        b
    }

    #[test]
    fn a_guest_agent_makes_the_device_multiport_with_two_ports_and_six_queues() {
        let plain = Console::new(Box::new(std::io::sink()), None);
        assert_eq!(plain.features() & F_MULTIPORT, 0);
        assert_eq!(plain.queue_max_sizes().len(), 2);
        assert_eq!(config(&plain), [0; 12]);

        let mut c = Console::new(Box::new(std::io::sink()), None)
            .with_guest_agent(AgentChannel::new().unwrap());
        assert_ne!(c.features() & F_MULTIPORT, 0);
        assert_eq!(c.queue_max_sizes().len(), 6);
        assert_eq!(&config(&c)[4..8], &2u32.to_le_bytes());
        // A read of max_nr_ports alone, and one past the end.
        let mut b = [0u8; 4];
        c.read_config(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 2);
        let mut b = [0xAAu8; 4];
        c.read_config(10, &mut b);
        assert_eq!(b, [0; 4]);

        // The protocol state survives a snapshot; a reset clears it.
        c.control.device_ready = true;
        c.control.guest_open[1] = true;
        let saved = c.device_state().unwrap();
        let mut d = Console::new(Box::new(std::io::sink()), None)
            .with_guest_agent(AgentChannel::new().unwrap());
        d.restore_device_state(&saved).unwrap();
        assert_eq!(d.control, c.control);
        d.reset();
        assert_eq!(d.control, Control::default());
        assert!(plain.device_state().is_none());
    }
}
