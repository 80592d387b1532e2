//! A type-0 PCI configuration space with BAR sizing and a capability list.

/// PCI Express functions have 4 KiB of configuration space.
pub const CONFIG_SPACE_SIZE: usize = 4096;
const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;
const BAR0_REG: usize = 4;
const NUM_BARS: usize = 6;
const STATUS_CAP_LIST: u32 = 1 << 20;
const CAP_PTR_REG: usize = 0x34 / 4;
const FIRST_CAP_OFFSET: usize = 0x40;
const COMMAND_MEMORY: u32 = 1 << 1;

/// Identity of a function.
#[derive(Clone, Copy, Debug)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub class_code: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub revision: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Memory32,
    Memory64,
}

/// A memory BAR as the VMM lays it out.
#[derive(Clone, Copy, Debug)]
pub struct PciBar {
    pub index: usize,
    pub kind: BarKind,
    pub size: u64,
    pub prefetchable: bool,
}

/// Configuration space of one function: register values plus the mask of bits the
/// guest may write.
pub struct PciConfiguration {
    regs: Box<[u32; NUM_REGS]>,
    writable: Box<[u32; NUM_REGS]>,
    bars: [Option<PciBar>; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfiguration {
    pub fn new(h: &PciHeader) -> Self {
        let mut regs = Box::new([0u32; NUM_REGS]);
        let mut writable = Box::new([0u32; NUM_REGS]);
        regs[0] = u32::from(h.device_id) << 16 | u32::from(h.vendor_id);
        // Command: I/O, memory, bus master, INTx disable are writable.
        writable[1] = 0x0000_0407;
        regs[2] = u32::from(h.class_code) << 24
            | u32::from(h.subclass) << 16
            | u32::from(h.prog_if) << 8
            | u32::from(h.revision);
        regs[11] = u32::from(h.subsystem_id) << 16 | u32::from(h.subsystem_vendor_id);
        // Interrupt line is writable scratch for the guest.
        writable[15] = 0xff;
        Self {
            regs,
            writable,
            bars: [None; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAP_OFFSET,
        }
    }

    /// Declares a memory BAR of `size` bytes (a power of two, at least 4 KiB here).
    pub fn add_bar(&mut self, bar: PciBar) {
        let size = bar.size.next_power_of_two().max(0x1000);
        let reg = BAR0_REG + bar.index;
        let mut low = 0u32;
        if bar.kind == BarKind::Memory64 {
            low |= 0b100;
        }
        if bar.prefetchable {
            low |= 0b1000;
        }
        self.regs[reg] = low;
        self.writable[reg] = !(size as u32 - 1) & !0xf;
        if size > u64::from(u32::MAX) && bar.kind == BarKind::Memory32 {
            tracing::warn!(size, "32-bit BAR larger than 4 GiB");
        }
        if bar.kind == BarKind::Memory64 {
            self.writable[reg + 1] = !((size - 1) >> 32) as u32;
        }
        self.bars[bar.index] = Some(PciBar { size, ..bar });
    }

    pub fn bars(&self) -> impl Iterator<Item = &PciBar> {
        self.bars.iter().flatten()
    }

    /// Current guest-physical address of BAR `index` (0 when unassigned).
    pub fn bar_address(&self, index: usize) -> u64 {
        let Some(bar) = self.bars.get(index).copied().flatten() else {
            return 0;
        };
        let low = u64::from(self.regs[BAR0_REG + index] & !0xf);
        match bar.kind {
            BarKind::Memory32 => low,
            BarKind::Memory64 => low | u64::from(self.regs[BAR0_REG + index + 1]) << 32,
        }
    }

    /// Programs BAR `index` (what firmware would do).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(bar) = self.bars.get(index).copied().flatten() else {
            return;
        };
        let reg = BAR0_REG + index;
        self.regs[reg] = (self.regs[reg] & 0xf) | (addr as u32 & !0xf);
        if bar.kind == BarKind::Memory64 {
            self.regs[reg + 1] = (addr >> 32) as u32;
        }
    }

    pub fn memory_enabled(&self) -> bool {
        self.regs[1] & COMMAND_MEMORY != 0
    }

    /// Enables memory decoding and bus mastering (what firmware does).
    pub fn enable_memory_and_master(&mut self) {
        self.regs[1] |= 0b110;
    }

    /// Appends a capability whose first two bytes (id, next) the space fills in.
    /// `body` is the capability starting at its ID byte; `writable` masks per byte.
    /// Returns the capability's offset.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> usize {
        let offset = self.next_cap;
        let len = body.len().div_ceil(4) * 4;
        for (i, &b) in body.iter().enumerate() {
            self.set_byte(offset + i, b);
            let w = writable.get(i).copied().unwrap_or(0);
            let reg = (offset + i) / 4;
            let shift = ((offset + i) % 4) * 8;
            self.writable[reg] = (self.writable[reg] & !(0xff << shift)) | (u32::from(w) << shift);
        }
        self.set_byte(offset + 1, 0);
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => {
                self.regs[CAP_PTR_REG] = offset as u32;
                self.regs[1] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = offset + len;
        offset
    }

    fn set_byte(&mut self, offset: usize, b: u8) {
        let reg = offset / 4;
        let shift = (offset % 4) * 8;
        self.regs[reg] = (self.regs[reg] & !(0xff << shift)) | (u32::from(b) << shift);
    }

    /// Every register, as a snapshot saves them.
    pub fn registers(&self) -> Vec<u32> {
        self.regs.to_vec()
    }

    /// Puts back saved registers (the layout — BARs, capabilities — is the device's own
    /// and must match, which the caller checks through the vendor/device ids).
    pub fn restore_registers(&mut self, regs: &[u32]) -> Result<(), String> {
        if regs.len() != NUM_REGS {
            return Err(format!(
                "configuration space of {} registers, expected {NUM_REGS}",
                regs.len()
            ));
        }
        if regs[0] != self.regs[0] {
            return Err(format!(
                "vendor/device id {:#010x} in the snapshot, {:#010x} here",
                regs[0], self.regs[0]
            ));
        }
        self.regs.copy_from_slice(regs);
        Ok(())
    }

    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` of register `reg`, honouring the
    /// writable mask (so BAR sizing reads back the size mask).
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) {
        // checked: an offset near u64::MAX must not wrap round to a small one.
        let fits = matches!(offset.checked_add(data.len() as u64), Some(end) if end <= 4);
        if reg >= NUM_REGS || !fits {
            return;
        }
        let shift = offset as usize * 8;
        let mut value = 0u32;
        let mut byte_mask = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << (shift + i * 8);
            byte_mask |= 0xff << (shift + i * 8);
        }
        let mask = self.writable[reg] & byte_mask;
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
    }

    /// The BAR index a register belongs to (the high half of a 64-bit BAR maps to its
    /// low half's index).
    pub fn bar_of_register(&self, reg: usize) -> Option<usize> {
        let idx = reg.checked_sub(BAR0_REG)?;
        if idx >= NUM_BARS {
            return None;
        }
        if self.bars[idx].is_some() {
            return Some(idx);
        }
        let prev = idx.checked_sub(1)?;
        match self.bars[prev] {
            Some(b) if b.kind == BarKind::Memory64 => Some(prev),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            class_code: 1,
            subclass: 0,
            prog_if: 0,
            revision: 1,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    /// Found in the issue-12 audit: `offset + len` wrapped, so an offset near u64::MAX
    /// passed the bound and wrote a byte (release) or panicked (debug).
    #[test]
    fn a_write_at_an_offset_that_would_wrap_changes_nothing() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(PciBar {
            index: 0,
            kind: BarKind::Memory32,
            size: 0x1000,
            prefetchable: false,
        });
        let before = c.read_reg(4);
        for offset in [u64::MAX, u64::MAX - 1, u64::MAX - 3, 1 << 63] {
            c.write_reg(4, offset, &[0xab]);
            c.write_reg(4, offset, &[0xab, 0xcd]);
        }
        assert_eq!(c.read_reg(4), before);
        c.write_reg(4, 3, &[0xab]);
        assert_eq!(
            c.read_reg(4),
            before | 0xab00_0000,
            "a fitting write still lands"
        );
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(PciBar {
            index: 0,
            kind: BarKind::Memory64,
            size: 0x8000,
            prefetchable: false,
        });
        c.write_reg(4, 0, &0xffff_ffffu32.to_le_bytes());
        c.write_reg(5, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_reg(4), 0xffff_8004);
        assert_eq!(c.read_reg(5), 0xffff_ffff);
        c.set_bar_address(0, 0x1_2345_8000);
        assert_eq!(c.bar_address(0), 0x1_2345_8000);
        assert_eq!(c.bar_of_register(5), Some(0));
        assert_eq!(c.bar_of_register(6), None);
    }

    #[test]
    fn capabilities_form_a_list() {
        let mut c = PciConfiguration::new(&header());
        let a = c.add_capability(&[0x09, 0, 1, 2, 3], &[]);
        let b = c.add_capability(&[0x11, 0, 0, 0], &[0, 0, 0xff, 0xff]);
        assert_eq!(c.read_reg(0x34 / 4) & 0xff, a as u32);
        assert_ne!(c.read_reg(1) & STATUS_CAP_LIST, 0);
        assert_eq!((c.read_reg(a / 4) >> 8) & 0xff, b as u32);
        c.write_reg(b / 4, 2, &[0x34, 0x12]);
        assert_eq!(c.read_reg(b / 4) >> 16, 0x1234);
        c.write_reg(a / 4, 2, &[0xaa]);
        assert_eq!(
            (c.read_reg(a / 4) >> 16) & 0xff,
            1,
            "read-only byte unchanged"
        );
    }
}
