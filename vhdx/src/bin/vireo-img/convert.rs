//! `convert`: raw/VHDX to raw/VHDX. Reads only ranges that hold data (holes of
//! a raw file via SEEK_DATA/SEEK_HOLE, allocated blocks of a VHDX), skips
//! all-zero pieces so the destination stays sparse, and overlaps reading and
//! writing with a reader thread.

use crate::CliResult;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use vhdx::{CreateOptions, Vhdx};

const CHUNK: u64 = 4 << 20;
const PIECE: usize = 64 << 10;

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
    // Reader thread -> bounded channel -> this thread writes.
    let (tx, rx) = mpsc::sync_channel::<CliResult<(u64, Vec<u8>)>>(4);
    let (ret_tx, ret_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| -> CliResult<()> {
        let source = &source;
        let ranges = &ranges;
        s.spawn(move || {
            for &(start, len) in ranges {
                let mut off = start;
                while off < start + len {
                    let n = (start + len - off).min(CHUNK - off % CHUNK) as usize;
                    let mut buf = ret_rx.try_recv().unwrap_or_default();
                    buf.resize(n, 0);
                    let r = source.read(&mut buf, off).map(|_| (off, buf));
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                    off += n as u64;
                }
            }
        });
        for msg in rx {
            let (off, buf) = msg?;
            // Write runs of non-zero pieces.
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
                i = j;
            }
            if let Some(b) = &bar {
                b.inc(buf.len() as u64);
            }
            let _ = ret_tx.send(buf);
        }
        Ok(())
    })?;
    if let Some(b) = bar {
        b.finish();
    }
    dest.finish()
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u128 has no invalid bit patterns; align_to keeps every slice in bounds.
        unsafe { b.align_to::<u128>() }
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}
