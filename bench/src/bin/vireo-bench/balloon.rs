//! Balloon (issue 16): how fast memory the guest gives back reaches the host. A 2 GiB
//! guest touches 1 GiB (`test=balloon touch_mib=1024`); the host asks for a 1 GiB
//! balloon and times it until the guest reports the balloon full, then deflates it
//! again. Vireo (`vm.resize`) and QEMU microvm with virtio-balloon-pci (QMP `balloon`),
//! the same guest driver (`--only balloon`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::qmp::Qmp;
use crate::{percentile, Vmm};

const GUEST_MIB: u32 = 2048;
const BALLOON_MIB: u64 = 1024;
const PAGES: u64 = BALLOON_MIB << 8;

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .unwrap_or(f64::NAN)
        / 1024.0
}

/// Serial lines of `child` on a channel.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

fn wait_for(rx: &mpsc::Receiver<String>, prefix: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return Ok(()),
            Ok(l) if l.contains("result fail") => return Err(l),
            Ok(_) => {}
            Err(_) => return Err(format!("no {prefix:?}")),
        }
    }
}

/// One run: (inflate ms, MiB/s returned, RSS drop MiB, deflate ms).
fn once(vmm: Vmm, dir: &Path) -> Result<(f64, f64, f64, f64), String> {
    let sock = dir.join(format!("{}.sock", vmm.name().replace(' ', "-")));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = vmm.command("test=balloon touch_mib=1024", GUEST_MIB, None);
    match vmm {
        Vmm::Vireo => cmd
            .args(["--balloon", "size=0,stats_interval=0"])
            .arg("--api-socket")
            .arg(&sock),
        Vmm::Qemu => cmd
            .args(["-device", "virtio-balloon-pci,id=b0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display())),
    };
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let rx = lines_of(&mut child);
    let result = (|| {
        wait_for(&rx, "balloon actual=0 target=0")?;
        let pid = child.id();
        let before = rss_mib(pid);
        let mut qmp = match vmm {
            Vmm::Qemu => Some(Qmp::connect(&sock)),
            Vmm::Vireo => None,
        };
        let mut set = |balloon_mib: u64| match &mut qmp {
            // QEMU's value is the guest's memory size once ballooned.
            Some(q) => {
                q.cmd(&format!(
                    r#"{{"execute":"balloon","arguments":{{"value":{}}}}}"#,
                    (u64::from(GUEST_MIB) - balloon_mib) << 20
                ));
            }
            None => {
                let (s, b) = vireo_e2e::api(
                    &sock,
                    "PUT",
                    "vm.resize",
                    Some(&format!(r#"{{"desired_balloon":{}}}"#, balloon_mib << 20)),
                );
                assert_eq!(s, 204, "{b}");
            }
        };
        let t0 = Instant::now();
        set(BALLOON_MIB);
        wait_for(&rx, &format!("balloon actual={PAGES} "))?;
        let inflate = t0.elapsed().as_secs_f64();
        let after = rss_mib(pid);
        let t1 = Instant::now();
        set(0);
        wait_for(&rx, "balloon actual=0 ")?;
        let deflate = t1.elapsed().as_secs_f64();
        Ok((
            inflate * 1e3,
            BALLOON_MIB as f64 / inflate,
            before - after,
            deflate * 1e3,
        ))
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn spread(v: &mut [f64]) -> String {
    format!(
        "{:.0} / {:.0} / {:.0}",
        percentile(v, 0.0),
        percentile(v, 0.5),
        percentile(v, 1.0)
    )
}

pub fn table(runs: usize) {
    println!(
        "### Balloon: {BALLOON_MIB} MiB inflated in a {GUEST_MIB} MiB guest that touched 1 GiB\n"
    );
    println!("The test guest's own balloon driver (`test=balloon touch_mib=1024`, 256 PFNs per inflate buffer, one buffer in flight, polls the target every 2 ms), Vireo through `vm.resize`, QEMU microvm with virtio-balloon-pci through QMP `balloon`. Inflate: from the request to the guest reporting the balloon full; MiB/s = {BALLOON_MIB} MiB / that time; RSS drop: the VMM's VmRSS before minus after. min / median / max of {runs} runs.\n");
    println!("| VMM | inflate ms | MiB/s returned | RSS drop (MiB) | deflate ms |");
    println!("|---|---|---|---|---|");
    let dir = tempfile::tempdir().expect("tempdir");
    for vmm in [Vmm::Vireo, Vmm::Qemu] {
        let (mut inf, mut rate, mut drop, mut def) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            match once(vmm, dir.path()) {
                Ok((a, b, c, d)) => {
                    inf.push(a);
                    rate.push(b);
                    drop.push(c);
                    def.push(d);
                }
                Err(e) => eprintln!("{}: {e}", vmm.name()),
            }
        }
        if inf.is_empty() {
            println!("| {} | did not run | | | |", vmm.name());
            continue;
        }
        println!(
            "| {} | {} | {} | {} | {} |",
            vmm.name(),
            spread(&mut inf),
            spread(&mut rate),
            spread(&mut drop),
            spread(&mut def)
        );
    }
    println!();
}
