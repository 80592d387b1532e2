//! The PCI root complex: bus 0, its functions, and the MMIO mappings of their BARs.

use std::sync::{Arc, Mutex, Weak};
use vireo_util::sync;

use super::{PciConfiguration, PciDevice, PciHeader};
use crate::bus::{Bus, BusError};
use crate::BusDevice;

/// Slots on bus 0 (device numbers).
const SLOTS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum PciRootError {
    #[error("PCI bus 0 has no free slot")]
    NoFreeSlot,
    #[error("the MMIO bus is gone (VM shutting down)")]
    BusGone,
    #[error("cannot map BAR {bar} of PCI device {slot:02x}.0 at {addr:#x}")]
    MapBar {
        slot: u8,
        bar: usize,
        addr: u64,
        #[source]
        source: BusError,
    },
}

/// Tells the VMM that a BAR moved (ioeventfds must follow it).
#[derive(Clone, Copy, Debug)]
pub struct BarRelocation {
    pub slot: u8,
    pub bar: usize,
    pub old: u64,
    pub new: u64,
}

/// The host bridge at 00:00.0: present so guests see a normal root complex.
struct HostBridge {
    config: PciConfiguration,
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

type SharedPci = Arc<Mutex<dyn PciDevice>>;

struct Slot {
    device: SharedPci,
    /// Where each BAR is mapped on the MMIO bus now (0 = not mapped).
    mapped: [u64; 6],
}

/// One BAR of one device, as a bus device on the MMIO bus.
struct BarWindow {
    device: SharedPci,
    bar: usize,
}

impl BusDevice for BarWindow {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        sync::lock(&self.device).read_bar(self.bar, offset, data);
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        sync::lock(&self.device).write_bar(self.bar, offset, data);
    }
}

/// Bus 0 with its devices. Config accesses come through [`super::PciEcam`].
pub struct PciRoot {
    slots: Mutex<Vec<Option<Slot>>>,
    /// Weak: the MMIO bus holds the ECAM window, which holds this root.
    mmio: Weak<Bus>,
}

impl PciRoot {
    pub fn new(mmio: &Arc<Bus>) -> Self {
        let bridge = HostBridge {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: 0x8086,
                device_id: 0x0d57,
                class_code: 0x06,
                subclass: 0x00,
                prog_if: 0,
                revision: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        };
        let mut slots: Vec<Option<Slot>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            device: Arc::new(Mutex::new(bridge)),
            mapped: [0; 6],
        });
        Self {
            slots: Mutex::new(slots),
            mmio: Arc::downgrade(mmio),
        }
    }

    /// Plugs `device` into the first free slot, mapping each BAR at the address its
    /// configuration already holds (the VMM assigns addresses before plugging).
    pub fn add_device(&self, device: SharedPci) -> Result<u8, PciRootError> {
        let mmio = self.mmio.upgrade().ok_or(PciRootError::BusGone)?;
        let mut slots = sync::lock(&self.slots);
        let slot = slots
            .iter()
            .position(|s| s.is_none())
            .ok_or(PciRootError::NoFreeSlot)? as u8;
        let mut mapped = [0u64; 6];
        let bars: Vec<(usize, u64, u64)> = {
            let d = sync::lock(&device);
            d.config()
                .bars()
                .map(|b| (b.index, d.config().bar_address(b.index), b.size))
                .collect()
        };
        for (bar, addr, size) in bars {
            if addr == 0 {
                continue;
            }
            let window = Arc::new(Mutex::new(BarWindow {
                device: device.clone(),
                bar,
            }));
            mmio.insert(window, addr, size)
                .map_err(|source| PciRootError::MapBar {
                    slot,
                    bar,
                    addr,
                    source,
                })?;
            mapped[bar] = addr;
        }
        slots[slot as usize] = Some(Slot { device, mapped });
        Ok(slot)
    }

    pub fn read_config(&self, slot: u8, reg: usize) -> u32 {
        let slots = sync::lock(&self.slots);
        match slots.get(slot as usize).and_then(|s| s.as_ref()) {
            Some(s) => sync::lock(&s.device).read_config_register(reg),
            None => 0xffff_ffff,
        }
    }

    /// Writes configuration space; if the write moved a BAR, moves its MMIO mapping and
    /// tells the device. Returns the relocation, if any.
    pub fn write_config(
        &self,
        slot: u8,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarRelocation> {
        let mut slots = sync::lock(&self.slots);
        let s = slots.get_mut(slot as usize)?.as_mut()?;
        let mut dev = sync::lock(&s.device);
        dev.write_config_register(reg, offset, data);
        let bar = dev.config().bar_of_register(reg)?;
        let new = dev.config().bar_address(bar);
        let old = s.mapped[bar];
        // Sizing writes (all ones) and half-written 64-bit BARs are not moves yet.
        let size = dev.config().bars().find(|b| b.index == bar)?.size;
        if new == old || new == 0 || new & (size - 1) != 0 || new.checked_add(size).is_none() {
            return None;
        }
        let mmio = self.mmio.upgrade()?;
        let moved = if old == 0 {
            let window = Arc::new(Mutex::new(BarWindow {
                device: s.device.clone(),
                bar,
            }));
            mmio.insert(window, new, size)
        } else {
            mmio.relocate(old, new)
        };
        match moved {
            Ok(()) => {
                s.mapped[bar] = new;
                dev.bar_moved(bar, old, new);
                tracing::debug!(slot, bar, old, new, "PCI BAR moved");
                Some(BarRelocation {
                    slot,
                    bar,
                    old,
                    new,
                })
            }
            Err(e) => {
                tracing::debug!(slot, bar, new, error = %e, "BAR not (yet) mappable");
                None
            }
        }
    }
}
