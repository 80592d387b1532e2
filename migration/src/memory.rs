//! Guest memory to and from a file. Zero pages are not written (the file is sparse:
//! holes read back as zeros), and loading copies only the file's data extents
//! (SEEK_DATA/SEEK_HOLE), so an idle 1 GiB guest costs what it has touched.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

pub const PAGE_SIZE: usize = 4096;

/// Where one region of guest memory lies in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("memory file: {op} at offset {offset:#x}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("the snapshot's memory layout {saved:?} does not match this VM's {ours:?}")]
    Layout {
        saved: Vec<RegionLayout>,
        ours: Vec<RegionLayout>,
    },
    #[error("guest memory region at {0:#x} has no host mapping")]
    NoHostMapping(u64),
}

/// The file layout of `mem`: regions back to back, in address order.
pub fn layout<M: GuestMemoryBackend>(mem: &M) -> Vec<RegionLayout> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let l = RegionLayout {
                guest_addr: r.start_addr().0,
                size: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            l
        })
        .collect()
}

/// A region's bytes. Callers guarantee nobody writes guest memory meanwhile (vCPUs and
/// device workers are paused).
fn region_bytes<R: GuestMemoryRegion>(r: &R) -> Result<&[u8], MemoryFileError> {
    let ptr = region_host_ptr(r)?;
    // SAFETY: the region is a live mapping of `len` bytes owned by the guest memory,
    // which outlives this borrow; the VM is paused, so the bytes do not change.
    Ok(unsafe { std::slice::from_raw_parts(ptr, r.len() as usize) })
}

fn region_host_ptr<R: GuestMemoryRegion>(r: &R) -> Result<*mut u8, MemoryFileError> {
    r.get_host_address(MemoryRegionAddress(0))
        .map_err(|_| MemoryFileError::NoHostMapping(r.start_addr().0))
}

use vireo_util::is_zero;

/// What [`save`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaveStats {
    pub pages_written: u64,
    pub zero_pages: u64,
}

/// Writes all of `mem` into `file` (which must be empty), runs of non-zero pages at a
/// time; the file's length is the total size, zero pages stay holes. `populated`, one
/// bitmap per region (bit i = page i), names the pages that may hold data: the others
/// were never written (they read as zero) and are not even read, so a 1 TiB guest that
/// touched a few GiB costs what it touched. None reads every page.
pub fn save<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
    populated: Option<&[Vec<u64>]>,
) -> Result<SaveStats, MemoryFileError> {
    let mut stats = SaveStats::default();
    let mut total = 0u64;
    for (i, (region, l)) in mem.iter().zip(layout(mem)).enumerate() {
        let bytes = region_bytes(region)?;
        let bits = populated.and_then(|p| p.get(i)).map(Vec::as_slice);
        let may_hold_data =
            |p: usize| bits.is_none_or(|b| b.get(p / 64).is_none_or(|w| w & (1 << (p % 64)) != 0));
        let mut run: Option<usize> = None;
        let pages = bytes.len().div_ceil(PAGE_SIZE);
        let mut p = 0;
        while p <= pages {
            // 64 pages none of which was ever written, with no run open: skipped whole.
            if run.is_none() && p % 64 == 0 && p + 64 <= pages {
                if let Some(0) = bits.and_then(|b| b.get(p / 64)) {
                    stats.zero_pages += 64;
                    p += 64;
                    continue;
                }
            }
            // One past the last page closes a run that reaches the end.
            let page =
                (p < pages).then(|| &bytes[p * PAGE_SIZE..((p + 1) * PAGE_SIZE).min(bytes.len())]);
            let data = page.is_some_and(|pg| may_hold_data(p) && !is_zero(pg));
            match (data, run) {
                (true, None) => run = Some(p),
                (false, Some(start)) => {
                    let from = start * PAGE_SIZE;
                    let to = (p * PAGE_SIZE).min(bytes.len());
                    let offset = l.file_offset + from as u64;
                    file.write_all_at(&bytes[from..to], offset)
                        .map_err(|source| MemoryFileError::Io {
                            op: "write",
                            offset,
                            source,
                        })?;
                    stats.pages_written += (p - start) as u64;
                    run = None;
                }
                _ => {}
            }
            if page.is_some() && !data {
                stats.zero_pages += 1;
            }
            p += 1;
        }
        total = l.file_offset + l.size;
    }
    file.set_len(total).map_err(|source| MemoryFileError::Io {
        op: "set length",
        offset: total,
        source,
    })?;
    Ok(stats)
}

