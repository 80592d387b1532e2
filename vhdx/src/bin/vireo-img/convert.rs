//! `convert`: raw/VHDX to raw/VHDX. Reads only ranges that hold data (holes of
//! a raw file via SEEK_DATA/SEEK_HOLE, allocated blocks of a VHDX), skips
//! all-zero pieces so the destination stays sparse. `-m` readers each read
//! 4 MiB chunks into a pool of buffers and half as many writers write their
//! non-zero pieces, so reads stay in flight while earlier chunks are written
//! (one read in flight at a time leaves the disk idle between requests).
//!
//! Cache modes, as qemu-img's `-t`/`-T`: by default (`none`) both sides use
//! `O_DIRECT` for aligned I/O, so the data is copied by the device rather
//! than twice by the CPU through the page cache, and the destination is
//! flushed before exit. `writeback` goes through the page cache and flushes
//! at the end; `unsafe` (qemu-img's default) never flushes.

use crate::CliResult;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use vhdx::storage::DIRECT_ALIGN;
use vhdx::{CreateOptions, FileStorage, OpenOptions, Storage, Vhdx};

const CHUNK: u64 = 4 << 20;
const PIECE: usize = 64 << 10;
/// Start writeback of a buffered destination after every this many bytes written.
const WRITEBACK_EVERY: u64 = 64 << 20;
/// Chunks converted at once by default (reads in flight keep the disk busy).
pub const DEFAULT_WORKERS: usize = 4;

/// How a side of the conversion uses the page cache (qemu-img's cache modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// `O_DIRECT` for aligned I/O, flush at the end.
    None,
    /// Page cache, flush at the end.
    Writeback,
    /// Page cache, no flush.
    Unsafe,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "directsync" => Ok(CacheMode::None),
            "writeback" | "writethrough" => Ok(CacheMode::Writeback),
            "unsafe" => Ok(CacheMode::Unsafe),
            _ => Err(format!(
                "Invalid cache option: {s} (none, writeback or unsafe)"
            )),
        }
    }
}

/// What `convert` was asked to do.
pub struct Job<'a> {
    pub src: &'a Path,
    pub src_format: Option<&'a str>,
    pub src_cache: CacheMode,
    pub dst: &'a Path,
    pub dst_format: &'a str,
    pub dst_cache: CacheMode,
    pub options: Option<&'a str>,
    pub progress: bool,
    pub workers: usize,
    /// Open a VHDX source without its lock (`-U`).
    pub src_force_share: bool,
}

enum Src {
    Raw(FileStorage, u64),
    Vhdx(Box<Vhdx>),
}

impl Src {
    fn size(&self) -> u64 {
        match self {
            Src::Raw(_, s) => *s,
            Src::Vhdx(v) => v.virtual_size(),
        }
    }
    fn data_ranges(&self, raw_fd: Option<&File>) -> CliResult<Vec<(u64, u64)>> {
        match self {
            Src::Raw(_, size) => {
                Ok(raw_fd.map_or_else(|| vec![(0, *size)], |f| raw_data_ranges(f, *size)))
            }
            Src::Vhdx(v) => Ok(v
                .block_status(0, v.virtual_size())
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|e| e.data)
                .map(|e| (e.start, e.length))
                .collect()),
        }
    }
    fn read(&self, buf: &mut [u8], off: u64) -> CliResult<()> {
        match self {
            Src::Raw(f, _) => {
                let mut done = 0;
                while done < buf.len() {
                    match f.read_at(&mut buf[done..], off + done as u64) {
                        Ok(0) => {
                            buf[done..].fill(0);
                            break;
                        }
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("error while reading at byte {off}: {e}")),
                    }
                }
                Ok(())
            }
            Src::Vhdx(v) => v.read_at(buf, off).map_err(|e| e.to_string()),
        }
    }
}

/// The data extents of a raw source; a file system without SEEK_DATA has only data.
fn raw_data_ranges(f: &File, size: u64) -> Vec<(u64, u64)> {
    vireo_util::extents::data_extents(f, 0, size).unwrap_or_else(|_| vec![(0, size)])
}

enum Dst {
    Raw(FileStorage),
    Vhdx(Box<Vhdx>),
}

