//! `vireod-bench`: N test-guest VMs through a real vireod. Measures the time until all
//! report running, vireod's RSS and the per-VM overhead, API latency (info, list) with
//! the guests running and with them paused, re-adoption after `kill -9 vireod`, and
//! host shutdown. Prints a Markdown table.
//!
//! CPU isolation (vireod's cgroup placement) is on unless `--no-cgroups`: the bench's
//! vireod places its VMMs under `--cgroup-root` (default a fresh
//! /sys/fs/cgroup/cpu/vireo-bench-PID, removed at the end), so that the same build
//! shows the figures with and without it.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::client;
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "vireod-bench",
    about = "Start many test-guest VMs through vireod and measure"
)]
struct Cli {
    /// Number of VMs.
    #[arg(long, default_value_t = 64)]
    vms: usize,
    /// Start requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 32)]
    memory_mib: u64,
    /// Requests per latency measurement.
    #[arg(long, default_value_t = 500)]
    requests: usize,
    /// The test guest ELF (default: build tests/guest).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Pause each VM as soon as it runs (the test guest spins at 100% of a CPU, unlike
    /// an idle real guest): measures vireod without n spinning guests.
    #[arg(long)]
    pause_after_boot: bool,
    /// Run vireod at this nice value (the VMMs it starts run at 0).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    nice: i32,
    /// Directory with vireod and vireo (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Run without CPU cgroups (vireod --no-cpu-cgroups): the "before" figures.
    #[arg(long)]
    no_cgroups: bool,
    /// vireod's --cpu-cgroup-root (default /sys/fs/cgroup/cpu/vireo-bench-PID).
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// vireod's --cpu-cgroup-shares: the weight of all VMs together against the rest
    /// of the host (e.g. 15, one nice-19 process, when the bench itself runs at nice 19).
    #[arg(long)]
    cgroup_shares: Option<u64>,
    /// More vireod arguments (repeatable), e.g. --vireod-arg=--vms-cpu-shares=64.
    #[arg(long, allow_hyphen_values = true)]
    vireod_arg: Vec<String>,
}

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn guest() -> R<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guest");
    let out = Command::new(dir.join("build.sh"))
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err("tests/guest/build.sh failed".into());
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// This process's nice value.
fn own_nice() -> i32 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| {
            let rest = &t[t.rfind(')')? + 1..];
            rest.split_whitespace().nth(16)?.parse().ok()
        })
        .unwrap_or(0)
}

fn rss_kib(pid: i32) -> u64 {
    agent::procfs::rss_bytes(pid).unwrap_or(0) / 1024
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
    bin_dir: PathBuf,
    nice: i32,
    /// vireod's cgroup arguments and other extra arguments.
    extra: Vec<String>,
    /// A cgroup root this bench made (removed at the end).
    cgroup_root: Option<PathBuf>,
}