/// Fills freshly mapped (all-zero) guest memory from a file that [`save`] wrote with
/// the same `saved` layout.
pub fn load<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
    saved: &[RegionLayout],
) -> Result<u64, MemoryFileError> {
    let ours = layout(mem);
    if ours != saved {
        return Err(MemoryFileError::Layout {
            saved: saved.to_vec(),
            ours,
        });
    }
    let mut loaded = 0u64;
    for (region, l) in mem.iter().zip(ours) {
        let ptr = region_host_ptr(region)?;
        // SAFETY: the region is a live mapping of `len` bytes owned by the guest memory;
        // the VM does not run while its memory is loaded, and nothing else holds a
        // reference into the region meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, region.len() as usize) };
        let end = l.file_offset + l.size;
        let extents =
            vireo_util::extents::data_extents(file, l.file_offset, end).map_err(|source| {
                MemoryFileError::Io {
                    op: "seek",
                    offset: l.file_offset,
                    source,
                }
            })?;
        for (data, len) in extents {
            let hole = data + len;
            let (from, to) = (
                (data - l.file_offset) as usize,
                (hole - l.file_offset) as usize,
            );
            file.read_exact_at(&mut bytes[from..to], data)
                .map_err(|source| MemoryFileError::Io {
                    op: "read",
                    offset: data,
                    source,
                })?;
            loaded += len;
        }
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    type Mem = GuestMemoryMmap<()>;

    fn mem() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 1 << 20)]).unwrap()
    }

    #[test]
    fn round_trip_keeps_every_byte_and_skips_zero_pages() {
        let src = mem();
        src.write_slice(b"first page", GuestAddress(0)).unwrap();
        src.write_slice(&[0xab; 10_000], GuestAddress(0x5_0ff0))
            .unwrap();
        src.write_slice(b"last byte", GuestAddress((1 << 32) + (1 << 20) - 9))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let stats = save(&src, &f, None).unwrap();
        // Page 0; pages 0x50..=0x53 (10,000 bytes from 0x50ff0); the last page.
        assert_eq!(stats.pages_written, 1 + 4 + 1);
        assert_eq!(stats.pages_written + stats.zero_pages, 512);
        assert_eq!(f.metadata().unwrap().len(), 2 << 20);

        let dst = mem();
        let loaded = load(&dst, &f, &layout(&src)).unwrap();
        assert!(loaded >= 6 * 4096, "at least the data pages were read");
        for (a, b) in src.iter().zip(dst.iter()) {
            assert!(region_bytes(a).unwrap() == region_bytes(b).unwrap());
        }
    }

    /// With a populated bitmap only the pages it names are read: the same bytes come
    /// back for them, and a page it leaves out is not even looked at.
    #[test]
    fn only_populated_pages_are_read() {
        let src = mem();
        src.write_slice(b"first page", GuestAddress(0)).unwrap();
        src.write_slice(&[0xab; 10_000], GuestAddress(0x5_0ff0))
            .unwrap();
        src.write_slice(b"last byte", GuestAddress((1 << 32) + (1 << 20) - 9))
            .unwrap();
        // Data the bitmap says was never written (it cannot be, by its contract):
        // proves the page is skipped unread.
        src.write_slice(b"not populated", GuestAddress(0x10_0000 - 4096))
            .unwrap();
        let mut low = vec![0u64; 4];
        low[0] |= 1; // page 0
        low[1] |= 0b1111 << (0x50 - 64); // pages 0x50..=0x53
        let mut high = vec![0u64; 4];
        high[3] |= 1 << 63; // the region's last page
        let populated = vec![low, high];
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("memory"))
            .unwrap();
        let stats = save(&src, &f, Some(&populated)).unwrap();
        assert_eq!(stats.pages_written, 1 + 4 + 1);
        assert_eq!(stats.pages_written + stats.zero_pages, 512);
        let dst = mem();
        load(&dst, &f, &layout(&src)).unwrap();
        let mut back = [0u8; 13];
        dst.read_slice(&mut back, GuestAddress(0x10_0000 - 4096))
            .unwrap();
        assert_eq!(back, [0u8; 13], "the page outside the bitmap was read");
        let mut first = [0u8; 10];
        dst.read_slice(&mut first, GuestAddress(0)).unwrap();
        assert_eq!(&first, b"first page");
        let mut last = [0u8; 9];
        dst.read_slice(&mut last, GuestAddress((1 << 32) + (1 << 20) - 9))
            .unwrap();
        assert_eq!(&last, b"last byte");
    }

    #[test]
    fn a_different_layout_is_refused() {
        let src = mem();
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("m"))
            .unwrap();
        save(&src, &f, None).unwrap();
        let small = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(matches!(
            load(&small, &f, &layout(&src)),
            Err(MemoryFileError::Layout { .. })
        ));
    }
}
