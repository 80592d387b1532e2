//! Dirty pages out of guest memory into Pages frames on one stream: batching, zero runs,
//! compression and pacing. Used by the single-stream migration and by each of the
//! parallel page streams.

use std::sync::{Arc, Mutex};
use vireo_util::sync;

use migration::protocol::{self, Message};
use migration::transport::Stream;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use devices::rate_limiter::RateLimiter;
use devices::virtio::GuestMemoryMmap;

use super::dirty::{Bitmaps, PAGE_SIZE};

/// A Pages frame is sent once it holds this much.
const BATCH_BYTES: usize = 4 << 20;
/// Pages read from guest memory at a time.
pub const CHUNK_PAGES: usize = 256;

/// Counts what went on the wire; compresses and paces it if asked.
pub struct Wire<'a> {
    pub stream: &'a mut dyn Stream,
    payload: Vec<u8>,
    pub pages: u64,
    pub bytes: u64,
    compress: bool,
    /// Shared by every stream of a migration (the limit is for all of them).
    limiter: Option<Arc<RateLimiter>>,
    /// Shared-nothing: disk operations (copy and mirrored guest writes) to forward.
    pub disk_ops: Option<std::sync::mpsc::Receiver<protocol::DiskOp>>,
    /// The migration's progress, for `vm.migration-info` during a round: each frame
    /// sent moves its pages from `remaining_pages` to `pages_sent` (the round's end
    /// then sets both from the dirty log).
    progress: Option<Arc<Mutex<api::MigrationInfo>>>,
    unreported: u64,
}

impl<'a> Wire<'a> {
    pub fn new(
        stream: &'a mut dyn Stream,
        compress: bool,
        limiter: Option<Arc<RateLimiter>>,
    ) -> Self {
        Self {
            stream,
            payload: Vec::new(),
            pages: 0,
            bytes: 0,
            compress,
            limiter,
            disk_ops: None,
            progress: None,
            unreported: 0,
        }
    }

    /// Reports the pages of every frame sent to `info` (see [`Wire::progress`]).
    pub fn report_to(mut self, info: Arc<Mutex<api::MigrationInfo>>) -> Self {
        self.progress = Some(info);
        self
    }

    fn report(&mut self) {
        let Some(info) = &self.progress else {
            return;
        };
        let n = std::mem::take(&mut self.unreported);
        let mut i = sync::lock(info);
        i.pages_sent += n;
        i.remaining_pages = i.remaining_pages.saturating_sub(n);
    }

    fn pace(&self, len: u64) {
        if let Some(l) = &self.limiter {
            while let Err(wait) = l.admit(len) {
                std::thread::sleep(wait);
            }
        }
    }

    /// Sends a message that is not pages (counted and paced like them).
    pub fn send(&mut self, m: &Message, len: u64) -> Result<(), String> {
        self.pace(len);
        self.bytes += len;
        protocol::send(self.stream, m).map_err(|e| e.to_string())
    }

    /// Sends every queued disk operation, in order.
    pub fn drain_disk_ops(&mut self) -> Result<(), String> {
        let Some(rx) = &self.disk_ops else {
            return Ok(());
        };
        let ops: Vec<protocol::DiskOp> = rx.try_iter().collect();
        for op in ops {
            let len = match &op {
                protocol::DiskOp::Write { data, .. } => data.len() as u64 + 24,
                protocol::DiskOp::Zeroes { .. } => 32,
            };
            self.send(&Message::Disk(op), len)?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), String> {
        self.drain_disk_ops()?;
        if self.payload.is_empty() {
            return Ok(());
        }
        let p = std::mem::take(&mut self.payload);
        let msg = if self.compress {
            Message::PagesZstd(protocol::compress_pages(&p).map_err(|e| e.to_string())?)
        } else {
            Message::Pages(p)
        };
        let len = match &msg {
            Message::Pages(p) | Message::PagesZstd(p) => p.len() as u64 + 12,
            _ => 0,
        };
        self.send(&msg, len)?;
        self.report();
        Ok(())
    }

    fn push(&mut self, gpa: u64, pages: u32, data: Option<&[u8]>) -> Result<(), String> {
        protocol::push_run(&mut self.payload, gpa, pages, data);
        self.pages += u64::from(pages);
        self.unreported += u64::from(pages);
        if self.payload.len() >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }
}

use vireo_util::is_zero;

/// A scratch buffer for [`send_span`].
pub fn chunk_buffer() -> Vec<u8> {
    vec![0u8; CHUNK_PAGES * PAGE_SIZE as usize]
}

/// Queues the pages `from..to` of the region at `base` whose bit is set in `bits`, as
/// they are now. Zero pages go as zero runs, or not at all with `skip_zero` (round 0:
/// the destination's memory starts zeroed). The caller flushes.
#[allow(clippy::too_many_arguments)]
pub fn send_span(
    wire: &mut Wire<'_>,
    mem: &GuestMemoryMmap,
    base: u64,
    bits: &[u64],
    from: usize,
    to: usize,
    skip_zero: bool,
    buf: &mut [u8],
) -> Result<(), String> {
    let mut p = from;
    while p < to {
        if bits[p / 64] == 0 && p.is_multiple_of(64) {
            p += 64;
            continue;
        }
        if bits[p / 64] & (1 << (p % 64)) == 0 {
            p += 1;
            continue;
        }
        // A run of dirty pages from p, at most CHUNK_PAGES long.
        let mut end = p + 1;
        while end < to && end - p < CHUNK_PAGES && bits[end / 64] & (1 << (end % 64)) != 0 {
            end += 1;
        }
        let n = end - p;
        let chunk = &mut buf[..n * PAGE_SIZE as usize];
        let gpa = base + p as u64 * PAGE_SIZE;
        mem.read_slice(chunk, GuestAddress(gpa))
            .map_err(|e| format!("reading guest memory at {gpa:#x}: {e}"))?;
        // Split the run where pages switch between zero and data.
        let mut i = 0;
        while i < n {
            let page = |k: usize| &chunk[k * PAGE_SIZE as usize..(k + 1) * PAGE_SIZE as usize];
            let zero = is_zero(page(i));
            let mut j = i + 1;
            while j < n && is_zero(page(j)) == zero {
                j += 1;
            }
            let at = gpa + i as u64 * PAGE_SIZE;
            let data = &chunk[i * PAGE_SIZE as usize..j * PAGE_SIZE as usize];
            if !zero {
                wire.push(at, (j - i) as u32, Some(data))?;
            } else if !skip_zero {
                wire.push(at, (j - i) as u32, None)?;
            }
            i = j;
        }
        p = end;
    }
    Ok(())
}

/// Sends every page set in `bitmaps` on one stream, then flushes.
pub fn send_pages(
    wire: &mut Wire<'_>,
    mem: &GuestMemoryMmap,
    bitmaps: &Bitmaps,
    skip_zero: bool,
) -> Result<(), String> {
    let mut buf = chunk_buffer();
    for (region, bits) in mem.iter().zip(bitmaps) {
        let pages = (region.len() / PAGE_SIZE) as usize;
        send_span(
            wire,
            mem,
            region.start_addr().0,
            bits,
            0,
            pages,
            skip_zero,
            &mut buf,
        )?;
    }
    wire.flush()
}
