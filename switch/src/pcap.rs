//! pcapng blocks for the switch's port traces (what `vireo-switch trace PORT` writes):
//! a section header, one Ethernet interface, then one enhanced packet block per
//! frame with its direction (`epb_flags`) and a comment naming the port and the
//! verdict (`opt_comment`), so tshark/Wireshark show both. Little-endian.

use crate::extension::Direction;
use crate::TraceRecord;

const SHB: u32 = 0x0a0d_0d0a;
const IDB: u32 = 1;
const EPB: u32 = 6;
const LINKTYPE_ETHERNET: u16 = 1;

fn pad4(v: &mut Vec<u8>) {
    v.resize(v.len().next_multiple_of(4), 0);
}

fn option(v: &mut Vec<u8>, code: u16, value: &[u8]) {
    v.extend_from_slice(&code.to_le_bytes());
    v.extend_from_slice(&(value.len() as u16).to_le_bytes());
    v.extend_from_slice(value);
    pad4(v);
}

/// A whole block: type, total length, body, total length.
fn block(ty: u32, body: &[u8]) -> Vec<u8> {
    let total = (12 + body.len()) as u32;
    let mut b = Vec::with_capacity(total as usize);
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(&total.to_le_bytes());
    b.extend_from_slice(body);
    b.extend_from_slice(&total.to_le_bytes());
    b
}

/// The section header and the one interface (`name`, microsecond timestamps).
pub fn header(name: &str) -> Vec<u8> {
    let mut shb = Vec::new();
    shb.extend_from_slice(&0x1a2b_3c4du32.to_le_bytes());
    shb.extend_from_slice(&1u16.to_le_bytes());
    shb.extend_from_slice(&0u16.to_le_bytes());
    shb.extend_from_slice(&(-1i64).to_le_bytes());
    option(&mut shb, 4, b"vireo-switch"); // shb_userappl
    option(&mut shb, 0, &[]);
    let mut idb = Vec::new();
    idb.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    idb.extend_from_slice(&0u16.to_le_bytes());
    idb.extend_from_slice(&0u32.to_le_bytes()); // no snap length limit
    option(&mut idb, 2, name.as_bytes()); // if_name
    option(&mut idb, 0, &[]);
    let mut out = block(SHB, &shb);
    out.extend_from_slice(&block(IDB, &idb));
    out
}

/// The comment a record carries: `<port> from-vm|to-vm pass|drop:<reason>`.
pub fn comment(port: &str, r: &TraceRecord) -> String {
    let dir = match r.direction {
        Direction::Outbound => "from-vm",
        Direction::Inbound => "to-vm",
    };
    match r.dropped {
        None => format!("{port} {dir} pass"),
        Some(why) => format!("{port} {dir} drop:{}", why.0),
    }
}

/// One frame: timestamp in microseconds since the epoch.
pub fn packet(r: &TraceRecord, port: &str, micros: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(r.frame.len() + 96);
    b.extend_from_slice(&0u32.to_le_bytes()); // interface 0
    b.extend_from_slice(&((micros >> 32) as u32).to_le_bytes());
    b.extend_from_slice(&(micros as u32).to_le_bytes());
    b.extend_from_slice(&(r.frame.len() as u32).to_le_bytes());
    b.extend_from_slice(&(r.frame.len() as u32).to_le_bytes());
    b.extend_from_slice(&r.frame);
    pad4(&mut b);
    // epb_flags: direction relative to the interface (1 inbound: the port's host
    // sent it to the switch; 2 outbound: the switch sent it to the port).
    let flags: u32 = match r.direction {
        Direction::Outbound => 1,
        Direction::Inbound => 2,
    };
    option(&mut b, 2, &flags.to_le_bytes());
    option(&mut b, 1, comment(port, r).as_bytes());
    option(&mut b, 0, &[]);
    block(EPB, &b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extension::DropReason;

    #[test]
    fn blocks_are_framed_and_padded() {
        let h = header("vm1");
        assert_eq!(h[..4], SHB.to_le_bytes());
        let shb_len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        assert_eq!(h[shb_len - 4..shb_len], h[4..8], "trailing length");
        assert_eq!(h[shb_len..shb_len + 4], IDB.to_le_bytes());
        assert!(h.len().is_multiple_of(4));
        let r = TraceRecord {
            port: 1,
            direction: Direction::Outbound,
            dropped: Some(DropReason("acl")),
            frame: vec![7; 61],
        };
        let p = packet(&r, "vm1", 1_700_000_000_123_456);
        assert!(p.len().is_multiple_of(4));
        assert_eq!(p[..4], EPB.to_le_bytes());
        assert_eq!(
            u32::from_le_bytes(p[4..8].try_into().unwrap()) as usize,
            p.len()
        );
        assert_eq!(u32::from_le_bytes(p[20..24].try_into().unwrap()), 61);
        assert!(p.windows(20).any(|w| w == b"vm1 from-vm drop:acl"));
    }
}
