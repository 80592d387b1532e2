//! The vfio-user wire format (the protocol's version 0.1 as QEMU, SPDK and the
//! `vfio_user` crate speak it): a 16-byte header, then the command's fields, all
//! little-endian. Only what the client sends and reads is here; every reply is
//! checked before a field of it is used.

/// Commands (vfio-user specification, "Commands").
pub const VERSION: u16 = 1;
pub const DMA_MAP: u16 = 2;
pub const DEVICE_GET_INFO: u16 = 4;
pub const DEVICE_GET_REGION_INFO: u16 = 5;
pub const DEVICE_GET_IRQ_INFO: u16 = 7;
pub const DEVICE_SET_IRQS: u16 = 8;
pub const REGION_READ: u16 = 9;
pub const REGION_WRITE: u16 = 10;

/// Header flags: the message type (bits 0..3), no-reply, error.
const FLAG_TYPE_MASK: u32 = 0xf;
const FLAG_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;

pub const HEADER_SIZE: usize = 16;

/// `vfio_device_info.flags`: the device is a PCI function.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;
/// vfio-pci region indices: BAR0..BAR5, then ROM, then configuration space.
pub const CONFIG_REGION: u32 = 7;
/// vfio-pci interrupt indices.
pub const MSIX_IRQ_INDEX: u32 = 2;
/// `VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER`.
pub const IRQ_SET_EVENTFD_TRIGGER: u32 = (1 << 2) | (1 << 5);
/// `VFIO_IRQ_INFO_EVENTFD`: the interrupt can be signalled through an eventfd.
pub const IRQ_INFO_EVENTFD: u32 = 1;
/// DMA_MAP flags: the server may read and write the range.
pub const DMA_READ_WRITE: u32 = 0b11;

/// One message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub command: u16,
    /// The whole message's size, header included.
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    pub fn command(id: u16, command: u16, payload: usize) -> Self {
        Self {
            id,
            command,
            size: (HEADER_SIZE + payload) as u32,
            flags: 0,
            error: 0,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_SIZE]) -> Self {
        Self {
            id: u16::from_le_bytes([b[0], b[1]]),
            command: u16::from_le_bytes([b[2], b[3]]),
            size: u32_at(b, 4),
            flags: u32_at(b, 8),
            error: u32_at(b, 12),
        }
    }

    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == FLAG_REPLY
    }

    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }
}

/// The little-endian u32 at `at` (0 past the end: callers check lengths first).
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}

/// The little-endian u64 at `at` (0 past the end).
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// A payload built field by field.
#[derive(Default)]
pub struct Fields(pub Vec<u8>);

impl Fields {
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_classify() {
        let h = Header::command(7, REGION_READ, 16);
        assert_eq!(Header::decode(&h.encode()), h);
        assert_eq!(h.size, 32);
        assert!(!h.is_reply());
        let r = Header {
            flags: FLAG_REPLY | FLAG_ERROR,
            ..h
        };
        assert!(r.is_reply() && r.is_error());
        assert_eq!(u32_at(&[1, 0, 0], 0), 0, "short input reads as 0");
    }
}
