//! `vireo-bench`: the VMM's figures, side by side with QEMU microvm in one run.
//!
//! 1. exec → first guest serial byte, and exec → guest power-off (`test=boot`).
//! 2. VMM memory overhead: process RSS minus the RSS of guest RAM.
//! 3. In-guest virtio-blk (`test=blk-bench`, queue depth 1 and 32): 4K random read/write IOPS
//!    and 1 MiB sequential MB/s on raw and on dynamic VHDX images, with what a request
//!    costs per stage (`blk.rs`; alone: `--only blk`).
//!
//! 4. Live migration on one host: total time and downtime, idle and dirtying guests.
//!
//! 5. Live storage migration of a 4 GiB disk under a guest write load (vs drive-mirror).
//!
//! 6. Live migration over TCP: plain vs mutual TLS, one vs four page streams (Vireo).
//!
//! 7. In-guest virtio-net on a tap (`test=net-bench`, root): frames/s and MB/s out and in.
//!
//! 8. Live migration between two vireods: HTTPS with mutual TLS between the VMMs vs
//!    a same-host pair whose VMMs speak `insecure` TCP (part of `migration-transport`;
//!    alone: `--only vireod-transport`).
//!
//! 9. Large guests: VMM overhead and live migration of a 1 TiB guest that touched
//!    768 MiB vs a 1 GiB guest (`large_memory.rs`; alone: `--only large-memory`).
//!
//! 10. Many vCPUs: exec → all 31 APs of a 32-vCPU guest online, Vireo vs QEMU
//!     (`smp_boot.rs`; alone: `--only smp-boot`).
//!
//! 11. Balloon: MiB/s a 1 GiB inflation returns to the host, Vireo vs QEMU
//!     (`balloon.rs`; alone: `--only balloon`).
//!
//! 12. Vireo Replica's RPO over a 100 Mbit/s link with 50 ms each way, the bytes on the
//!     wire per byte written and the cost to the guest's write latency
//!     (`replica_rpo.rs`; only with `--only replica-rpo`: it takes minutes).
//!
//! 13. The failover cluster's control plane at scale: 64 node agents and 4,000
//!     clustered VMs (stand-ins, no VMM) on a real 3-member etcd — failover of one
//!     node, drain of one node, listing every VM, etcd's size (`cluster_scale.rs`;
//!     only with `--only cluster-scale`: it takes minutes).
//!
//! 14. Host loss on a real three-host cluster (vireods, VMMs, etcd over mutual TLS in
//!     network namespaces): kill → each of its VMs running elsewhere, per priority, over
//!     many rounds (`cluster_failover.rs`; only with `--only cluster-failover`).
//!
//! 15. What a Replica server writes to keep 1, 24 or thinned recovery points, against
//!     what the guest wrote (`replica_history.rs`; only with `--only replica-history`).
//!
//! Usage: `vireo-bench [--runs N] [--skip-blk] [--transport-rounds N] [--rpo-rounds N]
//! [--cluster-nodes N] [--cluster-vms N] [--cluster-rounds N] [--cluster-lists N]
//! [--failover-rounds N]
//! [--only boot|memory|blk|migration|storage|migration-transport|vireod-transport|net|large-memory|smp-boot|balloon|replica-rpo|replica-history|cluster-scale|cluster-failover]`
//! (build the workspace binaries first; `--help` prints this and runs nothing).
//! Prints markdown tables for docs/benchmarks.md.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

mod balloon;
mod blk;
mod cluster_failover;
mod cluster_scale;
mod large_memory;
mod replica_history;
mod replica_rpo;
mod smp_boot;
use vireo_e2e::vireod_host::VireodHost;
use vireo_e2e::{bin, guest};

