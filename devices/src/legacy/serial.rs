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
    irq: Arc<dyn LineSink>,
}

/// The UART's registers and receive FIFO as a snapshot saves them (vm-superio's
/// `SerialState`, which has no serde).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    pub fn new(irq: Arc<dyn LineSink>, out: SerialOutput) -> Self {
        Self {
            uart: Serial::new(LineTrigger(irq.clone()), out),
            irq,
        }
    }

    pub fn state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Takes saved registers; output keeps going where this device's output goes.
    pub fn restore(&mut self, s: &SerialSnapshot) -> Result<(), String> {
        // vm-superio's FIFO holds 64 bytes; checked first so a bad snapshot cannot cost
        // us the output writer.
        if s.in_buffer.len() > 64 {
            return Err(format!("serial FIFO of {} bytes", s.in_buffer.len()));
        }
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let placeholder = Serial::new(
            LineTrigger(self.irq.clone()),
            Box::new(std::io::sink()) as SerialOutput,
        );
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        match Serial::from_state(&state, LineTrigger(self.irq.clone()), NoEvents, out) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            Err(e) => Err(format!("serial state: {e:?}")),
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
            crate::guest_warn!(error = %e, "serial write failed");
        }
        if offset == 0 {
            // Line-buffered sinks (files, pipes) see every byte promptly.
            let _ = self.uart.writer_mut().flush();
        }
    }
}
