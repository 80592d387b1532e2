//! Large guests (issue 16): what a 1 TiB guest that touched 768 MiB costs the host and
//! its migration, against a 1 GiB guest that touched the same, Vireo and QEMU microvm
//! side by side (`--only large-memory`).
//!
//! Both guests run `test=touch mib=768`: 196,608 pages backed, spread a page every
//! ~5.3 MiB over the 1 TiB guest's RAM above 4 GiB, contiguous in the 1 GiB guest's heap.

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use crate::migration::{migrate_once, spread};
use crate::Vmm;

const TOUCHED_MIB: u64 = 768;
const SIZES_MIB: [u32; 2] = [1024, 1 << 20];

/// (total RSS, RSS of guest RAM) of `pid` in KiB: guest RAM is every mapping of at
/// least 512 MiB (both VMMs map it in one or two such regions; nothing else is that big).
fn rss_of(pid: u32) -> (u64, u64) {
    crate::smaps_rss(pid, |size| size >= 512 << 20)
}

/// One boot to the third tick: (total, guest RAM) RSS in MiB, or why it did not run.
fn overhead_once(vmm: Vmm, mem_mib: u32) -> Result<(f64, f64), String> {
    let mut child = vmm
        .command(
            &format!("test=touch mib={TOUCHED_MIB} period_ms=50"),
            mem_mib,
            None,
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut buf = [0u8; 256];
    let mut seen = String::new();
    while !seen.contains("tick 3 ") {
        let n = out.read(&mut buf).unwrap_or(0);
        if n == 0 {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            let _ = child.wait();
            return Err(err.lines().last().unwrap_or("exited").to_string());
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let (total, guest) = rss_of(child.id());
    let _ = child.kill();
    let _ = child.wait();
    Ok((total as f64 / 1024.0, guest as f64 / 1024.0))
}

fn size_name(mem_mib: u32) -> String {
    if mem_mib >= 1 << 20 {
        format!("{} TiB", mem_mib >> 20)
    } else {
        format!("{} GiB", mem_mib >> 10)
    }
}

pub fn table(runs: usize) {
    println!("### Large guests: a 1 TiB guest that touched {TOUCHED_MIB} MiB vs a 1 GiB guest that touched the same\n");
    println!("VMM overhead = process RSS minus the RSS of guest RAM (mappings of ≥ 512 MiB), at the guest's third tick after touching. min / median / max of {runs} boots. Vireo's 1 TiB guest carries a 32 MiB dirty bitmap (1 bit per 4 KiB page, for device writes during migration).\n");
    println!("| VMM | guest | total RSS (MiB) | guest RAM RSS (MiB) | overhead (MiB) |");
    println!("|---|---|---|---|---|");
    let mut cannot_run = Vec::new();
    for vmm in [Vmm::Vireo, Vmm::Qemu] {
        for mem in SIZES_MIB {
            let mut total = Vec::new();
            let mut guest = Vec::new();
            let mut over = Vec::new();
            let mut failed = None;
            for _ in 0..runs {
                match overhead_once(vmm, mem) {
                    Ok((t, g)) => {
                        total.push(t);
                        guest.push(g);
                        over.push(t - g);
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                Some(e) => {
                    println!(
                        "| {} | {} | did not run: {e} | | |",
                        vmm.name(),
                        size_name(mem)
                    );
                    cannot_run.push((vmm.name(), mem));
                }
                None => println!(
                    "| {} | {} | {} | {} | {} |",
                    vmm.name(),
                    size_name(mem),
                    spread(&mut total),
                    spread(&mut guest),
                    spread(&mut over)
                ),
            }
        }
    }
    println!("\nGoal: Vireo's overhead for the 1 TiB guest ≤ 5 MiB + its bitmaps.\n");

    println!("### Live migration of the same guests (unix socket, 1 vCPU)\n");
    println!("min / median / max of {runs} migrations; Vireo's figures from its log, QEMU's from `query-migrate` (cancelled after 60 s).\n");
    println!("| VMM | guest | total (ms) | downtime (ms) | rounds / dirty syncs of the last run |");
    println!("|---|---|---|---|---|");
    for vmm in [Vmm::Vireo, Vmm::Qemu] {
        let mut medians = Vec::new();
        for mem in SIZES_MIB {
            if cannot_run.contains(&(vmm.name(), mem)) {
                println!(
                    "| {} | {} | did not run (above) | | |",
                    vmm.name(),
                    size_name(mem)
                );
                continue;
            }
            let mut total = Vec::new();
            let mut down = Vec::new();
            let mut last = String::new();
            for _ in 0..runs {
                let (t, d, r) = migrate_once(
                    vmm,
                    &format!("test=touch mib={TOUCHED_MIB} period_ms=1"),
                    mem,
                    false,
                );
                total.push(t);
                down.push(d);
                last = r;
                std::thread::sleep(Duration::from_millis(200));
            }
            medians.push(crate::percentile(&mut total, 0.5));
            let t = spread(&mut total);
            println!(
                "| {} | {} | {t} | {} | {last} |",
                vmm.name(),
                size_name(mem),
                spread(&mut down)
            );
        }
        if let [small, large] = medians[..] {
            println!(
                "| {} | 1 TiB / 1 GiB | {:.2}x | | |",
                vmm.name(),
                large / small
            );
        }
    }
    println!("\nGoal: Vireo's 1 TiB migration within 1.2x of the 1 GiB one (cost follows touched memory).\n");
}
