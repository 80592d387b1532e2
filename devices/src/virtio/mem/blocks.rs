//! The plugged bitmap and the request rules of virtio 1.2, 5.15.6.1-5.15.6.4, with no
//! I/O: which blocks are plugged, what the host asked for, and the response each
//! request gets. The worker discards the ranges this says were unplugged.

use serde::{Deserialize, Serialize};

use super::{RESP_ACK, RESP_ERROR, RESP_NACK, STATE_MIXED, STATE_PLUGGED, STATE_UNPLUGGED};

/// Why a region cannot be described by the device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlocksError {
    #[error("virtio-mem block size {0:#x} must be a power of two of at least 4 KiB")]
    BlockSize(u64),
    #[error("virtio-mem region {addr:#x}+{size:#x} must be a non-zero multiple of its block size {block:#x}, aligned to it")]
    Region { addr: u64, size: u64, block: u64 },
    #[error("requested size {requested:#x} must be a multiple of the block size {block:#x} and at most the region's {region:#x}")]
    Requested {
        requested: u64,
        block: u64,
        region: u64,
    },
    #[error("saved plugged bitmap has {got} blocks, the region has {want}")]
    Bitmap { got: usize, want: usize },
}

/// A request's answer: the response type and, for STATE, the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    pub kind: u16,
    pub state: u16,
}

impl Response {
    const fn of(kind: u16) -> Self {
        Self { kind, state: 0 }
    }
}

/// The device's memory: a region of `nblocks` blocks at `addr`, all usable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocks {
    pub block_size: u64,
    pub addr: u64,
    pub region_size: u64,
    /// Bytes the host asks the guest to have plugged.
    pub requested_size: u64,
    /// One bit per block, 64 blocks a word.
    pub plugged: Vec<u64>,
}

impl Blocks {
    pub fn new(addr: u64, region_size: u64, block_size: u64) -> Result<Self, BlocksError> {
        if !block_size.is_power_of_two() || block_size < 4096 {
            return Err(BlocksError::BlockSize(block_size));
        }
        if region_size == 0
            || !region_size.is_multiple_of(block_size)
            || !addr.is_multiple_of(block_size)
        {
            return Err(BlocksError::Region {
                addr,
                size: region_size,
                block: block_size,
            });
        }
        let n = region_size / block_size;
        Ok(Self {
            block_size,
            addr,
            region_size,
            requested_size: 0,
            plugged: vec![0; n.div_ceil(64) as usize],
        })
    }

    pub fn nblocks(&self) -> u64 {
        self.region_size / self.block_size
    }

