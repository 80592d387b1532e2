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
    Vireo,
    Qemu,
}

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
        Tool::Qemu => Command::new("qemu-img"),
    };
    c.args(["convert", "-f", from, "-O", to]).arg(src).arg(dst);
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
    }
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
    let tools = [Tool::Vireo, Tool::Qemu];
    let vhdx_out = |t: Tool| -> PathBuf {
        dir.join(match t {
            Tool::Vireo => "by-vireo.vhdx",
            Tool::Qemu => "by-qemu.vhdx",
        })
    };
    let mut rows: Vec<(String, [Times; 2])> = Vec::new();
    let mut checks: Vec<String> = Vec::new();

    // raw -> VHDX.
    let mut t: [Times; 2] = Default::default();
    for r in 0..runs {
        for (i, &tool) in tools.iter().enumerate() {
            eprintln!("convert: raw->vhdx {} run {}/{runs}", name(tool), r + 1);
            time_one(tool, "raw", "vhdx", &src, &vhdx_out(tool), &mut t[i])?;
        }
    }
    for &tool in &tools {
        let out = vhdx_out(tool);
        qemu_check(&out)?;
        qemu_compare(&src, &out)?;
        checks.push(format!(
            "{}'s VHDX: `qemu-img check` clean, `qemu-img compare` with the source: identical",
            name(tool)
        ));
    }
    rows.push(("raw → VHDX".into(), t));

    // VHDX -> raw, from each tool's image.
    for &maker in &tools {
        let input = vhdx_out(maker);
        let mut t: [Times; 2] = Default::default();
        let raw_out = |t: Tool| dir.join(format!("{}-from-{}.raw", name(t), name(maker)));
        for r in 0..runs {
            for (i, &tool) in tools.iter().enumerate() {
                eprintln!(
                    "convert: vhdx({})->raw {} run {}/{runs}",
                    name(maker),
                    name(tool),
                    r + 1
                );
                time_one(tool, "vhdx", "raw", &input, &raw_out(tool), &mut t[i])?;
            }
        }
        for &tool in &tools {
            let out = raw_out(tool);
            same_file(&src, &out)?;
            checks.push(format!(
                "{} of {}'s VHDX back to raw: byte-identical to the source",
                name(tool),
                name(maker)
            ));
            std::fs::remove_file(&out)?;
        }
        rows.push((format!("VHDX (made by {}) → raw", name(maker)), t));
    }
    if !args.keep {
        for &tool in &tools {
            let _ = std::fs::remove_file(vhdx_out(tool));
        }
        let _ = std::fs::remove_file(&src);
    }

    println!("## 1. convert: vireo-img vs qemu-img\n");
    println!("Source: {layout}.");
    println!(
        "Median of {runs} runs, {}. \"exit\" = wall time until the command exits; \
         \"durable\" = until its output file is also fsync'ed (vireo-img fsyncs before \
         exiting; qemu-img convert's default cache mode `unsafe` never flushes). \
         Speedup = qemu time / vireo time.\n",
        if cold {
            "page cache dropped before every run"
        } else {
            "page cache NOT dropped (not root): warm source"
        }
    );
    println!("| case | vireo exit (s) | qemu exit (s) | speedup (exit) | vireo durable (s) | qemu durable (s) | speedup (durable) |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (case, [v, q]) in &rows {
        let (ve, qe) = (median(&v.exit), median(&q.exit));
        let (vd, qd) = (median(&v.durable), median(&q.durable));
        println!(
            "| {case} | {ve:.2} | {qe:.2} | {:.2}x | {vd:.2} | {qd:.2} | {:.2}x |",
            qe / ve,
            qd / vd
        );
    }
    println!("\nAll runs (exit s): ");
    for (case, [v, q]) in &rows {
        println!(
            "- {case}: vireo {} / qemu {}",
            fmt_runs(&v.exit),
            fmt_runs(&q.exit)
        );
    }
    println!("\nVerified:");
    for c in &checks {
        println!("- {c}");
    }
    println!();
    Ok(())
}
