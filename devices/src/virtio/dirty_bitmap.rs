//! The dirty bitmap of a guest memory region: pages devices wrote (DMA), for live
//! migration. Two levels, so that taking what was written costs what was written and
//! not the region's size: a bit per 4 KiB page, and a summary bit per word of those
//! (64 pages). A 1 TiB region has a 32 MiB page bitmap that is only ever touched where
//! devices wrote, and a 512 KiB summary that a round scans.
//!
//! It is vm-memory's [`Bitmap`] for our mappings (in place of `AtomicBitmap`, whose
//! `get_and_reset` swaps and copies every word of the region each round).

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

const PAGE_SIZE: usize = 4096;

/// `n` clean words from zeroed memory: calloc'd pages stay unbacked until a bit in them
/// is set (a 1 TiB region's 32 MiB costs nothing while devices write nothing there).
fn zeroed(n: usize) -> Box<[AtomicU64]> {
    // SAFETY: all-zero bytes are a valid AtomicU64 (it has the representation of u64).
    unsafe { Box::<[AtomicU64]>::new_zeroed_slice(n).assume_init() }
}

#[derive(Debug, Default)]
pub struct DirtyBitmap {
    /// Bit p: page p was written.
    pages: Box<[AtomicU64]>,
    /// Bit w: word w of `pages` may have a bit set.
    words: Box<[AtomicU64]>,
}

impl DirtyBitmap {
    /// A bitmap for `bytes` bytes of memory, all clean.
    pub fn new(bytes: usize) -> Self {
        let pages = bytes.div_ceil(PAGE_SIZE);
        let words = pages.div_ceil(64);
        Self {
            pages: zeroed(words),
            words: zeroed(words.div_ceil(64)),
        }
    }

    /// Pages in the bitmap.
    pub fn len(&self) -> usize {
        self.pages.len() * 64
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    fn set_page(&self, page: usize) {
        let (w, bit) = (page / 64, 1u64 << (page % 64));
        let Some(word) = self.pages.get(w) else {
            return;
        };
        // The page bit first, then the summary: a take that sees the summary bit finds
        // the page bit (a take between the two leaves the page for the next take).
        if word.load(Ordering::Relaxed) & bit == 0 {
            word.fetch_or(bit, Ordering::Release);
        }
        let (s, sbit) = (w / 64, 1u64 << (w % 64));
        if let Some(summary) = self.words.get(s) {
            if summary.load(Ordering::Relaxed) & sbit == 0 {
                summary.fetch_or(sbit, Ordering::Release);
            }
        }
    }

    /// ORs the pages written since the last take into `out` (bit p = page p) and
    /// clears them here. Costs a scan of the summary plus the words that were written.
    pub fn take_into(&self, out: &mut [u64]) {
        for (s, summary) in self.words.iter().enumerate() {
            if summary.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut set = summary.swap(0, Ordering::Acquire);
            while set != 0 {
                let w = s * 64 + set.trailing_zeros() as usize;
                set &= set - 1;
                let Some(word) = self.pages.get(w) else {
                    continue;
                };
                let bits = word.swap(0, Ordering::Acquire);
                if let Some(o) = out.get_mut(w) {
                    *o |= bits;
                }
            }
        }
    }
}

impl Clone for DirtyBitmap {
    fn clone(&self) -> Self {
        let copy = |v: &[AtomicU64]| {
            v.iter()
                .map(|a| AtomicU64::new(a.load(Ordering::Acquire)))
                .collect()
        };
        Self {
            pages: copy(&self.pages),
            words: copy(&self.words),
        }
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for DirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE;
        let last = offset.saturating_add(len - 1) / PAGE_SIZE;
        for page in first..=last.min(self.len().saturating_sub(1)) {
            self.set_page(page);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = offset / PAGE_SIZE;
        self.pages
            .get(page / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyBitmap {
    fn with_len(len: usize) -> Self {
        Self::new(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(b: &DirtyBitmap) -> Vec<usize> {
        let mut out = vec![0u64; b.len() / 64];
        b.take_into(&mut out);
        (0..b.len())
            .filter(|&p| out[p / 64] & (1 << (p % 64)) != 0)
            .collect()
    }

    #[test]
    fn marked_ranges_are_taken_once_and_only_they() {
        let b = DirtyBitmap::new(64 << 20); // 16,384 pages
        b.mark_dirty(0, 1);
        b.mark_dirty(5 * PAGE_SIZE + 100, PAGE_SIZE); // straddles pages 5 and 6
        b.mark_dirty(4095 * PAGE_SIZE, 3 * PAGE_SIZE); // 4095..=4097: two summary words
        b.mark_dirty((16_384 - 1) * PAGE_SIZE, 10 * PAGE_SIZE); // clipped at the end
        b.mark_dirty(7 * PAGE_SIZE, 0); // nothing
        assert!(b.dirty_at(6 * PAGE_SIZE) && !b.dirty_at(7 * PAGE_SIZE));
        assert_eq!(taken(&b), vec![0, 5, 6, 4095, 4096, 4097, 16_383]);
        assert!(taken(&b).is_empty(), "a take clears what it took");
        assert!(!b.dirty_at(0));
        b.mark_dirty(100 * PAGE_SIZE, 1);
        assert_eq!(taken(&b), vec![100]);
    }

    #[test]
    fn slices_mark_at_their_offset() {
        let b = DirtyBitmap::new(1 << 20);
        b.slice_at(3 * PAGE_SIZE).mark_dirty(PAGE_SIZE, 1);
        assert_eq!(taken(&b), vec![4]);
    }
}
