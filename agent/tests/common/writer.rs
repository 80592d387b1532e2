//! Reading back what the test guest's `replica-writer` wrote: iteration n writes 4 KiB
//! block n % BLOCKS with the pattern of seed n.

/// The writer's blocks (`blocks=64` on its command line).
pub const BLOCKS: u64 = 64;

/// The seed of the writer guest's iteration whose data block `b` of `image` holds
/// (0: never written), trying every iteration up to `max`.
pub fn seed_of(image: &[u8], b: u64, max: u64) -> u64 {
    let at = (b * 4096) as usize;
    let block = &image[at..at + 4096];
    if block.iter().all(|&x| x == 0) {
        return 0;
    }
    let mut buf = vec![0u8; 4096];
    let mut n = if b == 0 { BLOCKS } else { b };
    while n <= max {
        vireo_e2e::pattern::fill(n, b * 8, &mut buf);
        if buf == block {
            return n;
        }
        n += BLOCKS;
    }
    panic!("block {b} holds no iteration up to {max} of the writer guest");
}

/// Checks that `image` holds exactly the guest's iterations 1..=N for one N (each
/// block the newest of them that wrote it) and returns N.
pub fn prefix_of(image: &[u8], max: u64, what: &str) -> u64 {
    let seeds: Vec<u64> = (0..BLOCKS).map(|b| seed_of(image, b, max)).collect();
    let n = seeds.iter().copied().max().unwrap_or(0);
    for (b, &s) in seeds.iter().enumerate() {
        let b = b as u64;
        // The newest iteration up to n that wrote block b.
        let expected = (1..=n).rev().find(|i| i % BLOCKS == b).unwrap_or(0);
        assert_eq!(s, expected, "{what}: block {b} after iteration {n}: a hole");
    }
    n
}
