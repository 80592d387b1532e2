//! `vireo-img convert` against `qemu-img convert`, raw→VHDX and VHDX→raw.

use crate::{
    drop_caches, human_size, median, qemu_check, qemu_compare, same_file, vireo_img, Args,
    BenchResult, Rng,
};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    /// `vireo-img convert` (default cache mode `none`: O_DIRECT, flush at the end).
    Vireo,
    /// `qemu-img convert` (default cache mode `unsafe`: page cache, no flush).
    Qemu,
    /// `qemu-img convert -t none -T none`: qemu-img in vireo-img's cache mode.
    QemuDirect,
}

const TOOLS: [Tool; 3] = [Tool::Vireo, Tool::Qemu, Tool::QemuDirect];
/// Tools whose VHDX output is also used as an input.
const MAKERS: [Tool; 2] = [Tool::Vireo, Tool::Qemu];

/// Wall times of one case: until the command exits, and until its output is durable.
#[derive(Default)]
struct Times {
    exit: Vec<f64>,
    durable: Vec<f64>,
}

/// Writes the source image: extents of `ext` bytes cycling data, written
/// zeros, data, hole (so half data, a quarter explicit zeros, a quarter
/// sparse). Returns a description of the layout.
fn make_source(path: &Path, size: u64) -> BenchResult<String> {
    let ext = (size / 16 / MIB * MIB).clamp(MIB, 64 * MIB);
    let f = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(size)?;
    let mut rng = Rng::new(0x5eed_0001);
    let mut buf = vec![0u8; (8 * MIB).min(ext) as usize];
    let zeros = vec![0u8; buf.len()];
    let mut at = 0u64;
    let mut i = 0u64;
    while at < size {
        let end = (at + ext).min(size);
        let kind = i % 4;
        let mut o = at;
        while o < end && kind != 3 {
            let n = (end - o).min(buf.len() as u64) as usize;
            if kind.is_multiple_of(2) {
                rng.fill(&mut buf[..n]);
                f.write_all_at(&buf[..n], o)?;
            } else {
                f.write_all_at(&zeros[..n], o)?;
            }
            o += n as u64;
        }
        at = end;
        i += 1;
    }
    f.sync_all()?;
    Ok(format!(
        "{} raw file; extents of {} cycling random data / written zeros / random data / hole \
         (half data, a quarter explicit zeros, a quarter sparse)",
        human_size(size),
        human_size(ext)
    ))
}

fn command(tool: Tool, from: &str, to: &str, src: &Path, dst: &Path) -> BenchResult<Command> {
    let mut c = match tool {
        Tool::Vireo => Command::new(vireo_img()?),
        Tool::Qemu | Tool::QemuDirect => Command::new("qemu-img"),
    };
    c.args(["convert", "-f", from, "-O", to]);
    if tool == Tool::QemuDirect {
        c.args(["-t", "none", "-T", "none"]);
    }
    c.arg(src).arg(dst);
    Ok(c)
}

/// One timed conversion from a cold page cache (when it can be dropped).
fn time_one(
    tool: Tool,
    from: &str,
    to: &str,
    src: &Path,
    dst: &Path,
    t: &mut Times,
) -> BenchResult<()> {
    if dst.exists() {
        std::fs::remove_file(dst)?;
    }
    drop_caches();
    let mut cmd = command(tool, from, to, src, dst)?;
    let t0 = Instant::now();
    crate::run_ok(&mut cmd)?;
    let exit = t0.elapsed().as_secs_f64();
    File::open(dst)?.sync_all()?;
    let durable = t0.elapsed().as_secs_f64();
    t.exit.push(exit);
    t.durable.push(durable);
    Ok(())
}

fn name(t: Tool) -> &'static str {
    match t {
        Tool::Vireo => "vireo-img",
        Tool::Qemu => "qemu-img",
        Tool::QemuDirect => "qemu-img -t none -T none",
    }
}

/// File name part for a tool's outputs.
fn tag(t: Tool) -> &'static str {
    match t {
        Tool::Vireo => "vireo",
        Tool::Qemu => "qemu",
        Tool::QemuDirect => "qemu-direct",
    }
}

/// The allocated ranges of a file (SEEK_DATA/SEEK_HOLE; all of it without them).
fn data_ranges(f: &File, size: u64) -> Vec<(u64, u64)> {
    vireo_util::extents::data_extents(f, 0, size).unwrap_or_else(|_| vec![(0, size)])
}

