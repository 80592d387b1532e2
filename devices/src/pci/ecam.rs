//! PCI Express enhanced configuration access (ECAM): configuration space as MMIO.

use std::sync::Arc;

use super::PciRoot;
use crate::BusDevice;

/// Each bus takes 1 MiB of ECAM (32 devices x 8 functions x 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// The ECAM window: decodes offsets into bus/device/function/register.
pub struct PciEcam {
    root: Arc<PciRoot>,
}

impl PciEcam {
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root }
    }

    fn decode(offset: u64) -> (u8, u8, u8, usize, u64) {
        let bus = (offset >> 20) as u8;
        let dev = ((offset >> 15) & 0x1f) as u8;
        let func = ((offset >> 12) & 0x7) as u8;
        let reg = ((offset & 0xfff) / 4) as usize;
        (bus, dev, func, reg, offset & 3)
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, reg, byte) = Self::decode(offset);
        let value = if bus == 0 && func == 0 {
            self.root.read_config(dev, reg)
        } else {
            0xffff_ffff
        };
        let bytes = value.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(byte as usize + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (bus, dev, func, reg, byte) = Self::decode(offset);
        if bus == 0 && func == 0 && byte as usize + data.len() <= 4 {
            self.root.write_config(dev, reg, byte, data);
        }
    }
}
