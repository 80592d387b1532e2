//! One virtio-blk request: parsed from a descriptor chain, executed against the
//! backend straight in guest memory, completed with a status byte.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::device::{BlockConfig, BlockCounters, MAX_DISCARD_SECTORS, SECTOR_SIZE, SEG_MAX};
use crate::block::BlockBackend;
use crate::virtio::GuestMemoryMmap;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

pub(super) const S_OK: u8 = 0;
pub(super) const S_IOERR: u8 = 1;
pub(super) const S_UNSUPP: u8 = 2;

const HEADER_LEN: u32 = 16;
const SERIAL_LEN: usize = 20;
const DISCARD_SEGMENT_LEN: usize = 16;

/// Why a chain is not a well-formed request (the driver's bug, reported and failed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum RequestError {
    #[error("descriptor chain too short")]
    TooShort,
    #[error("request header is not readable or is shorter than 16 bytes")]
    BadHeader,
    #[error("status descriptor is not device-writable")]
    BadStatus,
    #[error("request has more than {SEG_MAX} segments")]
    TooManySegments,
    #[error("guest address {0:#x} is not in guest memory")]
    BadAddress(u64),
}

/// A parsed request: where its data and status live in guest memory.
pub(super) struct Request {
    pub kind: u32,
    pub sector: u64,
    /// Data segments (address, length, device-writable).
    pub data: Vec<(GuestAddress, u32, bool)>,
    pub status: GuestAddress,
}

impl Request {
    pub fn parse(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Self, RequestError> {
        let descs: Vec<Descriptor> = chain.collect();
        let (header, rest) = descs.split_first().ok_or(RequestError::TooShort)?;
        if header.is_write_only() || header.len() < HEADER_LEN {
            return Err(RequestError::BadHeader);
        }
        let hdr: [u8; 16] = mem
            .read_obj(header.addr())
            .map_err(|_| RequestError::BadAddress(header.addr().0))?;
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let (last, middle) = rest.split_last().ok_or(RequestError::TooShort)?;
        if !last.is_write_only() || last.len() == 0 {
            return Err(RequestError::BadStatus);
        }
        if middle.len() > SEG_MAX as usize {
            return Err(RequestError::TooManySegments);
        }
        let mut data: Vec<(GuestAddress, u32, bool)> = middle
            .iter()
            .map(|d| (d.addr(), d.len(), d.is_write_only()))
            .collect();
        // The status byte may share the last descriptor with data.
        if last.len() > 1 {
            data.push((last.addr(), last.len() - 1, true));
        }
        let status = last
            .addr()
            .checked_add(u64::from(last.len() - 1))
            .ok_or(RequestError::BadAddress(last.addr().0))?;
        Ok(Self {
            kind,
            sector,
            data,
            status,
        })
    }

    /// What the bandwidth bucket charges: data moved by reads and writes; other
    /// requests (flush, discard, write-zeroes, get-id) count as operations only.
    pub fn rate_limited_bytes(&self) -> u64 {
        match self.kind {
            T_IN | T_OUT => self.data_len(),
            _ => 0,
        }
    }

    fn data_len(&self) -> u64 {
        self.data.iter().map(|(_, l, _)| u64::from(*l)).sum()
    }

    /// Executes the request; returns (status, bytes written into guest memory).
    pub fn execute(
        &self,
        mem: &GuestMemoryMmap,
        disk: &dyn BlockBackend,
        cfg: &BlockConfig,
        counters: &BlockCounters,
    ) -> (u8, u32) {
        let result = match self.kind {
            T_IN => self.read(mem, disk, counters),
            T_OUT if cfg.read_only => Err(S_IOERR),
            T_OUT => self.write(mem, disk, counters),
            T_FLUSH => {
                counters.flush_ops.fetch_add(1, Ordering::Relaxed);
                disk.flush().map(|_| 0).map_err(|e| io_err("flush", e))
            }
            T_GET_ID => self.get_id(mem, cfg),
            T_DISCARD | T_WRITE_ZEROES if cfg.read_only => Err(S_IOERR),
            T_DISCARD => self.discard_or_zero(mem, disk, false, &counters.discard_ops),
            T_WRITE_ZEROES => self.discard_or_zero(mem, disk, true, &counters.write_zeroes_ops),
            _ => Err(S_UNSUPP),
        };
        match result {
            Ok(written) => (S_OK, written),
            Err(status) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                (status, 0)
            }
        }
    }

