//! Guest memory as I/O buffers: the one place where addresses in guest RAM become the
//! raw iovecs that backends read into and write from ([`IoBufsMut`], [`IoBufs`]).
//!
//! The guest owns these bytes and may change them while the host works on them, so no
//! Rust reference is ever made over them: vm-memory resolves each guest range to
//! `VolatileSlice`s (bounds-checked, possibly spanning memory regions), and their host
//! pointers go into iovecs for `preadv`/`pwritev` as they are.

use vm_memory::bitmap::BS;
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

use crate::block::{IoBufs, IoBufsMut};
use crate::virtio::GuestMemoryMmap;

/// A guest range that is not (wholly) guest memory.
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
#[error("guest range {addr:#x}+{len:#x} is not in guest memory")]
pub struct BadGuestRange {
    pub addr: u64,
    pub len: u32,
}

/// The host slices behind guest ranges, in order.
type Slices<'m> = Vec<VolatileSlice<'m, BS<'m, super::dirty_bitmap::DirtyBitmap>>>;

fn resolve<'m>(
    mem: &'m GuestMemoryMmap,
    segments: impl Iterator<Item = (GuestAddress, u32)>,
) -> Result<Slices<'m>, BadGuestRange> {
    let mut out = Vec::new();
    for (addr, len) in segments {
        let bad = BadGuestRange { addr: addr.0, len };
        // Checked: a range that wraps around the address space is refused, not split.
        addr.0.checked_add(u64::from(len)).ok_or(bad)?;
        for slice in mem.get_slices(addr, len as usize) {
            out.push(slice.map_err(|_| bad)?);
        }
    }
    Ok(out)
}

fn iovecs(slices: &Slices<'_>) -> Vec<libc::iovec> {
    slices
        .iter()
        .map(|s| libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect()
}

/// Buffers a read fills: the guest ranges `segments` (device-writable descriptors).
/// Also returns the host slices, whose dirty bits the caller sets once the read is done.
pub fn guest_bufs_mut<'m>(
    mem: &'m GuestMemoryMmap,
    segments: impl Iterator<Item = (GuestAddress, u32)>,
) -> Result<(IoBufsMut<'m>, Slices<'m>), BadGuestRange> {
    let slices = resolve(mem, segments)?;
    // SAFETY: each iovec is a VolatileSlice of a guest memory mapping, valid for reads
    // and writes of its length for as long as `mem` is borrowed ('m); the VMM makes no
    // Rust reference into guest RAM, only volatile accesses.
    let bufs = unsafe { IoBufsMut::from_raw(iovecs(&slices)) };
    Ok((bufs, slices))
}

/// Buffers a write takes its data from: the guest ranges `segments`.
pub fn guest_bufs<'m>(
    mem: &'m GuestMemoryMmap,
    segments: impl Iterator<Item = (GuestAddress, u32)>,
) -> Result<IoBufs<'m>, BadGuestRange> {
    let slices = resolve(mem, segments)?;
    // SAFETY: as in `guest_bufs_mut`; IoBufs only reads.
    Ok(unsafe { IoBufs::from_raw(iovecs(&slices)) })
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryBackend};

    use super::*;
    use crate::block::{BlockBackend, RawFile};

    fn two_regions() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap()
    }

    #[test]
    fn a_range_across_regions_becomes_iovecs_into_the_guest_mappings() {
        let mem = two_regions();
        let segs = [
            (GuestAddress(0xf000), 0x2000u32),
            (GuestAddress(0x100), 0x200),
        ];
        let (bufs, slices) = guest_bufs_mut(&mem, segs.into_iter()).unwrap();
        assert_eq!(bufs.len(), 0x2200);
        assert_eq!(slices.len(), 3, "split where the regions meet");
        let host = |a: u64| mem.get_host_address(GuestAddress(a)).unwrap() as usize;
        let got: Vec<(usize, usize)> = bufs
            .iovecs()
            .iter()
            .map(|v| (v.iov_base as usize, v.iov_len))
            .collect();
        assert_eq!(
            got,
            vec![
                (host(0xf000), 0x1000),
                (host(0x10000), 0x1000),
                (host(0x100), 0x200)
            ]
        );
    }

    #[test]
    fn ranges_outside_guest_memory_or_wrapping_are_refused() {
        let mem = two_regions();
        let e = guest_bufs(&mem, [(GuestAddress(0x1f000), 0x2000u32)].into_iter());
        assert!(e.is_err());
        let e = guest_bufs(&mem, [(GuestAddress(u64::MAX - 10), 0x100u32)].into_iter());
        assert!(e.is_err());
    }

    #[test]
    fn a_raw_disk_reads_and_writes_guest_memory_in_place_with_exact_bytes() {
        let mem = two_regions();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let disk = RawFile::open(&p, false, false).unwrap();
        let pattern: Vec<u8> = (0..0x3000u32).map(|i| (i * 31 % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0xe800)).unwrap();
        let src = [(GuestAddress(0xe800), 0x3000u32)];
        disk.write_vectored_at(&guest_bufs(&mem, src.into_iter()).unwrap(), 4096)
            .unwrap();
        assert_eq!(
            &std::fs::read(&p).unwrap()[4096..4096 + 0x3000],
            &pattern[..]
        );
        // Read back into two scattered ranges, one across the region boundary.
        let dst = [
            (GuestAddress(0x100), 0x1000u32),
            (GuestAddress(0xfc00), 0x2000),
        ];
        let (bufs, _) = guest_bufs_mut(&mem, dst.into_iter()).unwrap();
        disk.read_vectored_at(&bufs, 4096).unwrap();
        let mut a = vec![0u8; 0x1000];
        let mut b = vec![0u8; 0x2000];
        mem.read_slice(&mut a, GuestAddress(0x100)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0xfc00)).unwrap();
        assert_eq!(a, pattern[..0x1000]);
        assert_eq!(b, pattern[0x1000..]);
        // Past the end of the file reads as zeros.
        let (bufs, _) = guest_bufs_mut(&mem, dst.into_iter()).unwrap();
        drop(disk);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(4096 + 0x800)
            .unwrap();
        let short = RawFile::open(&p, false, false).unwrap();
        short.read_vectored_at(&bufs, 4096).unwrap();
        mem.read_slice(&mut a, GuestAddress(0x100)).unwrap();
        assert_eq!(a[..0x800], pattern[..0x800]);
        assert!(a[0x800..].iter().all(|&x| x == 0));
    }
}
