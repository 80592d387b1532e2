//! The disk of `test=replica-writer`, read back: block b of B holds the pattern of
//! the last sequence number n with n % B == b. A disk written by one sequential writer
//! at a time (however often it moved between hosts, with `resume`) holds exactly the
//! last B sequence numbers of one run: [`single_writer`] checks that, so a stale
//! writer's late write, or two writers interleaving, is found in the bytes.

use std::io::Read;
use std::path::Path;

use crate::pattern;

/// Block size the guest writes.
pub const BLOCK: usize = 4096;

/// The seed (sequence number) of each of the first `blocks` blocks of `disk`; None
/// where a block holds no pattern (never written, or torn).
pub fn seeds(disk: &Path, blocks: u64) -> Vec<Option<u64>> {
    let mut f = std::fs::File::open(disk).expect("open the disk image");
    let mut buf = vec![0u8; BLOCK];
    (0..blocks)
        .map(|b| {
            f.read_exact(&mut buf).expect("read a block");
            pattern::seed_of(b * 8, &buf)
        })
        .collect()
}

/// Checks that `seeds` is what one sequential writer leaves, and returns the highest
/// sequence number (0: nothing written).
pub fn single_writer(seeds: &[Option<u64>]) -> Result<u64, String> {
    let blocks = seeds.len() as u64;
    let max = seeds.iter().flatten().copied().max().unwrap_or(0);
    for (b, s) in seeds.iter().enumerate() {
        let b = b as u64;
        match *s {
            Some(s) if s % blocks != b => {
                return Err(format!("block {b} holds sequence {s}, which belongs in block {}", s % blocks))
            }
            // The last B writes of one run: max-B+1 ..= max.
            Some(s) if s + blocks <= max => {
                return Err(format!(
                    "block {b} holds sequence {s}, but {} was written after it (highest {max}): a write went backwards or two writers interleaved",
                    s + blocks
                ))
            }
            Some(_) => {}
            // Written at least once iff some n in 1..=max has n % B == b.
            None if (b == 0 && max >= blocks) || (b != 0 && max >= b) => {
                return Err(format!("block {b} holds no sequence although {max} were written"))
            }
            None => {}
        }
    }
    Ok(max)
}

/// The whole lines of `serial` (a line still being written is not one yet).
fn whole_lines(serial: &str) -> std::str::Lines<'_> {
    serial[..serial.rfind('\n').map_or(0, |i| i + 1)].lines()
}

/// The sequence numbers the guest reported complete (`rw n=N` lines), in order.
pub fn reported(serial: &str) -> Vec<u64> {
    whole_lines(serial)
        .filter_map(|l| l.strip_prefix("rw n="))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Where the guest resumed (`rw resume n=M` lines), in order.
pub fn resumed(serial: &str) -> Vec<u64> {
    whole_lines(serial)
        .filter_map(|l| l.strip_prefix("rw resume n="))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Nanoseconds on `CLOCK_MONOTONIC` (what write leases are counted on).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(last: u64, blocks: u64) -> Vec<Option<u64>> {
        let mut v = vec![None; blocks as usize];
        for n in 1..=last {
            v[(n % blocks) as usize] = Some(n);
        }
        v
    }

    #[test]
    fn one_writer_passes_a_stale_write_does_not() {
        assert_eq!(single_writer(&run(0, 8)), Ok(0));
        assert_eq!(single_writer(&run(5, 8)), Ok(5));
        assert_eq!(single_writer(&run(100, 8)), Ok(100));
        let mut stale = run(100, 8);
        stale[(90 % 8) as usize] = Some(90);
        assert!(single_writer(&stale).is_err());
        let mut torn = run(100, 8);
        torn[3] = None;
        assert!(single_writer(&torn).is_err());
        let mut misplaced = run(100, 8);
        misplaced[2] = Some(99);
        assert!(single_writer(&misplaced).is_err());
        assert_eq!(reported("rw start\nrw n=1\nrw n=2\nrw n=3"), vec![1, 2]);
        assert_eq!(resumed("rw resume n=7\n"), vec![7]);
    }
}