    fn byte_range(&self, disk: &dyn BlockBackend) -> Result<u64, u8> {
        let offset = self.sector.checked_mul(SECTOR_SIZE).ok_or(S_IOERR)?;
        let end = offset.checked_add(self.data_len()).ok_or(S_IOERR)?;
        if end > disk.size() || !self.data_len().is_multiple_of(SECTOR_SIZE) {
            return Err(S_IOERR);
        }
        Ok(offset)
    }

    fn read(
        &self,
        mem: &GuestMemoryMmap,
        disk: &dyn BlockBackend,
        c: &BlockCounters,
    ) -> Result<u32, u8> {
        let offset = self.byte_range(disk)?;
        let mut regions = Vec::with_capacity(self.data.len());
        for &(addr, len, writable) in &self.data {
            if !writable {
                return Err(S_IOERR);
            }
            for slice in mem.get_slices(addr, len as usize) {
                regions.push(slice.map_err(|_| S_IOERR)?);
            }
        }
        let mut slices: Vec<IoSliceMut<'_>> = regions
            .iter()
            .map(|r| {
                // SAFETY: the slice lies in a guest memory mapping that lives as long as
                // `mem`; the guest owns the buffer until we return it in the used ring.
                IoSliceMut::new(unsafe {
                    std::slice::from_raw_parts_mut(r.ptr_guard_mut().as_ptr(), r.len())
                })
            })
            .collect();
        let read = disk.read_vectored_at(&mut slices, offset);
        // Dirty only once written (even partly, on an error): a migration round that
        // took the bitmap between a mark and the write would have copied the page as it
        // was and cleared its bit, losing the write.
        drop(slices);
        for r in &regions {
            r.bitmap().mark_dirty(0, r.len());
        }
        read.map_err(|e| io_err("read", e))?;
        let len = self.data_len();
        c.read_ops.fetch_add(1, Ordering::Relaxed);
        c.read_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(len as u32)
    }

    fn write(
        &self,
        mem: &GuestMemoryMmap,
        disk: &dyn BlockBackend,
        c: &BlockCounters,
    ) -> Result<u32, u8> {
        let offset = self.byte_range(disk)?;
        let mut slices = Vec::with_capacity(self.data.len());
        for &(addr, len, writable) in &self.data {
            if writable {
                return Err(S_IOERR);
            }
            guest_slices(mem, addr, len, &mut |ptr, n| {
                // SAFETY: as in `read`; the backend only reads from these buffers.
                slices.push(IoSlice::new(unsafe { std::slice::from_raw_parts(ptr, n) }));
            })?;
        }
        disk.write_vectored_at(&slices, offset)
            .map_err(|e| io_err("write", e))?;
        c.write_ops.fetch_add(1, Ordering::Relaxed);
        c.write_bytes.fetch_add(self.data_len(), Ordering::Relaxed);
        Ok(0)
    }

    fn get_id(&self, mem: &GuestMemoryMmap, cfg: &BlockConfig) -> Result<u32, u8> {
        let &(addr, len, writable) = self.data.first().ok_or(S_IOERR)?;
        if !writable {
            return Err(S_IOERR);
        }
        let mut id = [0u8; SERIAL_LEN];
        let serial = cfg.serial.as_bytes();
        let n = serial.len().min(SERIAL_LEN);
        id[..n].copy_from_slice(&serial[..n]);
        let n = (len as usize).min(SERIAL_LEN);
        mem.write_slice(&id[..n], addr).map_err(|_| S_IOERR)?;
        Ok(n as u32)
    }

