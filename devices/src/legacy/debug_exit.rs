//! The debug-exit port (QEMU's `isa-debug-exit`): test guests end a run with a status.

use std::sync::Arc;

use super::{PowerControl, PowerEvent};
use crate::BusDevice;

/// Port of QEMU's isa-debug-exit as our test guest uses it (`iobase=0xf4,iosize=4`).
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
pub const DEBUG_EXIT_PORT_LEN: u64 = 4;

/// Turns a write of `code` into power-off (0) or a reported guest failure (non-zero).
pub struct DebugExit {
    power: Arc<dyn PowerControl>,
}

impl DebugExit {
    pub fn new(power: Arc<dyn PowerControl>) -> Self {
        Self { power }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        let mut code = [0u8; 4];
        let n = data.len().min(4);
        code[..n].copy_from_slice(&data[..n]);
        let code = u32::from_le_bytes(code);
        tracing::info!(code, "guest wrote the debug-exit port");
        self.power.request(if code == 0 {
            PowerEvent::PowerOff
        } else {
            PowerEvent::GuestFailure(code)
        });
    }
}
