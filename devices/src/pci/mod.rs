//! PCI: configuration space, the root bus reached through ECAM, MSI-X.

mod config;
mod ecam;
mod msix;
mod root;

pub use config::{BarKind, PciBar, PciConfiguration, PciHeader};
pub use ecam::{PciEcam, ECAM_BUS_SIZE};
pub use msix::{MsixCap, MsixState, MsixTable, MSIX_ENTRY_SIZE};
pub use root::{BarRelocation, PciRoot, PciRootError};

/// A function on the PCI bus.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfiguration;
    fn config_mut(&mut self) -> &mut PciConfiguration;

    /// Reads a 32-bit configuration register (index = offset / 4).
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }

    /// Writes `data` at byte `offset` within register `reg`.
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config_mut().write_reg(reg, offset, data);
    }

    /// MMIO read within BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// MMIO write within BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// The guest moved BAR `bar` from `old` to `new` (the bus mapping has moved already).
    fn bar_moved(&mut self, _bar: usize, _old: u64, _new: u64) {}
}
