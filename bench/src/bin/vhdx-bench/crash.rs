//! Crash runs: a writer process (this binary with `--crash-child`) writes 4K
//! patterns all over a 256 MiB dynamic VHDX with 1 MiB blocks (so the first
//! few hundred writes allocate, and with a flush after every write the log
//! fills and new log sequences start), flushes every 1, 2, 4 or 8 writes
//! (chosen per run) and prints `ACK i` after each completed flush. It is killed with SIGKILL at a random moment. The crashed image is
//! then (a) copied and replayed by qemu (`qemu-img check -r all`), and (b)
//! reopened by the engine; both must pass `qemu-img check` and both views must
//! hold every acknowledged write.

use crate::{qemu_check, run_ok, Args, BenchResult, Rng};
use std::io::{BufRead, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhdx::{CreateOptions, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;
const SLOTS: u64 = SIZE / 4096;
const FLUSH_CHOICES: [u64; 5] = [1, 1, 2, 4, 8];
/// The kill comes this long (at most) after the first acknowledgement.
const MAX_DELAY_MS: u64 = 300;

/// The `i`th write: a 4K pattern that names `i`, and where it goes.
fn pattern(i: u64) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    for (k, c) in p.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(i * 1_000_003 + k as u64).to_le_bytes());
    }
    p
}

fn slot(i: u64, seed: u64) -> u64 {
    (i * 7919 + seed) % SLOTS
}

/// The writer (runs in the child process).
pub fn child(p: &Path, seed: u64, flush_every: u64) -> BenchResult<()> {
    let v = Vhdx::open(p, OpenOptions::default())?;
    let mut out = std::io::stdout().lock();
    let every = flush_every.max(1);
    for i in 0..SLOTS {
        v.write_at(&pattern(i), slot(i, seed) * 4096)?;
        if i % every == every - 1 {
            v.flush()?;
            writeln!(out, "ACK {i}")?;
            out.flush()?;
        }
    }
    v.close()?;
    Ok(())
}

struct Outcome {
    acked: Option<u64>,
    finished: bool,
    replayed: bool,
    /// Killed after more flushed entries than one log sequence holds.
    past_restart: bool,
}

/// Every acknowledged write must read back through `read` (4 KiB at an offset).
fn check_acked(
    mut read: impl FnMut(&mut [u8], u64) -> BenchResult<()>,
    last: Option<u64>,
    seed: u64,
    who: &str,
) -> BenchResult<()> {
    let Some(last) = last else { return Ok(()) };
    let mut b = vec![0u8; 4096];
    for i in 0..=last {
        read(&mut b, slot(i, seed) * 4096)?;
        if b != pattern(i) {
            return Err(format!("{who}: acknowledged write {i} (of {last}) lost").into());
        }
    }
    Ok(())
}

