//! VMs on vireod's host switch (`vireod --switch lan`): a real vireod (root: jailed
//! VMMs), the real `vireo-switch` it runs and supervises, real VMMs booting the test
//! guest on vhost-user ports that vireod adds and removes.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{bin, Daemon, T};
use serde_json::{json, Value};

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    vireo_e2e::skip_or_fail_under_ci("vireod's switch test jails its VMMs: it needs root");
    false
}

fn start_vireod() -> Daemon {
    let sw = bin("vireo-switch");
    Daemon::start(&[
        "--no-autostart",
        "--switch",
        "lan",
        "--switch-bin",
        sw.to_str().unwrap(),
    ])
}

/// One request on the switch's control socket (this test runs as root, as vireod).
fn ctl(d: &Daemon, req: &str) -> Value {
    let control = d.run_dir.join("switches/lan/ctl.sock");
    let mut s = UnixStream::connect(&control)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", control.display(), d.log()));
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// The switch's ports: name → whether a VMM is connected.
fn ports(d: &Daemon) -> Vec<(String, bool)> {
    let v = ctl(d, r#"{"op":"ports"}"#);
    assert_eq!(v["ok"], true, "{v}");
    v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["connected"] == true,
            )
        })
        .collect()
}

fn counters(d: &Daemon, port: &str) -> Value {
    let v = ctl(d, &format!(r#"{{"op":"counters","port":"{port}"}}"#));
    assert_eq!(v["ok"], true, "{v}");
    v["counters"].clone()
}

fn wait_until(what: &str, d: &Daemon, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < T, "{what}\nvireod log:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /api/v1/switches`' one switch.
fn lan(d: &Daemon) -> Value {
    let v = d.ok("GET", "/api/v1/switches", None);
    assert_eq!(v[0]["name"], "lan", "{v}");
    v[0].clone()
}

/// A VM on switch `lan`, VLAN `vlan`, running the test guest's `test=net ARGS`.
fn define(d: &Daemon, name: &str, vlan: u16, mac: &str, args: &str) {
    let def = json!({
        "config": {
            "payload": {"kernel": vireo_e2e::guest(), "cmdline": format!("test=net {args}")},
            "memory": {"size": 64u64 << 20},
            "nets": [{"switch": "lan", "vlan": vlan, "mac": mac, "guard": "all"}],
        },
        "restart": "never",
    });
    d.ok(
        "PUT",
        &format!("/api/v1/vms/{name}"),
        Some(&def.to_string()),
    );
}

/// What a receiving guest reports for the stream a guest with `seed` and `src` sends.
fn guest_stream(seed: u64, n: u32, src: &str) -> String {
    use vireo_e2e::netframe;
    use vireo_e2e::pattern::Crc32;
    let mac: net::MacAddr = src.parse().unwrap();
    let mut crc = Crc32::new();
    let mut bytes = 0u64;
    for i in 0..n {
        let mut f = vec![0u8; netframe::frame_len(i, 1514)];
        netframe::fill(&mut f, netframe::BROADCAST, mac.bytes(), seed, i);
        crc.update(&f);
        bytes += f.len() as u64;
    }
    format!(
        "received={n} bytes={bytes} crc32={:08x} bad=0",
        crc.finish()
    )
}

/// The guest's complete serial line containing `prefix` (it writes byte by byte).
fn serial_line(d: &Daemon, name: &str, prefix: &str) -> String {
    let start = Instant::now();
    loop {
        let s = d.serial(name);
        if let Some(l) = s.split_inclusive('\n').find(|l| l.contains(prefix)) {
            if l.ends_with('\n') {
                return l.trim_end().to_string();
            }
        }
        assert!(
            start.elapsed() < T,
            "{name}: no {prefix:?} line on serial:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A on VLAN 10 sends to B on VLAN 10, byte for byte; C on VLAN 20 gets nothing. The
/// switch is SIGKILLed while A waits to receive: vireod starts it again and adds the
/// running VMs' ports, A's (jailed) VMM reconnects through its socket directory, and
/// a new VM's frames reach A byte for byte. A VM that stops loses its port.
#[test]
fn vms_on_a_vireod_switch_exchange_frames_and_survive_a_killed_switch() {
    if !as_root() {
        return;
    }
    let d = start_vireod();
    wait_until("the switch runs", &d, || lan(&d)["running"] == true);
    let first_pid = lan(&d)["pid"].as_i64().unwrap();
    let n = 20u32;
    let macs = [
        "52:54:00:00:50:0a",
        "52:54:00:00:50:0b",
        "52:54:00:00:50:0c",
        "52:54:00:00:50:0d",
    ];
    define(&d, "c", 20, macs[2], "send=0 recv=0 hold=1");
    define(
        &d,
        "b",
        10,
        macs[1],
        &format!("send=0 recv={n} seed=100 ms=120000"),
    );
    define(
        &d,
        "a",
        10,
        macs[0],
        &format!("send={n} recv={n} seed=101 ms=600000"),
    );
    define(&d, "b2", 10, macs[3], &format!("send={n} recv=0 seed=102"));

    d.ok("PUT", "/api/v1/vms/c/start", None);
    d.wait_serial("c", "net holding", T);
    d.ok("PUT", "/api/v1/vms/b/start", None);
    d.wait_serial("b", "net receiving", T);
    d.ok("PUT", "/api/v1/vms/a/start", None);
    let got = serial_line(&d, "b", "net received=");
    assert!(got.contains(&guest_stream(101, n, macs[0])), "B: {got}");
    // B's guest ended: its VM stopped and its port is gone.
    d.wait_state("b", "Stopped", T);
    let p = ports(&d);
    assert!(!p.iter().any(|(name, _)| name == "b.0"), "{p:?}");
    assert!(p.contains(&("a.0".into(), true)), "{p:?}");
    // VLAN 20 got none of it (read after B's receipt: the switch had handled them).
    let cc = counters(&d, "c.0");
    assert_eq!(cc["tx_packets"], 0, "{cc}");
    assert_eq!(counters(&d, "a.0")["rx_packets"], n);
    // A's VMM is jailed: it reaches its port through its socket directory.
    let a_pid = d.pid("a").unwrap();
    let uid = std::fs::read_to_string(format!("/proc/{a_pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|u| u.split_whitespace().next().unwrap().to_string())
        })
        .unwrap();
    assert_ne!(uid, "0");
    // Its socket directory is its jail's group's (setgid), the switch's socket in it
    // that group's too, and nobody else's.
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let uid: u32 = uid.parse().unwrap();
        let dir = d.run_dir.join("switches/lan/vm/a");
        let m = std::fs::metadata(&dir).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.permissions().mode() & 0o7777),
            (0, uid, 0o2750)
        );
        let m = std::fs::metadata(dir.join("0.sock")).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.permissions().mode() & 0o777),
            (0, uid, 0o770)
        );
    }

    // The switch dies; vireod starts it again and the ports come back.
    d.wait_serial("a", "net receiving", T);
    // SAFETY: kill(2) of the switch's pid, which vireod reported.
    assert_eq!(unsafe { libc::kill(first_pid as i32, libc::SIGKILL) }, 0);
    wait_until("the switch restarted", &d, || {
        let s = lan(&d);
        s["running"] == true && s["restarts"] == 1 && s["pid"].as_i64() != Some(first_pid)
    });
    wait_until("A's and C's VMMs reconnected", &d, || {
        let p = ports(&d);
        p.contains(&("a.0".into(), true)) && p.contains(&("c.0".into(), true))
    });
    d.ok("PUT", "/api/v1/vms/b2/start", None);
    let got = serial_line(&d, "a", "net received=");
    assert!(got.contains(&guest_stream(102, n, macs[3])), "A: {got}");
    d.wait_state("a", "Stopped", T);
    d.wait_state("b2", "Stopped", T);
    assert_eq!(counters(&d, "c.0")["tx_packets"], 0);
    // Stopping C takes its port off the switch; nothing of the VMs is left.
    d.ok("PUT", "/api/v1/vms/c/stop", None);
    d.wait_state("c", "Stopped", T);
    assert_eq!(ports(&d), Vec::<(String, bool)>::new());
    assert_eq!(lan(&d)["ports"], json!([]));
    assert!(!d.run_dir.join("switches/lan/vm/a").exists());
}

/// A definition naming a switch this host lacks, or a host socket, is refused with one
/// line; the switch's options are checked before anything runs.
#[test]
fn definitions_naming_an_unknown_switch_or_a_host_socket_are_refused_with_one_line() {
    let d = start_vireod();
    let def = |net: Value| {
        json!({
            "config": {
                "payload": {"kernel": vireo_e2e::guest()},
                "memory": {"size": 64u64 << 20, "shared": true},
                "nets": [net],
            }
        })
        .to_string()
    };
    for (net, status, needle) in [
        (
            json!({"switch": "wan", "vlan": 10}),
            400,
            "nets[0] names switch \"wan\", which this host does not have (vireod --switch; known: lan)",
        ),
        (
            json!({"vhost_user": "/run/other.sock"}),
            400,
            "names a host socket",
        ),
        (
            json!({"switch": "lan", "guard": "mac,vhost-user=/tmp/x"}),
            400,
            "unknown guard",
        ),
        (json!({"switch": "lan", "vlan": 5000}), 400, "outside 1-4094"),
    ] {
        let (s, body) = d.api("PUT", "/api/v1/vms/x", Some(&def(net.clone())));
        assert_eq!(s, status, "{net}: {body}");
        let e: Value = serde_json::from_str(&body).unwrap();
        let e = e["error"].as_str().unwrap();
        assert!(e.contains(needle), "{net}: {e}");
        assert!(!e.contains('\n'), "{e}");
        assert!(d.absent("x"));
    }
    // A good one gets a MAC now, kept for every start.
    let (s, body) = d.api(
        "PUT",
        "/api/v1/vms/x",
        Some(&def(json!({"switch": "lan", "vlan": 10}))),
    );
    assert_eq!(s, 201, "{body}");
    let mac = d.vm("x")["definition"]["config"]["nets"][0]["mac"].clone();
    assert!(mac.is_string(), "{}", d.vm("x"));
}

/// vireod killed (`kill -9`) while a VM on its switch waits for frames: the switch ends
/// with it; the next vireod starts the switch again, re-adopts the VMM and adds its
/// port, the VMM reconnects, and a new VM's frames reach the guest byte for byte.
#[test]
fn a_restarted_vireod_runs_its_switch_again_and_its_readopted_vms_get_their_ports_back() {
    if !as_root() {
        return;
    }
    let mut d = start_vireod();
    wait_until("the switch runs", &d, || lan(&d)["running"] == true);
    let old = lan(&d)["pid"].as_i64().unwrap() as i32;
    let n = 12u32;
    let macs = ["52:54:00:00:60:0a", "52:54:00:00:60:0b"];
    define(
        &d,
        "a",
        10,
        macs[0],
        &format!("send=0 recv={n} seed=99 ms=600000"),
    );
    define(&d, "b", 10, macs[1], &format!("send={n} recv=0 seed=100"));
    d.ok("PUT", "/api/v1/vms/a/start", None);
    d.wait_serial("a", "net receiving", T);
    let a_pid = d.pid("a").unwrap();
    d.kill9();
    // The switch ends with vireod (its parent-death signal).
    wait_until("the switch ended with vireod", &d, || {
        // SAFETY: kill with signal 0 only checks that the pid exists.
        unsafe { libc::kill(old, 0) != 0 }
    });
    d.spawn();
    wait_until("A's VMM reconnected to the new switch", &d, || {
        let s = lan(&d);
        s["running"] == true && ports(&d).contains(&("a.0".into(), true))
    });
    assert_eq!(d.pid("a"), Some(a_pid), "re-adopted, not restarted");
    d.ok("PUT", "/api/v1/vms/b/start", None);
    let got = serial_line(&d, "a", "net received=");
    assert!(got.contains(&guest_stream(100, n, macs[1])), "A: {got}");
    // A re-adopted VMM's exit status is not vireod's to see: its end counts as a crash.
    d.wait_state("a", "Crashed", T);
    d.wait_state("b", "Stopped", T);
    assert_eq!(ports(&d), Vec::<(String, bool)>::new());
}
