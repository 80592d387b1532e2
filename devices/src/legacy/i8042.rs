//! Just enough of the i8042 keyboard controller for a guest to reset the machine
//! (command 0xfe, "pulse reset line"), as Linux's `reboot=k` does.

use std::sync::Arc;

use super::{PowerControl, PowerEvent};
use crate::BusDevice;

pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    power: Arc<dyn PowerControl>,
}

impl I8042 {
    pub fn new(power: Arc<dyn PowerControl>) -> Self {
        Self { power }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; no keyboard behind it.
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.power.request(PowerEvent::Reset);
        }
    }
}
