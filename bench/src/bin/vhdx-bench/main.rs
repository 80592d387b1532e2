//! `vhdx-bench`: the VHDX engine's figures, side by side with qemu-img/qemu-io
//! and a raw file in one run. Prints markdown tables on stdout (progress on stderr).
//!
//! 1. `convert`: `vireo-img convert` raw→VHDX and VHDX→raw against `qemu-img
//!    convert` on the same files; every output is checked byte for byte.
//! 2. `io`: library 4K random and 1 MiB sequential read/write on a fully
//!    allocated dynamic VHDX against the same pattern on a raw file.
//! 3. `alloc`: allocating 4K writes (one per block) with a flush every 16:
//!    the engine against a raw file (pwrite + fdatasync) and qemu-io's VHDX.
//! 4. `crash`: a writer process killed with SIGKILL at random moments; each
//!    crashed image is reopened by the engine and by qemu and every write
//!    acknowledged by a completed flush must read back.
//!
//! Build the binaries first (`cargo build --release -p vhdx -p vireo-bench --bins`): the
//! convert bench runs the `vireo-img` that sits next to this executable.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod alloc;
mod convert;
mod crash;
mod libio;

use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Errors of the bench: reported on stderr, exit status 1.
pub type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser, Debug)]
#[command(
    name = "vhdx-bench",
    about = "VHDX engine benchmarks against qemu-img/qemu-io and raw files"
)]
pub struct Args {
    /// Which benches to run (comma-separated): convert, io, alloc, crash.
    #[arg(long, default_value = "convert,io,alloc,crash")]
    pub only: String,
    /// Size of the convert image (half random data, half zeros).
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub size: u64,
    /// Timed runs of each convert case (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Size of the images of the library I/O bench.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub io_size: u64,
    /// Seconds per library I/O measurement (each is repeated --io-rounds times).
    #[arg(long, default_value_t = 1.0)]
    pub io_secs: f64,
    /// Alternating rounds of each library I/O measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub io_rounds: usize,
    /// Allocating 4K writes per alloc run (a flush every 16).
    #[arg(long, default_value_t = 1024)]
    pub alloc_writes: u64,
    /// Block size of the alloc images (the stride of the writes).
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    pub alloc_block: u64,
    /// Runs of each alloc case (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub alloc_rounds: usize,
    /// SIGKILL crash runs.
    #[arg(long, default_value_t = 20)]
    pub crash_runs: usize,
    /// Seed of the crash runs' kill times (default: from the clock).
    #[arg(long)]
    pub crash_seed: Option<u64>,
    /// Directory for scratch files (default: `bench-tmp` in the cargo target directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the scratch files.
    #[arg(long)]
    pub keep: bool,
    /// Internal: run as the crash writer on this image.
    #[arg(long, hide = true)]
    pub crash_child: Option<PathBuf>,
    /// Internal: the crash writer's flush interval.
    #[arg(long, hide = true, default_value_t = 8)]
    pub crash_flush_every: u64,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIREO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let r = match &args.crash_child {
        Some(p) => crash::child(p, args.crash_seed.unwrap_or(0), args.crash_flush_every),
        None => run(&args),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhdx-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> BenchResult<()> {
    let which: Vec<&str> = args.only.split(',').map(str::trim).collect();
    for w in &which {
        if !["convert", "io", "alloc", "crash"].contains(w) {
            return Err(format!("unknown bench '{w}' (convert, io, alloc, crash)").into());
        }
    }
    for tool in ["qemu-img", "qemu-io"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            return Err(format!("{tool} not found (install qemu-utils)").into());
        }
    }
    let base = match &args.dir {
        Some(d) => d.clone(),
        None => default_dir()?,
    };
    let scratch = Scratch::new(&base, args.keep)?;
    eprintln!("scratch directory: {}", scratch.path.display());
    let t0 = Instant::now();
    println!("# vhdx-bench\n");
    println!("{}\n", qemu_version());
    if which.contains(&"convert") {
        convert::run(args, &scratch.path)?;
    }
    if which.contains(&"io") {
        libio::run(args, &scratch.path)?;
    }
    if which.contains(&"alloc") {
        alloc::run(args, &scratch.path)?;
    }
    if which.contains(&"crash") {
        crash::run(args, &scratch.path)?;
    }
    println!("Total bench time: {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn qemu_version() -> String {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "qemu-img (version unknown)".into())
}

/// `<target>/bench-tmp`, next to the `release`/`debug` directory of this executable.
fn default_dir() -> BenchResult<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot locate the target directory; pass --dir")?;
    Ok(target.join("bench-tmp"))
}

/// The `vireo-img` binary next to this one.
pub fn vireo_img() -> BenchResult<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .ok_or("cannot locate the executable's directory")?
        .join("vireo-img");
    if !p.exists() {
        return Err(format!(
            "{} not found: build it first with `cargo build --release -p vhdx -p vireo-bench --bins`",
            p.display()
        )
        .into());
    }
    Ok(p)
}

