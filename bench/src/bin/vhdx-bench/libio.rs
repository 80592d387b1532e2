//! Library I/O: the engine's read_at/write_at on a fully allocated dynamic
//! VHDX against pread/pwrite on a raw file, same pattern, same thread.

use crate::{human_size, median, qemu_check, Args, BenchResult, Rng};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};
use vhdx::{CreateOptions, Vhdx};

const MIB: u64 = 1 << 20;

enum Target {
    Vhdx(Box<Vhdx>),
    Raw(File),
}

impl Target {
    fn read(&self, buf: &mut [u8], off: u64) -> BenchResult<()> {
        match self {
            Target::Vhdx(v) => v.read_at(buf, off)?,
            Target::Raw(f) => f.read_exact_at(buf, off)?,
        }
        Ok(())
    }
    fn write(&self, buf: &[u8], off: u64) -> BenchResult<()> {
        match self {
            Target::Vhdx(v) => v.write_at(buf, off)?,
            Target::Raw(f) => f.write_all_at(buf, off)?,
        }
        Ok(())
    }
    fn flush(&self) -> BenchResult<()> {
        match self {
            Target::Vhdx(v) => v.flush()?,
            Target::Raw(f) => f.sync_data()?,
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Pattern {
    RandRead4k,
    RandWrite4k,
    SeqRead1m,
    SeqWrite1m,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::RandRead4k => "4K random read",
            Pattern::RandWrite4k => "4K random write",
            Pattern::SeqRead1m => "1 MiB sequential read",
            Pattern::SeqWrite1m => "1 MiB sequential write",
        }
    }
    fn len(self) -> usize {
        match self {
            Pattern::RandRead4k | Pattern::RandWrite4k => 4096,
            Pattern::SeqRead1m | Pattern::SeqWrite1m => MIB as usize,
        }
    }
    fn is_write(self) -> bool {
        matches!(self, Pattern::RandWrite4k | Pattern::SeqWrite1m)
    }
}

/// Operations per second of `pat` on `t` for `secs` seconds.
fn measure(t: &Target, pat: Pattern, size: u64, secs: f64, seed: u64) -> BenchResult<f64> {
    let mut rng = Rng::new(seed);
    let len = pat.len();
    let mut buf = vec![0u8; len];
    rng.fill(&mut buf);
    let slots = size / len as u64;
    let mut seq = rng.below(slots);
    let deadline = Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut ops = 0u64;
    loop {
        for _ in 0..64 {
            let slot = match pat {
                Pattern::RandRead4k | Pattern::RandWrite4k => rng.below(slots),
                Pattern::SeqRead1m | Pattern::SeqWrite1m => {
                    seq = (seq + 1) % slots;
                    seq
                }
            };
            let off = slot * len as u64;
            if pat.is_write() {
                t.write(&buf, off)?;
            } else {
                t.read(&mut buf, off)?;
            }
        }
        ops += 64;
        if t0.elapsed() >= deadline {
            break;
        }
    }
    let rate = ops as f64 / t0.elapsed().as_secs_f64();
    if pat.is_write() {
        t.flush()?;
    }
    Ok(rate)
}

/// Fills both images with the same random data, 1 MiB at a time.
fn fill(v: &Vhdx, f: &File, size: u64) -> BenchResult<()> {
    let mut rng = Rng::new(0x5eed_0002);
    let mut buf = vec![0u8; (8 * MIB) as usize];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        v.write_at(&buf[..n], at)?;
        f.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    v.flush()?;
    f.sync_all()?;
    Ok(())
}

pub fn run(args: &Args, dir: &Path) -> BenchResult<()> {
    let size = (args.io_size.max(64 * MIB)) / MIB * MIB;
    let vp = dir.join("io.vhdx");
    let rp = dir.join("io.raw");
    eprintln!("io: preparing {} images", human_size(size));
    let v = Vhdx::create(
        &vp,
        &CreateOptions {
            size,
            ..Default::default()
        },
    )?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&rp)?;
    f.set_len(size)?;
    fill(&v, &f, size)?;
    let blocks = size.div_ceil(u64::from(v.block_size()));
    for b in 0..blocks {
        if vhdx::bat_entry::state(v.payload_entry(b)) != vhdx::bat_entry::PAYLOAD_FULLY_PRESENT {
            return Err(format!("block {b} of {} is not allocated", vp.display()).into());
        }
    }
    let block_size = v.block_size();
    let file_size = v.file_size()?;
    let targets = [Target::Raw(f), Target::Vhdx(Box::new(v))];
    let pats = [
        Pattern::RandRead4k,
        Pattern::RandWrite4k,
        Pattern::SeqRead1m,
        Pattern::SeqWrite1m,
    ];
    let rounds = args.io_rounds.max(1);
    // rates[pattern][target] over rounds.
    let mut rates = vec![[Vec::new(), Vec::new()]; pats.len()];
    for round in 0..rounds {
        for (pi, &pat) in pats.iter().enumerate() {
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for ti in order {
                eprintln!(
                    "io: {} on {} round {}/{rounds}",
                    pat.name(),
                    if ti == 0 { "raw" } else { "vhdx" },
                    round + 1
                );
                let seed = 1000 + (round * 16 + pi) as u64;
                let r = measure(&targets[ti], pat, size, args.io_secs, seed)?;
                rates[pi][ti].push(r);
            }
        }
    }
    let [_, Target::Vhdx(v)] = targets else {
        return Err("internal: target order".into());
    };
    let grew = v.file_size()? != file_size;
    v.close()?;
    qemu_check(&vp)?;
    if grew {
        return Err("the VHDX grew during the I/O bench: blocks were not all allocated".into());
    }
    println!("## 2. library I/O: dynamic VHDX vs raw file\n");
    println!(
        "{} images, every block allocated beforehand (dynamic VHDX, {} blocks). \
         One thread, queue depth 1. Buffered I/O for both (the engine's default open, \
         no O_DIRECT), so both files sit in the page cache and this measures the \
         engine's CPU cost over bare pread/pwrite. Median of {rounds} rounds of {:.1} s, \
         raw and VHDX alternating. `qemu-img check` of the VHDX afterwards: clean.\n",
        human_size(size),
        human_size(u64::from(block_size)),
        args.io_secs
    );
    println!("| case | vireo VHDX | raw | VHDX/raw |");
    println!("|---|---:|---:|---:|");
    for (pi, &pat) in pats.iter().enumerate() {
        let raw = median(&rates[pi][0]);
        let vx = median(&rates[pi][1]);
        let (fmt_v, fmt_r) = if pat.len() == 4096 {
            (format!("{vx:.0} IOPS"), format!("{raw:.0} IOPS"))
        } else {
            (
                format!("{:.0} MiB/s", vx * pat.len() as f64 / MIB as f64),
                format!("{:.0} MiB/s", raw * pat.len() as f64 / MIB as f64),
            )
        };
        println!(
            "| {} | {fmt_v} | {fmt_r} | {:.0} % |",
            pat.name(),
            100.0 * vx / raw
        );
    }
    println!();
    std::fs::remove_file(&vp)?;
    std::fs::remove_file(&rp)?;
    Ok(())
}
