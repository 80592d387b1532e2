//! The Ethernet frames of the guest's `test=net`, shared by the guest and the host
//! tests (included with `#[path]`, like pattern.rs). Core only.
//!
//! Frame `index` of a stream with `seed` (length `frame_len(index, max_len)`):
//! destination MAC, source MAC, ethertype 0x88B5 (IEEE local experimental), the index
//! as a little-endian u32, then payload byte `i` = the i-th byte of the xorshift64*
//! stream seeded with `pattern::sector_state(seed, index)` (8 little-endian bytes per
//! step, as in pattern.rs).

#![allow(dead_code)]

pub const ETHERTYPE: u16 = 0x88b5;
/// Ethernet header (14) + the index (4).
pub const HEADER_LEN: usize = 18;
/// Shortest frame sent (the Ethernet minimum without the FCS).
pub const MIN_LEN: usize = 60;
/// Longest frame for a 1500-byte MTU.
pub const MAX_LEN: usize = 1514;
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// Length of frame `index` when lengths vary up to `max_len` (60..=1514): spread over
/// the whole range, starting at `max_len`.
pub fn frame_len(index: u32, max_len: usize) -> usize {
    let max = max_len.clamp(MIN_LEN, MAX_LEN);
    let span = (max - MIN_LEN + 1) as u64;
    MIN_LEN + ((span - 1 + u64::from(index) * 331) % span) as usize
}

fn payload_byte_stream(seed: u64, index: u32) -> impl Iterator<Item = u8> {
    let mut s = super::pattern::sector_state(seed, u64::from(index));
    core::iter::repeat_with(move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    })
    .flatten()
}

/// Fills `frame` (at least HEADER_LEN bytes) as frame `index` of `seed`.
pub fn fill(frame: &mut [u8], dst: [u8; 6], src: [u8; 6], seed: u64, index: u32) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    frame[14..18].copy_from_slice(&index.to_le_bytes());
    for (b, p) in frame[HEADER_LEN..]
        .iter_mut()
        .zip(payload_byte_stream(seed, index))
    {
        *b = p;
    }
}

/// Whether `frame` is one of ours: the ethertype.
pub fn is_test_frame(frame: &[u8]) -> bool {
    frame.len() >= HEADER_LEN && frame[12..14] == ETHERTYPE.to_be_bytes()
}

/// The index of a test frame and whether its payload is right for `seed`.
pub fn check(frame: &[u8], seed: u64) -> Option<(u32, bool)> {
    if !is_test_frame(frame) {
        return None;
    }
    let index = u32::from_le_bytes([frame[14], frame[15], frame[16], frame[17]]);
    let ok = frame[HEADER_LEN..]
        .iter()
        .zip(payload_byte_stream(seed, index))
        .all(|(a, b)| *a == b);
    Some((index, ok))
}