/// A scratch directory removed (with everything in it) when dropped.
struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    fn new(base: &Path, keep: bool) -> BenchResult<Scratch> {
        let path = base.join(format!("run-{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        Ok(Scratch { path, keep })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                eprintln!("vhdx-bench: removing {}: {e}", self.path.display());
            }
        }
    }
}

/// `4G`, `256M`, `64k`, or bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in '{s}'")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size '{s}' (e.g. 4G, 256M)"))?;
    n.checked_mul(mul)
        .ok_or_else(|| format!("size '{s}' too large"))
}

/// SplitMix64: fast, deterministic bytes for test data and offsets.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0; the tiny modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let v = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&v[..n]);
    }
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if !n.is_multiple_of(2) {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Writes back dirty pages and drops the page cache (needs root); false if not allowed.
pub fn drop_caches() -> bool {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// Longest any tool may run before the bench gives up on it.
const TOOL_TIMEOUT: Duration = Duration::from_secs(900);

/// Runs a command to completion (killed after [`TOOL_TIMEOUT`]).
pub fn output(cmd: &mut Command) -> BenchResult<Output> {
    use std::io::Read;
    let what = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {what}: {e}"))?;
    let mut so = child.stdout.take().ok_or("no stdout pipe")?;
    let mut se = child.stderr.take().ok_or("no stderr pipe")?;
    let to = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let te = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > TOOL_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} did not finish in {} s", TOOL_TIMEOUT.as_secs()).into());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Ok(Output {
        status,
        stdout: to.join().map_err(|_| "stdout reader panicked")?,
        stderr: te.join().map_err(|_| "stderr reader panicked")?,
    })
}

/// Runs a command that must succeed; returns stdout.
pub fn run_ok(cmd: &mut Command) -> BenchResult<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        return Err(format!(
            "{:?} {:?} failed ({}): {}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `qemu-img check` must report a clean image.
pub fn qemu_check(p: &Path) -> BenchResult<()> {
    run_ok(
        Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(p),
    )?;
    Ok(())
}

/// `qemu-img compare` of a raw file and a VHDX image: must be identical.
pub fn qemu_compare(raw: &Path, vhdx: &Path) -> BenchResult<()> {
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "vhdx"])
            .arg(raw)
            .arg(vhdx),
    )
    .map_err(|e| format!("{} differs from {}: {e}", vhdx.display(), raw.display()))?;
    Ok(())
}

/// Byte-for-byte comparison of two files.
pub fn same_file(a: &Path, b: &Path) -> BenchResult<()> {
    use std::io::Read;
    let mut fa = std::fs::File::open(a).map_err(|e| format!("{}: {e}", a.display()))?;
    let mut fb = std::fs::File::open(b).map_err(|e| format!("{}: {e}", b.display()))?;
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    if la != lb {
        return Err(format!(
            "{} is {la} bytes, {} is {lb} bytes",
            a.display(),
            b.display()
        )
        .into());
    }
    const CHUNK: usize = 8 << 20;
    let mut ba = vec![0u8; CHUNK];
    let mut bb = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < la {
        let n = (la - at).min(CHUNK as u64) as usize;
        fa.read_exact(&mut ba[..n])?;
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Err(format!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                at + i as u64
            )
            .into());
        }
        at += n as u64;
    }
    Ok(())
}

pub fn human_size(n: u64) -> String {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        format!("{} GiB", n >> 30)
    } else if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}