#[derive(Clone, Copy)]
enum Vmm {
    Vireo,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Vireo => "vireo",
            Vmm::Qemu => "qemu microvm",
        }
    }

    /// The command that boots the test guest with `cmdline`, serial on stdout.
    fn command(self, cmdline: &str, mem_mib: u32, disk: Option<(&Path, &str)>) -> Command {
        match self {
            Vmm::Vireo => {
                // Larger than hosts of this kind: backed only where it is touched.
                let overcommit = if mem_mib > 32 << 10 {
                    ",overcommit=on"
                } else {
                    ""
                };
                let mut c = Command::new(bin("vireo"));
                c.arg("--kernel")
                    .arg(guest())
                    .args(["--cmdline", cmdline, "--serial", "tty"])
                    .args(["--memory", &format!("size={mem_mib}M{overcommit}")]);
                if let Some((p, _)) = disk {
                    c.args(["--disk", &format!("path={}", p.display())]);
                }
                c
            }
            Vmm::Qemu => {
                let mut c = Command::new("qemu-system-x86_64");
                c.args([
                    "-M",
                    "microvm,pcie=on",
                    "-accel",
                    "kvm",
                    "-cpu",
                    "host,-arch-capabilities",
                ])
                .args(["-m", &mem_mib.to_string(), "-display", "none", "-no-reboot"])
                .args([
                    "-serial",
                    "stdio",
                    "-device",
                    "isa-debug-exit,iobase=0xf4,iosize=4",
                ])
                .arg("-kernel")
                .arg(guest())
                .args(["-append", cmdline]);
                if let Some((p, fmt)) = disk {
                    c.arg("-drive")
                        .arg(format!(
                            "file={},if=none,id=d0,format={fmt},cache=writeback,aio=threads",
                            p.display()
                        ))
                        .args(["-device", "virtio-blk-pci,drive=d0"]);
                }
                c
            }
        }
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// One boot: (ms to first serial byte, ms to exit).
fn boot_once(vmm: Vmm) -> (f64, f64) {
    let t0 = Instant::now();
    let mut child = vmm
        .command("test=boot", 256, None)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn VMM");
    let mut out = child.stdout.take().expect("stdout");
    let mut b = [0u8; 1];
    out.read_exact(&mut b).expect("first serial byte");
    let first = t0.elapsed();
    let mut rest = Vec::new();
    let _ = out.read_to_end(&mut rest);
    let _ = child.wait();
    let exit = t0.elapsed();
    (first.as_secs_f64() * 1e3, exit.as_secs_f64() * 1e3)
}

fn boot_table(runs: usize) {
    println!(
        "### Boot: exec → first serial byte, exec → power-off (test=boot, 256 MiB, {runs} runs)\n"
    );
    println!("| VMM | first byte p50 (ms) | first byte p90 | power-off p50 (ms) | power-off p90 |");
    println!("|---|---|---|---|---|");
    let mut p50s = Vec::new();
    for vmm in [Vmm::Vireo, Vmm::Qemu] {
        // One warm-up run (page cache), then the measured runs, interleaved per VMM.
        let _ = boot_once(vmm);
        let (mut f, mut e): (Vec<f64>, Vec<f64>) = (0..runs).map(|_| boot_once(vmm)).unzip();
        let row = (
            percentile(&mut f, 0.5),
            percentile(&mut f, 0.9),
            percentile(&mut e, 0.5),
            percentile(&mut e, 0.9),
        );
        p50s.push(row.2);
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            vmm.name(),
            row.0,
            row.1,
            row.2,
            row.3
        );
    }
    println!(
        "\nVireo's power-off time is {:.2} of QEMU's (goal ≤ 0.20).\n",
        p50s[0] / p50s[1]
    );
}

/// (total RSS, RSS of the guest RAM mapping) in KiB, from /proc/PID/smaps.
fn rss_split(pid: u32, guest_bytes: u64) -> (u64, u64) {
    // Guest RAM: the mapping(s) of at least the guest's size (QEMU may align up).
    smaps_rss(pid, |size| {
        size >= guest_bytes && size < guest_bytes + (64 << 20)
    })
}

/// (total RSS, RSS of the mappings whose size `is_guest` accepts) of `pid`, in KiB,
/// from /proc/PID/smaps.
fn smaps_rss(pid: u32, is_guest: impl Fn(u64) -> bool) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut total, mut guest) = (0u64, 0u64);
    let mut cur_size = 0u64;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let mut it = first.split('-');
            let a = u64::from_str_radix(it.next().unwrap_or("0"), 16).unwrap_or(0);
            let b = u64::from_str_radix(it.next().unwrap_or("0"), 16).unwrap_or(0);
            cur_size = b.saturating_sub(a);
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            total += kib;
            if is_guest(cur_size) {
                guest += kib;
            }
        }
    }
    (total, guest)
}

