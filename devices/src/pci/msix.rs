//! MSI-X: the capability in configuration space, and the vector table + pending-bit
//! array that live in a memory BAR.

use crate::interrupt::{MsiMessage, MsiSink};

pub const MSIX_ENTRY_SIZE: u64 = 16;
const MSIX_CAP_ID: u8 = 0x11;
const MSG_CTL_ENABLE: u16 = 1 << 15;
const MSG_CTL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CTL_MASKED: u32 = 1;

/// Builds the MSI-X capability bytes for [`crate::pci::PciConfiguration::add_capability`].
pub struct MsixCap;

impl MsixCap {
    /// Returns (body, writable mask) of a capability for `vectors` entries, with the table
    /// at `table_offset` and the PBA at `pba_offset`, both in BAR `bir`.
    pub fn build(vectors: u16, bir: u8, table_offset: u32, pba_offset: u32) -> (Vec<u8>, Vec<u8>) {
        let mut body = vec![MSIX_CAP_ID, 0];
        body.extend_from_slice(&(vectors - 1).to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bir)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bir)).to_le_bytes());
        // Only the enable and function-mask bits of message control are writable.
        let writable = vec![0, 0, 0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0];
        (body, writable)
    }

    /// Decodes message control (the upper half of the capability's first register).
    pub fn control(first_reg: u32) -> (bool, bool) {
        let ctl = (first_reg >> 16) as u16;
        (ctl & MSG_CTL_ENABLE != 0, ctl & MSG_CTL_FUNCTION_MASK != 0)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & VECTOR_CTL_MASKED != 0
    }
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

/// An MSI-X table as saved in a snapshot: per vector (address low, address high, data,
/// control), the pending bits, and the capability's enable and function-mask bits.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    pub entries: Vec<[u32; 4]>,
    pub pending: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// The vector table and pending bits of one function.
pub struct MsixTable {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
}

impl MsixTable {
    pub fn new(vectors: u16) -> Self {
        let n = usize::from(vectors);
        Self {
            entries: vec![
                Entry {
                    control: VECTOR_CTL_MASKED,
                    ..Default::default()
                };
                n
            ],
            pending: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
        }
    }

    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Follows the capability's message control; unmasking delivers pending vectors.
    pub fn set_control(&mut self, enabled: bool, function_masked: bool, sink: &dyn MsiSink) {
        self.enabled = enabled;
        self.function_masked = function_masked;
        self.deliver_pending(sink);
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let (idx, field) = (
            (offset / MSIX_ENTRY_SIZE) as usize,
            offset % MSIX_ENTRY_SIZE,
        );
        let Some(e) = self.entries.get(idx) else {
            data.fill(0xff);
            return;
        };
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(field as usize + i).copied().unwrap_or(0);
        }
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8], sink: &dyn MsiSink) {
        let (idx, field) = (
            (offset / MSIX_ENTRY_SIZE) as usize,
            offset % MSIX_ENTRY_SIZE,
        );
        let Some(e) = self.entries.get_mut(idx) else {
            return;
        };
        let mut bytes = [0u8; 16];
        for (i, w) in [e.addr_lo, e.addr_hi, e.data, e.control].iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        for (i, d) in data.iter().enumerate() {
            if let Some(b) = bytes.get_mut(field as usize + i) {
                *b = *d;
            }
        }
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let was_masked = e.masked();
        *e = Entry {
            addr_lo: word(0),
            addr_hi: word(4),
            data: word(8),
            control: word(12),
        };
        if was_masked && !e.masked() {
            self.deliver_pending(sink);
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let mut bytes = Vec::with_capacity(self.pending.len() * 8);
        for p in &self.pending {
            bytes.extend_from_slice(&p.to_le_bytes());
        }
        for (i, d) in data.iter_mut().enumerate() {
            // checked: an offset near u64::MAX must not wrap round to the first bytes.
            let at = offset
                .checked_add(i as u64)
                .and_then(|a| usize::try_from(a).ok());
            *d = at.and_then(|a| bytes.get(a)).copied().unwrap_or(0);
        }
    }

    /// Signals `vector`: delivered now, or left pending while masked.
    pub fn signal(&mut self, vector: u16, sink: &dyn MsiSink) -> std::io::Result<()> {
        let v = usize::from(vector);
        let Some(e) = self.entries.get(v) else {
            return Ok(());
        };
        if !self.enabled {
            return Ok(());
        }
        if self.function_masked || e.masked() {
            self.pending[v / 64] |= 1 << (v % 64);
            return Ok(());
        }
        sink.deliver(e.message())
    }

    fn deliver_pending(&mut self, sink: &dyn MsiSink) {
        if !self.enabled || self.function_masked {
            return;
        }
        for v in 0..self.entries.len() {
            let bit = 1u64 << (v % 64);
            if self.pending[v / 64] & bit != 0 && !self.entries[v].masked() {
                self.pending[v / 64] &= !bit;
                if let Err(e) = sink.deliver(self.entries[v].message()) {
                    crate::guest_warn!(vector = v, error = %e, "MSI-X delivery failed");
                }
            }
        }
    }
}

impl MsixTable {
    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self
                .entries
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.control])
                .collect(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Takes a saved table of the same size (no interrupt is delivered: pending bits
    /// stay pending until the guest unmasks, as on the source).
    pub fn restore(&mut self, s: &MsixState) -> Result<(), String> {
        if s.entries.len() != self.entries.len() || s.pending.len() != self.pending.len() {
            return Err(format!(
                "MSI-X table has {} vectors, the snapshot {}",
                self.entries.len(),
                s.entries.len()
            ));
        }
        for (e, [addr_lo, addr_hi, data, control]) in self.entries.iter_mut().zip(&s.entries) {
            *e = Entry {
                addr_lo: *addr_lo,
                addr_hi: *addr_hi,
                data: *data,
                control: *control,
            };
        }
        self.pending.clone_from(&s.pending);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Sink(Mutex<Vec<MsiMessage>>);
    impl MsiSink for Sink {
        fn deliver(&self, msg: MsiMessage) -> std::io::Result<()> {
            self.0.lock().unwrap().push(msg);
            Ok(())
        }
    }

    #[test]
    fn masked_vectors_pend_until_unmasked() {
        let sink = Sink::default();
        let mut t = MsixTable::new(2);
        t.set_control(true, false, &sink);
        t.write_table(16, &0xfee0_0000u32.to_le_bytes(), &sink);
        t.write_table(24, &0x41u32.to_le_bytes(), &sink);
        t.signal(1, &sink).unwrap();
        assert!(sink.0.lock().unwrap().is_empty(), "entries start masked");
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        t.write_table(28, &0u32.to_le_bytes(), &sink);
        assert_eq!(
            *sink.0.lock().unwrap(),
            vec![MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            }]
        );
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
    }

    /// Found in the issue-12 audit: `offset + i` wrapped, so reading the PBA at an
    /// offset near u64::MAX returned its first bytes (release) or panicked (debug).
    #[test]
    fn a_pba_read_at_an_offset_that_would_wrap_reads_zeroes() {
        let sink = Sink::default();
        let mut t = MsixTable::new(2);
        t.set_control(true, false, &sink);
        t.signal(0, &sink).unwrap(); // masked: pending bit 0
        let mut pba = [0xffu8; 4];
        t.read_pba(0, &mut pba);
        assert_eq!(pba, [1, 0, 0, 0]);
        t.read_pba(u64::MAX, &mut pba);
        assert_eq!(pba, [0; 4]);
    }
}
