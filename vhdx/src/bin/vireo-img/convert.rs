//! `convert`: raw/VHDX to raw/VHDX. Reads only ranges that hold data (holes of
//! a raw file via SEEK_DATA/SEEK_HOLE, allocated blocks of a VHDX), skips
//! all-zero pieces so the destination stays sparse. Several workers (`-m`)
//! each read a 4 MiB chunk and write its non-zero pieces, so reads overlap
//! (one read in flight at a time leaves the disk idle between requests) and
//! writeback of the destination starts while the conversion goes on.

use crate::CliResult;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use vhdx::{CreateOptions, Vhdx};

const CHUNK: u64 = 4 << 20;
const PIECE: usize = 64 << 10;
/// Start writeback of the destination after every this many bytes written.
const WRITEBACK_EVERY: u64 = 64 << 20;
/// Chunks converted at once by default (reads in flight keep the disk busy).
pub const DEFAULT_WORKERS: usize = 4;

enum Src {
    Raw(File, u64),
    Vhdx(Box<Vhdx>),
}

impl Src {
    fn size(&self) -> u64 {
        match self {
            Src::Raw(_, s) => *s,
            Src::Vhdx(v) => v.virtual_size(),
        }
    }
    fn data_ranges(&self) -> CliResult<Vec<(u64, u64)>> {
        match self {
            Src::Raw(f, size) => Ok(raw_data_ranges(f, *size)),
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

fn raw_data_ranges(f: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let size_i = size as i64;
    while pos < size_i {
        // SAFETY: lseek on our open descriptor.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            if out.is_empty()
                && pos == 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO)
            {
                // SEEK_DATA unsupported: treat everything as data.
                return vec![(0, size)];
            }
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size_i } else { hole.min(size_i) };
        if end > data {
            out.push((data as u64, (end - data) as u64));
        }
        pos = end;
    }
    out
}

enum Dst {
    Raw(File),
    Vhdx(Box<Vhdx>),
}

impl Dst {
    fn write(&self, buf: &[u8], off: u64) -> CliResult<()> {
        match self {
            Dst::Raw(f) => f
                .write_all_at(buf, off)
                .map_err(|e| format!("error while writing at byte {off}: {e}")),
            Dst::Vhdx(v) => v.write_at(buf, off).map_err(|e| e.to_string()),
        }
    }
    fn finish(self) -> CliResult<()> {
        match self {
            Dst::Raw(f) => f.sync_all().map_err(|e| e.to_string()),
            Dst::Vhdx(v) => v.close().map_err(|e| e.to_string()),
        }
    }
}

pub fn run(
    src: &Path,
    src_format: Option<&str>,
    dst: &Path,
    dst_format: &str,
    options: Option<&str>,
    progress: bool,
    workers: usize,
) -> CliResult<()> {
    let is_vhdx =
        vhdx::probe(src).map_err(|e| format!("Could not open '{}': {e}", src.display()))?;
    let fmt = src_format.unwrap_or(if is_vhdx { "vhdx" } else { "raw" });
    let source = match fmt {
        "vhdx" => Src::Vhdx(Box::new(crate::open_ro(src)?)),
        "raw" => {
            let f =
                File::open(src).map_err(|e| format!("Could not open '{}': {e}", src.display()))?;
            let size = f.metadata().map_err(|e| e.to_string())?.len();
            Src::Raw(f, size)
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
            Dst::Vhdx(Box::new(Vhdx::create(dst, &o).map_err(|e| e.to_string())?))
        }
        "raw" => {
            let f = File::create(dst)
                .map_err(|e| format!("Could not create '{}': {e}", dst.display()))?;
            f.set_len(size).map_err(|e| e.to_string())?;
            Dst::Raw(f)
        }
        f => return Err(format!("Unknown file format '{f}'")),
    };
    let ranges = source.data_ranges()?;
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
    let bar = if progress {
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
    // A second descriptor of the destination, to start writeback early.
    let wb = File::open(dst).ok();
    let workers = workers.clamp(1, 64);
    let next = AtomicUsize::new(0);
    let written = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_err: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut buf = Vec::new();
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(off, n)) = chunks.get(i) else {
                        break;
                    };
                    buf.resize(n, 0);
                    let r = source
                        .read(&mut buf, off)
                        .and_then(|_| write_nonzero(&dest, &buf, off, &written, wb.as_ref()));
                    if let Err(e) = r {
                        failed.store(true, Ordering::Relaxed);
                        let mut g = first_err.lock().unwrap_or_else(|e| e.into_inner());
                        g.get_or_insert(e);
                        break;
                    }
                    if let Some(b) = &bar {
                        b.inc(n as u64);
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    if let Some(b) = bar {
        b.finish();
    }
    dest.finish()
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

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u128 has no invalid bit patterns; align_to keeps every slice in bounds.
        unsafe { b.align_to::<u128>() }
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}
