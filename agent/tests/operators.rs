//! The operator's vireoctl (issue 17): `vm create` from `vireo`'s own flags, `vm set`
//! and `vm edit` validated by vireod (a running VM takes the change at its next start),
//! the guest's shutdown on the ACPI power button, reboot, reset, virsh's names
//! (`destroy`, `undefine`), `autostart`, `list` with vCPUs, memory and `--state`,
//! names checked before anything is sent, and plain words for bad bodies.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use common::{bin, Daemon, T};
use serde_json::Value;

fn guest() -> String {
    vireo_e2e::guest().display().to_string()
}

fn definition(d: &Daemon, name: &str) -> Value {
    d.vm(name)["definition"].clone()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// vireoctl against `d` with `EDITOR=editor` and `input` on standard input.
fn ctl_edit(d: &Daemon, name: &str, editor: &Path, input: &str) -> Output {
    let mut child = Command::new(bin("vireoctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["vm", "edit", name])
        .env("EDITOR", editor)
        .env_remove("VISUAL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

/// An executable shell script at `dir/name`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\nset -e\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn create_counter(d: &Daemon, name: &str, extra: &[&str]) -> String {
    let kernel = guest();
    let mut args = vec![
        "vm",
        "create",
        name,
        "--kernel",
        kernel.as_str(),
        "--cmdline",
        "test=counter period_ms=10",
        "--memory",
        "32M",
    ];
    args.extend_from_slice(extra);
    d.ctl_ok(&args)
}

#[test]
fn create_from_flags_defines_what_the_vmm_parsers_make_and_the_guest_runs() {
    let d = Daemon::start(&["--no-autostart"]);
    let disk = d.dir.path().join("data.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // A relative disk path, from the directory vireoctl runs in.
    let o = Command::new(bin("vireoctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["vm", "create", "web", "--kernel", &guest()])
        .args(["--cmdline", "test=counter period_ms=10"])
        .args(["--memory", "48M", "--cpus", "2", "--disk", "path=data.raw"])
        .args(["--console", "null", "--rng"])
        .args(["--priority", "high", "--restart", "never", "--start"])
        .current_dir(d.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Running"), "{}", stdout(&o));

    // The stored definition is what the VMM's own parsers make of the same flags.
    let def = definition(&d, "web");
    let cfg = &def["config"];
    assert_eq!(
        cfg["cpus"],
        serde_json::to_value(api::config::parse_cpus("boot=2").unwrap()).unwrap()
    );
    assert_eq!(
        cfg["memory"],
        serde_json::to_value(api::config::parse_memory("size=48M").unwrap()).unwrap()
    );
    assert_eq!(cfg["disks"][0]["path"], disk.display().to_string(), "{def}");
    assert_eq!(cfg["disks"][0]["format"], "raw", "{def}");
    assert_eq!(cfg["console"]["mode"], "null");
    assert_eq!(cfg["rng"], true);
    assert_eq!(def["priority"], "high");
    assert_eq!(def["restart"], "never");
    // And the guest runs.
    d.wait_serial("web", "tick 3 ", T);

    // `list`: vCPUs, memory, uptime; one casing; --state filters.
    create_counter(&d, "idle", &["--priority", "low"]);
    let table = d.ctl_ok(&["vm", "list"]);
    let header = table.lines().next().unwrap();
    for col in [
        "NAME", "STATE", "PRIORITY", "VCPUS", "MEMORY", "PID", "UPTIME",
    ] {
        assert!(header.contains(col), "{table}");
    }
    let web: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        &web[..5],
        &["web", "Running", "high", "2", "48M"],
        "{table}"
    );
    assert_ne!(web[6], "-", "uptime of a running VM: {table}");
    let idle: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("idle "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        &idle[..5],
        &["idle", "Stopped", "low", "1", "32M"],
        "{table}"
    );
    let running = d.ctl_ok(&["vm", "list", "--state", "running"]);
    assert!(running.lines().any(|l| l.starts_with("web ")), "{running}");
    assert!(
        !running.lines().any(|l| l.starts_with("idle ")),
        "{running}"
    );
    let stopped = d.ctl_ok(&["vm", "list", "--state", "Stopped"]);
    assert!(stopped.lines().any(|l| l.starts_with("idle ")), "{stopped}");
    assert!(!stopped.lines().any(|l| l.starts_with("web ")), "{stopped}");
    let o = d.ctl(&["vm", "list", "--state", "sleeping"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("expected one of stopped"),
        "{}",
        stderr(&o)
    );

    // A flag the parser refuses, and a VM vireod refuses: nothing is defined.
    let o = d.ctl(&[
        "vm",
        "create",
        "bad",
        "--kernel",
        &guest(),
        "--memory",
        "size=lots",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--memory: size=lots"), "{}", stderr(&o));
    // Outside vireod's storage roots.
    let o = d.ctl(&["vm", "create", "bad", "--kernel", "/etc/hostname"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/etc/hostname"), "{}", stderr(&o));
    assert!(stderr(&o).contains("(400)"), "{}", stderr(&o));
    let o = d.ctl(&["vm", "create", "bad", "--memory", "1G"]);
    assert!(stderr(&o).contains("needs --kernel"), "{}", stderr(&o));
    assert!(d.absent("bad"));
}

#[test]
fn set_changes_a_definition_and_a_running_vm_takes_it_at_its_next_start() {
    let d = Daemon::start(&["--no-autostart"]);
    create_counter(&d, "db", &[]);
    let out = d.ctl_ok(&[
        "vm",
        "set",
        "db",
        "--memory",
        "64M",
        "--cpus",
        "3",
        "--priority",
        "low",
    ]);
    assert!(out.contains("db: definition changed"), "{out}");
    let def = definition(&d, "db");
    assert_eq!(def["config"]["memory"]["size"], 64u64 << 20);
    assert_eq!(def["config"]["cpus"]["boot"], 3);
    assert_eq!(def["priority"], "low");
    assert_eq!(
        def["config"]["payload"]["cmdline"],
        "test=counter period_ms=10"
    );

    // vireod refuses a definition the VMM could not run: nothing changes.
    let o = d.ctl(&["vm", "set", "db", "--memory", "1M"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("(400)"), "{}", stderr(&o));
    assert_eq!(definition(&d, "db"), def);
    let o = d.ctl(&["vm", "set", "db"]);
    assert!(stderr(&o).contains("nothing to change"), "{}", stderr(&o));

    // Running: the VMM keeps what it was started with; the change waits.
    d.ctl_ok(&["vm", "start", "db"]);
    let socket = PathBuf::from(d.vm("db")["socket"].as_str().unwrap());
    let out = d.ctl_ok(&["vm", "set", "db", "--memory", "96M"]);
    assert!(out.contains("applies at its next start"), "{out}");
    let st = d.vm("db");
    assert_eq!(st["definition_pending"], true, "{st}");
    assert_eq!(st["definition"]["config"]["memory"]["size"], 96u64 << 20);
    let export = d.ctl_ok(&["vm", "export", "db"]);
    assert!(export.contains(&(96u64 << 20).to_string()), "{export}");
    let (_, info) = common::http(&socket, "GET", "/api/v1/vm.info", None);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["config"]["memory"]["size"], 64u64 << 20, "{info}");
    // Next start: the new definition.
    d.ctl_ok(&["vm", "stop", "db"]);
    d.ctl_ok(&["vm", "start", "db"]);
    let st = d.vm("db");
    assert!(st.get("definition_pending").is_none(), "{st}");
    let socket = PathBuf::from(st["socket"].as_str().unwrap());
    let (_, info) = common::http(&socket, "GET", "/api/v1/vm.info", None);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["config"]["memory"]["size"], 96u64 << 20, "{info}");
    assert_eq!(info["config"]["cpus"]["boot"], 3, "{info}");
    d.wait_serial("db", "tick 3 ", T);
}

#[test]
fn edit_validates_through_vireod_retries_and_aborts_leaving_the_definition() {
    let d = Daemon::start(&["--no-autostart"]);
    create_counter(&d, "ed", &[]);
    let dir = d.dir.path();
    let before = definition(&d, "ed");

    // A good edit.
    let good = script(
        dir,
        "good.sh",
        r#"sed -i 's/"max_restarts": 3/"max_restarts": 7/' "$1""#,
    );
    let o = ctl_edit(&d, "ed", &good, "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("ed: definition changed"),
        "{}",
        stdout(&o)
    );
    let after = definition(&d, "ed");
    assert_eq!(after["max_restarts"], 7);
    assert_eq!(after["config"], before["config"]);

    // Invalid JSON, no second try (end of input): given up, unchanged.
    let garbage = script(dir, "garbage.sh", r#"echo '{ "config": ' > "$1""#);
    let o = ctl_edit(&d, "ed", &garbage, "");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not a valid definition"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("unchanged"), "{}", stderr(&o));
    assert_eq!(definition(&d, "ed"), after);

    // A definition vireod refuses (16 MiB is the least memory), answered "n".
    let small = script(
        dir,
        "small.sh",
        r#"sed -i 's/"size": 33554432/"size": 1048576/' "$1""#,
    );
    let o = ctl_edit(&d, "ed", &small, "n\n");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("vireod refused it"), "{}", stderr(&o));
    assert_eq!(definition(&d, "ed"), after);

    // Wrong first, "y", right the second time: the second edit is stored.
    let twice = script(
        dir,
        "twice.sh",
        &format!(
            r#"if [ ! -e {m} ]; then touch {m}; sed -i 's/"max_restarts": 7/"max_restarts": 7,,/' "$1"; else sed -i 's/"max_restarts": 7,,/"max_restarts": 9/' "$1"; fi"#,
            m = dir.join("once").display()
        ),
    );
    let o = ctl_edit(&d, "ed", &twice, "y\n");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not a valid definition"),
        "{}",
        stderr(&o)
    );
    assert_eq!(definition(&d, "ed")["max_restarts"], 9);

    // An editor that fails: unchanged.
    let o = ctl_edit(&d, "ed", Path::new("false"), "");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("failed"), "{}", stderr(&o));
    assert_eq!(definition(&d, "ed")["max_restarts"], 9);
    // The temporary files are gone.
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("vireoctl-edit-ed-")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn shutdown_reboot_reset_destroy_undefine_and_autostart() {
    let d = Daemon::start(&["--no-autostart"]);
    // A guest that powers off on the ACPI power button.
    d.ctl_ok(&[
        "vm",
        "create",
        "pb",
        "--kernel",
        &guest(),
        "--cmdline",
        "test=power-button ms=600000",
        "--memory",
        "32M",
        "--start",
    ]);
    d.wait_serial("pb", "power-button waiting", T);
    let out = d.ctl_ok(&["vm", "shutdown", "pb", "--timeout", "60"]);
    assert!(out.contains("pb: the guest shut down"), "{out}");
    let st = d.vm("pb");
    assert_eq!(st["state"], "Stopped", "{st}");
    assert_eq!(st["last_exit"]["reason"], "guest-shutdown", "{st}");
    assert!(
        st["last_exit"]["serial_tail"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("power-button pressed")),
        "{st}"
    );
    // A stopped VM cannot be shut down.
    let o = d.ctl(&["vm", "shutdown", "pb"]);
    assert!(stderr(&o).contains("(409)"), "{}", stderr(&o));

    // Reboot: the guest's shutdown, then a new start.
    d.ctl_ok(&["vm", "start", "pb"]);
    d.wait_serial("pb", "power-button waiting", T);
    let pid = d.pid("pb").unwrap();
    let out = d.ctl_ok(&["vm", "reboot", "pb", "--timeout", "60"]);
    assert!(
        out.contains("the guest shut down") && out.contains("started again"),
        "{out}"
    );
    let st = d.vm("pb");
    assert_eq!(st["state"], "Running", "{st}");
    assert_ne!(st["pid"], pid, "{st}");
    assert_eq!(st["last_exit"]["reason"], "guest-shutdown", "{st}");
    d.wait_serial("pb", "power-button waiting", T);

    // A guest that ignores the button is stopped after the timeout.
    create_counter(&d, "deaf", &["--start"]);
    d.wait_serial("deaf", "tick 3 ", T);
    let out = d.ctl_ok(&["vm", "shutdown", "deaf", "--timeout", "1"]);
    assert!(out.contains("did not shut down in time"), "{out}");
    let st = d.vm("deaf");
    assert_eq!(st["state"], "Stopped", "{st}");
    assert_eq!(st["last_exit"]["reason"], "requested", "{st}");

    // Reset: the same VMM, the guest boots again (its ticks start over).
    d.ctl_ok(&["vm", "start", "deaf"]);
    d.wait_serial("deaf", "tick 300 ", T);
    let pid = d.pid("deaf").unwrap();
    let before = *d.tick_numbers("deaf").last().unwrap();
    let out = d.ctl_ok(&["-o", "json", "vm", "reset", "deaf"]);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["state"], "Running", "{st}");
    assert_eq!(st["pid"], pid, "{st}");
    let t0 = Instant::now();
    loop {
        let ticks = d.tick_numbers("deaf");
        let restarted =
            ticks.windows(2).any(|w| w[1] < w[0]) || ticks.last().is_some_and(|&n| n < before);
        if restarted {
            break;
        }
        assert!(t0.elapsed() < T, "the guest did not boot again: {ticks:?}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }

    // virsh's names: destroy kills, undefine deletes.
    let out = d.ctl_ok(&["vm", "destroy", "deaf"]);
    assert!(out.contains("Stopped"), "{out}");
    common::wait_dead(pid, T);
    d.ctl_ok(&["vm", "undefine", "deaf"]);
    assert!(d.absent("deaf"));

    // Autostart is the priority: off is not started by vireod.
    assert_eq!(definition(&d, "pb")["priority"], "off");
    d.ctl_ok(&["vm", "autostart", "pb"]);
    assert_eq!(definition(&d, "pb")["priority"], "medium");
    d.ctl_ok(&["vm", "autostart", "pb", "--priority", "high"]);
    assert_eq!(definition(&d, "pb")["priority"], "high");
    d.ctl_ok(&["vm", "autostart", "pb", "--disable"]);
    assert_eq!(definition(&d, "pb")["priority"], "off");
}

/// A name vireod would refuse is refused by vireoctl before it connects: the socket
/// here does not exist, so any request would fail to connect instead.
#[test]
fn vm_names_are_checked_before_any_request() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("no.sock");
    for args in [
        vec!["vm", "start", "a/b"],
        vec!["vm", "create", "../x", "--kernel", "/k"],
        vec!["vm", "set", "a b", "--memory", "1G"],
        vec!["vm", "edit", ".hidden"],
        vec!["vm", "shutdown", "x;y"],
        vec!["vm", "undefine", "é"],
        vec!["vm", "migrate", "ok", "b/ad", "--to", "auto"],
    ] {
        let o = Command::new(bin("vireoctl"))
            .arg("--socket")
            .arg(&nowhere)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?}");
        let e = stderr(&o);
        assert!(e.contains("invalid VM name"), "{args:?}: {e}");
        assert!(!e.contains("cannot reach"), "{args:?}: {e}");
    }
    // A good name does try to connect.
    let o = Command::new(bin("vireoctl"))
        .arg("--socket")
        .arg(&nowhere)
        .args(["vm", "start", "web-1.prod"])
        .output()
        .unwrap();
    assert!(stderr(&o).contains("cannot reach"), "{}", stderr(&o));
}

/// vireod's 400 answers name the field in plain words: no Rust type names.
#[test]
fn bad_definitions_get_plain_words_naming_the_field() {
    let d = Daemon::start(&["--no-autostart"]);
    create_counter(&d, "ok", &[]);
    let kernel = guest();
    let cases = [
        (
            r#"{"config":[]}"#.to_string(),
            "config: invalid type: array",
        ),
        (
            format!(
                r#"{{"config":{{"payload":{{"kernel":"{kernel}"}},"serial":{{"mode":"tty","file":"/x"}}}}}}"#
            ),
            "config.serial.file",
        ),
        (
            format!(r#"{{"config":{{"payload":{{"kernel":"{kernel}"}}}},"priority":"urgent"}}"#),
            "priority: unknown value `urgent`, expected one of `high`, `medium`, `low`, `off`",
        ),
        (
            format!(r#"{{"config":{{"payload":{{"kernel":"{kernel}"}},"numa":[[]]}}}}"#),
            "config.numa[0]: invalid type: array, expected an object",
        ),
    ];
    for route in ["/api/v1/vms/new", "/api/v1/vms/ok/definition"] {
        for (body, want) in &cases {
            let (s, answer) = d.api("PUT", route, Some(body));
            assert_eq!(s, 400, "{route} {body}: {answer}");
            assert!(answer.contains(want), "{route} {body}: {answer}");
            for rust in [
                "::",
                "struct ",
                "variant",
                "element",
                "VmConfig",
                "OutputConfig",
            ] {
                assert!(!answer.contains(rust), "{route} {body}: {answer}");
            }
        }
    }
    assert!(d.absent("new"));
    // The old capitalized priority is still read, and written back in lower case.
    let def = format!(r#"{{"config":{{"payload":{{"kernel":"{kernel}"}}}},"priority":"High"}}"#);
    d.ok("PUT", "/api/v1/vms/ok/definition", Some(&def));
    assert_eq!(definition(&d, "ok")["priority"], "high");
}