impl Dst {
    fn write(&self, buf: &[u8], off: u64) -> CliResult<()> {
        match self {
            Dst::Raw(f) => {
                let mut done = 0;
                while done < buf.len() {
                    match f.write_at(&buf[done..], off + done as u64) {
                        Ok(0) => {
                            return Err(format!("error while writing at byte {off}: wrote nothing"))
                        }
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("error while writing at byte {off}: {e}")),
                    }
                }
                Ok(())
            }
            Dst::Vhdx(v) => v.write_at(buf, off).map_err(|e| e.to_string()),
        }
    }
    fn finish(self, cache: CacheMode) -> CliResult<()> {
        match self {
            Dst::Raw(f) if cache == CacheMode::Unsafe => {
                drop(f);
                Ok(())
            }
            Dst::Raw(f) => f.sync_data().map_err(|e| e.to_string()),
            // Closing a VHDX always flushes: its log must be retired.
            Dst::Vhdx(v) => v.close().map_err(|e| e.to_string()),
        }
    }
}

fn raw_storage(file: File, path: &Path, write: bool, cache: CacheMode) -> FileStorage {
    if cache == CacheMode::None {
        FileStorage::with_direct(file, path, write)
    } else {
        FileStorage::new(file)
    }
}

/// A chunk read, on its way to the writers.
struct Filled {
    mem: AlignedBuf,
    off: u64,
    n: usize,
}

use vireo_util::sync::lock;

/// A zeroed buffer of `len` bytes whose start is [`DIRECT_ALIGN`]-aligned
/// (so aligned chunks can go through `O_DIRECT`).
struct AlignedBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let mem = vec![0u8; len + DIRECT_ALIGN];
        let start = mem.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { mem, start, len }
    }
    fn slice(&mut self, n: usize) -> &mut [u8] {
        let n = n.min(self.len);
        &mut self.mem[self.start..self.start + n]
    }
}

