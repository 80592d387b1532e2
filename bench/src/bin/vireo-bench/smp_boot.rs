//! Many vCPUs (issue 16): exec → every application processor online, a 32-vCPU guest
//! (2 sockets x 8 cores x 2 threads), Vireo and QEMU microvm with the same test guest
//! (`test=smp`: INIT-SIPI-SIPI to all APs, each checks in at CPL3; `--only smp-boot`).

use std::io::Read;
use std::process::Stdio;
use std::time::Instant;

use crate::{percentile, Vmm};

const CPUS: u32 = 32;
const GUEST: &str = "test=smp rounds=1000";

/// One boot: (ms from exec to the guest's `smp online` line, ms from exec to exit, the
/// guest's own µs from its first INIT to the last AP online).
fn once(vmm: Vmm) -> Result<(f64, f64, f64), String> {
    let mut cmd = vmm.command(GUEST, 512, None);
    match vmm {
        Vmm::Vireo => cmd.args(["--cpus", &format!("boot={CPUS},topology=2:8:2")]),
        Vmm::Qemu => cmd.args(["-smp", &format!("{CPUS},sockets=2,cores=8,threads=2")]),
    };
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut seen = String::new();
    let mut online_ms = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = out.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        if online_ms.is_none() && seen.contains("smp online") {
            online_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let _ = child.wait();
    let exit_ms = t0.elapsed().as_secs_f64() * 1e3;
    if !seen.contains("vireo-guest: result ok") {
        return Err(seen.lines().last().unwrap_or("no output").to_string());
    }
    let guest_us = seen
        .lines()
        .find_map(|l| l.strip_prefix("smp online"))
        .and_then(|l| l.rsplit("us=").next()?.trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    Ok((online_ms.unwrap_or(f64::NAN), exit_ms, guest_us))
}

fn spread(v: &mut [f64]) -> String {
    format!(
        "{:.1} / {:.1} / {:.1}",
        percentile(v, 0.0),
        percentile(v, 0.5),
        percentile(v, 1.0)
    )
}

pub fn table(runs: usize) {
    println!("### {CPUS} vCPUs: exec → every AP online (2 sockets x 8 cores x 2 threads)\n");
    println!("Same test guest (`{GUEST}`), 512 MiB. exec → online: from spawning the VMM to the guest's `smp online` line on serial (VMM start, guest boot, INIT-SIPI-SIPI with the MP specification's 10 ms INIT wait, every AP in long mode at CPL3). Guest µs: the guest's own TSC from its first INIT to the last AP checking in. min / median / max of {runs} boots.\n");
    println!(
        "| VMM | exec → all APs online (ms) | exec → exit (ms) | guest: INIT → last AP (µs) |"
    );
    println!("|---|---|---|---|");
    let mut medians = Vec::new();
    for vmm in [Vmm::Vireo, Vmm::Qemu] {
        let (mut online, mut exit, mut guest) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            match once(vmm) {
                Ok((o, e, g)) => {
                    online.push(o);
                    exit.push(e);
                    guest.push(g);
                }
                Err(e) => eprintln!("{}: {e}", vmm.name()),
            }
        }
        if online.is_empty() {
            println!("| {} | did not run | | |", vmm.name());
            continue;
        }
        medians.push(percentile(&mut online, 0.5));
        println!(
            "| {} | {} | {} | {} |",
            vmm.name(),
            spread(&mut online),
            spread(&mut exit),
            spread(&mut guest)
        );
    }
    if let [ours, theirs] = medians[..] {
        println!(
            "\nVireo / QEMU, exec → all APs online (medians): {:.2} (goal ≤ 0.33).\n",
            ours / theirs
        );
    }
}
