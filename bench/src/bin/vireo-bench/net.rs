//! In-guest virtio-net on a tap (`--only net`, root): frames/s and MB/s out and in.

use std::process::Stdio;
use std::time::Duration;

use super::{percentile, Vmm};

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

pub(crate) fn net_table() {
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
