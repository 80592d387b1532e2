//! The serial console both ways: what vireoctl sends reaches the guest's COM1
//! (vireod → the VMM's vm.serial-input → the UART's receive FIFO), and the guest's
//! answer comes back on the console output.

use crate::common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, T};
use serde_json::json;

#[test]
fn console_input_reaches_the_guest_and_its_answer_comes_back() {
    let d = Daemon::start(&["--no-autostart"]);
    let def = json!({"config": {
        "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=echo"},
        "memory": {"size": 32u64 << 20},
    }});
    d.ok("PUT", "/api/v1/vms/e", Some(&def.to_string()));
    d.ok("PUT", "/api/v1/vms/e/start", None);
    d.wait_serial("e", "echo ready", T);

    // One line through vireoctl --send; longer than the UART's 64-byte FIFO, so
    // vireod has to feed it as the guest reads.
    let long = "x".repeat(200);
    d.ctl_ok(&["vm", "console", "e", "--send", &long]);
    d.wait_serial("e", &format!("echo {long}"), T);

    // Interactive: typed input goes in, the echo comes out on vireoctl's stdout;
    // Ctrl-] ends the session (stdin is a pipe here, so no raw mode).
    let mut ctl = Command::new(common::bin("vireoctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["vm", "console", "e", "--input", "--lines", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = ctl.stdin.take().unwrap();
    stdin.write_all(b"hello from the host\r").unwrap();
    stdin.flush().unwrap();
    d.wait_serial("e", "echo hello from the host", T);
    std::thread::sleep(Duration::from_millis(300)); // vireoctl polls the output.
    stdin.write_all(&[0x1d]).unwrap();
    drop(stdin);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = ctl.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < T, "vireoctl did not end on Ctrl-]");
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = ctl.wait_with_output().unwrap();
    assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("echo hello from the host"), "{text}");

    // The guest ends its test on "quit": a clean power-off.
    d.ctl_ok(&["vm", "console", "e", "--send", "quit"]);
    let v = d.wait_state("e", "Stopped", T);
    assert_eq!(v["last_exit"]["reason"], "power-off", "{v}");
    // No VMM, no input.
    let (s, b) = d.api("POST", "/api/v1/vms/e/serial", Some("x"));
    assert_eq!(s, 409, "{b}");
    let (s, b) = d.api("POST", "/api/v1/vms/nope/serial", Some("x"));
    assert_eq!(s, 404, "{b}");
}

/// The highest `rw n=` the guest printed (whole lines only).
fn last_write(d: &Daemon, vm: &str) -> u64 {
    let s = d.serial(vm);
    let whole = &s[..s.rfind('\n').map_or(0, |i| i + 1)];
    whole
        .lines()
        .filter_map(|l| l.strip_prefix("rw n="))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// `vireoctl vm guest-command` reaches the guest's agent through vireod and the
/// (jailed, when vireod runs as root) VMM: a ping, a freeze that holds the guest's
/// writes until the thaw; a VM without the channel is refused by its VMM (409), an
/// unknown VM by vireod (404), a bad --arguments before any request.
#[test]
fn vireoctl_asks_the_guest_agent_and_a_freeze_holds_the_writes_until_the_thaw() {
    let d = Daemon::start(&["--no-autostart"]);
    let disk = d.dir.path().join("ga.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let def = json!({"config": {
        "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=replica-writer blocks=64 agent"},
        "memory": {"size": 32u64 << 20},
        "disks": [{"path": disk, "format": "raw"}],
        "guest_agent": true,
    }});
    d.ok("PUT", "/api/v1/vms/ga", Some(&def.to_string()));
    d.ok("PUT", "/api/v1/vms/ga/start", None);
    d.wait_serial("ga", "agent ready port=org.qemu.guest_agent.0", T);
    d.wait_serial("ga", "rw n=20\n", T);

    let reply: serde_json::Value =
        serde_json::from_str(&d.ctl_ok(&["vm", "guest-command", "ga", "guest-ping"])).unwrap();
    assert_eq!(reply, json!({"return": {}}));
    let reply: serde_json::Value =
        serde_json::from_str(&d.ctl_ok(&["vm", "guest-command", "ga", "guest-fsfreeze-freeze"]))
            .unwrap();
    assert_eq!(reply, json!({"return": 1}));
    let frozen_at = last_write(&d, "ga");
    for _ in 0..3 {
        let (s, b) = d.api(
            "POST",
            "/api/v1/vms/ga/guest-command",
            Some(r#"{"execute": "guest-fsfreeze-status"}"#),
        );
        assert_eq!((s, b.contains("frozen")), (200, true), "{b}");
        assert_eq!(last_write(&d, "ga"), frozen_at, "a write while frozen");
    }
    d.ctl_ok(&["vm", "guest-command", "ga", "guest-fsfreeze-thaw"]);
    d.wait_serial("ga", &format!("rw n={}\n", frozen_at + 5), T);

    // Refusals: bad arguments (vireoctl), a bad body (vireod), an unknown VM.
    let o = d.ctl(&[
        "vm",
        "guest-command",
        "ga",
        "guest-ping",
        "--arguments",
        "[1]",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a JSON object"));
    let (s, b) = d.api(
        "POST",
        "/api/v1/vms/ga/guest-command",
        Some(r#"{"exec": 1}"#),
    );
    assert_eq!(s, 400, "{b}");
    let (s, b) = d.api(
        "POST",
        "/api/v1/vms/nope/guest-command",
        Some(r#"{"execute": "guest-ping"}"#),
    );
    assert_eq!(s, 404, "{b}");

    // A VM without the channel: its VMM says so (409), and the VM runs on.
    let plain = json!({"config": {
        "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=echo"},
        "memory": {"size": 32u64 << 20},
    }});
    d.ok("PUT", "/api/v1/vms/plain", Some(&plain.to_string()));
    d.ok("PUT", "/api/v1/vms/plain/start", None);
    d.wait_serial("plain", "echo ready", T);
    let (s, b) = d.api(
        "POST",
        "/api/v1/vms/plain/guest-command",
        Some(r#"{"execute": "guest-ping"}"#),
    );
    assert_eq!(s, 409, "{b}");
    d.wait_state("plain", "Running", T);
}
