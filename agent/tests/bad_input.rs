//! Bad input: each a 4xx/5xx with a message, the inventory unchanged, no orphan process.

use crate::common;

use common::{Daemon, T};
use serde_json::{json, Value};

fn error_of(d: &Daemon, method: &str, path: &str, body: Option<&str>, want: u16) -> String {
    let (s, b) = d.api(method, path, body);
    assert_eq!(s, want, "{method} {path}: {b}");
    let v: Value = serde_json::from_str(&b).unwrap_or_else(|_| panic!("not JSON: {b}"));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {b}"));
    assert!(!msg.is_empty());
    msg.to_string()
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let d = Daemon::start(&["--no-autostart"]);
    d.define_counter("one", "Off", "never");
    let export = d.ok("GET", "/api/v1/export", None);

    // Duplicate name.
    let def = json!({"config": common::counter_config()}).to_string();
    let m = error_of(&d, "PUT", "/api/v1/vms/one", Some(&def), 409);
    assert!(m.contains("already exists"), "{m}");
    // Unknown VM, for every verb.
    for (method, path) in [
        ("GET", "/api/v1/vms/ghost"),
        ("DELETE", "/api/v1/vms/ghost"),
        ("PUT", "/api/v1/vms/ghost/start"),
        ("PUT", "/api/v1/vms/ghost/stop"),
        ("PUT", "/api/v1/vms/ghost/pause"),
        ("GET", "/api/v1/vms/ghost/metrics"),
        ("GET", "/api/v1/vms/ghost/serial"),
    ] {
        let m = error_of(&d, method, path, None, 404);
        assert!(m.contains("ghost"), "{m}");
    }
    // Malformed JSON, unknown fields, bad values, bad names, relative paths.
    let m = error_of(&d, "PUT", "/api/v1/vms/two", Some("{not json"), 400);
    assert!(m.contains("invalid VM definition"), "{m}");
    let m = error_of(
        &d,
        "PUT",
        "/api/v1/vms/two",
        Some(r#"{"config":{"payload":{"kernel":"/k"}},"colour":"red"}"#),
        400,
    );
    assert!(m.contains("colour"), "{m}");
    let m = error_of(
        &d,
        "PUT",
        "/api/v1/vms/two",
        Some(r#"{"config":{"payload":{"kernel":"/k"}},"priority":"Urgent"}"#),
        400,
    );
    assert!(m.contains("Urgent"), "{m}");
    let m = error_of(
        &d,
        "PUT",
        "/api/v1/vms/two",
        Some(r#"{"config":{"payload":{"kernel":"/k"},"memory":{"size":4096}}}"#),
        400,
    );
    assert!(m.contains("memory.size"), "{m}");
    // A field's error names where it is, in the definition's own words.
    let m = error_of(
        &d,
        "PUT",
        "/api/v1/vms/two",
        Some(r#"{"config":{"payload":{"kernel":"/k"},"disks":[{"path":"/d","format":"qcow"}]}}"#),
        400,
    );
    assert!(
        m.contains("config.disks[0].format: unknown value `qcow`, expected `raw` or `vhdx`"),
        "{m}"
    );
    let m = error_of(
        &d,
        "PUT",
        "/api/v1/vms/two",
        Some(r#"{"config":{"payload":{"kernel":"guest.elf"}}}"#),
        400,
    );
    assert!(m.contains("absolute"), "{m}");
    let m = error_of(&d, "PUT", "/api/v1/vms/..", Some(&def), 400);
    assert!(m.contains("invalid VM name"), "{m}");
    let m = error_of(&d, "PUT", "/api/v1/vms/a%20b", Some(&def), 400);
    assert!(m.contains("invalid VM name"), "{m}");
    // Wrong state.
    let m = error_of(&d, "PUT", "/api/v1/vms/one/pause", None, 409);
    assert!(m.contains("Stopped"), "{m}");
    let m = error_of(&d, "PUT", "/api/v1/vms/one/stop", None, 409);
    assert!(m.contains("Stopped"), "{m}");
    // Bad query, unknown route, migration.
    error_of(&d, "PUT", "/api/v1/vms/one/stop?timeout_s=soon", None, 400);
    error_of(&d, "GET", "/api/v1/nothing", None, 404);
    let m = error_of(&d, "PUT", "/api/v1/vms/one/migrate", None, 400);
    assert!(m.contains("invalid migration request"), "{m}");
    let url = format!(
        r#"{{"destination_url":"unix:{}/vms/x.sock"}}"#,
        d.run_dir.display()
    );
    let m = error_of(&d, "PUT", "/api/v1/vms/one/migrate", Some(&url), 409);
    assert!(m.contains("Stopped"), "{m}");

    assert_eq!(
        d.ok("GET", "/api/v1/export", None),
        export,
        "inventory unchanged"
    );
    assert_eq!(d.processes().len(), 1, "no VMM was started");
}

#[test]
fn a_start_that_fails_reports_why_and_leaves_no_process() {
    let d = Daemon::start(&["--no-autostart"]);
    // A kernel beneath a storage root (a missing one is refused at define) that is
    // no kernel at all: only the VMM finds out, when it loads it.
    let kernel = d.dir.path().join("not-a-kernel.elf");
    std::fs::write(&kernel, b"this is not an ELF file").unwrap();
    let def = json!({"config": {"payload": {"kernel": kernel}, "memory": {"size": 32u64 << 20}}});
    d.ok("PUT", "/api/v1/vms/broken", Some(&def.to_string()));
    let export = d.ok("GET", "/api/v1/export", None);
    let m = error_of(&d, "PUT", "/api/v1/vms/broken/start", None, 500);
    assert!(
        m.contains("failed to start") && m.contains("not-a-kernel.elf"),
        "{m}"
    );
    assert!(m.contains("exit status 1"), "{m}");
    let v = d.vm("broken");
    assert_eq!(v["state"], "Stopped", "{v}");
    assert!(v["pid"].is_null());
    assert_eq!(v["last_exit"]["reason"], "start-failed", "{v}");
    assert_eq!(
        d.ok("GET", "/api/v1/export", None),
        export,
        "inventory unchanged"
    );
    assert_eq!(d.processes().len(), 1, "no orphan VMM: {:?}", d.processes());
    assert!(!d.run_dir.join("vms/broken/api.sock").exists());
    assert!(!d.run_dir.join("vms/broken.pid").exists());

    // vireoctl shows it as a readable one-line error and exits 1.
    let o = d.ctl(&["vm", "start", "broken"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("vireoctl: error: VM \"broken\" failed to start"),
        "{err}"
    );
    let o = d.ctl(&["vm", "info", "ghost"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "vireoctl: error: no VM named \"ghost\" (404)"
    );
    // Deleting a running VM is refused.
    d.define_counter("live", "Off", "never");
    d.ok("PUT", "/api/v1/vms/live/start", None);
    let m = error_of(&d, "DELETE", "/api/v1/vms/live", None, 409);
    assert!(m.contains("stop it first"), "{m}");
    d.ok("PUT", "/api/v1/vms/live/kill", None);
    d.wait_state("live", "Stopped", T);
    assert_eq!(d.ok("DELETE", "/api/v1/vms/live", None), Value::Null);
}

#[test]
fn vireoctl_without_vireod_and_with_bad_files_says_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let o = std::process::Command::new(common::bin("vireoctl"))
        .args(["--socket", sock.to_str().unwrap(), "vm", "list"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot reach vireod") && err.contains("none.sock"),
        "{err}"
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"config\": ").unwrap();
    let o = std::process::Command::new(common::bin("vireoctl"))
        .args([
            "--socket",
            sock.to_str().unwrap(),
            "vm",
            "define",
            "x",
            "--file",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.json: not valid JSON"), "{err}");
}
