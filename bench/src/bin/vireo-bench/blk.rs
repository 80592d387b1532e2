//! In-guest virtio-blk, Vireo beside QEMU microvm (`--only blk`; `test=blk-bench`):
//! 4K random read/write IOPS and 1 MiB sequential MB/s, on raw and dynamic VHDX images,
//! at queue depth 1 and 32.
//!
//! Each phase is its own VM run (`phases=NAME`), so that the VMM's counters at its end
//! (`vireo` logs them as it exits) belong to that phase alone; a run with no phase
//! measures what booting and powering off cost, and is subtracted. Every cell is run
//! `BLK_ROUNDS` times (default 5; `BLK_MS` per phase, default 2000; `BLK_QD=1` or `32`
//! for one table), the configurations alternating, and printed as the
//! median with the spread (min–max) of the rounds. Beside the figures, for each phase:
//! vCPU exits, queue notifications, worker wake-ups and polls that found work, per
//! request; the host's time per request executing it (backend I/O and copies) and from
//! taking it off the ring to returning it; and the guest's time per request in its
//! submit call (the notification's exit) and waiting for the used ring.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::Vmm;
use vireo_e2e::bin;

/// The guest's phases, and whether the figure is MB/s (else IOPS).
const PHASES: [(&str, bool); 4] = [
    ("rand4k-read", false),
    ("rand4k-write", false),
    ("seq1m-write", true),
    ("seq1m-read", true),
];

/// What one phase of one run measured.
#[derive(Clone, Debug, Default)]
struct PhaseRun {
    /// IOPS or MB/s, as the phase is measured.
    figure: f64,
    /// The guest's time per request in its submit call, and waiting for completion.
    submit_ns: f64,
    wait_ns: f64,
    /// The VMM's counters at its end (Vireo only).
    counters: Option<VmmCounters>,
}

/// Vireo's counters at a VM's end, summed over its disks.
#[derive(Clone, Copy, Debug, Default)]
struct VmmCounters {
    requests: f64,
    exits: f64,
    notifications: f64,
    wakeups: f64,
    polled: f64,
    missed_kicks: f64,
    execute_ns: f64,
    service_ns: f64,
}

impl VmmCounters {
    /// Parses the `counters=` field of the VMM's "the VM's counters at its end" log line.
    fn from_log(stderr: &str) -> Option<Self> {
        let line = stderr
            .lines()
            .find(|l| l.contains("the VM's counters at its end"))?;
        let json = &line[line.find("counters=")? + "counters=".len()..];
        let v: serde_json::Value = serde_json::from_str(json.split_whitespace().next()?).ok()?;
        let mut c = VmmCounters::default();
        let get = |dev: &serde_json::Value, k: &str| dev.get(k).and_then(|x| x.as_u64());
        for (id, dev) in v.as_object()? {
            if id == "vcpus" {
                c.exits += get(dev, "exits").unwrap_or(0) as f64;
                continue;
            }
            // A disk: it counts read operations.
            let Some(reads) = get(dev, "read_ops") else {
                continue;
            };
            let n = |k| get(dev, k).unwrap_or(0) as f64;
            c.requests += reads as f64 + n("write_ops") + n("flush_ops");
            c.notifications += n("notifications");
            c.wakeups += n("wakeups");
            c.polled += n("polled");
            c.missed_kicks += n("missed_kicks");
            c.execute_ns += n("execute_ns");
            c.service_ns += n("service_ns");
        }
        Some(c)
    }

    /// This run's counters less those of a run that only booted and powered off.
    fn less(self, base: Self) -> Self {
        let d = |a: f64, b: f64| (a - b).max(0.0);
        VmmCounters {
            requests: d(self.requests, base.requests),
            exits: d(self.exits, base.exits),
            notifications: d(self.notifications, base.notifications),
            wakeups: d(self.wakeups, base.wakeups),
            polled: d(self.polled, base.polled),
            missed_kicks: d(self.missed_kicks, base.missed_kicks),
            execute_ns: d(self.execute_ns, base.execute_ns),
            service_ns: d(self.service_ns, base.service_ns),
        }
    }
}

