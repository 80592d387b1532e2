//! The I/O APIC, emulated in user space (KVM's split irqchip: LAPICs in the kernel,
//! IOAPIC here). Legacy interrupt lines (COM1) are routed through its redirection table
//! and delivered as MSI messages to the in-kernel LAPICs, as in Cloud Hypervisor.
//!
//! Register interface (82093AA): IOREGSEL at offset 0x00, IOWIN at 0x10, EOI at 0x40
//! (version 0x20). Level-triggered lines keep Remote IRR set until the LAPIC's EOI
//! reaches us (`KVM_EXIT_IOAPIC_EOI`).

use std::sync::{Arc, Mutex};
use vireo_util::sync;

use crate::interrupt::{LineSink, MsiMessage, MsiSink};
use crate::BusDevice;

pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const IOAPIC_SIZE: u64 = 0x1000;
pub const IOAPIC_PINS: usize = 24;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const EOI: u64 = 0x40;
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARB: u32 = 0x02;
const REG_TABLE: u32 = 0x10;
const VERSION: u32 = 0x20 | ((IOAPIC_PINS as u32 - 1) << 16);

const MASKED: u64 = 1 << 16;
const TRIGGER_LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
const DELIVERY_STATUS: u64 = 1 << 12;
/// Bits the guest may write (remote IRR and delivery status are read-only).
const WRITABLE: u64 = !(REMOTE_IRR | DELIVERY_STATUS);

struct State {
    id: u32,
    select: u32,
    table: [u64; IOAPIC_PINS],
    /// Current level of each input line (for level-triggered re-delivery after EOI).
    level: [bool; IOAPIC_PINS],
}

/// The IOAPIC's registers as a snapshot saves them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoapicState {
    pub id: u32,
    pub select: u32,
    pub table: Vec<u64>,
    pub level: Vec<bool>,
}

/// The IOAPIC; shared by the MMIO bus and the interrupt lines it serves.
pub struct Ioapic {
    state: Mutex<State>,
    msi: Arc<dyn MsiSink>,
}

impl Ioapic {
    pub fn new(msi: Arc<dyn MsiSink>) -> Self {
        Self {
            state: Mutex::new(State {
                id: 0,
                select: 0,
                table: [MASKED; IOAPIC_PINS],
                level: [false; IOAPIC_PINS],
            }),
            msi,
        }
    }

    /// The MSI message a redirection entry describes (Intel SDM 10.11: address
    /// 0xFEExxxxx with destination ID and mode; data with vector, delivery and trigger).
    fn message(entry: u64) -> MsiMessage {
        let vector = entry & 0xff;
        let delivery_mode = (entry >> 8) & 0x7;
        let dest_mode = (entry >> 11) & 1;
        let dest = (entry >> 56) & 0xff;
        let level = (entry >> 15) & 1;
        MsiMessage {
            address: 0xfee0_0000 | (dest << 12) | (dest_mode << 2),
            data: (vector | (delivery_mode << 8) | (level << 15) | (1 << 14)) as u32,
        }
    }

    /// Raises (edge) or sets the level of input `pin`.
    pub fn state(&self) -> IoapicState {
        let s = sync::lock(&self.state);
        IoapicState {
            id: s.id,
            select: s.select,
            table: s.table.to_vec(),
            level: s.level.to_vec(),
        }
    }

    pub fn restore(&self, saved: &IoapicState) -> Result<(), String> {
        let (Ok(table), Ok(level)) = (
            <[u64; IOAPIC_PINS]>::try_from(saved.table.as_slice()),
            <[bool; IOAPIC_PINS]>::try_from(saved.level.as_slice()),
        ) else {
            return Err(format!(
                "IOAPIC with {} pins in the snapshot, {IOAPIC_PINS} here",
                saved.table.len()
            ));
        };
        let mut s = sync::lock(&self.state);
        s.id = saved.id;
        s.select = saved.select;
        s.table = table;
        s.level = level;
        Ok(())
    }

    pub fn set_line(&self, pin: usize, asserted: bool) -> std::io::Result<()> {
        let msg = {
            let mut s = sync::lock(&self.state);
            let Some(&entry) = s.table.get(pin) else {
                return Ok(());
            };
            s.level[pin] = asserted;
            if !asserted || entry & MASKED != 0 {
                return Ok(());
            }
            if entry & TRIGGER_LEVEL != 0 {
                if entry & REMOTE_IRR != 0 {
                    return Ok(()); // Already in service; re-delivered after EOI.
                }
                s.table[pin] |= REMOTE_IRR;
            }
            Self::message(entry)
        };
        self.msi.deliver(msg)
    }

    /// The LAPIC signalled EOI for `vector` (level-triggered interrupts only).
    pub fn end_of_interrupt(&self, vector: u8) {
        let mut redeliver = Vec::new();
        {
            let mut s = sync::lock(&self.state);
            for pin in 0..IOAPIC_PINS {
                let e = s.table[pin];
                if e & TRIGGER_LEVEL != 0 && e & REMOTE_IRR != 0 && (e & 0xff) as u8 == vector {
                    s.table[pin] &= !REMOTE_IRR;
                    if s.level[pin] && e & MASKED == 0 {
                        s.table[pin] |= REMOTE_IRR;
                        redeliver.push(Self::message(e));
                    }
                }
            }
        }
        for m in redeliver {
            if let Err(e) = self.msi.deliver(m) {
                crate::guest_warn!(error = %e, "IOAPIC re-delivery failed");
            }
        }
    }

