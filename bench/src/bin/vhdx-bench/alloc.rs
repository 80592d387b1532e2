//! Allocating writes: every 4K write lands in a block of its own (stride =
//! block size), with a flush every 16 writes. The engine against a raw file
//! (pwrite + fdatasync every 16) and qemu-io on a VHDX.

use crate::{human_size, median, qemu_check, run_ok, Args, BenchResult};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use vhdx::{CreateOptions, OpenOptions, Vhdx};

const FLUSH_EVERY: u64 = 16;
const PATTERN: u8 = 0xab;

/// Seconds for the engine's run (create and close excluded, the session's
/// first header updates included).
fn vireo(p: &Path, n: u64, bs: u64) -> BenchResult<f64> {
    let v = Vhdx::create(
        p,
        &CreateOptions {
            size: n * bs,
            block_size: Some(u32::try_from(bs)?),
            ..Default::default()
        },
    )?;
    let buf = vec![PATTERN; 4096];
    let t0 = Instant::now();
    for i in 0..n {
        v.write_at(&buf, i * bs)?;
        if i % FLUSH_EVERY == FLUSH_EVERY - 1 {
            v.flush()?;
        }
    }
    v.flush()?;
    let t = t0.elapsed().as_secs_f64();
    v.close()?;
    Ok(t)
}

fn raw(p: &Path, n: u64, bs: u64) -> BenchResult<f64> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)?;
    f.set_len(n * bs)?;
    f.sync_all()?;
    let buf = vec![PATTERN; 4096];
    let t0 = Instant::now();
    for i in 0..n {
        f.write_all_at(&buf, i * bs)?;
        if i % FLUSH_EVERY == FLUSH_EVERY - 1 {
            f.sync_data()?;
        }
    }
    f.sync_data()?;
    Ok(t0.elapsed().as_secs_f64())
}

fn qemu_create(p: &Path, n: u64, bs: u64) -> BenchResult<()> {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "vhdx", "-o"])
            .arg(format!("block_size={bs},subformat=dynamic"))
            .arg(p)
            .arg((n * bs).to_string()),
    )?;
    Ok(())
}

/// Seconds of one qemu-io process running `cmds` on a fresh image.
fn qemu_io(p: &Path, cmds: &[String]) -> BenchResult<f64> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "vhdx", "-t", "writeback"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(p);
    let t0 = Instant::now();
    run_ok(&mut c)?;
    Ok(t0.elapsed().as_secs_f64())
}

fn verify_raw(p: &Path, n: u64, bs: u64) -> BenchResult<()> {
    let f = std::fs::File::open(p)?;
    let mut b = vec![0u8; 8192];
    for i in 0..n {
        f.read_exact_at(&mut b, i * bs)?;
        check_block(&b, p, i * bs)?;
    }
    Ok(())
}

fn check_block(b: &[u8], p: &Path, off: u64) -> BenchResult<()> {
    if b[..4096].iter().any(|&x| x != PATTERN) || b[4096..].iter().any(|&x| x != 0) {
        return Err(format!("{}: wrong bytes at {off}", p.display()).into());
    }
    Ok(())
}

/// The engine's view of an image (its own or qemu's).
fn verify_engine(p: &Path, n: u64, bs: u64) -> BenchResult<()> {
    let v = Vhdx::open(
        p,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )?;
    let mut b = vec![0u8; 8192];
    for i in 0..n {
        v.read_at(&mut b, i * bs)?;
        check_block(&b, p, i * bs)?;
    }
    let data: u64 = v
        .block_status(0, v.virtual_size())?
        .iter()
        .filter(|e| e.data)
        .map(|e| e.length)
        .sum();
    if data != n * bs {
        return Err(format!(
            "{}: {data} bytes allocated, {} expected",
            p.display(),
            n * bs
        )
        .into());
    }
    Ok(())
}

