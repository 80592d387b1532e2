//! One virtio-blk request: parsed from a descriptor chain, executed against the
//! backend straight in guest memory, completed with a status byte.

use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_blk;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress};

use super::device::{BlockConfig, BlockCounters, MAX_DISCARD_SECTORS, SECTOR_SIZE, SEG_MAX};
use super::on_error::{errno_of, DiskStopped};
use crate::block::BlockBackend;
use crate::virtio::guest_io::{guest_bufs, guest_bufs_mut};
use crate::virtio::GuestMemoryMmap;

const T_IN: u32 = virtio_blk::VIRTIO_BLK_T_IN;
const T_OUT: u32 = virtio_blk::VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = virtio_blk::VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = virtio_blk::VIRTIO_BLK_T_GET_ID;
const T_DISCARD: u32 = virtio_blk::VIRTIO_BLK_T_DISCARD;
const T_WRITE_ZEROES: u32 = virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES;

pub(super) const S_OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
pub(super) const S_IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
pub(super) const S_UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

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

    /// Executes the request: the status and bytes written into guest memory, or, when
    /// the host failed the I/O and `policy` says so, that the disk stops.
    pub fn execute(
        &self,
        mem: &GuestMemoryMmap,
        disk: &dyn BlockBackend,
        cfg: &BlockConfig,
        counters: &BlockCounters,
    ) -> Outcome {
        let result = match self.kind {
            T_IN => self.read(mem, disk, counters),
            T_OUT if cfg.read_only => Err(S_IOERR.into()),
            T_OUT => self.write(mem, disk, counters),
            T_FLUSH => {
                counters.flush_ops.fetch_add(1, Ordering::Relaxed);
                disk.flush().map(|_| 0).map_err(|e| io_err("flush", e))
            }
            T_GET_ID => self.get_id(mem, cfg),
            T_DISCARD | T_WRITE_ZEROES if cfg.read_only => Err(S_IOERR.into()),
            T_DISCARD => self.discard_or_zero(mem, disk, false, &counters.discard_ops),
            T_WRITE_ZEROES => self.discard_or_zero(mem, disk, true, &counters.write_zeroes_ops),
            _ => Err(S_UNSUPP.into()),
        };
        let status = match result {
            Ok(written) => {
                return Outcome::Done {
                    status: S_OK,
                    written,
                }
            }
            Err(Failed::Status(status)) => status,
            Err(Failed::Io { op, error }) => {
                let errno = errno_of(&error);
                if let Some(errno) =
                    errno.filter(|&n| cfg.stop_sink.is_some() && cfg.on_error.stops_on(n))
                {
                    return Outcome::Stop(DiskStopped { op, errno });
                }
                crate::guest_warn!(op, error = %error, "block backend error (reported to the guest)");
                S_IOERR
            }
        };
        counters.errors.fetch_add(1, Ordering::Relaxed);
        Outcome::Done { status, written: 0 }
    }

    fn byte_range(&self, disk: &dyn BlockBackend) -> Result<u64, Failed> {
        let offset = self.sector.checked_mul(SECTOR_SIZE).ok_or(S_IOERR)?;
        let end = offset.checked_add(self.data_len()).ok_or(S_IOERR)?;
        if end > disk.size() || !self.data_len().is_multiple_of(SECTOR_SIZE) {
            return Err(S_IOERR.into());
        }
        Ok(offset)
    }

    fn read(
        &self,
        mem: &GuestMemoryMmap,
        disk: &dyn BlockBackend,
        c: &BlockCounters,
    ) -> Result<u32, Failed> {
        let offset = self.byte_range(disk)?;
        if self.data.iter().any(|&(_, _, writable)| !writable) {
            return Err(S_IOERR.into());
        }
        let segments = self.data.iter().map(|&(addr, len, _)| (addr, len));
        let (bufs, regions) = guest_bufs_mut(mem, segments).map_err(|_| S_IOERR)?;
        let read = disk.read_vectored_at(&bufs, offset);
        // Dirty only once written (even partly, on an error): a migration round that
        // took the bitmap between a mark and the write would have copied the page as it
        // was and cleared its bit, losing the write.
        drop(bufs);
        for r in &regions {
            r.bitmap().mark_dirty(0, r.len());
        }
        read.map_err(|e| io_err("read", e))?;
        let len = self.data_len();
        c.read_ops.fetch_add(1, Ordering::Relaxed);
        c.read_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(u32::try_from(len).unwrap_or(u32::MAX))
    }

    fn write(
        &self,
        mem: &GuestMemoryMmap,
        disk: &dyn BlockBackend,
        c: &BlockCounters,
    ) -> Result<u32, Failed> {
        let offset = self.byte_range(disk)?;
        if self.data.iter().any(|&(_, _, writable)| writable) {
            return Err(S_IOERR.into());
        }
        let segments = self.data.iter().map(|&(addr, len, _)| (addr, len));
        let bufs = guest_bufs(mem, segments).map_err(|_| S_IOERR)?;
        disk.write_vectored_at(&bufs, offset)
            .map_err(|e| io_err("write", e))?;
        c.write_ops.fetch_add(1, Ordering::Relaxed);
        c.write_bytes.fetch_add(self.data_len(), Ordering::Relaxed);
        Ok(0)
    }

    fn get_id(&self, mem: &GuestMemoryMmap, cfg: &BlockConfig) -> Result<u32, Failed> {
        let &(addr, len, writable) = self.data.first().ok_or(S_IOERR)?;
        if !writable {
            return Err(S_IOERR.into());
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
    ) -> Result<u32, Failed> {
        for &(addr, len, writable) in &self.data {
            if writable || !(len as usize).is_multiple_of(DISCARD_SEGMENT_LEN) {
                return Err(S_IOERR.into());
            }
            for i in 0..(len as usize / DISCARD_SEGMENT_LEN) {
                let at = addr
                    .checked_add((i * DISCARD_SEGMENT_LEN) as u64)
                    .ok_or(S_IOERR)?;
                let seg: [u8; 16] = mem.read_obj(at).map_err(|_| S_IOERR)?;
                let sector = u64::from_le_bytes(seg[0..8].try_into().map_err(|_| S_IOERR)?);
                let count = u32::from_le_bytes(seg[8..12].try_into().map_err(|_| S_IOERR)?);
                if count > MAX_DISCARD_SECTORS {
                    return Err(S_IOERR.into());
                }
                let offset = sector.checked_mul(SECTOR_SIZE).ok_or(S_IOERR)?;
                let bytes = u64::from(count) * SECTOR_SIZE;
                if offset
                    .checked_add(bytes)
                    .is_none_or(|end| end > disk.size())
                {
                    return Err(S_IOERR.into());
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

fn io_err(op: &'static str, e: std::io::Error) -> Failed {
    Failed::Io { op, error: e }
}

/// Why a request failed: a bad request (its status) or the host's I/O.
#[derive(Debug)]
pub(super) enum Failed {
    Status(u8),
    Io {
        op: &'static str,
        error: std::io::Error,
    },
}

impl From<u8> for Failed {
    fn from(status: u8) -> Self {
        Failed::Status(status)
    }
}

/// What [`Request::execute`] did.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Complete the request with this status and byte count.
    Done { status: u8, written: u32 },
    /// The host failed the I/O and the disk's policy stops: do not complete it.
    Stop(DiskStopped),
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    use super::*;
    use crate::block::{IoBufs, IoBufsMut};
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
        fn read_vectored_at(&self, bufs: &IoBufsMut<'_>, _: u64) -> std::io::Result<()> {
            for r in self.mem.iter() {
                // As vmm::live::dirty does: the mapping's own bitmap.
                std::ops::Deref::deref(r).bitmap().take_into(&mut vec![
                    0;
                    r.len() as usize / 4096 / 64
                        + 1
                ]);
            }
            bufs.write_at(0, &vec![0xab; bufs.len() as usize]);
            Ok(())
        }
        fn write_vectored_at(&self, _: &IoBufs<'_>, _: u64) -> std::io::Result<()> {
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
            on_error: Default::default(),
            stop_sink: None,
        };
        let out = req.execute(&mem, &disk, &cfg, &BlockCounters::default());
        assert!(
            matches!(
                out,
                Outcome::Done {
                    status: S_OK,
                    written: 0x2000
                }
            ),
            "{out:?}"
        );
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