/// One configuration of the table.
struct Config<'a> {
    vmm: Vmm,
    image: &'a Path,
    format: &'static str,
    /// More `--disk` keys for Vireo (e.g. `,poll_us=0`).
    vireo_opts: &'static str,
    label: &'static str,
}

/// Runs the test guest once with `phases` (empty: none, the baseline) and returns its
/// `bench NAME ...` lines and, for Vireo, the counters at its end.
fn run_once(
    c: &Config,
    qd: u32,
    ms: u64,
    phases: &str,
) -> (Vec<(String, PhaseRun)>, Option<VmmCounters>) {
    let phases = if phases.is_empty() { "none" } else { phases };
    let cmdline = format!("test=blk-bench ms={ms} span_mib=512 seed=3 qd={qd} phases={phases}");
    let mut cmd = match c.vmm {
        Vmm::Vireo => {
            let mut cmd = c.vmm.command(&cmdline, 512, None);
            cmd.args([
                "--disk",
                &format!("path={}{}", c.image.display(), c.vireo_opts),
            ])
            .env("RUST_LOG", "warn,vmm::vmm=info");
            cmd
        }
        Vmm::Qemu => c.vmm.command(&cmdline, 512, Some((c.image, c.format))),
    };
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", c.vmm.name()));
    let serial = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // QEMU's isa-debug-exit makes the guest's exit code 0 its status 1.
    let ok = match c.vmm {
        Vmm::Vireo => out.status.success(),
        Vmm::Qemu => out.status.code() == Some(1),
    };
    assert!(
        ok && serial.contains("result ok"),
        "{} on {} (phases={phases}) failed: {}\n{serial}\n{stderr}",
        c.vmm.name(),
        c.format,
        out.status
    );
    let counters = match c.vmm {
        Vmm::Vireo => Some(
            VmmCounters::from_log(&stderr)
                .unwrap_or_else(|| panic!("vireo logged no counters at its end:\n{stderr}")),
        ),
        Vmm::Qemu => None,
    };
    (phase_lines(&serial), counters)
}

/// Parses `bench <phase> ops=.. iops=.. mbps=.. avg_us=.. submit_ns=.. wait_ns=..`.
fn phase_lines(serial: &str) -> Vec<(String, PhaseRun)> {
    serial
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("bench ")?;
            let mut it = rest.split_whitespace();
            let phase = it.next()?.to_string();
            let mb = PHASES.iter().find(|(p, _)| *p == phase)?.1;
            let mut run = PhaseRun::default();
            for kv in it {
                let (k, v) = kv.split_once('=')?;
                let v: f64 = v.parse().unwrap_or(0.0);
                match k {
                    "iops" if !mb => run.figure = v,
                    "mbps" if mb => run.figure = v,
                    "submit_ns" => run.submit_ns = v,
                    "wait_ns" => run.wait_ns = v,
                    _ => {}
                }
            }
            Some((phase, run))
        })
        .collect()
}

fn prepare_images(dir: &Path) -> (PathBuf, PathBuf) {
    let raw = dir.join("bench.raw");
    let vhdx = dir.join("bench.vhdx");
    // Fully written images: the figures are for allocated blocks.
    let status = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", raw.display()),
            "bs=1M",
            "count=1024",
            "status=none",
        ])
        .status()
        .expect("dd");
    assert!(status.success());
    // Through the page cache (vireo-img's default is O_DIRECT).
    let status = Command::new(bin("vireo-img"))
        .args(["convert", "-t", "writeback", "-f", "raw", "-O", "vhdx"])
        .arg(&raw)
        .arg(&vhdx)
        .status()
        .expect("vireo-img convert");
    assert!(status.success());
    for img in [&raw, &vhdx] {
        cache_in_small_pages(img);
    }
    (raw, vhdx)
}