fn memory_table() {
    println!("### VMM memory overhead (test=counter, 512 MiB guest, 1 vCPU, no disk)\n");
    println!("| VMM | total RSS (MiB) | guest RAM RSS (MiB) | overhead (MiB) |");
    println!("|---|---|---|---|");
    for vmm in [Vmm::Vireo, Vmm::Qemu] {
        let mut child = vmm
            .command("test=counter period_ms=50", 512, None)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn VMM");
        let mut out = child.stdout.take().expect("stdout");
        let mut buf = [0u8; 256];
        let mut seen = String::new();
        while !seen.contains("tick 3 ") {
            let n = out.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let (total, guest) = rss_split(child.id(), 512 << 20);
        let _ = child.kill();
        let _ = child.wait();
        println!(
            "| {} | {:.1} | {:.1} | {:.1} |",
            vmm.name(),
            total as f64 / 1024.0,
            guest as f64 / 1024.0,
            (total - guest) as f64 / 1024.0
        );
    }
    println!("\nGoal: Vireo's overhead ≤ 5 MiB.\n");
}

/// One QMP session (QEMU's JSON control protocol) on a unix socket.
struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let start = Instant::now();
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        let mut q = Qmp {
            reader: std::io::BufReader::new(s.try_clone().expect("clone")),
            writer: s,
        };
        q.line(); // greeting
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    fn line(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("QMP read");
        serde_json::from_str(&l).unwrap_or(serde_json::Value::Null)
    }

    /// Sends a command; returns its "return" (events in between are skipped).
    fn cmd(&mut self, c: &str) -> serde_json::Value {
        use std::io::Write;
        writeln!(self.writer, "{c}").expect("QMP write");
        loop {
            let v = self.line();
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    }
}

/// The guest's own view of the downtime: the longest gap between consecutive
/// `tick`/`dirty pass` TSC stamps across the source's and the destination's serial
/// output, in ms ("-" when the guest prints no TSC-stamped lines).
fn guest_gap(d: &Path) -> String {
    let mut text = std::fs::read_to_string(d.join("src.serial")).unwrap_or_default();
    text.push_str(&std::fs::read_to_string(d.join("dst.serial")).unwrap_or_default());
    let khz = text
        .lines()
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("tsc_khz="))
        })
        .and_then(|v| v.parse::<f64>().ok());
    let stamps: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("tick ") || l.starts_with("dirty pass="))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("tsc="))?
                .parse()
                .ok()
        })
        .collect();
    match khz {
        Some(k) if stamps.len() > 2 => {
            let gap = stamps.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
            format!("{:.1}", gap / k)
        }
        _ => "-".into(),
    }
}