impl Daemon {
    fn spawn(&mut self) -> R<Duration> {
        let t = Instant::now();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("vireod.log"))?;
        let child = Command::new("nice")
            .arg("-n")
            .arg(self.nice.to_string())
            .arg(self.bin_dir.join("vireod"))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--run-dir")
            .arg(self.dir.join("run"))
            .arg("--vireo-bin")
            .arg(self.bin_dir.join("vireo"))
            .arg("--no-autostart")
            .arg("--stop-timeout-s")
            .arg("60")
            .args(&self.extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if t.elapsed() > Duration::from_secs(60) {
                return Err("vireod did not come up".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(t.elapsed())
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Every VMM this bench started mentions the directory in its command line.
        let needle = self.dir.to_string_lossy().into_owned();
        if let Ok(d) = std::fs::read_dir("/proc") {
            for e in d.flatten() {
                if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    if String::from_utf8_lossy(&cmd).contains(&needle) {
                        // SAFETY: kill with a pid just read from /proc and a signal.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(root) = &self.cgroup_root {
            // Killed VMMs leave their cgroups once they are reaped.
            let start = Instant::now();
            while root.exists() && start.elapsed() < Duration::from_secs(10) {
                remove_cgroup_tree(root);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Removes a cgroup directory with its children (rmdir, deepest first).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

async fn call(sock: &Path, method: &str, path: &str, body: Option<Vec<u8>>) -> R<client::Response> {
    let r = client::request(sock, method, path, body, Duration::from_secs(300)).await?;
    if !r.ok() {
        return Err(format!("{method} {path}: {} {}", r.status, r.error_message()).into());
    }
    Ok(r)
}

/// Sends `n` copies of (method, path(i)) with `conc` in flight; returns the latencies (ms).
async fn batch(
    sock: &Path,
    n: usize,
    conc: usize,
    method: &'static str,
    path: Arc<dyn Fn(usize) -> String + Send + Sync>,
    then: Option<Arc<dyn Fn(usize) -> String + Send + Sync>>,
) -> R<Vec<f64>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(conc.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let sem = sem.clone();
        let sock = sock.to_path_buf();
        let path = path.clone();
        let then = then.clone();
        tasks.spawn(async move {
            let _p = sem.acquire().await;
            let t = Instant::now();
            let ms = call(&sock, method, &path(i), None)
                .await
                .map(|_| t.elapsed().as_secs_f64() * 1000.0)
                .map_err(|e| e.to_string())?;
            if let Some(then) = then {
                call(&sock, "PUT", &then(i), None)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<f64, String>(ms)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        out.push(r??);
    }
    out.sort_by(|a, b| a.total_cmp(b));
    Ok(out)
}

async fn latency(
    sock: &Path,
    n: usize,
    path: Arc<dyn Fn(usize) -> String + Send + Sync>,
) -> R<(f64, f64, f64)> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        call(sock, "GET", &path(i), None).await?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok((pct(&v, 0.5), pct(&v, 0.99), pct(&v, 1.0)))
}

/// Serial `tick` lines of each VM so far.
fn ticks(dir: &Path, n: usize) -> Vec<usize> {
    (0..n)
        .map(|i| {
            std::fs::read_to_string(dir.join(format!("state/vms/vm{i:03}/serial.log")))
                .map(|t| t.lines().filter(|l| l.starts_with("tick ")).count())
                .unwrap_or(0)
        })
        .collect()
}

async fn all_in(sock: &Path, state: &str) -> R<usize> {
    let r = call(sock, "GET", "/api/v1/vms", None).await?;
    let v: Value = serde_json::from_slice(&r.body)?;
    Ok(v.as_array()
        .map(|a| a.iter().filter(|x| x["state"] == state).count())
        .unwrap_or(0))
}

async fn vmm_pids(sock: &Path) -> R<Vec<i32>> {
    let r = call(sock, "GET", "/api/v1/vms", None).await?;
    let v: Value = serde_json::from_slice(&r.body)?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["pid"].as_i64().map(|p| p as i32))
                .collect()
        })
        .unwrap_or_default())
}

async fn run(cli: Cli) -> R<()> {
    let bin_dir = match cli.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .ok_or("no exe dir")?
            .to_path_buf(),
    };
    let kernel = match cli.kernel {
        Some(k) => k,
        None => guest()?,
    };
    let dir = std::env::temp_dir().join(format!("vireod-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut extra = cli.vireod_arg.clone();
    let mut cgroup_root = None;
    if cli.no_cgroups {
        extra.push("--no-cpu-cgroups".into());
    } else {
        let root = cli.cgroup_root.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "/sys/fs/cgroup/cpu/vireo-bench-{}",
                std::process::id()
            ))
        });
        extra.push("--cpu-cgroup-root".into());
        extra.push(root.display().to_string());
        if let Some(s) = cli.cgroup_shares {
            extra.push("--cpu-cgroup-shares".into());
            extra.push(s.to_string());
        }
        cgroup_root = Some(root);
    }
    let mut d = Daemon {
        child: None,
        socket: dir.join("run/vireod.sock"),
        dir,
        bin_dir,
        nice: cli.nice,
        extra,
        cgroup_root,
    };
    let up = d.spawn()?;
    let host: Value = serde_json::from_slice(
        &call(&d.socket, "GET", "/api/v1/host.info", None)
            .await?
            .body,
    )?;
    let isolation = match host["cpu_cgroup"].as_str() {
        Some(root) => format!(
            "CPU cgroups under {root}{}",
            cli.cgroup_shares
                .map(|s| format!(" (root cpu.shares {s})"))
                .unwrap_or_default()
        ),
        None => "no CPU cgroups".to_string(),
    };
    let sock = d.socket.clone();
    let rss0 = rss_kib(d.pid());
    let n = cli.vms;
    eprintln!("vireod up in {up:?}, RSS {rss0} KiB; defining {n} VMs");

    let cfg = json!({
        "payload": {"kernel": kernel, "cmdline": "test=counter period_ms=1000"},
        "memory": {"size": cli.memory_mib << 20},
    });
    let t = Instant::now();
    for i in 0..n {
        let def = json!({"config": cfg, "priority": "Medium"})
            .to_string()
            .into_bytes();
        call(&sock, "PUT", &format!("/api/v1/vms/vm{i:03}"), Some(def)).await?;
    }
    let define_s = t.elapsed().as_secs_f64();
    let rss_defined = rss_kib(d.pid());

    eprintln!("starting {n} VMs, {} at a time", cli.concurrency);
    let t = Instant::now();
    let starts = batch(
        &sock,
        n,
        cli.concurrency,
        "PUT",
        Arc::new(|i| format!("/api/v1/vms/vm{i:03}/start")),
        cli.pause_after_boot
            .then(|| Arc::new(|i| format!("/api/v1/vms/vm{i:03}/pause")) as Arc<_>),
    )
    .await?;
    let all_booted_s = t.elapsed().as_secs_f64();
    let up_state = if cli.pause_after_boot {
        "Paused"
    } else {
        "Running"
    };
    let running = all_in(&sock, up_state).await?;
    if running != n {
        return Err(format!("only {running} of {n} running").into());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // A metering round or so.
    let rss_running = rss_kib(d.pid());
    let pids = vmm_pids(&sock).await?;
    let vmm_rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let vmm_rss_avg = vmm_rss.iter().sum::<u64>() as f64 / vmm_rss.len().max(1) as f64;
    let threads: usize = pids
        .iter()
        .map(|p| {
            std::fs::read_dir(format!("/proc/{p}/task"))
                .map(|d| d.count())
                .unwrap_or(0)
        })
        .sum();

    let (mut info_run, mut list_run) = (
        (f64::NAN, f64::NAN, f64::NAN),
        (f64::NAN, f64::NAN, f64::NAN),
    );
    let mut guests_busy = String::from("(not measured: paused)");
    if !cli.pause_after_boot {
        eprintln!("latency with {n} guests running");
        // That the guests really spin meanwhile: the VMMs' CPU time and the guests'
        // serial ticks over the phase.
        let cpu0: u64 = pids
            .iter()
            .filter_map(|p| agent::procfs::stat(*p))
            .map(|s| s.cpu_ns)
            .sum();
        let ticks0 = ticks(&d.dir, n);
        let t0 = Instant::now();
        info_run = latency(
            &sock,
            cli.requests,
            Arc::new(move |i| format!("/api/v1/vms/vm{:03}", i % n)),
        )
        .await?;
        list_run = latency(&sock, cli.requests, Arc::new(|_| "/api/v1/vms".to_string())).await?;
        // A window of at least 3 s (the guests tick once a second).
        let window = Duration::from_secs(3);
        if t0.elapsed() < window {
            tokio::time::sleep(window - t0.elapsed()).await;
        }
        let wall = t0.elapsed().as_secs_f64();
        let cpu1: u64 = pids
            .iter()
            .filter_map(|p| agent::procfs::stat(*p))
            .map(|s| s.cpu_ns)
            .sum();
        let ticks1 = ticks(&d.dir, n);
        let ticked = ticks0.iter().zip(&ticks1).filter(|(a, b)| b > a).count();
        guests_busy = format!(
            "{:.2} CPUs over {wall:.1} s; {ticked}/{n} guests ticked",
            cpu1.saturating_sub(cpu0) as f64 / 1e9 / wall
        );
        eprintln!("pausing all");
        batch(
            &sock,
            n,
            cli.concurrency,
            "PUT",
            Arc::new(|i| format!("/api/v1/vms/vm{i:03}/pause")),
            None,
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info_idle = latency(
        &sock,
        cli.requests,
        Arc::new(move |i| format!("/api/v1/vms/vm{:03}", i % n)),
    )
    .await?;
    let list_idle = latency(&sock, cli.requests, Arc::new(|_| "/api/v1/vms".to_string())).await?;
    let metrics_idle = latency(
        &sock,
        cli.requests.min(200),
        Arc::new(|_| "/metrics".to_string()),
    )
    .await?;
    if !cli.pause_after_boot {
        batch(
            &sock,
            n,
            cli.concurrency,
            "PUT",
            Arc::new(|i| format!("/api/v1/vms/vm{i:03}/resume")),
            None,
        )
        .await?;
    }

    eprintln!("kill -9 vireod, restart, re-adopt");
    if let Some(mut c) = d.child.take() {
        c.kill()?;
        c.wait()?;
    }
    let t = Instant::now();
    d.spawn()?;
    while all_in(&sock, up_state).await? != n {
        if t.elapsed() > Duration::from_secs(120) {
            return Err("not all re-adopted".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let readopt_s = t.elapsed().as_secs_f64();
    let pids2 = vmm_pids(&sock).await?;
    let same = pids2.iter().zip(&pids).filter(|(a, b)| a == b).count();

    eprintln!("host shutdown (SIGTERM)");
    let t = Instant::now();
    let mut c = d.child.take().ok_or("no vireod")?;
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    c.wait()?;
    let shutdown_s = t.elapsed().as_secs_f64();
    let left = pids.iter().filter(|p| agent::procfs::alive(**p)).count();

    let ms = |x: (f64, f64, f64)| format!("{:.2} / {:.2} / {:.2}", x.0, x.1, x.2);
    println!(
        "| figure ({n} VMs, {} MiB each, {} starts in flight, bench nice {}, vireod nice {}, {isolation}{}) | value |",
        cli.memory_mib,
        cli.concurrency,
        own_nice(),
        (own_nice() + cli.nice).clamp(-20, 19),
        if cli.pause_after_boot {
            ", each paused once running"
        } else {
            ""
        }
    );
    println!("|---|---|");
    println!("| define {n} VMs (SQLite, synchronous=FULL) | {define_s:.2} s |");
    println!(
        "| start all until every one reports Running{} | {all_booted_s:.2} s ({:.1} VMs/s) |",
        if cli.pause_after_boot {
            " (and pause it)"
        } else {
            ""
        },
        n as f64 / all_booted_s
    );
    println!(
        "| one start, p50 / p99 / max | {:.0} / {:.0} / {:.0} ms |",
        pct(&starts, 0.5),
        pct(&starts, 0.99),
        pct(&starts, 1.0)
    );
    println!("| vireod RSS: empty / {n} defined / {n} running | {rss0} / {rss_defined} / {rss_running} KiB |");
    println!(
        "| vireod RSS per running VM | {:.1} KiB |",
        (rss_running.saturating_sub(rss0)) as f64 / n as f64
    );
    println!("| VMM (vireo) RSS per VM, average | {vmm_rss_avg:.0} KiB |");
    println!("| VMM threads, total | {threads} |");
    println!("| guests while the running latencies were measured | {guests_busy} |");
    println!(
        "| GET vms/NAME p50 / p99 / max, guests running | {} ms |",
        ms(info_run)
    );
    println!(
        "| GET vms p50 / p99 / max, guests running | {} ms |",
        ms(list_run)
    );
    println!(
        "| GET vms/NAME p50 / p99 / max, guests paused | {} ms |",
        ms(info_idle)
    );
    println!(
        "| GET vms p50 / p99 / max, guests paused | {} ms |",
        ms(list_idle)
    );
    println!(
        "| GET /metrics p50 / p99 / max, guests paused | {} ms |",
        ms(metrics_idle)
    );
    println!("| kill -9 vireod → restarted, all {n} re-adopted | {readopt_s:.2} s ({same}/{n} same pids) |");
    println!(
        "| SIGTERM → all {n} VMs shut down, vireod exited | {shutdown_s:.2} s ({left} VMMs left) |"
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vireod-bench: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vireod-bench: error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