/// Both sides start with their image cached, and cached alike: written back, dropped,
/// then read again 4 KiB at a time without readahead, so the page cache holds the image
/// in 4 KiB pages, as a cache filled by a guest's random reads would. How a file came
/// into the cache matters for buffered writes: ext4 (kernel 6.18) walks every block of
/// the folio a write lands in, so a 4 KiB write into the 2 MiB folios that `dd`, a
/// copy or this host's 8 MiB readahead leave costs ~35 µs instead of ~5 µs (perf: 79 %
/// of it in `ext4_block_write_begin`; docs/benchmarks.md) — and the two images, written
/// differently, held folios of different sizes.
fn cache_in_small_pages(img: &Path) {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .expect("image");
    f.sync_all().expect("fsync image");
    let fd = f.as_raw_fd();
    // SAFETY: plain advice calls on a descriptor this function owns.
    let (drop, random) = unsafe {
        (
            libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED),
            libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_RANDOM),
        )
    };
    assert_eq!((drop, random), (0, 0), "posix_fadvise on {}", img.display());
    let len = f.metadata().expect("image size").len();
    let mut page = [0u8; 4096];
    let mut at = 0;
    while at < len {
        f.read_at(&mut page, at).expect("read image");
        at += page.len() as u64;
    }
}

/// The host the figures come from: CPU, kernel, which KVM, and how busy it was.
fn host_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let kvm = ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "host: {cpu} ({cpus} CPUs), kernel {kernel}, KVM: {}, load average {}",
        if kvm.is_empty() { "?" } else { &kvm },
        load_average()
    )
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn table() {
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .expect("tempdir");
    let (raw, vhdx) = prepare_images(dir.path());
    println!("{}\n", host_line());
    // Queue depth 32 fills the guest driver's queue (virtio-drivers, vendored with a
    // 32-entry block queue; one indirect descriptor per request).
    // BLK_QD=1 or BLK_QD=32 runs one of the two tables.
    let only_qd: Option<u32> = std::env::var("BLK_QD").ok().and_then(|v| v.parse().ok());
    for qd in [1, 32] {
        if only_qd.is_none_or(|q| q == qd) {
            table_at(&raw, &vhdx, qd);
        }
    }
    println!("load average at the end: {}\n", load_average());
}

