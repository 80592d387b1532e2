//! `--only replica-rpo`: Vireo Replica's recovery point objective over a slow, distant
//! link (issue 14's figure): a primary and a replica vireod in two network
//! namespaces joined by a veth pair limited to 100 Mbit/s each way (`tc tbf`), with
//! 50 ms added each way by a userspace delay proxy in this process (no netem on this
//! host: the proxy listens in the primary's namespace and forwards every chunk to the
//! replica's peer listener 50 ms after it read it, both directions). The guest writes
//! 4 MiB/s of 4 KiB blocks at pseudo-random places of a 256 MiB raw disk
//! (`test=replica-writer rate=1024 random`) and prints each completed write
//! (`rw n=N us=L`); replication runs with `--interval 1s`.
//!
//! RPO of a write: from the moment its serial line is read here (within 5 ms of the
//! guest's print) to the moment the primary learned the replica committed (verified,
//! synced) the first recovery point whose cut was asked for after that moment
//! (`last_point_cut_at_ms`, `last_point_at_ms` of `GET .../replication`). Counting
//! from the cut request is conservative: a write that completed during the cut may be
//! in the earlier point too.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use vireo_e2e::netns::NetNs;
use vireo_e2e::vireod_host::{Pki, VireodHost};

const A_IP: &str = "10.78.0.1";
const B_IP: &str = "10.78.0.2";
const PEER: &str = "10.78.0.2:7443";
const PROXY: &str = "10.78.0.1:7444";
const DELAY: Duration = Duration::from_millis(50);
const RATE: &str = "100mbit";
/// Writes per second of 4 KiB: 4 MiB/s.
const WRITES_PER_S: u64 = 1024;
const BLOCKS: u64 = 65536;
const WINDOW: Duration = Duration::from_secs(30);
const WARM_UP: Duration = Duration::from_secs(20);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn run(args: &[&str]) {
    let o = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run");
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Copies `from` to `to`, each chunk written `DELAY` after it was read.
fn delayed_pump(mut from: TcpStream, mut to: TcpStream) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (due, data) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((Instant::now() + DELAY, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// The delay proxy: listens on `PROXY` in `ns` and forwards to `PEER`.
fn start_proxy(ns: Arc<NetNs>) {
    let listener = ns.run(|| TcpListener::bind(PROXY).expect("bind the delay proxy"));
    std::thread::spawn(move || {
        ns.run(|| {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(PEER) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || delayed_pump(client, server));
                std::thread::spawn(move || delayed_pump(s2, c2));
            }
        })
    });
}

/// A writer line seen on the serial console: (n, ms when read, write latency µs).
pub(crate) type Line = (u64, u64, u64);

/// Tails VM `name`'s serial file every 5 ms, stamping each complete `rw n=` line.
pub(crate) fn tail(path: std::path::PathBuf) -> Arc<Mutex<Vec<Line>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let out = lines.clone();
    std::thread::spawn(move || {
        let mut off = 0u64;
        let mut partial = String::new();
        loop {
            std::thread::sleep(Duration::from_millis(5));
            let Ok(mut f) = std::fs::File::open(&path) else {
                continue;
            };
            if f.seek(SeekFrom::Start(off)).is_err() {
                continue;
            }
            let mut buf = Vec::new();
            let Ok(n) = f.read_to_end(&mut buf) else {
                continue;
            };
            off += n as u64;
            let at = now_ms();
            partial.push_str(&String::from_utf8_lossy(&buf));
            let mut got = Vec::new();
            while let Some(i) = partial.find('\n') {
                let line: String = partial.drain(..=i).collect();
                let mut n = None;
                let mut us = None;
                for w in line.split_whitespace() {
                    if let Some(v) = w.strip_prefix("n=") {
                        n = v.parse().ok();
                    } else if let Some(v) = w.strip_prefix("us=") {
                        us = v.parse().ok();
                    }
                }
                if let (true, Some(n), Some(us)) = (line.starts_with("rw n="), n, us) {
                    got.push((n, at, us));
                }
            }
            out.lock().unwrap().extend(got);
        }
    });
    lines
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub(crate) fn define(host: &VireodHost, name: &str, replicated: bool) -> std::path::PathBuf {
    let dir = host.dir.path().join(format!("disks-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("d0.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(BLOCKS * 4096)
        .unwrap();
    let mut disk = json!({"path": img, "format": "raw"});
    if replicated {
        disk["replica_log"] = json!(dir.join("d0.rlog"));
    }
    let def = json!({
        "config": {
            "payload": {
                "kernel": vireo_e2e::guest(),
                "cmdline": format!("test=replica-writer disks=1 blocks={BLOCKS} rate={WRITES_PER_S} random"),
            },
            "memory": {"size": 32u64 << 20},
            "disks": [disk],
        },
        "restart": "never",
    });
    host.ok("PUT", &format!("vms/{name}"), Some(&def));
    host.ok("PUT", &format!("vms/{name}/start"), None);
    host.serial_path(name)
}

/// The guest's write latencies over `window` (µs), once it has written for a second.
fn latencies(lines: &Arc<Mutex<Vec<Line>>>, window: Duration) -> Vec<u64> {
    std::thread::sleep(Duration::from_secs(1));
    let from = now_ms();
    std::thread::sleep(window);
    let to = now_ms();
    lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.1 >= from && l.1 < to)
        .map(|l| l.2)
        .collect()
}

pub fn table(rounds: usize) {
    if !vireo_e2e::netns::is_root() {
        println!("replica-rpo: needs root (network namespaces, tc); skipped\n");
        return;
    }
    let ns_a = Arc::new(NetNs::new("rpoa"));
    let ns_b = Arc::new(NetNs::new("rpob"));
    run(&[
        "ip",
        "link",
        "add",
        "va",
        "netns",
        ns_a.name(),
        "type",
        "veth",
        "peer",
        "name",
        "vb",
        "netns",
        ns_b.name(),
    ]);
    for (ns, dev, ip) in [(&ns_a, "va", A_IP), (&ns_b, "vb", B_IP)] {
        ns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", dev]);
        ns.exec(&["ip", "link", "set", dev, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&[
            "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", RATE, "burst", "64kb",
            "latency", "200ms",
        ]);
    }
    let pki = Pki::new();
    let b_id = pki.host("host-b");
    let a_id = pki.host("host-a");
    let replicas = tempfile::Builder::new().prefix("rpo").tempdir().unwrap();
    let mut b_args = b_id.args();
    b_args.extend(
        [
            "--listen",
            PEER,
            "--peer",
            "host-a",
            "--replica-allow",
            "host-a",
            "--replica-dir",
        ]
        .map(String::from),
    );
    b_args.push(replicas.path().join("r").display().to_string());
    let b = VireodHost::start_in(Some(&ns_b), &b_args);
    let a = VireodHost::start_in(Some(&ns_a), &a_id.args());
    start_proxy(ns_a.clone());

    // Replication off: the guest's write latency on a disk without a change log.
    let serial = define(&a, "plain", false);
    let plain = tail(serial);
    let mut off = latencies(&plain, WINDOW);
    a.ok("PUT", "vms/plain/kill", None);

    // Replication on.
    let serial = define(&a, "rpo", true);
    let lines = tail(serial);
    std::thread::sleep(Duration::from_secs(1));
    a.ok(
        "PUT",
        "vms/rpo/replication",
        Some(&json!({"to": PROXY, "server_name": "host-b", "interval_s": 1.0})),
    );
    let status = || a.ok("GET", "vms/rpo/replication", None);
    let start = Instant::now();
    while status()["last_point"].is_null() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no first point: {}\n{}",
            status(),
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Warm-up: the first rounds carry what the guest wrote during the initial copy.
    std::thread::sleep(WARM_UP);
    println!("### Vireo Replica: RPO over 100 Mbit/s with 50 ms each way (generated by `vireo-bench --only replica-rpo`)\n");
    println!(
        "The guest writes {WRITES_PER_S} random 4 KiB blocks/s (4 MiB/s) to a 256 MiB raw disk; `--interval 1s`; link: veth with `tc tbf rate {RATE}` both ways, 50 ms added each way by a userspace proxy (RTT ≥ 100 ms). RPO per write: serial line read → the primary hears the replica committed the first point cut after it. {} s per round after {} s of warm-up (the backlog of the initial copy); wire ÷ written: the bytes written to the replica's connections (TLS included) over the 4 KiB writes between the round's first and last points' cuts.\n",
        WINDOW.as_secs(),
        WARM_UP.as_secs()
    );
    println!("| round | writes | write rate /s | RPO p50 | RPO p99 | RPO max | points | wire ÷ written | wire MiB | segments | segment MiB | rounds (failed) | cut held p50 / max µs |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut on_lat = Vec::new();
    let mut all_rpo = Vec::new();
    for round in 1..=rounds {
        let s0 = status();
        let from = now_ms();
        let mut points: Vec<(u64, u64, u64)> = Vec::new(); // (id, cut_at, at)
        let mut last = s0["last_point"].as_u64();
        let mut held: Vec<u64> = Vec::new(); // the cuts' hold times seen (µs)
        let poll = |points: &mut Vec<(u64, u64, u64)>, last: &mut Option<u64>| {
            let v = status();
            let p = v["last_point"].as_u64();
            if p != *last {
                *last = p;
                if let (Some(id), Some(cut), Some(at)) = (
                    p,
                    v["last_point_cut_at_ms"].as_u64(),
                    v["last_point_at_ms"].as_u64(),
                ) {
                    points.push((id, cut, at));
                }
            }
            v
        };
        // Every 200 ms: each point (one a second) is seen, and the polling itself (a
        // request to vireod) stays a small load beside the guest being measured.
        while now_ms() < from + WINDOW.as_millis() as u64 {
            let before = last;
            let v = poll(&mut points, &mut last);
            if last != before {
                held.extend(v["last_cut_held_us"].as_u64());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let to = now_ms();
        // Until a point cut after the window's last write.
        let wait = Instant::now();
        while !points.iter().any(|p| p.1 >= to) && wait.elapsed() < Duration::from_secs(120) {
            poll(&mut points, &mut last);
            std::thread::sleep(Duration::from_millis(200));
        }
        let s1 = status();
        let window: Vec<Line> = lines
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|l| l.1 >= from && l.1 < to)
            .collect();
        let mut rpo: Vec<u64> = window
            .iter()
            .filter_map(|&(_, t, _)| points.iter().find(|p| p.1 >= t).map(|p| p.2 - t))
            .collect();
        let uncovered = window.len() - rpo.len();
        on_lat.extend(window.iter().map(|l| l.2));
        all_rpo.extend(rpo.iter().copied());
        let d = |k: &str| s1[k].as_u64().unwrap_or(0) - s0[k].as_u64().unwrap_or(0);
        // What the segments sent between s0 and s1 carry: the writes between their
        // points' cuts.
        let cut = |v: &Value| v["last_point_cut_at_ms"].as_u64().unwrap_or(0);
        let written = lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.1 >= cut(&s0) && l.1 < cut(&s1))
            .count() as u64
            * 4096;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "| {round} | {}{} | {:.0} | {:.2} s | {:.2} s | {:.2} s | {} | {:.3} | {:.1} | {} | {:.1} | {} ({}) | {} / {} |",
            window.len(),
            if uncovered > 0 { format!(" ({uncovered} in no point)") } else { String::new() },
            window.len() as f64 / ((to - from) as f64 / 1000.0),
            pct(&mut rpo, 0.5) as f64 / 1000.0,
            pct(&mut rpo, 0.99) as f64 / 1000.0,
            rpo.iter().max().copied().unwrap_or(0) as f64 / 1000.0,
            points.len(),
            d("wire_bytes_sent") as f64 / written.max(1) as f64,
            mib(d("wire_bytes_sent")),
            d("segments_sent"),
            mib(d("segment_bytes_sent")),
            d("rounds"),
            d("failed_rounds"),
            pct(&mut held, 0.5),
            held.iter().max().copied().unwrap_or(0),
        );
    }
    println!(
        "\nAll rounds: RPO p50 {:.2} s, p99 {:.2} s, max {:.2} s over {} writes.\n",
        pct(&mut all_rpo, 0.5) as f64 / 1000.0,
        pct(&mut all_rpo, 0.99) as f64 / 1000.0,
        all_rpo.iter().max().copied().unwrap_or(0) as f64 / 1000.0,
        all_rpo.len()
    );
    println!("Guest write latency (µs per 4 KiB write, the guest's TSC), replication off (no change log) vs on:\n");
    println!("| | writes | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    for (what, v) in [("off", &mut off), ("on", &mut on_lat)] {
        let max = v.iter().max().copied().unwrap_or(0);
        println!(
            "| {what} | {} | {} | {} | {max} |",
            v.len(),
            pct(v, 0.5),
            pct(v, 0.99)
        );
    }
    let p99_off = pct(&mut off, 0.99).max(1) as f64;
    let p99_on = pct(&mut on_lat, 0.99) as f64;
    println!(
        "\np99 cost of replication: {:+.1} % (goal ≤ 5 %).\n",
        (p99_on / p99_off - 1.0) * 100.0
    );
    let v: Value = status();
    println!("Final status: `{v}`\n");
    drop(a);
    drop(b);
}