/// qemu's view of the engine's image: `read -P` checks the pattern.
fn verify_qemu(p: &Path, n: u64, bs: u64) -> BenchResult<()> {
    let mut c = Command::new("qemu-io");
    c.args(["-r", "-f", "vhdx"]);
    for i in 0..n {
        c.arg("-c")
            .arg(format!("read -q -P {PATTERN:#x} {} 4k", i * bs));
        c.arg("-c")
            .arg(format!("read -q -P 0 {} 4k", i * bs + 4096));
    }
    c.arg(p);
    run_ok(&mut c)?;
    Ok(())
}

fn qemu_cmds(n: u64, bs: u64) -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(format!("write -q -P {PATTERN:#x} {} 4k", i * bs));
        if i % FLUSH_EVERY == FLUSH_EVERY - 1 {
            v.push("flush".into());
        }
    }
    v.push("flush".into());
    v
}

pub fn run(args: &Args, dir: &Path) -> BenchResult<()> {
    let n = args.alloc_writes.max(FLUSH_EVERY) / FLUSH_EVERY * FLUSH_EVERY;
    let bs = args.alloc_block;
    if !bs.is_power_of_two() || !(1 << 20..=256 << 20).contains(&bs) {
        return Err("--alloc-block must be a power of two from 1M to 256M".into());
    }
    let rounds = args.alloc_rounds.max(1);
    let vp = dir.join("alloc.vhdx");
    let rp = dir.join("alloc.raw");
    let qp = dir.join("alloc-qemu.vhdx");
    let cmds = qemu_cmds(n, bs);
    // qemu-io's own start-up, open and close, measured on the same kind of image.
    let mut startup = Vec::new();
    let (mut tv, mut tr, mut tq) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        eprintln!("alloc: round {}/{rounds}", r + 1);
        tr.push(raw(&rp, n, bs)?);
        tv.push(vireo(&vp, n, bs)?);
        qemu_create(&qp, n, bs)?;
        startup.push(qemu_io(&qp, &["read -q 0 4k".to_string()])?);
        qemu_create(&qp, n, bs)?;
        tq.push(qemu_io(&qp, &cmds)?);
    }
    // The last round's three files must hold the same bytes.
    qemu_check(&vp)?;
    qemu_check(&qp)?;
    verify_raw(&rp, n, bs)?;
    verify_engine(&vp, n, bs)?;
    verify_engine(&qp, n, bs)?;
    verify_qemu(&vp, n, bs)?;
    for p in [&vp, &rp, &qp] {
        std::fs::remove_file(p)?;
    }
    let st = median(&startup);
    let (v, r, q) = (median(&tv), median(&tr), (median(&tq) - st).max(1e-9));
    let rate = |t: f64| n as f64 / t;
    println!("## 3. allocating writes\n");
    println!(
        "{n} writes of 4 KiB, each into a new {} block (stride = block size), flush every \
         {FLUSH_EVERY} (engine: `Vhdx::flush`; raw: `fdatasync`; qemu-io: `flush`). \
         qemu-io runs all commands in one process with `-t writeback` (cache=writeback: \
         its flushes are real, and its VHDX driver flushes on its own around each BAT \
         update); its start-up/open/close ({st:.3} s, measured with a one-read script) \
         is subtracted. Median of {rounds} runs. Verified afterwards: both VHDX images pass \
         `qemu-img check`; the engine reads qemu's image and its own, qemu-io reads the \
         engine's, and the raw file is read back: each write's 4 KiB holds the pattern, \
         the next 4 KiB zeros, and exactly the written blocks are allocated.\n",
        human_size(bs)
    );
    println!("| case | vireo | qemu | raw | vireo/raw | vireo/qemu |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| 4K allocating writes/s | {:.0} | {:.0} | {:.0} | {:.2} | {:.1}x |",
        rate(v),
        rate(q),
        rate(r),
        r / v,
        q / v
    );
    println!("| time for {n} writes (s) | {v:.3} | {q:.3} | {r:.3} | | |\n");
    Ok(())
}
