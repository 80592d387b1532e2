//! Deterministic disk pattern shared by the Vireo test guest and the host-side tests.
//!
//! Standalone and dependency-free (core only), so both sides include this one file:
//!
//! ```ignore
//! #[path = "../tests/guest/pattern.rs"]   // path relative to the including file
//! mod pattern;
//! ```
//!
//! Algorithm (the guest contract; change it only together with the tests):
//! * Each 512-byte sector is generated independently from `(seed, lba)`, so any range of
//!   sectors can be written or verified on its own.
//! * Per-sector state: `s = splitmix64_mix(seed ^ lba.wrapping_mul(0x9E3779B97F4A7C15))`, where
//!   `splitmix64_mix(z) = { z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
//!   z = (z ^ (z >> 27)) * 0x94D049BB133111EB; z ^ (z >> 31) }` (wrapping multiplies);
//!   if `s == 0` use `0x9E3779B97F4A7C15`.
//! * The sector is 64 little-endian u64 words; word `i` (i = 0..63) is the i-th output of
//!   xorshift64* on `s`: `s ^= s >> 12; s ^= s << 25; s ^= s >> 27;
//!   out = s.wrapping_mul(0x2545F4914F6CDD1D)`.
//! * Known answers: `expected_crc32(42, 5, 1000) == 0xe82b1ae9`; sector 0 under seed 0 starts
//!   with the bytes checked in the unit test below.
//! * Checksums printed by the guest are CRC-32/ISO-HDLC (the zlib/Ethernet CRC: reflected
//!   polynomial 0xEDB88320, init 0xFFFFFFFF, final xor 0xFFFFFFFF) over the bytes of all
//!   sectors in LBA order; `crc32(b"123456789") == 0xCBF43926`.

#![allow(dead_code)]