/// Median and spread of `v` (sorted here), as "median (min–max)".
fn median_spread(v: &mut [f64], digits: usize) -> String {
    if v.is_empty() {
        return "–".into();
    }
    v.sort_by(f64::total_cmp);
    format!(
        "{:.digits$} ({:.digits$}–{:.digits$})",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1]
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn table_at(raw: &Path, vhdx: &Path, qd: u32) {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rounds = env("BLK_ROUNDS", 5).max(1) as usize;
    let ms = env("BLK_MS", 2000).max(100);
    let configs = [
        Config {
            vmm: Vmm::Vireo,
            image: raw,
            format: "raw",
            vireo_opts: "",
            label: "vireo",
        },
        Config {
            vmm: Vmm::Vireo,
            image: vhdx,
            format: "vhdx",
            vireo_opts: "",
            label: "vireo",
        },
        Config {
            vmm: Vmm::Vireo,
            image: vhdx,
            format: "vhdx",
            vireo_opts: ",poll_us=0",
            label: "vireo, poll_us=0",
        },
        Config {
            vmm: Vmm::Qemu,
            image: raw,
            format: "raw",
            vireo_opts: "",
            label: "qemu microvm",
        },
        Config {
            vmm: Vmm::Qemu,
            image: vhdx,
            format: "vhdx",
            vireo_opts: "",
            label: "qemu microvm",
        },
    ];
    // runs[config][phase]: one PhaseRun per round (counters less the round's baseline).
    let mut runs = vec![vec![Vec::<PhaseRun>::new(); PHASES.len()]; configs.len()];
    for _ in 0..rounds {
        for (ci, c) in configs.iter().enumerate() {
            let base = run_once(c, qd, ms, "").1;
            for (pi, (phase, _)) in PHASES.iter().enumerate() {
                let (lines, counters) = run_once(c, qd, ms, phase);
                let mut run = lines
                    .into_iter()
                    .find(|(p, _)| p == phase)
                    .map(|(_, r)| r)
                    .unwrap_or_else(|| panic!("{} printed no {phase} line", c.vmm.name()));
                run.counters = counters.zip(base).map(|(c, b)| c.less(b));
                runs[ci][pi].push(run);
            }
        }
    }
    println!("### In-guest virtio-blk, queue depth {qd} (test=blk-bench, one run per phase of {ms} ms, 512 MiB span of a 1 GiB fully allocated image, cached in the host's page cache alike for both (4 KiB pages); median (min–max) of {rounds} rounds, configurations alternating)\n");
    println!("| VMM | image | rand 4K read IOPS | rand 4K write IOPS | seq 1M write MB/s | seq 1M read MB/s |");
    println!("|---|---|---|---|---|---|");
    let mut medians = Vec::new();
    for (ci, c) in configs.iter().enumerate() {
        let cells: Vec<String> = runs[ci]
            .iter()
            .map(|r| median_spread(&mut r.iter().map(|x| x.figure).collect::<Vec<_>>(), 0))
            .collect();
        println!("| {} | {} | {} |", c.label, c.format, cells.join(" | "));
        medians.push(
            runs[ci]
                .iter()
                .map(|r| median(&mut r.iter().map(|x| x.figure).collect::<Vec<_>>()))
                .collect::<Vec<_>>(),
        );
    }
    let ratio = |a: usize, b: usize| -> String {
        (0..PHASES.len())
            .map(|i| format!("{:.2}", medians[a][i] / medians[b][i].max(1e-9)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!("\nVireo VHDX ÷ Vireo raw (read IOPS / write IOPS / seq write / seq read): {} (goal ≥ 0.90)", ratio(1, 0));
    println!("Vireo VHDX ÷ QEMU VHDX: {} (goal ≥ 1.5)", ratio(1, 4));
    println!(
        "Vireo VHDX with polling ÷ without (poll_us=0): {}\n",
        ratio(1, 2)
    );

    println!("What a request costs, queue depth {qd} (medians over the rounds; per request: vCPU exits, queue notifications, worker wake-ups, polls that found work, requests found by the recheck after a sleep without a kick; host µs executing it (I/O and copies) and from ring to ring; guest µs in its submit call and waiting for the used ring):\n");
    println!("| VMM | image | phase | exits | notifies | wake-ups | polls found | missed kicks | host execute µs | host ring-to-ring µs | guest submit µs | guest wait µs |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (ci, c) in configs.iter().enumerate() {
        for (pi, (phase, _)) in PHASES.iter().enumerate() {
            let r = &runs[ci][pi];
            let of = |f: &dyn Fn(&PhaseRun) -> Option<f64>| -> String {
                let mut v: Vec<f64> = r.iter().filter_map(f).collect();
                if v.is_empty() {
                    "–".into()
                } else {
                    format!("{:.2}", median(&mut v))
                }
            };
            let per_req = |k: fn(&VmmCounters) -> f64| {
                move |x: &PhaseRun| {
                    x.counters
                        .filter(|c| c.requests > 0.0)
                        .map(|c| k(&c) / c.requests)
                }
            };
            let us = |k: fn(&VmmCounters) -> f64| {
                move |x: &PhaseRun| {
                    x.counters
                        .filter(|c| c.requests > 0.0)
                        .map(|c| k(&c) / c.requests / 1000.0)
                }
            };
            println!(
                "| {} | {} | {phase} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.label,
                c.format,
                of(&per_req(|c| c.exits)),
                of(&per_req(|c| c.notifications)),
                of(&per_req(|c| c.wakeups)),
                of(&per_req(|c| c.polled)),
                of(&per_req(|c| c.missed_kicks)),
                of(&us(|c| c.execute_ns)),
                of(&us(|c| c.service_ns)),
                of(&|x: &PhaseRun| Some(x.submit_ns / 1000.0)),
                of(&|x: &PhaseRun| Some(x.wait_ns / 1000.0)),
            );
        }
    }
    println!();
}
