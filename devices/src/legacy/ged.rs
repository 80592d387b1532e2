//! The ACPI Generic Event Device (GED, ACPI 6.1 §5.6.9) of a hardware-reduced platform,
//! as in Cloud Hypervisor: one byte of MMIO holding pending event flags, and an
//! interrupt line. The DSDT's `_EVT` method reads the byte (which clears it) and
//! notifies the matching device, e.g. `Notify (\_SB.PWRB, 0x80)` for the power button.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::interrupt::LineSink;
use crate::BusDevice;

/// Where the GED's event register lives (guest-physical, below the IOAPIC).
pub const GED_START: u64 = 0xfeb0_0000;
pub const GED_SIZE: u64 = 0x1;
/// The IOAPIC pin of the GED's interrupt.
pub const GED_IRQ: u32 = 9;
/// Event flag: the power button was pressed.
pub const GED_POWER_BUTTON: u8 = 1 << 3;

/// The pending-events register, shared by the MMIO handler and whoever raises events.
pub struct AcpiGed {
    pending: AtomicU8,
    line: Arc<dyn LineSink>,
}

impl AcpiGed {
    pub fn new(line: Arc<dyn LineSink>) -> Self {
        Self {
            pending: AtomicU8::new(0),
            line,
        }
    }

    /// Events raised and not yet read by the guest (snapshots keep them).
    pub fn pending(&self) -> u8 {
        self.pending.load(Ordering::SeqCst)
    }

    pub fn restore(&self, pending: u8) {
        self.pending.store(pending, Ordering::SeqCst);
    }

    /// Records `events` and interrupts the guest.
    pub fn notify(&self, events: u8) -> std::io::Result<()> {
        self.pending.fetch_or(events, Ordering::SeqCst);
        self.line.trigger()
    }
}

/// The GED's MMIO register on the bus (reads return and clear the pending flags).
pub struct AcpiGedMmio(pub Arc<AcpiGed>);

impl BusDevice for AcpiGedMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = self.0.pending.swap(0, Ordering::SeqCst);
            }
        }
    }

    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    struct CountingLine(AtomicU32);
    impl LineSink for CountingLine {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn events_interrupt_and_a_read_returns_then_clears_them() {
        let line = Arc::new(CountingLine(AtomicU32::new(0)));
        let ged = Arc::new(AcpiGed::new(line.clone()));
        let mut mmio = AcpiGedMmio(ged.clone());
        let mut b = [0xffu8; 1];
        mmio.read(GED_START, 0, &mut b);
        assert_eq!(b[0], 0, "nothing pending at start");
        ged.notify(GED_POWER_BUTTON).unwrap();
        assert_eq!(line.0.load(Ordering::SeqCst), 1);
        mmio.read(GED_START, 0, &mut b);
        assert_eq!(b[0], GED_POWER_BUTTON);
        mmio.read(GED_START, 0, &mut b);
        assert_eq!(b[0], 0, "a read clears the flags");
    }
}