/// Sector size the pattern is defined on.
pub const SECTOR_SIZE: usize = 512;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Initial xorshift64* state for one sector.
pub fn sector_state(seed: u64, lba: u64) -> u64 {
    let mut z = seed ^ lba.wrapping_mul(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    if z == 0 {
        GOLDEN
    } else {
        z
    }
}

/// Fills `buf` (exactly one sector) with the pattern of sector `lba` under `seed`.
pub fn fill_sector(seed: u64, lba: u64, buf: &mut [u8]) {
    assert_eq!(buf.len(), SECTOR_SIZE);
    let mut s = sector_state(seed, lba);
    for word in buf.chunks_exact_mut(8) {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        word.copy_from_slice(&s.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
}

/// Fills `buf` (a whole number of sectors) with the pattern starting at sector `first_lba`.
pub fn fill(seed: u64, first_lba: u64, buf: &mut [u8]) {
    assert_eq!(buf.len() % SECTOR_SIZE, 0);
    for (i, sector) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        fill_sector(seed, first_lba + i as u64, sector);
    }
}

/// True if `sector` (one sector) holds the pattern of sector `lba` under `seed`.
pub fn check_sector(seed: u64, lba: u64, sector: &[u8]) -> bool {
    assert_eq!(sector.len(), SECTOR_SIZE);
    let mut expect = [0u8; SECTOR_SIZE];
    fill_sector(seed, lba, &mut expect);
    expect[..] == sector[..]
}

/// The inverse of `z * m` for odd `m` (mod 2^64), by Newton's iteration.
const fn mul_inverse(m: u64) -> u64 {
    let mut inv = m;
    let mut i = 0;
    while i < 6 {
        inv = inv.wrapping_mul(2u64.wrapping_sub(m.wrapping_mul(inv)));
        i += 1;
    }
    inv
}

/// Undoes `y = x ^ (x >> k)`.
fn unxorshift_right(y: u64, k: u32) -> u64 {
    let mut x = y;
    let mut i = 0;
    while i < 64 / k + 1 {
        x = y ^ (x >> k);
        i += 1;
    }
    x
}

/// Undoes `y = x ^ (x << k)`.
fn unxorshift_left(y: u64, k: u32) -> u64 {
    let mut x = y;
    let mut i = 0;
    while i < 64 / k + 1 {
        x = y ^ (x << k);
        i += 1;
    }
    x
}

/// The seed whose pattern sector `lba` holds, if it holds one: the first word is
/// inverted back to the seed (every step of [`sector_state`] and of xorshift64* is a
/// bijection), and the whole sector is then checked against that seed's pattern. A
/// zeroed, torn or foreign sector gives `None`.
pub fn seed_of_sector(lba: u64, sector: &[u8]) -> Option<u64> {
    if sector.len() != SECTOR_SIZE {
        return None;
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&sector[..8]);
    let out = u64::from_le_bytes(w);
    // out = xorshift(s) * M  =>  s = unxorshift(out * M^-1).
    let mut s = out.wrapping_mul(mul_inverse(0x2545_F491_4F6C_DD1D));
    s = unxorshift_right(s, 27);
    s = unxorshift_left(s, 25);
    s = unxorshift_right(s, 12);
    // s = mix(seed ^ lba * GOLDEN), mix = three xorshift-multiply steps.
    let mut z = unxorshift_right(s, 31);
    z = z.wrapping_mul(mul_inverse(0x94D0_49BB_1331_11EB));
    z = unxorshift_right(z, 27);
    z = z.wrapping_mul(mul_inverse(0xBF58_476D_1CE4_E5B9));
    z = unxorshift_right(z, 30);
    let seed = z ^ lba.wrapping_mul(GOLDEN);
    check_sector(seed, lba, sector).then_some(seed)
}

/// The seed of a whole run of sectors starting at `first_lba`, if every sector holds
/// the pattern of one and the same seed.
pub fn seed_of(first_lba: u64, buf: &[u8]) -> Option<u64> {
    if buf.is_empty() || !buf.len().is_multiple_of(SECTOR_SIZE) {
        return None;
    }
    let seed = seed_of_sector(first_lba, &buf[..SECTOR_SIZE])?;
    buf.chunks_exact(SECTOR_SIZE)
        .enumerate()
        .all(|(i, s)| check_sector(seed, first_lba + i as u64, s))
        .then_some(seed)
}

const fn crc32_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32_TABLE: [u32; 256] = crc32_table();

/// Incremental CRC-32 (zlib). Start from `Crc32::new()`, `update` in order, then `finish`.
#[derive(Clone, Copy, Debug)]
pub struct Crc32(u32);

impl Crc32 {
    pub const fn new() -> Self {
        Crc32(0xFFFF_FFFF)
    }

    pub fn update(&mut self, data: &[u8]) {
        let mut c = self.0;
        for &b in data {
            c = CRC32_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }

    pub fn finish(&self) -> u32 {
        self.0 ^ 0xFFFF_FFFF
    }
}

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

/// CRC-32 of `data` in one go.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(data);
    c.finish()
}

/// CRC-32 of the pattern of `sectors` sectors starting at `first_lba`: what the guest prints
/// for `test=blk-write seed=<seed> sectors=<sectors> offset=<first_lba>`.
pub fn expected_crc32(seed: u64, first_lba: u64, sectors: u64) -> u32 {
    let mut c = Crc32::new();
    let mut buf = [0u8; SECTOR_SIZE];
    for i in 0..sectors {
        fill_sector(seed, first_lba + i, &mut buf);
        c.update(&buf);
    }
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn known_answers() {
        assert_eq!(expected_crc32(42, 5, 1000), 0xe82b_1ae9);
        let mut s = [0u8; SECTOR_SIZE];
        fill_sector(0, 0, &mut s);
        assert_eq!(&s[..8], &FIRST_WORD_SEED0_LBA0.to_le_bytes());
    }

    #[test]
    fn sectors_independent_of_chunking() {
        let mut a = [0u8; 4 * SECTOR_SIZE];
        fill(9, 100, &mut a);
        for i in 0..4 {
            assert!(check_sector(
                9,
                100 + i as u64,
                &a[i * SECTOR_SIZE..][..SECTOR_SIZE]
            ));
        }
        assert!(!check_sector(9, 99, &a[..SECTOR_SIZE]));
        assert!(!check_sector(8, 100, &a[..SECTOR_SIZE]));
    }

    #[test]
    fn seeds_invert() {
        let mut block = [0u8; 8 * SECTOR_SIZE];
        for (seed, lba) in [(1u64, 8u64), (12_345, 0), (u64::MAX, 504), (7, 1 << 40)] {
            fill(seed, lba, &mut block);
            assert_eq!(seed_of(lba, &block), Some(seed), "seed {seed} lba {lba}");
        }
        fill(5, 16, &mut block);
        assert_eq!(seed_of(24, &block), None, "wrong lba");
        block[4000] ^= 1;
        assert_eq!(seed_of(16, &block), None, "torn block");
        assert_eq!(seed_of(0, &[0u8; 4096]), None, "zeroed block");
    }

    const FIRST_WORD_SEED0_LBA0: u64 = 0x0d83_b3e2_9a21_487a;
}
