//! Zero detection over 16-byte words.

/// True if every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128, and align_to returns slices that
    // together cover exactly `buf`.
    let (head, words, tail) = unsafe { buf.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn a_single_set_byte_anywhere_is_seen() {
        // Offsets into a larger buffer give every alignment of head, words and tail.
        let backing = vec![0u8; 4096 + 64];
        for start in 0..17 {
            for len in [0, 1, 15, 16, 17, 31, 100, 4096] {
                let slice = &backing[start..start + len];
                assert!(is_zero(slice), "start {start} len {len}");
                for i in 0..len {
                    let mut copy = backing.clone();
                    copy[start + i] = 1;
                    assert!(
                        !is_zero(&copy[start..start + len]),
                        "start {start} len {len} byte {i}"
                    );
                }
            }
        }
    }
}
