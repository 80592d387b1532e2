//! Scatter-gather buffers as raw iovecs, for memory that Rust references must never
//! point into.
//!
//! A VMM moves disk data straight between an image and guest RAM. The guest may change
//! that RAM at any moment (a buggy or hostile driver reusing a buffer it submitted), so a
//! `&[u8]` or `&mut [u8]` over it would be undefined behaviour: Rust assumes memory
//! behind a reference does not change underneath it. [`IoBufsMut`] (the destination of
//! a read) and [`IoBufs`] (the source of a write) hold raw `libc::iovec`s instead:
//! they go to `preadv`/`pwritev` as they are, and the few bytes this crate copies in or
//! out itself (zeros for a hole, a replayed log entry, a partial sector merged for
//! copy-on-write) move with vm-memory's volatile copies. No reference to the memory is
//! ever made.
//!
//! The one unsafe step is building them from raw pointers ([`IoBufsMut::from_raw`],
//! [`IoBufs::from_raw`]); callers with ordinary Rust buffers use the safe constructors.

use std::io::{IoSlice, IoSliceMut};
use std::marker::PhantomData;

use vm_memory::VolatileSlice;

/// The iovecs and their total length; shared by both directions.
#[derive(Clone, Default)]
struct Iov {
    iov: Vec<libc::iovec>,
    len: u64,
}

impl Iov {
    fn new(iov: Vec<libc::iovec>) -> Self {
        let len = iov.iter().map(|v| v.iov_len as u64).sum();
        Self { iov, len }
    }

    /// The iovecs covering `[start, start+len)` (clamped to what there is).
    fn sub(&self, start: u64, len: u64) -> Iov {
        let end = start.saturating_add(len).min(self.len);
        let mut out = Vec::new();
        let mut at = 0u64;
        for v in &self.iov {
            let vl = v.iov_len as u64;
            let (s, e) = (start.max(at), end.min(at + vl));
            if s < e {
                out.push(libc::iovec {
                    // In bounds: s - at < vl, and the iovec is valid for vl bytes.
                    iov_base: v
                        .iov_base
                        .cast::<u8>()
                        .wrapping_add((s - at) as usize)
                        .cast(),
                    iov_len: (e - s) as usize,
                });
            }
            at += vl;
            if at >= end {
                break;
            }
        }
        Iov::new(out)
    }

    /// Each segment as a volatile slice.
    fn volatile(&self) -> impl Iterator<Item = VolatileSlice<'_>> {
        self.iov.iter().map(|v| {
            // SAFETY: every iovec was built (by a constructor of IoBufs or IoBufsMut,
            // whose contract says so) over memory valid for `iov_len` bytes for as long
            // as `self` is borrowed; volatile accesses tolerate concurrent changes.
            unsafe { VolatileSlice::new(v.iov_base.cast(), v.iov_len) }
        })
    }
}

/// Where a read puts its data: memory valid for writes, not referenced by Rust.
pub struct IoBufsMut<'a> {
    iov: Iov,
    _mem: PhantomData<&'a mut [u8]>,
}

/// What a write takes its data from: memory valid for reads, not referenced by Rust.
pub struct IoBufs<'a> {
    iov: Iov,
    _mem: PhantomData<&'a [u8]>,
}

impl<'a> IoBufsMut<'a> {
    /// Buffers over raw memory (guest RAM).
    ///
    /// # Safety
    /// Each iovec must point to memory that is valid for writes of `iov_len` bytes for
    /// all of `'a` and that no Rust reference points into for that time. Other parties
    /// (a guest) may change it concurrently: readers of it then see torn data, which is
    /// theirs to deal with, never undefined behaviour here.
    pub unsafe fn from_raw(iov: Vec<libc::iovec>) -> Self {
        Self {
            iov: Iov::new(iov),
            _mem: PhantomData,
        }
    }

