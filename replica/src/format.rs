//! The change log's bytes (little endian). A file is one segment:
//!
//! ```text
//! header   64 B  magic "VIREOCLG", version, seq, disk size, crc32c of bytes 0..60
//! record   32 B  kind, offset, len, crc32c of the data, crc32c of bytes 0..28
//!          len B the data (data records only; a zeroes record carries none)
//! ...
//! trailer  64 B  kind TRAILER, seq, cut id, records, data bytes, covered bytes,
//!                crc32c of every byte before the trailer, crc32c of bytes 0..60
//! ```
//! The file being written has no trailer yet; a sealed one ends with exactly one.

pub const MAGIC: &[u8; 8] = b"VIREOCLG";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
pub const RECORD_HEADER_LEN: usize = 32;
pub const TRAILER_LEN: usize = 64;
/// The largest data record a reader accepts (a virtio-blk request is far smaller):
/// a hostile length never makes a reader allocate more.
pub const MAX_RECORD_DATA: u64 = 64 << 20;
/// File names: the sequence number, zero padded, and this suffix.
pub const SEGMENT_SUFFIX: &str = ".vlog";

const KIND_DATA: u32 = 1;
const KIND_ZEROES: u32 = 2;
pub const KIND_TRAILER: u32 = 0x5452_4c52; // "RLRT"

/// What a record says happened to `offset..offset+len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// The guest wrote the bytes that follow the record header.
    Data,
    /// The range reads as zeros now (write-zeroes or discard).
    Zeroes,
}

/// The name of segment `seq`'s file.
pub fn segment_file_name(seq: u64) -> String {
    format!("{seq:020}{SEGMENT_SUFFIX}")
}

/// The sequence number in a segment file's name, if it is one.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub seq: u64,
    pub disk_size: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.disk_size.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, String> {
        if &b[0..8] != MAGIC {
            return Err("not a Vireo change log (bad magic)".into());
        }
        if crc32c::crc32c(&b[..60]) != u32_at(b, 60) {
            return Err("header checksum mismatch".into());
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(format!("version {version}, this build reads {VERSION}"));
        }
        Ok(Self {
            seq: u64_at(b, 16),
            disk_size: u64_at(b, 24),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub offset: u64,
    pub len: u64,
    pub data_crc: u32,
}

/// A record header, a trailer, or neither (torn or corrupt bytes).
pub enum Decoded {
    Record(RecordHeader),
    Trailer,
    Invalid(String),
}

impl RecordHeader {
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        let kind = match self.kind {
            RecordKind::Data => KIND_DATA,
            RecordKind::Zeroes => KIND_ZEROES,
        };
        b[0..4].copy_from_slice(&kind.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..28].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes the first 32 bytes at a record position.
    pub fn decode(b: &[u8; RECORD_HEADER_LEN]) -> Decoded {
        let kind = match u32_at(b, 0) {
            KIND_DATA => RecordKind::Data,
            KIND_ZEROES => RecordKind::Zeroes,
            KIND_TRAILER => return Decoded::Trailer,
            k => return Decoded::Invalid(format!("unknown record kind {k:#x}")),
        };
        if crc32c::crc32c(&b[..28]) != u32_at(b, 28) {
            return Decoded::Invalid("record header checksum mismatch".into());
        }
        Decoded::Record(Self {
            kind,
            offset: u64_at(b, 8),
            len: u64_at(b, 16),
            data_crc: u32_at(b, 24),
        })
    }

    /// Bytes of data that follow the header.
    pub fn data_len(&self) -> u64 {
        match self.kind {
            RecordKind::Data => self.len,
            RecordKind::Zeroes => 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrailerFields {
    pub seq: u64,
    pub cut_id: u64,
    pub records: u64,
    pub data_bytes: u64,
    pub covered_bytes: u64,
    pub body_crc: u32,
}

impl TrailerFields {
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        b[0..4].copy_from_slice(&KIND_TRAILER.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.cut_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.records.to_le_bytes());
        b[32..40].copy_from_slice(&self.data_bytes.to_le_bytes());
        b[40..48].copy_from_slice(&self.covered_bytes.to_le_bytes());
        b[48..52].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; TRAILER_LEN]) -> Result<Self, String> {
        if u32_at(b, 0) != KIND_TRAILER {
            return Err("no trailer mark".into());
        }
        if crc32c::crc32c(&b[..60]) != u32_at(b, 60) {
            return Err("trailer checksum mismatch".into());
        }
        Ok(Self {
            seq: u64_at(b, 8),
            cut_id: u64_at(b, 16),
            records: u64_at(b, 24),
            data_bytes: u64_at(b, 32),
            covered_bytes: u64_at(b, 40),
            body_crc: u32_at(b, 48),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_and_strangers_are_not_segments() {
        assert_eq!(parse_file_name(&segment_file_name(42)), Some(42));
        for stranger in [
            "42.vlog",
            "x0000000000000000042.vlog",
            "../00000000000000000042.vlog",
            "00000000000000000042.vlog.tmp",
        ] {
            assert_eq!(parse_file_name(stranger), None, "{stranger}");
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_in_a_record_header_is_caught() {
        let h = RecordHeader {
            kind: RecordKind::Data,
            offset: 4096,
            len: 512,
            data_crc: 7,
        };
        let good = h.encode();
        assert!(matches!(RecordHeader::decode(&good), Decoded::Record(r) if r == h));
        for bit in 0..(RECORD_HEADER_LEN * 8) {
            let mut b = good;
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                !matches!(RecordHeader::decode(&b), Decoded::Record(r) if r == h),
                "bit {bit}"
            );
        }
    }
}
