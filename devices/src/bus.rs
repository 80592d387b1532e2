//! Dispatch of guest port-I/O and MMIO accesses to the devices that own the addresses.
//!
//! A [`Bus`] maps non-overlapping address ranges to devices. vCPU threads call
//! [`Bus::read`]/[`Bus::write`] on exits; a device receives the base of its range and the
//! offset within it, so one model can be mapped anywhere.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use vireo_util::sync;

/// A device reachable through a bus.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` within the device's range starting at `base`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` within the device's range starting at `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Errors of bus registration.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already mapped at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength { base: u64 },
    #[error("no device is mapped at {base:#x}")]
    NotMapped { base: u64 },
}

/// Shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Mapping {
    len: u64,
    device: SharedDevice,
}

/// A set of address ranges, each owned by one device.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Mapping>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let mut ranges = sync::write(&self.ranges);
        let end = base.saturating_add(len);
        if let Some((&other, m)) = ranges.range(..end).next_back() {
            if other.saturating_add(m.len) > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        ranges.insert(base, Mapping { len, device });
        Ok(())
    }

    /// Unmaps the range that starts at `base`, returning its device.
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        let mut ranges = sync::write(&self.ranges);
        ranges
            .remove(&base)
            .map(|m| m.device)
            .ok_or(BusError::NotMapped { base })
    }

    /// Moves the range at `old_base` to `new_base` (a guest reprogrammed a BAR).
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let len = {
            let ranges = sync::read(&self.ranges);
            ranges
                .get(&old_base)
                .map(|m| m.len)
                .ok_or(BusError::NotMapped { base: old_base })?
        };
        let device = self.remove(old_base)?;
        if let Err(e) = self.insert(device.clone(), new_base, len) {
            // Put it back where it was: a failed move must not lose the device.
            let _ = self.insert(device, old_base, len);
            return Err(e);
        }
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, SharedDevice)> {
        let ranges = sync::read(&self.ranges);
        let (&base, m) = ranges.range(..=addr).next_back()?;
        let end = addr.checked_add(size as u64)?;
        (end <= base.saturating_add(m.len)).then(|| (base, m.device.clone()))
    }

    /// Reads from the device at `addr`. Returns false when nothing is mapped there
    /// (the caller then returns all-ones, as unclaimed reads do on real hardware).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((base, dev)) => {
                sync::lock(&dev).read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`. Returns false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((base, dev)) => {
                sync::lock(&dev).write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill((base + offset) as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last = Some((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert!(bus.write(0x104, &[1, 2]));
        assert_eq!(dev.lock().unwrap().last, Some((0x100, 4, vec![1, 2])));
        let mut b = [0u8; 1];
        assert!(bus.read(0x10f, &mut b));
        assert_eq!(b[0], 0x0f);
        assert!(!bus.read(0x110, &mut b), "one past the end is unmapped");
        assert!(!bus.read(0x10f, &mut [0u8; 2]), "access straddling the end");
        assert!(!bus.read(0xff, &mut b));
    }

    #[test]
    fn refuses_overlaps_and_relocates() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x1000, 0x100).unwrap();
        assert!(matches!(
            bus.insert(a.clone(), 0x10ff, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(a.clone(), 0xf01, 0x100),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(a.clone(), 0x1100, 0x100).unwrap();
        assert!(bus.relocate(0x1000, 0x1080).is_err(), "would overlap");
        assert!(
            bus.read(0x1000, &mut [0u8; 1]),
            "failed move keeps the mapping"
        );
        bus.relocate(0x1000, 0x5000).unwrap();
        assert!(!bus.read(0x1000, &mut [0u8; 1]));
        assert!(bus.read(0x5000, &mut [0u8; 1]));
    }
}