/// The read floor of a conversion: seconds to read every allocated byte of
/// `input` from a cold cache with O_DIRECT (4 MiB reads, 4 in flight) and write
/// nothing. No converter that must read those bytes can beat it.
fn read_floor(input: &Path) -> BenchResult<(f64, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    drop_caches();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(input)?;
    let size = f.metadata()?.len();
    let chunk = 4 * MIB;
    let mut chunks = Vec::new();
    for (start, len) in data_ranges(&f, size) {
        let first = start / 4096 * 4096;
        let mut o = first;
        while o < start + len {
            let n = (start + len - o).min(chunk).div_ceil(4096) * 4096;
            chunks.push((o, n as usize));
            o += n;
        }
    }
    let bytes: u64 = chunks.iter().map(|c| c.1 as u64).sum();
    let next = AtomicUsize::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| -> BenchResult<()> {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| -> std::io::Result<()> {
                    let mut mem = vec![0u8; chunk as usize + 4096];
                    let a = mem.as_ptr().align_offset(4096);
                    loop {
                        let Some(&(off, n)) = chunks.get(next.fetch_add(1, Ordering::Relaxed))
                        else {
                            return Ok(());
                        };
                        let mut done = 0;
                        while done < n {
                            match f.read_at(&mut mem[a + done..a + n], off + done as u64)? {
                                0 => break,
                                k => done += k,
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| "read floor thread panicked")??;
        }
        Ok(())
    })?;
    Ok((t0.elapsed().as_secs_f64(), bytes))
}

fn fmt_runs(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn run(args: &Args, dir: &Path) -> BenchResult<()> {
    let size = args.size.max(16 * MIB) / MIB * MIB;
    let runs = args.runs.max(1);
    let src = dir.join("src.raw");
    eprintln!("convert: writing the {} source image", human_size(size));
    let layout = make_source(&src, size)?;
    let cold = drop_caches();
    let vhdx_out = |t: Tool| -> PathBuf { dir.join(format!("by-{}.vhdx", tag(t))) };
    let mut rows: Vec<(String, [Times; 3], (f64, u64))> = Vec::new();
    let mut checks: Vec<String> = Vec::new();

    // raw -> VHDX.
    let floor = read_floor(&src)?;
    let mut t: [Times; 3] = Default::default();
    for r in 0..runs {
        for (i, &tool) in TOOLS.iter().enumerate() {
            eprintln!("convert: raw->vhdx {} run {}/{runs}", name(tool), r + 1);
            time_one(tool, "raw", "vhdx", &src, &vhdx_out(tool), &mut t[i])?;
        }
    }
    for &tool in &TOOLS {
        let out = vhdx_out(tool);
        qemu_check(&out)?;
        qemu_compare(&src, &out)?;
        checks.push(format!(
            "{}'s VHDX: `qemu-img check` clean, `qemu-img compare` with the source: identical",
            name(tool)
        ));
    }
    rows.push(("raw → VHDX".into(), t, floor));

    // VHDX -> raw, from each tool's image.
    for &maker in &MAKERS {
        let input = vhdx_out(maker);
        let floor = read_floor(&input)?;
        let mut t: [Times; 3] = Default::default();
        let raw_out = |t: Tool| dir.join(format!("{}-from-{}.raw", tag(t), tag(maker)));
        for r in 0..runs {
            for (i, &tool) in TOOLS.iter().enumerate() {
                eprintln!(
                    "convert: vhdx({})->raw {} run {}/{runs}",
                    name(maker),
                    name(tool),
                    r + 1
                );
                time_one(tool, "vhdx", "raw", &input, &raw_out(tool), &mut t[i])?;
            }
        }
        for &tool in &TOOLS {
            let out = raw_out(tool);
            same_file(&src, &out)?;
            checks.push(format!(
                "{} of {}'s VHDX back to raw: byte-identical to the source",
                name(tool),
                name(maker)
            ));
            std::fs::remove_file(&out)?;
        }
        rows.push((format!("VHDX (made by {}) → raw", name(maker)), t, floor));
    }
    if !args.keep {
        for &tool in &TOOLS {
            let _ = std::fs::remove_file(vhdx_out(tool));
        }
        let _ = std::fs::remove_file(&src);
    }

    println!("## 1. convert: vireo-img vs qemu-img\n");
    println!("Source: {layout}.");
    println!(
        "Median of {runs} runs, {}. \"exit\" = wall time until the command exits; \
         \"durable\" = until its output file is also fsync'ed. vireo-img's default cache \
         mode (`none`: O_DIRECT, flush before exit) makes its exit time a durable time; \
         qemu-img's default (`unsafe`) exits with its output still in the page cache; \
         `qemu-img -t none -T none` is qemu-img in vireo-img's mode. The read floor is \
         the time to read just the bytes the conversion must read (every allocated byte \
         of the input, O_DIRECT, 4 MiB reads, 4 in flight, nothing written): no tool \
         that reads them beats it. Speedup = qemu time / vireo time.\n",
        if cold {
            "page cache dropped before every run"
        } else {
            "page cache NOT dropped (not root): warm source"
        }
    );
    println!(
        "| case | vireo (s) | qemu exit (s) | qemu durable (s) | qemu -t none (s) | read floor (s) | \
         vs qemu exit | vs qemu durable | vs qemu -t none | vireo / floor |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (case, [v, q, qn], (floor, bytes)) in &rows {
        let (ve, qe) = (median(&v.durable), median(&q.exit));
        let (qd, qnd) = (median(&q.durable), median(&qn.durable));
        println!(
            "| {case} | {ve:.2} | {qe:.2} | {qd:.2} | {qnd:.2} | {floor:.2} ({}) | {:.2}x | {:.2}x | {:.2}x | {:.2} |",
            human_size(*bytes),
            qe / ve,
            qd / ve,
            qnd / ve,
            ve / floor
        );
    }
    println!("\nAll runs (exit s): ");
    for (case, [v, q, qn], _) in &rows {
        println!(
            "- {case}: vireo {} / qemu {} / qemu -t none {}",
            fmt_runs(&v.exit),
            fmt_runs(&q.exit),
            fmt_runs(&qn.exit)
        );
    }
    println!("\nVerified:");
    for c in &checks {
        println!("- {c}");
    }
    println!();
    Ok(())
}