fn one(dir: &Path, run: usize, rng: &mut Rng) -> BenchResult<Outcome> {
    let p = dir.join(format!("crash-{run}.vhdx"));
    Vhdx::create(
        &p,
        &CreateOptions {
            size: SIZE,
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )?
    .close()?;
    let seed = rng.below(SLOTS);
    let every = FLUSH_CHOICES[rng.below(FLUSH_CHOICES.len() as u64) as usize];
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--crash-child")
        .arg(&p)
        .arg("--crash-seed")
        .arg(seed.to_string())
        .arg("--crash-flush-every")
        .arg(every.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("child has no stdout")?;
    let acked = Arc::new(AtomicI64::new(-1));
    let a2 = acked.clone();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(n) = line
                .strip_prefix("ACK ")
                .and_then(|s| s.parse::<i64>().ok())
            {
                a2.store(n, Ordering::SeqCst);
            }
        }
    });
    let t0 = Instant::now();
    while acked.load(Ordering::SeqCst) < 0 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(rng.below(MAX_DELAY_MS + 1)));
    let finished = child.try_wait()?.is_some();
    // Child::kill sends SIGKILL.
    let _ = child.kill();
    child.wait()?;
    reader
        .join()
        .map_err(|_| "the child's stdout reader panicked")?;
    let last = u64::try_from(acked.load(Ordering::SeqCst)).ok();

    // qemu's replay of a copy.
    let q = dir.join(format!("crash-{run}-qemu.vhdx"));
    std::fs::copy(&p, &q)?;
    // Replays the log; its exit status counts the replay as a repaired corruption.
    crate::output(
        Command::new("qemu-img")
            .args(["check", "-q", "-r", "all", "-f", "vhdx"])
            .arg(&q),
    )?;
    qemu_check(&q).map_err(|e| format!("qemu's replay: {e}"))?;
    let qraw = dir.join(format!("crash-{run}-qemu.raw"));
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "vhdx", "-O", "raw"])
            .arg(&q)
            .arg(&qraw),
    )?;
    let qf = std::fs::File::open(&qraw)?;
    check_acked(
        |b, o| Ok(qf.read_exact_at(b, o)?),
        last,
        seed,
        "qemu's replay",
    )?;

    // The engine's.
    let v = Vhdx::open(&p, OpenOptions::default()).map_err(|e| format!("reopen: {e}"))?;
    let replayed = v.replayed_log_entries() > 0;
    check_acked(|b, o| Ok(v.read_at(b, o)?), last, seed, "engine")?;
    v.close()?;
    qemu_check(&p).map_err(|e| format!("after the engine's replay: {e}"))?;
    for f in [&p, &q, &qraw] {
        std::fs::remove_file(f)?;
    }
    // With a flush per write, each of the first ~256 flushes logs a one-page
    // entry (2 sectors); a 1 MiB log holds 127 of them before a new sequence.
    let past_restart = every == 1 && last.is_some_and(|l| l >= 130);
    Ok(Outcome {
        acked: last,
        past_restart,
        finished,
        replayed,
    })
}

pub fn run(args: &Args, dir: &Path) -> BenchResult<()> {
    let runs = args.crash_runs;
    if runs == 0 {
        return Ok(());
    }
    let seed = args.crash_seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut rng = Rng::new(seed);
    let t0 = Instant::now();
    let (mut failures, mut replayed, mut finished, mut verified) = (Vec::new(), 0, 0, 0u64);
    let mut past_restart = 0;
    for r in 0..runs {
        if r % 10 == 0 {
            eprintln!("crash: run {}/{runs}", r + 1);
        }
        match one(dir, r, &mut rng) {
            Ok(o) => {
                replayed += usize::from(o.replayed);
                finished += usize::from(o.finished);
                past_restart += usize::from(o.past_restart);
                verified += o.acked.map_or(0, |a| a + 1);
            }
            Err(e) => failures.push(format!("run {r}: {e}")),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!("## 4. SIGKILL crash runs\n");
    println!(
        "A writer process writes 4 KiB patterns over a 256 MiB dynamic VHDX (1 MiB blocks), \
         flushes every 1, 2, 4 or 8 writes (drawn per run) and acknowledges each completed \
         flush; with a flush per write the log fills and new log sequences start. It is \
         killed with SIGKILL 0–{MAX_DELAY_MS} ms after its first acknowledgement. Each \
         crashed image is replayed by qemu (`qemu-img check -r all` on a copy) and \
         reopened by the engine; both must pass `qemu-img check` and hold every \
         acknowledged write. Seed {seed}.\n"
    );
    println!("| runs | failures | engine replayed a log | killed after a new log sequence began | writer finished before the kill | acknowledged writes verified (x2) | time |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {runs} | {} | {replayed} | {past_restart} | {finished} | {verified} | {secs:.0} s |\n",
        failures.len()
    );
    for f in &failures {
        println!("- FAILED {f}");
    }
    if !failures.is_empty() {
        return Err(format!("{} of {runs} crash runs failed", failures.len()).into());
    }
    Ok(())
}