    /// Buffers over ordinary Rust buffers (exclusively borrowed for `'a`).
    pub fn from_slices(bufs: &'a mut [IoSliceMut<'_>]) -> Self {
        let iov = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: the slices are valid for writes and borrowed exclusively for 'a.
        unsafe { Self::from_raw(iov) }
    }

    /// One ordinary buffer (exclusively borrowed for `'a`).
    pub fn from_slice(buf: &'a mut [u8]) -> Self {
        let iov = vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: as in `from_slices`.
        unsafe { Self::from_raw(iov) }
    }

    /// The parts one after the other (e.g. a host header, then guest memory).
    pub fn join(parts: Vec<IoBufsMut<'a>>) -> Self {
        let iov = parts.into_iter().flat_map(|p| p.iov.iov).collect();
        // SAFETY: every part already met `from_raw`'s contract for 'a.
        unsafe { Self::from_raw(iov) }
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.iov.len
    }

    pub fn is_empty(&self) -> bool {
        self.iov.len == 0
    }

    /// The bytes `[start, start+len)` (clamped to what there is).
    pub fn sub(&self, start: u64, len: u64) -> IoBufsMut<'_> {
        IoBufsMut {
            iov: self.iov.sub(start, len),
            _mem: PhantomData,
        }
    }

    /// The iovecs, for `preadv`.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iov.iov
    }

    /// Zeros every byte.
    pub fn fill_zero(&self) {
        const ZEROS: [u8; 4096] = [0; 4096];
        for s in self.iov.volatile() {
            let mut at = 0;
            while at < s.len() {
                let n = (s.len() - at).min(ZEROS.len());
                if let Ok(part) = s.subslice(at, n) {
                    part.copy_from(&ZEROS[..n]);
                }
                at += n;
            }
        }
    }

    /// Copies `data` in at byte `pos` (what lies past the end is not copied).
    pub fn write_at(&self, pos: u64, data: &[u8]) {
        let mut src = data;
        for s in self.iov.sub(pos, data.len() as u64).volatile() {
            let n = s.len().min(src.len());
            s.copy_from(&src[..n]);
            src = &src[n..];
        }
    }

    /// Copies out the bytes at `pos` into `out` (what lies past the end is left alone).
    pub fn read_at(&self, pos: u64, out: &mut [u8]) {
        let mut dst = out;
        for s in self.iov.sub(pos, dst.len() as u64).volatile() {
            let n = s.copy_to(dst);
            dst = &mut dst[n..];
        }
    }

    /// The same memory as a write's source.
    pub fn as_source(&self) -> IoBufs<'_> {
        IoBufs {
            iov: self.iov.clone(),
            _mem: PhantomData,
        }
    }
}

impl<'a> IoBufs<'a> {
    /// Buffers over raw memory (guest RAM).
    ///
    /// # Safety
    /// Each iovec must point to memory that is valid for reads of `iov_len` bytes for
    /// all of `'a` and that no Rust `&mut` reference points into for that time. Other
    /// parties may change it concurrently (the data written is then whatever the read
    /// saw).
    pub unsafe fn from_raw(iov: Vec<libc::iovec>) -> Self {
        Self {
            iov: Iov::new(iov),
            _mem: PhantomData,
        }
    }

    /// Buffers over ordinary Rust buffers (borrowed for `'a`).
    pub fn from_slices(bufs: &'a [IoSlice<'_>]) -> Self {
        let iov = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: the slices are valid for reads and borrowed for 'a; nothing writes
        // through these iovecs (IoBufs has no writing method).
        unsafe { Self::from_raw(iov) }
    }

    /// One ordinary buffer (borrowed for `'a`).
    pub fn from_slice(buf: &'a [u8]) -> Self {
        let iov = vec![libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }];
        // SAFETY: as in `from_slices`.
        unsafe { Self::from_raw(iov) }
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.iov.len
    }

    pub fn is_empty(&self) -> bool {
        self.iov.len == 0
    }

    /// The bytes `[start, start+len)` (clamped to what there is).
    pub fn sub(&self, start: u64, len: u64) -> IoBufs<'_> {
        IoBufs {
            iov: self.iov.sub(start, len),
            _mem: PhantomData,
        }
    }

    /// The iovecs, for `pwritev`.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iov.iov
    }

    /// Copies out the bytes at `pos` into `out` (what lies past the end is left alone).
    pub fn read_at(&self, pos: u64, out: &mut [u8]) {
        let mut dst = out;
        for s in self.iov.sub(pos, dst.len() as u64).volatile() {
            let n = s.copy_to(dst);
            dst = &mut dst[n..];
        }
    }

    /// A copy of every byte (for a backend that must keep the data, such as a queue).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.iov.len as usize];
        self.read_at(0, &mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_ranges_span_segments_and_copies_land_where_they_should() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut sl = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        let bufs = IoBufsMut::from_slices(&mut sl);
        assert_eq!(bufs.len(), 16);
        let mid = bufs.sub(6, 4);
        assert_eq!(mid.iovecs().len(), 2);
        assert_eq!(mid.len(), 4);
        mid.write_at(0, &[1, 2, 3, 4]);
        bufs.sub(14, 100).fill_zero();
        let mut out = [0u8; 16];
        bufs.read_at(0, &mut out);
        assert_eq!(out, [0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bufs.as_source().sub(5, 3).to_vec(), vec![0, 1, 2]);
        assert!(bufs.sub(16, 4).is_empty());
    }
}