    fn read_register(&self) -> u32 {
        let s = sync::lock(&self.state);
        match s.select {
            REG_ID | REG_ARB => s.id << 24,
            REG_VERSION => VERSION,
            r if (REG_TABLE..REG_TABLE + 2 * IOAPIC_PINS as u32).contains(&r) => {
                let i = ((r - REG_TABLE) / 2) as usize;
                let e = s.table[i];
                if (r - REG_TABLE).is_multiple_of(2) {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&self, value: u32) {
        let pending = {
            let mut s = sync::lock(&self.state);
            match s.select {
                REG_ID => {
                    s.id = (value >> 24) & 0xf;
                    None
                }
                r if (REG_TABLE..REG_TABLE + 2 * IOAPIC_PINS as u32).contains(&r) => {
                    let i = ((r - REG_TABLE) / 2) as usize;
                    let old = s.table[i];
                    let half = if (r - REG_TABLE).is_multiple_of(2) {
                        (old & !0xffff_ffff) | u64::from(value)
                    } else {
                        (old & 0xffff_ffff) | (u64::from(value) << 32)
                    };
                    s.table[i] = (old & !WRITABLE) | (half & WRITABLE);
                    if s.table[i] & TRIGGER_LEVEL == 0 {
                        s.table[i] &= !REMOTE_IRR;
                    }
                    // Unmasking a level-triggered line that is still asserted delivers it.
                    let e = s.table[i];
                    let unmasked = old & MASKED != 0 && e & MASKED == 0;
                    (unmasked && e & TRIGGER_LEVEL != 0 && s.level[i] && e & REMOTE_IRR == 0).then(
                        || {
                            s.table[i] |= REMOTE_IRR;
                            Self::message(e)
                        },
                    )
                }
                _ => None,
            }
        };
        if let Some(m) = pending {
            if let Err(e) = self.msi.deliver(m) {
                crate::guest_warn!(error = %e, "IOAPIC delivery failed");
            }
        }
    }
}

/// The IOAPIC's MMIO window.
pub struct IoapicMmio(pub Arc<Ioapic>);

impl BusDevice for IoapicMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = match offset {
            IOREGSEL => sync::lock(&self.0.state).select,
            IOWIN => self.0.read_register(),
            _ => 0,
        };
        let b = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            IOREGSEL => sync::lock(&self.0.state).select = v & 0xff,
            IOWIN => self.0.write_register(v),
            EOI => self.0.end_of_interrupt(v as u8),
            _ => {}
        }
    }
}

/// An edge-triggered input line of the IOAPIC (what a legacy device holds).
pub struct IoapicLine {
    pub ioapic: Arc<Ioapic>,
    pub pin: usize,
}

impl LineSink for IoapicLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.ioapic.set_line(self.pin, true)?;
        self.ioapic.set_line(self.pin, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Sink(Mutex<Vec<MsiMessage>>);
    impl MsiSink for Sink {
        fn deliver(&self, m: MsiMessage) -> std::io::Result<()> {
            self.0.lock().unwrap().push(m);
            Ok(())
        }
    }

    fn program(mmio: &mut IoapicMmio, pin: u32, entry: u64) {
        mmio.write(0, IOREGSEL, &(REG_TABLE + 2 * pin).to_le_bytes());
        mmio.write(0, IOWIN, &(entry as u32).to_le_bytes());
        mmio.write(0, IOREGSEL, &(REG_TABLE + 2 * pin + 1).to_le_bytes());
        mmio.write(0, IOWIN, &((entry >> 32) as u32).to_le_bytes());
    }

    #[test]
    fn edge_line_becomes_an_msi_to_the_programmed_cpu_and_vector() {
        let sink = Arc::new(Sink::default());
        let io = Arc::new(Ioapic::new(sink.clone()));
        let mut mmio = IoapicMmio(io.clone());
        let line = IoapicLine {
            ioapic: io.clone(),
            pin: 4,
        };
        line.trigger().unwrap();
        assert!(sink.0.lock().unwrap().is_empty(), "masked at reset");
        program(&mut mmio, 4, 0x24 | (3u64 << 56));
        line.trigger().unwrap();
        assert_eq!(
            sink.0.lock().unwrap().as_slice(),
            &[MsiMessage {
                address: 0xfee0_3000,
                data: 0x4024
            }]
        );
        mmio.write(0, IOREGSEL, &REG_VERSION.to_le_bytes());
        let mut v = [0u8; 4];
        mmio.read(0, IOWIN, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x0017_0020);
    }

    #[test]
    fn level_line_waits_for_eoi_and_redelivers_while_asserted() {
        let sink = Arc::new(Sink::default());
        let io = Arc::new(Ioapic::new(sink.clone()));
        let mut mmio = IoapicMmio(io.clone());
        program(&mut mmio, 9, 0x31 | TRIGGER_LEVEL);
        io.set_line(9, true).unwrap();
        io.set_line(9, true).unwrap();
        assert_eq!(
            sink.0.lock().unwrap().len(),
            1,
            "remote IRR blocks a second delivery"
        );
        io.end_of_interrupt(0x31);
        assert_eq!(
            sink.0.lock().unwrap().len(),
            2,
            "still asserted: delivered again"
        );
        io.set_line(9, false).unwrap();
        io.end_of_interrupt(0x31);
        assert_eq!(sink.0.lock().unwrap().len(), 2);
    }
}
