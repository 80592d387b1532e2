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