    pub fn is_plugged(&self, i: u64) -> bool {
        self.plugged
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set(&mut self, i: u64, on: bool) {
        if let Some(w) = self.plugged.get_mut((i / 64) as usize) {
            if on {
                *w |= 1 << (i % 64);
            } else {
                *w &= !(1 << (i % 64));
            }
        }
    }

    pub fn plugged_blocks(&self) -> u64 {
        self.plugged.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn plugged_size(&self) -> u64 {
        self.plugged_blocks() * self.block_size
    }

    /// The usable region: all of it (a multiple of the block size, as the spec wants).
    pub fn usable_region_size(&self) -> u64 {
        self.region_size
    }

    /// Sets what the host asks for (a multiple of the block size within the region).
    pub fn set_requested(&mut self, bytes: u64) -> Result<(), BlocksError> {
        if !bytes.is_multiple_of(self.block_size) || bytes > self.region_size {
            return Err(BlocksError::Requested {
                requested: bytes,
                block: self.block_size,
                region: self.region_size,
            });
        }
        self.requested_size = bytes;
        Ok(())
    }

    /// The first block and count of `[addr, addr + nb_blocks * block_size)` if it is
    /// block-aligned, non-empty and inside the usable region.
    fn range(&self, addr: u64, nb_blocks: u16) -> Option<(u64, u64)> {
        let n = u64::from(nb_blocks);
        if n == 0 || addr < self.addr || !(addr - self.addr).is_multiple_of(self.block_size) {
            return None;
        }
        let first = (addr - self.addr) / self.block_size;
        (first.checked_add(n)? <= self.usable_region_size() / self.block_size).then_some((first, n))
    }

    /// PLUG: ACK, or NACK beyond `requested_size`, or ERROR for a bad range or a block
    /// already plugged.
    pub fn plug(&mut self, addr: u64, nb_blocks: u16) -> Response {
        let Some((first, n)) = self.range(addr, nb_blocks) else {
            return Response::of(RESP_ERROR);
        };
        if (first..first + n).any(|i| self.is_plugged(i)) {
            return Response::of(RESP_ERROR);
        }
        if self.plugged_size() + n * self.block_size > self.requested_size {
            return Response::of(RESP_NACK);
        }
        for i in first..first + n {
            self.set(i, true);
        }
        Response::of(RESP_ACK)
    }

    /// UNPLUG: ACK (the caller discards the range), or ERROR for a bad range or a block
    /// not plugged.
    pub fn unplug(&mut self, addr: u64, nb_blocks: u16) -> Response {
        let Some((first, n)) = self.range(addr, nb_blocks) else {
            return Response::of(RESP_ERROR);
        };
        if !(first..first + n).all(|i| self.is_plugged(i)) {
            return Response::of(RESP_ERROR);
        }
        for i in first..first + n {
            self.set(i, false);
        }
        Response::of(RESP_ACK)
    }

    /// UNPLUG_ALL: every block unplugged (the caller discards the whole region).
    pub fn unplug_all(&mut self) -> Response {
        self.plugged.iter_mut().for_each(|w| *w = 0);
        Response::of(RESP_ACK)
    }

    /// STATE: whether every block of the range is plugged, none, or some.
    pub fn state(&self, addr: u64, nb_blocks: u16) -> Response {
        let Some((first, n)) = self.range(addr, nb_blocks) else {
            return Response::of(RESP_ERROR);
        };
        let plugged = (first..first + n).filter(|&i| self.is_plugged(i)).count() as u64;
        Response {
            kind: RESP_ACK,
            state: if plugged == n {
                STATE_PLUGGED
            } else if plugged == 0 {
                STATE_UNPLUGGED
            } else {
                STATE_MIXED
            },
        }
    }

    /// Runs of plugged (`plugged`) or unplugged blocks as guest-physical ranges.
    pub fn runs(&self, plugged: bool) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let n = self.nblocks();
        let mut i = 0;
        while i < n {
            // A word with no block of the kind asked for is skipped whole (a guest's
            // UNPLUG_ALL of a large, mostly unplugged region costs its words, not its
            // blocks).
            let word = self.plugged.get((i / 64) as usize).copied().unwrap_or(0);
            if i % 64 == 0 && (if plugged { word } else { !word }) == 0 {
                i += 64;
                continue;
            }
            let this = i;
            i += 1;
            if self.is_plugged(this) != plugged {
                continue;
            }
            let i = this;
            let gpa = self.addr + i * self.block_size;
            match out.last_mut() {
                Some((s, l)) if *s + *l == gpa => *l += self.block_size,
                _ => out.push((gpa, self.block_size)),
            }
        }
        out
    }

    /// Takes a saved bitmap and request (same region).
    pub fn restore(&mut self, saved: &Blocks) -> Result<(), BlocksError> {
        if saved.plugged.len() != self.plugged.len()
            || saved.block_size != self.block_size
            || saved.region_size != self.region_size
            || saved.addr != self.addr
        {
            return Err(BlocksError::Bitmap {
                got: saved.plugged.len() * 64,
                want: self.plugged.len() * 64,
            });
        }
        self.plugged.clone_from(&saved.plugged);
        // Bits past the last block mean nothing: a crafted state must not count them.
        let tail = self.nblocks() % 64;
        if let (Some(last), true) = (self.plugged.last_mut(), tail != 0) {
            *last &= (1u64 << tail) - 1;
        }
        self.set_requested(saved.requested_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = 2 << 20;
    const BASE: u64 = 0x1_4000_0000;

    fn blocks() -> Blocks {
        let mut b = Blocks::new(BASE, 16 * B, B).unwrap();
        b.set_requested(4 * B).unwrap();
        b
    }

    #[test]
    fn the_region_must_be_block_aligned() {
        assert_eq!(
            Blocks::new(BASE, 3 << 20, B).unwrap_err(),
            BlocksError::Region {
                addr: BASE,
                size: 3 << 20,
                block: B
            }
        );
        assert!(Blocks::new(BASE + 4096, 4 * B, B).is_err());
        assert!(Blocks::new(BASE, 4 * B, 3 << 20).is_err());
        assert!(Blocks::new(BASE, 0, B).is_err());
        let mut b = blocks();
        assert!(b.set_requested(B + 1).is_err());
        assert!(b.set_requested(17 * B).is_err());
        assert!(b.set_requested(16 * B).is_ok());
    }

    #[test]
    fn plugging_follows_the_requested_size() {
        let mut b = blocks();
        assert_eq!(b.plug(BASE, 2).kind, RESP_ACK);
        assert_eq!(
            b.plug(BASE + 2 * B, 3).kind,
            RESP_NACK,
            "5 blocks > 4 requested"
        );
        assert_eq!(b.plug(BASE + 2 * B, 2).kind, RESP_ACK);
        assert_eq!(b.plugged_size(), 4 * B);
        assert_eq!(b.plug(BASE + 8 * B, 1).kind, RESP_NACK, "at the request");
        assert_eq!(b.plug(BASE, 1).kind, RESP_ERROR, "already plugged");
        b.set_requested(8 * B).unwrap();
        assert_eq!(b.plug(BASE + 4 * B, 1).kind, RESP_ACK);
        assert_eq!(b.plugged_blocks(), 5);
    }

    #[test]
    fn bad_ranges_are_errors() {
        let mut b = blocks();
        assert_eq!(b.plug(BASE + 4096, 1).kind, RESP_ERROR, "unaligned");
        assert_eq!(b.plug(BASE - B, 1).kind, RESP_ERROR, "below");
        assert_eq!(
            b.plug(BASE + 15 * B, 2).kind,
            RESP_ERROR,
            "runs past the end"
        );
        assert_eq!(b.plug(BASE, 0).kind, RESP_ERROR, "empty");
        assert_eq!(b.state(BASE + 16 * B, 1).kind, RESP_ERROR);
        assert_eq!(b.unplug(u64::MAX - B + 1, u16::MAX).kind, RESP_ERROR);
    }

    #[test]
    fn unplugging_needs_plugged_blocks() {
        let mut b = blocks();
        assert_eq!(b.unplug(BASE, 1).kind, RESP_ERROR, "not plugged");
        assert_eq!(b.plug(BASE, 3).kind, RESP_ACK);
        assert_eq!(b.unplug(BASE, 4).kind, RESP_ERROR, "one of them is not");
        assert_eq!(b.unplug(BASE + B, 1).kind, RESP_ACK);
        assert_eq!(b.runs(true), vec![(BASE, B), (BASE + 2 * B, B)]);
        assert_eq!(b.runs(false)[0], (BASE + B, B));
        assert_eq!(b.unplug_all().kind, RESP_ACK);
        assert_eq!(b.plugged_size(), 0);
        assert_eq!(b.runs(true), vec![]);
        assert_eq!(b.runs(false), vec![(BASE, 16 * B)]);
        // Runs across whole words, skipped or not.
        let mut big = Blocks::new(BASE, 200 * B, B).unwrap();
        big.set_requested(200 * B).unwrap();
        assert_eq!(big.plug(BASE + 60 * B, 80).kind, RESP_ACK);
        assert_eq!(big.runs(true), vec![(BASE + 60 * B, 80 * B)]);
        assert_eq!(
            big.runs(false),
            vec![(BASE, 60 * B), (BASE + 140 * B, 60 * B)]
        );
    }

    #[test]
    fn state_says_plugged_unplugged_or_mixed() {
        let mut b = blocks();
        b.plug(BASE, 2);
        assert_eq!(
            b.state(BASE, 2),
            Response {
                kind: RESP_ACK,
                state: STATE_PLUGGED
            }
        );
        assert_eq!(b.state(BASE + 2 * B, 3).state, STATE_UNPLUGGED);
        assert_eq!(b.state(BASE + B, 2).state, STATE_MIXED);
    }

    #[test]
    fn a_restored_bitmap_is_the_saved_one() {
        let mut b = Blocks::new(BASE, 128 * B, B).unwrap();
        b.set_requested(100 * B).unwrap();
        b.plug(BASE + 70 * B, 30);
        let mut c = Blocks::new(BASE, 128 * B, B).unwrap();
        c.restore(&b).unwrap();
        assert_eq!(c, b);
        let mut other = Blocks::new(BASE, 64 * B, B).unwrap();
        assert!(other.restore(&b).is_err());
        // Bits past the region's 100 blocks are dropped.
        let mut crafted = Blocks::new(BASE, 100 * B, B).unwrap();
        crafted.plugged = vec![0, u64::MAX];
        let mut d = Blocks::new(BASE, 100 * B, B).unwrap();
        d.restore(&crafted).unwrap();
        assert_eq!(d.plugged_blocks(), 36);
    }
}