/// One Vireo migration of `cmdline`'s guest in `d` to `url`, with more JSON fields for
/// the send and receive requests: (total ms, downtime ms, rounds), as the source logs them.
/// Lets the source's workload warm up (1 s); a `test=touch` guest is waited for until
/// it has touched its memory and ticks (a large guest takes seconds to touch it).
fn warm_up(serial: &Path, cmdline: &str) {
    std::thread::sleep(Duration::from_millis(1000));
    if !cmdline.contains("test=touch") {
        return;
    }
    let start = Instant::now();
    while !std::fs::read_to_string(serial)
        .unwrap_or_default()
        .contains("tick 2 ")
    {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the guest did not touch its memory in 300 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn vireo_migrate(
    d: &Path,
    cmdline: &str,
    mem_mib: u32,
    url: &str,
    send_extra: &str,
    receive_extra: &str,
) -> (f64, f64, String) {
    let src_sock = d.join("src.sock");
    let dst_sock = d.join("dst.sock");
    let mut src = Vmm::Vireo.command(cmdline, mem_mib, None);
    src.arg("--api-socket")
        .arg(&src_sock)
        .env("RUST_LOG", "vmm::live=info");
    let src_log = std::fs::File::create(d.join("src.err")).expect("log");
    let mut src = src
        .stdout(std::fs::File::create(d.join("src.serial")).expect("serial"))
        .stderr(src_log)
        .spawn()
        .expect("source");
    let mut dst = Command::new(bin("vireo"))
        .arg("--api-socket")
        .arg(&dst_sock)
        .arg("--serial")
        .arg(format!("file={}", d.join("dst.serial").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("destination");
    vireo_e2e::wait_for_socket(&src_sock, Duration::from_secs(10));
    vireo_e2e::wait_for_socket(&dst_sock, Duration::from_secs(10));
    warm_up(&d.join("src.serial"), cmdline);
    // Plain TCP is measured too, said out loud.
    let insecure = if url.starts_with("tcp:") && !send_extra.contains("\"tls\"") {
        r#","insecure":true"#
    } else {
        ""
    };
    let (s, b) = vireo_e2e::api(
        &dst_sock,
        "PUT",
        "vm.receive-migration",
        Some(&format!(
            r#"{{"receiver_url":"{url}"{}{}{insecure}{receive_extra}}}"#,
            vireo_e2e::config_field_of(&src_sock),
            vireo_e2e::secret_field()
        )),
    );
    assert_eq!(s, 204, "{b}");
    let (s, b) = vireo_e2e::api(
        &src_sock,
        "PUT",
        "vm.send-migration",
        Some(&format!(
            r#"{{"destination_url":"{url}"{}{insecure}{send_extra}}}"#,
            vireo_e2e::secret_field()
        )),
    );
    assert_eq!(s, 204, "{b}");
    let _ = src.wait();
    let log = std::fs::read_to_string(d.join("src.err")).unwrap_or_default();
    let line = log
        .lines()
        .find(|l| l.contains("migration committed"))
        .unwrap_or_else(|| panic!("vireo migration did not commit:\n{log}"))
        .to_string();
    let field = |name: &str| -> f64 {
        let clean: String = line
            .split('\x1b')
            .map(|p| p.split_once('m').map_or(p, |(_, r)| r))
            .collect();
        clean
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    std::thread::sleep(Duration::from_millis(300));
    let _ = vireo_e2e::api(&dst_sock, "PUT", "vm.shutdown", None);
    let _ = dst.kill();
    let _ = dst.wait();
    (
        field("total_ms="),
        field("downtime_ms="),
        field("rounds=").to_string(),
    )
}

/// (total ms, downtime ms, "rounds | guest gap") of one migration of `cmdline`'s guest.
fn migrate_once(vmm: Vmm, cmdline: &str, mem_mib: u32, auto_converge: bool) -> (f64, f64, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    match vmm {
        Vmm::Vireo => {
            let url = format!("unix:{}", d.join("mig.sock").display());
            let (total, down, rounds) = vireo_migrate(d, cmdline, mem_mib, &url, "", "");
            (total, down, format!("{rounds} | {}", guest_gap(d)))
        }
        Vmm::Qemu => {
            let mig = d.join("q.mig");
            let mut dst = vmm.command(cmdline, mem_mib, None);
            dst.arg("-incoming")
                .arg(format!("unix:{}", mig.display()))
                .arg("-qmp")
                .arg(format!(
                    "unix:{},server=on,wait=off",
                    d.join("dst.qmp").display()
                ));
            // Both print the guest's serial port on stdout: into the files guest_gap reads.
            let mut dst = dst
                .stdout(std::fs::File::create(d.join("dst.serial")).expect("serial"))
                .stderr(Stdio::null())
                .spawn()
                .expect("qemu dst");
            let mut src = vmm.command(cmdline, mem_mib, None);
            src.arg("-qmp").arg(format!(
                "unix:{},server=on,wait=off",
                d.join("src.qmp").display()
            ));
            let mut src = src
                .stdout(std::fs::File::create(d.join("src.serial")).expect("serial"))
                .stderr(Stdio::null())
                .spawn()
                .expect("qemu src");
            let mut qs = Qmp::connect(&d.join("src.qmp"));
            let _qd = Qmp::connect(&d.join("dst.qmp"));
            warm_up(&d.join("src.serial"), cmdline);
            if auto_converge {
                qs.cmd(r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"auto-converge","state":true}]}}"#);
            }
            qs.cmd(&format!(
                r#"{{"execute":"migrate","arguments":{{"uri":"unix:{}"}}}}"#,
                mig.display()
            ));
            let start = Instant::now();
            let result = loop {
                let v = qs.cmd(r#"{"execute":"query-migrate"}"#);
                let r = &v["return"];
                match r["status"].as_str() {
                    Some("completed") => {
                        break (
                            r["total-time"].as_f64().unwrap_or(f64::NAN),
                            r["downtime"].as_f64().unwrap_or(f64::NAN),
                            r["ram"]["dirty-sync-count"]
                                .as_u64()
                                .map_or("-".into(), |n| n.to_string()),
                        )
                    }
                    Some("failed") | Some("cancelled") => {
                        break (f64::NAN, f64::NAN, "failed".into())
                    }
                    _ => {}
                }
                if start.elapsed() > Duration::from_secs(60) {
                    qs.cmd(r#"{"execute":"migrate_cancel"}"#);
                    break (f64::NAN, f64::NAN, "did not converge in 60 s".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            std::thread::sleep(Duration::from_millis(300));
            for c in [&mut src, &mut dst] {
                let _ = c.kill();
                let _ = c.wait();
            }
            let (t, dt, r) = result;
            (t, dt, format!("{r} | {}", guest_gap(d)))
        }
    }
}

fn migration_table() {
    println!("### Live migration on one host (unix socket), 1 GiB guest, 1 vCPU\n");
    println!("Each VMM reports its own figures: Vireo from pausing the VM to sending Go, QEMU `query-migrate`'s `downtime` (QEMU's default downtime limit is 300 ms, Vireo's target 50 ms). Dirty-sync count is QEMU's number of dirty-log passes. The last column is the guest's own measure: the longest gap between consecutive TSC-stamped lines it printed (1 ms ticks when idle, a line every 5 ms when dirtying) across both hosts' serial output — it includes the normal interval, and shows a pause only if the guest's TSC kept running through it.\n");
    println!("| guest | VMM | total (ms) | downtime (ms) | rounds / dirty syncs | longest gap the guest saw (ms) |");
    println!("|---|---|---|---|---|---|");
    let cases = [
        ("idle (test=counter)", "test=counter period_ms=1"),
        (
            "dirtying a 128 MiB hot set at full speed (test=dirty pages=32768)",
            "test=dirty pages=32768 report_ms=5",
        ),
    ];
    for (name, cmdline) in cases {
        for (vmm, label, ac) in [
            (Vmm::Vireo, "vireo", false),
            (Vmm::Qemu, "qemu microvm", false),
            (Vmm::Qemu, "qemu microvm, auto-converge", true),
        ] {
            if ac && name.starts_with("idle") {
                continue;
            }
            let (total, down, rounds) = migrate_once(vmm, cmdline, 1024, ac);
            println!("| {name} | {label} | {total:.1} | {down:.1} | {rounds} |");
        }
    }
    println!("\nGoals: idle total ≤ 1500 ms and downtime ≤ 20 ms; dirtying guest always completes with downtime ≤ 50 ms.\n");
}

/// Rounds of each migration-transport case: the table shows their spread.
const TRANSPORT_ROUNDS: usize = 5;

/// A number `name=` of the source's "migration committed" log line in `dir`.
fn committed_field(dir: &Path, name: &str) -> f64 {
    let log = std::fs::read_to_string(dir.join("src.err")).unwrap_or_default();
    let line = log
        .lines()
        .find(|l| l.contains("migration committed"))
        .unwrap_or_default();
    let clean: String = line
        .split('\x1b')
        .map(|p| p.split_once('m').map_or(p, |(_, r)| r))
        .collect();
    clean
        .split_whitespace()
        .find_map(|w| w.strip_prefix(name))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// "min / median / max" of `v` (sorted here).
fn spread(v: &mut [f64]) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!(
        "{:.1} / {:.1} / {:.1}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

/// Live migration over TCP loopback: plain or mutual TLS, one or four page streams.
fn migration_transport_table() {
    println!("### Live migration over TCP loopback: TLS and parallel page streams, 1 GiB guest, 1 vCPU\n");
    println!("Vireo only, source and destination on this host; total and downtime as the source logs them, min / median / max of {TRANSPORT_ROUNDS} rounds; the counters that explain them (copy rounds, pages and MiB sent, pages per round) as medians.\n");
    println!("| guest | transport | connections | total ms (min / median / max) | downtime ms (min / median / max) | rounds | pages sent | MiB sent | pages per round |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let certs = tempfile::tempdir().expect("tempdir");
    let ca = vireo_e2e::tls_certs::Ca::new(certs.path(), "ca");
    let server = ca.server("dst", &["127.0.0.1"]);
    let client = ca.client("src");
    let cases = [
        ("idle (test=counter)", "test=counter period_ms=1"),
        (
            "dirtying a 128 MiB hot set at full speed (test=dirty pages=32768)",
            "test=dirty pages=32768 report_ms=5",
        ),
    ];
    for (name, cmdline) in cases {
        for tls in [false, true] {
            for connections in [1, 4] {
                let (mut totals, mut downs) = (Vec::new(), Vec::new());
                let (mut rounds, mut pages, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..TRANSPORT_ROUNDS {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let port = std::net::TcpListener::bind("127.0.0.1:0")
                        .and_then(|l| l.local_addr())
                        .map(|a| a.port())
                        .expect("a free port");
                    let url = format!("tcp:127.0.0.1:{port}");
                    let (send, receive) = if tls {
                        (
                            vireo_e2e::tls_certs::send_tls(Some(&client), &ca),
                            vireo_e2e::tls_certs::receive_tls(&server, &ca),
                        )
                    } else {
                        (String::new(), String::new())
                    };
                    let send = format!(r#"{send},"connections":{connections}"#);
                    let (total, down, _) =
                        vireo_migrate(dir.path(), cmdline, 1024, &url, &send, &receive);
                    totals.push(total);
                    downs.push(down);
                    rounds.push(committed_field(dir.path(), "rounds="));
                    pages.push(committed_field(dir.path(), "pages="));
                    bytes.push(committed_field(dir.path(), "bytes="));
                }
                let median = |v: &mut Vec<f64>| {
                    v.sort_by(|a, b| a.total_cmp(b));
                    v[v.len() / 2]
                };
                let (r, p, b) = (median(&mut rounds), median(&mut pages), median(&mut bytes));
                let transport = if tls { "mutual TLS" } else { "plain" };
                println!(
                    "| {name} | {transport} | {connections} | {} | {} | {r:.0} | {p:.0} | {:.1} | {:.0} |",
                    spread(&mut totals),
                    spread(&mut downs),
                    b / (1u64 << 20) as f64,
                    p / r.max(1.0),
                );
            }
        }
    }
    println!();
}

/// One migration of a fresh VM `name` (1 GiB, `cmdline`) from `src` with the migrate
/// request `body`; the VM is then killed on `dst`. (total ms, downtime ms, rounds,
/// pages sent, bytes sent), as the source vireod's record gives them.
fn vireod_migrate_once(
    src: &VireodHost,
    dst: &VireodHost,
    name: &str,
    cmdline: &str,
    body: &serde_json::Value,
) -> [f64; 5] {
    let def = serde_json::json!({
        "config": {
            "payload": {"kernel": guest(), "cmdline": cmdline},
            "memory": {"size": 1u64 << 30},
        },
        "priority": "Medium",
    });
    src.ok("PUT", &format!("vms/{name}"), Some(&def));
    src.ok("PUT", &format!("vms/{name}/start"), None);
    src.wait_state(name, "Running", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1000)); // let the workload warm up
    let rec = src.ok("PUT", &format!("vms/{name}/migrate"), Some(body));
    let id = rec["id"].as_str().expect("a migration id");
    let done = src.wait_migration(id, Duration::from_secs(300));
    assert_eq!(
        done["state"],
        "completed",
        "{done}\nsource:\n{}\ndestination:\n{}",
        src.log(),
        dst.log()
    );
    // Every stream crossed the source's gateway: the protocol's and one per page stream.
    let streams = match body["connections"].as_u64().unwrap_or(1) {
        1 => 1,
        n => n + 1,
    };
    assert_eq!(done["streams"].as_u64(), Some(streams), "{done}");
    let _ = dst.api("PUT", &format!("vms/{name}/kill"), None);
    let p = &done["progress"];
    let f = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
    [
        f("total_ms"),
        f("downtime_ms"),
        f("rounds"),
        f("pages_sent"),
        f("bytes_sent"),
    ]
}

/// Live migration between two vireods: over HTTPS (host certificates from `vireoctl
/// pki`, mutual TLS between the vireods and between the VMMs, the default between
/// hosts) vs two vireods of this host (unix socket) whose VMMs speak `insecure` TCP.
fn vireod_transport_table(rounds: usize) {
    use vireo_e2e::vireod_host::Pki;
    println!("### Live migration between two vireods: HTTPS + mutual TLS vs insecure TCP, 1 GiB guest, 1 vCPU\n");
    println!("Two vireods on this host. `https`: host-a → host-b over the HTTPS peer listener (host certificates from `vireoctl pki`), the migration stream mutual TLS spoken by the vireods' gateways (the VMMs send and receive on unix sockets in their run directories). `insecure`: a same-host pair (`--peer-socket`), `receiver_url` tcp:127.0.0.1, in clear through the same gateways (a peer over HTTPS cannot ask for it). Total and downtime from the source vireod's migration record, min / median / max of {rounds} rounds; counters as medians.\n");
    println!("| guest | between the vireods | VMM stream | page streams | total ms (min / median / max) | downtime ms (min / median / max) | rounds | pages sent | MiB sent |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let pki = Pki::new();
    let (a, b) = (pki.host("host-a"), pki.host("host-b"));
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let mut dst_args = b.args();
    dst_args.extend([
        "--listen".into(),
        addr.clone(),
        "--peer".into(),
        "host-a".into(),
    ]);
    let https_dst = VireodHost::start(&dst_args);
    let start = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no peer listener:\n{}",
            https_dst.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let https_src = VireodHost::start(&a.args());
    let local_dst = VireodHost::start(&[]);
    let local_src = VireodHost::start(&[
        "--peer-socket".into(),
        local_dst.socket.display().to_string(),
    ]);
    let cases = [
        ("idle (test=counter)", "test=counter period_ms=1"),
        (
            "dirtying a 128 MiB hot set at full speed (test=dirty pages=32768)",
            "test=dirty pages=32768 report_ms=5",
        ),
    ];
    for (c, (guest_name, cmdline)) in cases.iter().enumerate() {
        for (connections, https) in [(1, true), (1, false), (4, true), (4, false)] {
            let mut runs: Vec<[f64; 5]> = Vec::new();
            for r in 0..rounds {
                let name = format!("b{c}{}{connections}{r}", if https { "t" } else { "p" });
                let (src, dst, mut body) = if https {
                    (
                        &https_src,
                        &https_dst,
                        serde_json::json!({"destination_agent": format!("https://{addr}"),
                            "destination_name": "host-b"}),
                    )
                } else {
                    let port = std::net::TcpListener::bind("127.0.0.1:0")
                        .and_then(|l| l.local_addr())
                        .map(|a| a.port())
                        .expect("a free port");
                    (
                        &local_src,
                        &local_dst,
                        serde_json::json!({"destination_agent": local_dst.socket,
                            "receiver_url": format!("tcp:127.0.0.1:{port}"), "insecure": true}),
                    )
                };
                body["connections"] = connections.into();
                runs.push(vireod_migrate_once(src, dst, &name, cmdline, &body));
            }
            let col = |i: usize| runs.iter().map(|r| r[i]).collect::<Vec<f64>>();
            let median = |mut v: Vec<f64>| {
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            };
            let (between, stream) = if https {
                ("HTTPS (mutual TLS)", "mutual TLS")
            } else {
                ("unix socket", "insecure TCP")
            };
            println!(
                "| {guest_name} | {between} | {stream} | {connections} | {} | {} | {:.0} | {:.0} | {:.1} |",
                spread(&mut col(0)),
                spread(&mut col(1)),
                median(col(2)),
                median(col(3)),
                median(col(4)) / (1u64 << 20) as f64,
            );
        }
    }
    println!();
}

/// (worst write latency in ms, writes/s) of `work iter=` lines between two marks.
fn work_stats(serial: &str, from: u64, to: u64) -> (f64, f64) {
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

fn last_work_iter(serial: &str) -> u64 {
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

fn wait_for_iter(serial: &Path, n: u64) {
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
fn storage_migration_table() {
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

/// `bench net-tx frames=.. fps=.. mbps=..` → (fps, MB/s) per phase.
fn net_bench_lines(serial: &str) -> Vec<(String, f64, f64)> {
    serial
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("bench net-")?;
            let mut it = rest.split_whitespace();
            let phase = it.next()?.to_string();
            let (mut fps, mut mbps) = (None, None);
            for kv in it {
                if let Some(v) = kv.strip_prefix("fps=") {
                    fps = v.parse().ok();
                }
                if let Some(v) = kv.strip_prefix("mbps=") {
                    mbps = v.parse().ok();
                }
            }
            Some((phase, fps?, mbps?))
        })
        .collect()
}

/// (frames/s, MB/s) of the transmit and the receive phase of one net-bench run.
type NetRun = [(f64, f64); 2];

/// One `test=net-bench` run on tap `tap` of `ns` while a thread floods the tap with
/// frames for the guest: [(tx fps, tx MB/s), (rx fps, rx MB/s)].
fn net_bench_once(
    vmm: Vmm,
    ns: &vireo_e2e::netns::NetNs,
    tap: &str,
    len: usize,
) -> [(f64, f64); 2] {
    use std::sync::atomic::{AtomicBool, Ordering};
    use vireo_e2e::netframe;
    const MAC: &str = "52:54:00:12:34:56";
    let cmdline = format!("test=net-bench ms=2000 len={len}");
    let mut cmd = vmm.command(&cmdline, 256, None);
    match vmm {
        Vmm::Vireo => cmd.args(["--net", &format!("tap={tap},mac={MAC}")]),
        Vmm::Qemu => cmd
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            ])
            .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={MAC}")]),
    };
    ns.enter_on_exec(&mut cmd);
    let sock = vireo_e2e::netns::PacketSocket::open(ns, tap, netframe::ETHERTYPE);
    let stop = AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            let mut f = vec![0u8; len];
            netframe::fill(
                &mut f,
                [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                [0x52, 0x54, 0, 0, 0, 0xfe],
                2,
                0,
            );
            while !stop.load(Ordering::Relaxed) {
                if !sock.try_send(&f) {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        });
        let out = cmd.stderr(Stdio::null()).output().expect("run net-bench");
        stop.store(true, Ordering::Relaxed);
        out
    });
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    let lines = net_bench_lines(&s);
    let get = |phase: &str| {
        lines
            .iter()
            .find(|l| l.0 == phase)
            .map(|l| (l.1, l.2))
            .unwrap_or_else(|| panic!("{}: no {phase} line:\n{s}", vmm.name()))
    };
    [get("tx"), get("rx")]
}

fn net_table() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!(
            "### In-guest virtio-net: skipped (needs root for a network namespace and a tap)\n"
        );
        return;
    }
    let ns = vireo_e2e::netns::NetNs::new("bench-net");
    ns.add_tap("vbench0");
    println!("### In-guest virtio-net on a tap (test=net-bench, 2 s per phase, virtio-drivers' VirtIONet: one frame in flight on transmit, 16 receive buffers; the host floods the tap from one thread during the run; median of 3 runs, VMMs alternating)\n");
    println!("| VMM | frame | tx frames/s | tx MB/s | rx frames/s | rx MB/s |");
    println!("|---|---|---|---|---|---|");
    for len in [1514usize, 60] {
        let mut runs: Vec<Vec<NetRun>> = vec![Vec::new(), Vec::new()];
        for _ in 0..3 {
            for (i, vmm) in [Vmm::Vireo, Vmm::Qemu].into_iter().enumerate() {
                runs[i].push(net_bench_once(vmm, &ns, "vbench0", len));
            }
        }
        for (i, vmm) in [Vmm::Vireo, Vmm::Qemu].into_iter().enumerate() {
            let med = |f: &dyn Fn(&NetRun) -> f64| {
                let mut v: Vec<f64> = runs[i].iter().map(f).collect();
                percentile(&mut v, 0.5)
            };
            println!(
                "| {} | {len} B | {:.0} | {:.1} | {:.0} | {:.1} |",
                vmm.name(),
                med(&|r| r[0].0),
                med(&|r| r[0].1),
                med(&|r| r[1].0),
                med(&|r| r[1].1)
            );
        }
    }
    println!();
}

/// The VMM's figures, side by side with QEMU microvm, as markdown tables for
/// docs/benchmarks.md (build the workspace binaries first).
#[derive(Parser)]
#[command(name = "vireo-bench")]
struct Cli {
    /// Runs per measurement.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Leave out the virtio-blk table.
    #[arg(long)]
    skip_blk: bool,
    /// Run one part only.
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// Rounds of each vireod↔vireod migration case (min / median / max over them).
    #[arg(long, default_value_t = TRANSPORT_ROUNDS)]
    transport_rounds: usize,
    /// Rounds (30 s windows) of `--only replica-rpo` and of each setting of `--only replica-history`.
    #[arg(long, default_value_t = 3)]
    rpo_rounds: usize,
    /// Node agents of `--only cluster-scale`.
    #[arg(long, default_value_t = 64)]
    cluster_nodes: usize,
    /// Clustered VMs of `--only cluster-scale`.
    #[arg(long, default_value_t = 4000)]
    cluster_vms: usize,
    /// Failover rounds and drain rounds of `--only cluster-scale` (each).
    #[arg(long, default_value_t = 3)]
    cluster_rounds: usize,
    /// Reads of every VM record in `--only cluster-scale`'s list figure.
    #[arg(long, default_value_t = 200)]
    cluster_lists: usize,
    /// Host losses of `--only cluster-failover`.
    #[arg(long, default_value_t = 25)]
    failover_rounds: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Boot,
    Memory,
    Blk,
    Migration,
    Storage,
    MigrationTransport,
    VireodTransport,
    Net,
    LargeMemory,
    SmpBoot,
    Balloon,
    ReplicaRpo,
    ReplicaHistory,
    ClusterScale,
    ClusterFailover,
}

fn main() {
    let cli = Cli::parse();
    let runs = cli.runs;
    let want = |part: Part| cli.only.is_none_or(|o| o == part);
    println!("## vireo VMM (generated by `vireo-bench`)\n");
    if want(Part::Boot) {
        boot_table(runs);
    }
    if want(Part::Memory) {
        memory_table();
    }
    if want(Part::Blk) && !cli.skip_blk {
        blk::table();
    }
    if want(Part::Migration) {
        migration_table();
    }
    if want(Part::Storage) {
        storage_migration_table();
    }
    if want(Part::MigrationTransport) {
        migration_transport_table();
    }
    if want(Part::MigrationTransport) || cli.only == Some(Part::VireodTransport) {
        vireod_transport_table(cli.transport_rounds.max(1));
    }
    if want(Part::Net) {
        net_table();
    }
    if want(Part::LargeMemory) {
        large_memory::table(runs.min(5));
    }
    if want(Part::SmpBoot) {
        smp_boot::table(runs.min(10));
    }
    if want(Part::Balloon) {
        balloon::table(runs.min(5));
    }
    if cli.only == Some(Part::ReplicaRpo) {
        replica_rpo::table(cli.rpo_rounds.max(1));
    }
    if cli.only == Some(Part::ReplicaHistory) {
        replica_history::table(cli.rpo_rounds.max(1));
    }
    if cli.only == Some(Part::ClusterScale) {
        cluster_scale::table(&cluster_scale::Options {
            nodes: cli.cluster_nodes.max(2),
            vms: cli.cluster_vms.max(1),
            rounds: cli.cluster_rounds.max(1),
            lists: cli.cluster_lists.max(1),
        });
    }
    if cli.only == Some(Part::ClusterFailover) {
        cluster_failover::table(cli.failover_rounds.max(1));
    }
}
