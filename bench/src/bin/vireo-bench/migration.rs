//! Live migration on one host, Vireo beside QEMU (`--only migration`), and over TCP
//! loopback with TLS and parallel streams, through the VMM and through vireod
//! (`--only migration-transport`, `--only vireod-transport`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::qmp::Qmp;
use super::Vmm;
use vireo_e2e::vireod_host::VireodHost;
use vireo_e2e::{bin, guest};

/// The guest's own view of the downtime: the longest gap between consecutive
/// `tick`/`dirty pass` TSC stamps across the source's and the destination's serial
/// output, in ms ("-" when the guest prints no TSC-stamped lines).
pub(crate) fn guest_gap(d: &Path) -> String {
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
pub(crate) fn warm_up(serial: &Path, cmdline: &str) {
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
pub(crate) fn migrate_once(
    vmm: Vmm,
    cmdline: &str,
    mem_mib: u32,
    auto_converge: bool,
) -> (f64, f64, String) {
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

pub(crate) fn migration_table() {
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
pub(crate) const TRANSPORT_ROUNDS: usize = 5;

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
pub(crate) fn spread(v: &mut [f64]) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!(
        "{:.1} / {:.1} / {:.1}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

/// Live migration over TCP loopback: plain or mutual TLS, one or four page streams.
pub(crate) fn migration_transport_table() {
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
pub(crate) fn vireod_transport_table(rounds: usize) {
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
