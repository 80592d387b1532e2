//! COM1: a 16550A UART (vm-superio) whose output goes to a file, stdout or nowhere,
//! and whose interrupt is a legacy line (IRQ 4).

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::interrupt::LineSink;
use crate::BusDevice;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_PORT_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Where the guest's serial output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// Adapts a [`LineSink`] to vm-superio's trigger.
struct LineTrigger(Arc<dyn LineSink>);

impl Trigger for LineTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.trigger()
    }
}

pub struct SerialDevice {
    uart: Serial<LineTrigger, NoEvents, SerialOutput>,
}

impl SerialDevice {
    pub fn new(irq: Arc<dyn LineSink>, out: SerialOutput) -> Self {
        Self {
            uart: Serial::new(LineTrigger(irq), out),
        }
    }

    /// Queues bytes for the guest to read (console input).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let Some(b) = data.first_mut() else { return };
        *b = self.uart.read(offset as u8);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        if let Err(e) = self.uart.write(offset as u8, b) {
            tracing::warn!(error = %e, "serial write failed");
        }
        if offset == 0 {
            // Line-buffered sinks (files, pipes) see every byte promptly.
            let _ = self.uart.writer_mut().flush();
        }
    }
}
