//! File type identifier and the two headers: parsing, CRC-32C, choosing the
//! current header per MS-VHDX 2.2.2, and building the next one.

use crate::bytes::*;
use crate::error::{Error, Result};
use uuid::Uuid;

pub(crate) const FILE_ID_SIGNATURE: &[u8; 8] = b"vhdxfile";
pub(crate) const HEADER_SIGNATURE: &[u8; 4] = b"head";
pub(crate) const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub(crate) const HEADER_SIZE: usize = 4096;

/// One of the two headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence_number: u64,
    pub file_write_guid: Uuid,
    pub data_write_guid: Uuid,
    pub log_guid: Uuid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Parses and validates (signature, CRC-32C, version) a 4 KiB header.
    pub(crate) fn parse(b: &[u8]) -> std::result::Result<Header, String> {
        if b.len() < HEADER_SIZE {
            return Err("truncated".into());
        }
        let b = &b[..HEADER_SIZE];
        if &b[0..4] != HEADER_SIGNATURE {
            return Err("bad signature".into());
        }
        let stored = le32(b, 4);
        let computed = crc_with_zero_field(b, 4);
        if stored != computed {
            return Err(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let h = Header {
            sequence_number: le64(b, 8),
            file_write_guid: guid(b, 16),
            data_write_guid: guid(b, 32),
            log_guid: guid(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        };
        if h.version != 1 {
            return Err(format!("unsupported version {}", h.version));
        }
        Ok(h)
    }

    /// Serializes to 4 KiB with a correct checksum.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(HEADER_SIGNATURE);
        put64(&mut b, 8, self.sequence_number);
        put_guid(&mut b, 16, &self.file_write_guid);
        put_guid(&mut b, 32, &self.data_write_guid);
        put_guid(&mut b, 48, &self.log_guid);
        put16(&mut b, 64, self.log_version);
        put16(&mut b, 66, self.version);
        put32(&mut b, 68, self.log_length);
        put64(&mut b, 72, self.log_offset);
        let c = crc32c::crc32c(&b);
        put32(&mut b, 4, c);
        b
    }
}

/// Picks the current header: the valid one, or the valid one with the higher
/// sequence number. Two valid headers with equal sequence numbers are accepted
/// only when identical (as some tools write them); otherwise the file is corrupt.
/// Returns the index (0 or 1) of the current header.
pub(crate) fn select_current(
    path: &str,
    h: &[std::result::Result<Header, String>; 2],
) -> Result<usize> {
    match (&h[0], &h[1]) {
        (Ok(_), Err(e)) => {
            tracing::warn!(path, "header 2 invalid ({e}); using header 1");
            Ok(0)
        }
        (Err(e), Ok(_)) => {
            tracing::warn!(path, "header 1 invalid ({e}); using header 2");
            Ok(1)
        }
        (Err(e1), Err(e2)) => Err(Error::corrupt(
            path,
            "headers",
            HEADER_OFFSETS[0],
            format!("both headers invalid: header 1: {e1}; header 2: {e2}"),
        )),
        (Ok(a), Ok(b)) => {
            if a.sequence_number > b.sequence_number {
                Ok(0)
            } else if b.sequence_number > a.sequence_number {
                Ok(1)
            } else if a == b {
                Ok(0)
            } else {
                Err(Error::corrupt(
                    path,
                    "headers",
                    HEADER_OFFSETS[0],
                    format!(
                        "both headers valid with the same sequence number {} but different contents",
                        a.sequence_number
                    ),
                ))
            }
        }
    }
}

/// The file type identifier (first 64 KiB).
pub(crate) fn file_identifier(creator: &str) -> Vec<u8> {
    let mut b = vec![0u8; 64 * KIB as usize];
    b[0..8].copy_from_slice(FILE_ID_SIGNATURE);
    let c = utf16le(creator);
    let n = c.len().min(510);
    b[8..8 + n].copy_from_slice(&c[..n]);
    b
}

/// Reads the creator string out of a file identifier.
pub(crate) fn creator(b: &[u8]) -> String {
    if b.len() < 520 {
        return String::new();
    }
    let raw = &b[8..520];
    let end = raw
        .chunks_exact(2)
        .position(|c| c == [0, 0])
        .map(|p| p * 2)
        .unwrap_or(raw.len());
    from_utf16le(&raw[..end]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(seq: u64) -> Header {
        Header {
            sequence_number: seq,
            file_write_guid: Uuid::new_v4(),
            data_write_guid: Uuid::new_v4(),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: 1 << 20,
        }
    }

    #[test]
    fn roundtrip_and_crc() {
        let h = hdr(7);
        let mut b = h.to_bytes();
        assert_eq!(Header::parse(&b).unwrap(), h);
        b[100] ^= 1;
        assert!(Header::parse(&b).unwrap_err().contains("checksum"));
    }

    #[test]
    fn selection_rules() {
        let a = hdr(5);
        let b = hdr(6);
        assert_eq!(
            select_current("x", &[Ok(a.clone()), Ok(b.clone())]).unwrap(),
            1
        );
        assert_eq!(
            select_current("x", &[Ok(b.clone()), Ok(a.clone())]).unwrap(),
            0
        );
        assert_eq!(
            select_current("x", &[Ok(a.clone()), Ok(a.clone())]).unwrap(),
            0
        );
        let mut c = a.clone();
        c.file_write_guid = Uuid::new_v4();
        assert!(select_current("x", &[Ok(a.clone()), Ok(c)]).is_err());
        assert_eq!(select_current("x", &[Err("bad".into()), Ok(a)]).unwrap(), 1);
        assert!(select_current("x", &[Err("bad".into()), Err("bad".into())]).is_err());
    }
}
