//! ACPI power management for a hardware-reduced platform: the FADT's sleep control,
//! sleep status and reset registers all live in this one port block, as in Cloud
//! Hypervisor. Writing SLP_TYP=5 with SLP_EN powers off; the reset value resets.

use std::sync::Arc;

use super::{PowerControl, PowerEvent};
use crate::BusDevice;

pub const ACPI_PM_PORT: u64 = 0x600;
pub const ACPI_PM_PORT_LEN: u64 = 8;
/// Offset 0: sleep control register (and reset register, distinguished by value).
const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset 1: sleep status register.
const SLEEP_STATUS_OFFSET: u64 = 1;
/// The `_S5_` sleep type we publish in the DSDT.
pub const ACPI_SLP_TYP_S5: u8 = 5;
/// FADT reset value, written to the sleep control offset.
pub const ACPI_RESET_VALUE: u8 = 0xfe;
const SLP_EN: u8 = 1 << 5;

pub struct AcpiPmDevice {
    power: Arc<dyn PowerControl>,
}

impl AcpiPmDevice {
    pub fn new(power: Arc<dyn PowerControl>) -> Self {
        Self { power }
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        // Wake status bit set in the sleep status register: the guest never waits.
        data.fill(0);
        if offset == SLEEP_STATUS_OFFSET {
            if let Some(b) = data.first_mut() {
                *b = 0x80;
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if offset != SLEEP_CONTROL_OFFSET {
            return;
        }
        if value == ACPI_RESET_VALUE {
            self.power.request(PowerEvent::Reset);
        } else if value & SLP_EN != 0 && (value >> 2) & 0x7 == ACPI_SLP_TYP_S5 {
            self.power.request(PowerEvent::PowerOff);
        }
    }
}
