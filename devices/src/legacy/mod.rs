//! Legacy platform devices: the ones a PC guest expects at fixed port addresses.

mod acpi_pm;
mod debug_exit;
mod ged;
mod i8042;
mod ioapic;
mod serial;

pub use acpi_pm::{
    AcpiPmDevice, ACPI_PM_PORT, ACPI_PM_PORT_LEN, ACPI_RESET_VALUE, ACPI_SLP_TYP_S5,
};
pub use debug_exit::{DebugExit, DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_LEN};
pub use ged::{AcpiGed, AcpiGedMmio, GED_IRQ, GED_POWER_BUTTON, GED_SIZE, GED_START};
pub use i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
pub use ioapic::{
    Ioapic, IoapicLine, IoapicMmio, IoapicState, IOAPIC_PINS, IOAPIC_SIZE, IOAPIC_START,
};
pub use serial::{SerialDevice, SerialOutput, SerialSnapshot, COM1_IRQ, COM1_PORT, COM1_PORT_LEN};

/// Why the guest asked the platform to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerEvent {
    /// ACPI S5 or a debug-exit write of 0.
    PowerOff,
    /// The guest wrote a non-zero code to the debug-exit port (test guests report failure so).
    GuestFailure(u32),
    /// i8042 or ACPI reset.
    Reset,
    /// Disk `disk` (its index in the configuration) stopped on a host I/O error
    /// (on_error=stop): the VM should pause until the cause is fixed.
    DiskStopped {
        disk: u32,
        op: &'static str,
        errno: i32,
    },
}

/// Receives the guest's power requests; the VMM implements it.
pub trait PowerControl: Send + Sync {
    fn request(&self, event: PowerEvent);
}
