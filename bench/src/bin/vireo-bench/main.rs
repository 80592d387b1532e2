//! `vireo-bench`: the VMM's figures, side by side with QEMU microvm in one run.
//!
//! 1. exec → first guest serial byte, and exec → guest power-off (`test=boot`).
//! 2. VMM memory overhead: process RSS minus the RSS of guest RAM.
//! 3. In-guest virtio-blk (`test=blk-bench`, queue depth 1 and 32): 4K random read/write IOPS
//!    and 1 MiB sequential MB/s on raw and on dynamic VHDX images, with what a request
//!    costs per stage (`blk.rs`; alone: `--only blk`).
//!
//! 4. Live migration on one host: total time and downtime, idle and dirtying guests
//!    (`migration.rs`; QEMU through `qmp.rs`).
//!
//! 5. Live storage migration of a 4 GiB disk under a guest write load (vs drive-mirror;
//!    `storage.rs`).
//!
//! 6. Live migration over TCP: plain vs mutual TLS, one vs four page streams (Vireo;
//!    `migration.rs`).
//!
//! 7. In-guest virtio-net on a tap (`test=net-bench`, root): frames/s and MB/s out and in
//!    (`net.rs`).
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
use std::time::Instant;

use clap::{Parser, ValueEnum};

mod balloon;
mod blk;
mod cluster_failover;
mod cluster_scale;
mod large_memory;
mod migration;
mod net;
mod qmp;
mod replica_history;
mod replica_rpo;
mod smp_boot;
mod storage;
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

/// (anonymous KiB outside the guest RAM mapping(s) of `pid` — heap, stacks,
/// copied-on-write data: what this VMM has to itself —, KiB of its page tables (VmPTE)).
fn own_memory_kib(pid: u32, guest_bytes: u64) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let kib = |v: &str| -> u64 { v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0) };
    let (mut own, mut in_guest) = (0u64, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let mut it = first.split('-');
            let a = u64::from_str_radix(it.next().unwrap_or("0"), 16).unwrap_or(0);
            let b = u64::from_str_radix(it.next().unwrap_or("0"), 16).unwrap_or(0);
            let size = b.saturating_sub(a);
            in_guest = size >= guest_bytes && size < guest_bytes + (64 << 20);
        } else if let Some(v) = line.strip_prefix("Anonymous:") {
            if !in_guest {
                own += kib(v);
            }
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let pte = status
        .lines()
        .find_map(|l| l.strip_prefix("VmPTE:"))
        .map_or(0, kib);
    (own, pte)
}

fn memory_table() {
    println!("### VMM memory overhead (test=counter, 512 MiB guest, 1 vCPU, no disk)\n");
    println!("Overhead: RSS less guest RAM. Of it, the file pages (the binary's code and read-only data, the libraries) are the page cache's, one copy shared by every VMM of the host; the anonymous memory outside guest RAM (heap, stacks, copied-on-write data) and the page tables are each VM's own.\n");
    println!("| VMM | total RSS (MiB) | guest RAM RSS (MiB) | overhead (MiB) | of it file pages (MiB) | the VM's own: anonymous + page tables (MiB) |");
    println!("|---|---|---|---|---|---|");
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
        let (anon, pte) = own_memory_kib(child.id(), 512 << 20);
        let _ = child.kill();
        let _ = child.wait();
        let overhead = total - guest;
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            vmm.name(),
            total as f64 / 1024.0,
            guest as f64 / 1024.0,
            overhead as f64 / 1024.0,
            overhead.saturating_sub(anon) as f64 / 1024.0,
            (anon + pte) as f64 / 1024.0
        );
    }
    println!("\nGoal: Vireo's overhead ≤ 3 MiB for the dist build (what a host runs).\n");
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
    #[arg(long, default_value_t = migration::TRANSPORT_ROUNDS)]
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
        migration::migration_table();
    }
    if want(Part::Storage) {
        storage::storage_migration_table();
    }
    if want(Part::MigrationTransport) {
        migration::migration_transport_table();
    }
    if want(Part::MigrationTransport) || cli.only == Some(Part::VireodTransport) {
        migration::vireod_transport_table(cli.transport_rounds.max(1));
    }
    if want(Part::Net) {
        net::net_table();
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
