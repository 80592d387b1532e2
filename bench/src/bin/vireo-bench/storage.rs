//! Live storage migration of a disk under a guest write load, Vireo's
//! `vm.migrate-disk` beside QEMU's `drive-mirror` (`--only storage`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::qmp::Qmp;
use super::Vmm;

/// (worst write latency in ms, writes/s) of `work iter=` lines between two marks.
pub(crate) fn work_stats(serial: &str, from: u64, to: u64) -> (f64, f64) {
    let mut worst = 0f64;
    let mut pts = Vec::new();
    for l in serial.lines() {
        let Some(rest) = l.strip_prefix("work iter=") else {
            continue;
        };
        let f = |k: &str| {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse::<f64>().ok())
        };
        let n = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if n >= from && n <= to {
            worst = worst.max(f("max_write_us=").unwrap_or(0.0) / 1e3);
            pts.push((n, f("tsc=").unwrap_or(0.0)));
        }
    }
    let khz = serial
        .lines()
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("tsc_khz="))
        })
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(1.0);
    let rate = match (pts.first(), pts.last()) {
        (Some(a), Some(b)) if b.1 > a.1 => (b.0 - a.0) as f64 / ((b.1 - a.1) / (khz * 1e3)),
        _ => 0.0,
    };
    (worst, rate)
}

pub(crate) fn last_work_iter(serial: &str) -> u64 {
    serial
        .lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("work iter=")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

pub(crate) fn wait_for_iter(serial: &Path, n: u64) {
    let start = Instant::now();
    while last_work_iter(&std::fs::read_to_string(serial).unwrap_or_default()) < n {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "workload stalled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live storage migration of a 4 GiB raw disk (2 GiB of data) while the guest's
/// workload writes 4 KiB blocks: copy time and the guest's worst write latency.
pub(crate) fn storage_migration_table() {
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let disk = dir.path().join("disk.raw");
    let status = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", disk.display()),
            "bs=1M",
            "count=2048",
            "status=none",
        ])
        .status()
        .expect("dd");
    assert!(status.success());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .expect("disk")
        .set_len(4 << 30)
        .expect("size");
    println!("### Live storage migration: 4 GiB raw disk (2 GiB data), guest writing 4 KiB blocks (test=workload)\n");
    println!("| VMM | copy + switch (ms) | guest writes/s before | worst write latency before (ms) | worst write latency during (ms) |");
    println!("|---|---|---|---|---|");
    let cmdline = "test=workload pages=16 report=200";
    for vmm in [Vmm::Vireo, Vmm::Qemu] {
        let serial = dir
            .path()
            .join(format!("{}.log", vmm.name().replace(' ', "-")));
        let target = dir.path().join("moved.raw");
        let _ = std::fs::remove_file(&target);
        let sock = dir.path().join("vm.sock");
        let mut c = vmm.command(cmdline, 512, Some((&disk, "raw")));
        match vmm {
            Vmm::Vireo => c.arg("--api-socket").arg(&sock),
            Vmm::Qemu => c
                .arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", sock.display())),
        };
        // Both print the guest's serial port on stdout.
        let mut child = c
            .stdout(std::fs::File::create(&serial).expect("serial"))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        wait_for_iter(&serial, 2000);
        let before_end = last_work_iter(&std::fs::read_to_string(&serial).unwrap_or_default());
        let t0 = Instant::now();
        match vmm {
            Vmm::Vireo => {
                let body = format!(r#"{{"id":"disk0","destination":"{}"}}"#, target.display());
                let (s, b) = vireo_e2e::api(&sock, "PUT", "vm.migrate-disk", Some(&body));
                assert_eq!(s, 204, "{b}");
                loop {
                    let (_, i) = vireo_e2e::api(&sock, "GET", "vm.migrate-disk-info", None);
                    if i.contains("\"completed\"") {
                        break;
                    }
                    assert!(!i.contains("\"failed\""), "{i}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Vmm::Qemu => {
                let mut q = Qmp::connect(&sock);
                let r = q.cmd(&format!(
                    r#"{{"execute":"drive-mirror","arguments":{{"device":"d0","target":"{}","format":"raw","sync":"full","mode":"absolute-paths"}}}}"#,
                    target.display()
                ));
                assert!(r.get("error").is_none(), "{r}");
                loop {
                    let v = q.cmd(r#"{"execute":"query-block-jobs"}"#);
                    let jobs = v["return"].as_array().cloned().unwrap_or_default();
                    if jobs.first().is_some_and(|j| j["ready"] == true) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                q.cmd(r#"{"execute":"block-job-complete","arguments":{"device":"d0"}}"#);
                loop {
                    let v = q.cmd(r#"{"execute":"query-block-jobs"}"#);
                    if v["return"].as_array().is_some_and(|a| a.is_empty()) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let copy_ms = t0.elapsed().as_secs_f64() * 1e3;
        let during_end = last_work_iter(&std::fs::read_to_string(&serial).unwrap_or_default());
        wait_for_iter(&serial, during_end + 400);
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        let (worst_before, rate) = work_stats(&text, 400, before_end);
        let (worst_during, _) = work_stats(&text, before_end + 1, during_end + 200);
        let _ = child.kill();
        let _ = child.wait();
        println!(
            "| {} | {copy_ms:.0} | {rate:.0} | {worst_before:.2} | {worst_during:.2} |",
            vmm.name()
        );
        // The next run starts from the same image.
        if target.exists() && !disk.exists() {
            let _ = std::fs::rename(&target, &disk);
        }
    }
    println!("\nWrites are 4 KiB (one per iteration, plus a read-back); both VMMs use the host page cache.\n");
}