pub fn run(job: &Job) -> CliResult<()> {
    let (src, dst, dst_format, options) = (job.src, job.dst, job.dst_format, job.options);
    if crate::wants_options_help(options) {
        crate::print_options_help();
        return Ok(());
    }
    let is_vhdx =
        vhdx::probe(src).map_err(|e| format!("Could not open '{}': {e}", src.display()))?;
    let fmt = job
        .src_format
        .unwrap_or(if is_vhdx { "vhdx" } else { "raw" });
    let mut raw_src_fd = None;
    let source = match fmt {
        "vhdx" => Src::Vhdx(Box::new(
            Vhdx::open(
                src,
                OpenOptions {
                    read_only: true,
                    direct: job.src_cache == CacheMode::None,
                    no_lock: job.src_force_share,
                    ..Default::default()
                },
            )
            .map_err(|e| format!("Could not open '{}': {e}", src.display()))?,
        )),
        "raw" => {
            let open =
                || File::open(src).map_err(|e| format!("Could not open '{}': {e}", src.display()));
            let f = open()?;
            let size = f.metadata().map_err(|e| e.to_string())?.len();
            raw_src_fd = Some(open()?);
            Src::Raw(raw_storage(f, src, false, job.src_cache), size)
        }
        f => return Err(format!("Unknown file format '{f}'")),
    };
    let size = source.size();
    let dest = match dst_format {
        "vhdx" => {
            let mut o = CreateOptions::default();
            crate::parse_create_options(options, &mut o)?;
            let lss = u64::from(o.logical_sector_size);
            o.size = size.div_ceil(lss) * lss;
            let open = OpenOptions {
                direct: job.dst_cache == CacheMode::None,
                ..Default::default()
            };
            Dst::Vhdx(Box::new(
                Vhdx::create_with(dst, &o, open).map_err(|e| e.to_string())?,
            ))
        }
        "raw" => {
            let f = File::create(dst)
                .map_err(|e| format!("Could not create '{}': {e}", dst.display()))?;
            f.set_len(size).map_err(|e| e.to_string())?;
            Dst::Raw(raw_storage(f, dst, true, job.dst_cache))
        }
        f => return Err(format!("Unknown file format '{f}'")),
    };
    let ranges = source.data_ranges(raw_src_fd.as_ref())?;
    // Chunks of at most CHUNK bytes, aligned to CHUNK, in order.
    let mut chunks = Vec::new();
    for &(start, len) in &ranges {
        let mut off = start;
        while off < start + len {
            let n = (start + len - off).min(CHUNK - off % CHUNK);
            chunks.push((off, n as usize));
            off += n;
        }
    }
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let bar = if job.progress {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "    ({percent:.2}/100%) {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    // A second descriptor of a buffered destination, to start writeback early.
    let wb = match job.dst_cache {
        CacheMode::Writeback => File::open(dst).ok(),
        CacheMode::None | CacheMode::Unsafe => None,
    };
    let readers = job.workers.clamp(1, 64);
    let writers = readers.div_ceil(2);
    let next = AtomicUsize::new(0);
    let written = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_err: Mutex<Option<String>> = Mutex::new(None);
    let fail = |e: String| {
        failed.store(true, Ordering::Relaxed);
        let mut g = lock(&first_err);
        g.get_or_insert(e);
    };
    // A pipeline: readers fill buffers from a pool, writers empty them, so
    // `readers` reads stay in flight while earlier chunks are being written.
    let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
    for _ in 0..readers + writers + 1 {
        // Cannot fail: the receiver is alive.
        let _ = free_tx.send(AlignedBuf::new(CHUNK as usize));
    }
    let free_rx = Mutex::new(free_rx);
    let (full_tx, full_rx) = mpsc::channel::<Filled>();
    let full_rx = Mutex::new(full_rx);
    {
        let (source, dest, chunks, bar) = (&source, &dest, &chunks, &bar);
        let (next, written, failed, fail, wb) = (&next, &written, &failed, &fail, &wb);
        let (free_rx, full_rx, free_tx) = (&free_rx, &full_rx, &free_tx);
        std::thread::scope(|s| {
            for _ in 0..readers {
                let full_tx = full_tx.clone();
                s.spawn(move || {
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(off, n)) = chunks.get(i) else {
                            break;
                        };
                        let Ok(mut mem) = lock(free_rx).recv() else {
                            break;
                        };
                        if let Err(e) = source.read(mem.slice(n), off) {
                            fail(e);
                            break;
                        }
                        if full_tx.send(Filled { mem, off, n }).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(full_tx);
            for _ in 0..writers {
                s.spawn(move || loop {
                    let msg = lock(full_rx).recv();
                    let Ok(Filled { mut mem, off, n }) = msg else {
                        break;
                    };
                    if !failed.load(Ordering::Relaxed) {
                        match write_nonzero(dest, mem.slice(n), off, written, wb.as_ref()) {
                            Ok(()) => {
                                if let Some(b) = bar {
                                    b.inc(n as u64);
                                }
                            }
                            Err(e) => fail(e),
                        }
                    }
                    let _ = free_tx.send(mem);
                });
            }
        });
    }
    if let Some(e) = vireo_util::sync::into_inner(first_err) {
        return Err(e);
    }
    if let Some(b) = bar {
        b.finish();
    }
    dest.finish(job.dst_cache)
}

/// Writes the runs of non-zero PIECEs of `buf` (the destination is new and
/// reads as zeros); every WRITEBACK_EVERY bytes starts writeback of the
/// destination so that the final flush does not have to write it all.
fn write_nonzero(
    dest: &Dst,
    buf: &[u8],
    off: u64,
    written: &AtomicU64,
    wb: Option<&File>,
) -> CliResult<()> {
    let mut i = 0;
    while i < buf.len() {
        let pe = (i + PIECE).min(buf.len());
        if is_zero(&buf[i..pe]) {
            i = pe;
            continue;
        }
        let mut j = pe;
        while j < buf.len() {
            let qe = (j + PIECE).min(buf.len());
            if is_zero(&buf[j..qe]) {
                break;
            }
            j = qe;
        }
        dest.write(&buf[i..j], off + i as u64)?;
        let before = written.fetch_add((j - i) as u64, Ordering::Relaxed);
        if before / WRITEBACK_EVERY != (before + (j - i) as u64) / WRITEBACK_EVERY {
            if let Some(f) = wb {
                // SAFETY: sync_file_range on an open descriptor with plain
                // integer arguments; it only starts writeback (failure is harmless).
                unsafe {
                    libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
                }
            }
        }
        i = j;
    }
    Ok(())
}

use vireo_util::is_zero;