    fn discard_or_zero(
        &self,
        mem: &GuestMemoryMmap,
        disk: &dyn BlockBackend,
        zero: bool,
        ops: &AtomicU64,
    ) -> Result<u32, u8> {
        for &(addr, len, writable) in &self.data {
            if writable || !(len as usize).is_multiple_of(DISCARD_SEGMENT_LEN) {
                return Err(S_IOERR);
            }
            for i in 0..(len as usize / DISCARD_SEGMENT_LEN) {
                let at = addr
                    .checked_add((i * DISCARD_SEGMENT_LEN) as u64)
                    .ok_or(S_IOERR)?;
                let seg: [u8; 16] = mem.read_obj(at).map_err(|_| S_IOERR)?;
                let sector = u64::from_le_bytes(seg[0..8].try_into().map_err(|_| S_IOERR)?);
                let count = u32::from_le_bytes(seg[8..12].try_into().map_err(|_| S_IOERR)?);
                if count > MAX_DISCARD_SECTORS {
                    return Err(S_IOERR);
                }
                let offset = sector.checked_mul(SECTOR_SIZE).ok_or(S_IOERR)?;
                let bytes = u64::from(count) * SECTOR_SIZE;
                if offset
                    .checked_add(bytes)
                    .is_none_or(|end| end > disk.size())
                {
                    return Err(S_IOERR);
                }
                let r = if zero {
                    disk.write_zeroes(offset, bytes)
                } else {
                    disk.discard(offset, bytes)
                };
                r.map_err(|e| io_err(if zero { "write-zeroes" } else { "discard" }, e))?;
            }
        }
        ops.fetch_add(1, Ordering::Relaxed);
        Ok(0)
    }
}

fn io_err(op: &str, e: std::io::Error) -> u8 {
    tracing::warn!(op, error = %e, "block backend error");
    S_IOERR
}

/// Walks the host mappings of `[addr, addr+len)` (which may span memory regions).
fn guest_slices(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u32,
    f: &mut dyn FnMut(*mut u8, usize),
) -> Result<(), u8> {
    for slice in mem.get_slices(addr, len as usize) {
        let slice = slice.map_err(|_| S_IOERR)?;
        f(slice.ptr_guard_mut().as_ptr(), slice.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::GuestMemoryRegion;

    use super::*;
    use crate::rate_limiter::RateLimiterConfig;

    /// A disk whose read first does what a live migration's round does to the device
    /// bitmap (takes it: reads and clears), then fills the buffers.
    struct RoundDuringRead {
        mem: Arc<GuestMemoryMmap>,
    }

    impl BlockBackend for RoundDuringRead {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], _: u64) -> std::io::Result<()> {
            for r in self.mem.iter() {
                // As vmm::live::dirty does: the mapping's own bitmap.
                let _ = std::ops::Deref::deref(r).bitmap().get_and_reset();
            }
            for b in bufs.iter_mut() {
                b.fill(0xab);
            }
            Ok(())
        }
        fn write_vectored_at(&self, _: &[IoSlice<'_>], _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn pages_a_read_fills_are_dirty_after_it_even_if_a_round_ran_meanwhile() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        let disk = RoundDuringRead { mem: mem.clone() };
        // 8 KiB into pages 1 and 2 (0x1800..0x3800 spans three pages).
        let req = Request {
            kind: T_IN,
            sector: 0,
            data: vec![(GuestAddress(0x1800), 0x2000, true)],
            status: GuestAddress(0x8000),
        };
        let cfg = BlockConfig {
            read_only: false,
            serial: "t".into(),
            num_queues: 1,
            rate_limiter: RateLimiterConfig::default(),
            poll_us: 0,
        };
        let (status, written) = req.execute(&mem, &disk, &cfg, &BlockCounters::default());
        assert_eq!((status, written), (S_OK, 0x2000));
        let region = mem.iter().next().unwrap();
        for page in [1usize, 2, 3] {
            assert!(
                region.bitmap().dirty_at(page * 0x1000),
                "page {page} written by the device but not dirty"
            );
        }
        assert!(
            !region.bitmap().dirty_at(0x5000),
            "an untouched page is dirty"
        );
        let mut got = [0u8; 0x2000];
        mem.read_slice(&mut got, GuestAddress(0x1800)).unwrap();
        assert!(got.iter().all(|&b| b == 0xab));
    }
}
