//! define → start → guest ticks → pause/resume → stop through vireod and vireoctl,
//! with `list` telling the truth at each step, and the state changes on the SSE stream.

use crate::common;

use std::time::Duration;

use common::{wait_dead, Daemon, Events, T};
use serde_json::Value;

fn list_state(d: &Daemon, name: &str) -> String {
    let list = d.ok("GET", "/api/v1/vms", None);
    let vm = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .cloned()
        .unwrap_or(Value::Null);
    vm["state"].as_str().unwrap_or("absent").to_string()
}

#[test]
fn define_start_pause_resume_stop_with_list_telling_the_truth() {
    let d = Daemon::start(&["--no-autostart"]);
    let mut events = Events::subscribe(&d.socket, "?vm=web");
    let cfg = d.dir.path().join("web.json");
    std::fs::write(&cfg, common::counter_config().to_string()).unwrap();

    // Define through vireoctl (a plain VM config file plus flags).
    let out = d.ctl_ok(&[
        "vm",
        "define",
        "web",
        "--file",
        cfg.to_str().unwrap(),
        "--priority",
        "low",
    ]);
    assert!(out.contains("Stopped"), "{out}");
    assert_eq!(list_state(&d, "web"), "Stopped");
    let table = d.ctl_ok(&["vm", "list"]);
    assert!(table.lines().next().unwrap().starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("web") && l.contains("Stopped") && l.contains(" low ")),
        "{table}"
    );

    // Start: returns when the VMM reports the VM running.
    let out = d.ctl_ok(&["--output", "json", "vm", "start", "web"]);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["state"], "Running", "{out}");
    let pid = st["pid"].as_i64().unwrap() as i32;
    assert!(common::alive(pid));
    assert_eq!(list_state(&d, "web"), "Running");
    let sock = st["socket"].as_str().unwrap().to_string();
    assert_eq!(
        sock,
        d.run_dir.join("vms/web/api.sock").display().to_string()
    );
    d.wait_serial("web", "tick 5 ", T);
    // The guest's serial output through vireoctl console.
    let console = d.ctl_ok(&["vm", "console", "web", "--lines", "3"]);
    assert_eq!(console.lines().count(), 3, "{console}");
    assert!(console.lines().all(|l| l.starts_with("tick ")), "{console}");
    let host = d.ctl_ok(&["host", "info"]);
    assert!(
        host.lines()
            .any(|l| l.starts_with("vms_running") && l.ends_with(" 1")),
        "{host}"
    );
    // Straight to the VMM's own socket.
    let direct = d.ctl_ok(&["--vm-socket", &sock, "-o", "json", "vm", "info"]);
    assert!(direct.contains("\"Running\""), "{direct}");

    // Pause: the guest stops ticking; list says Paused.
    d.ctl_ok(&["vm", "pause", "web"]);
    assert_eq!(list_state(&d, "web"), "Paused");
    let before = d.ticks("web");
    std::thread::sleep(Duration::from_millis(300));
    let after = d.ticks("web");
    assert!(
        after <= before + 1,
        "guest ran while paused: {before} -> {after}"
    );
    // Pausing twice is refused with a message, state unchanged.
    let o = d.ctl(&["vm", "pause", "web"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Paused") && err.contains("409"), "{err}");
    assert_eq!(list_state(&d, "web"), "Paused");

    d.ctl_ok(&["vm", "resume", "web"]);
    assert_eq!(list_state(&d, "web"), "Running");
    d.wait_serial("web", &format!("tick {} ", after + 10), T);

    // Info (table) and metering.
    let info = d.ctl_ok(&["vm", "info", "web"]);
    assert!(
        info.contains("Running") && info.contains(&pid.to_string()),
        "{info}"
    );
    let prom = d.ok_text("/metrics");
    assert!(
        prom.contains("vireo_vm_state{vm=\"web\",state=\"Running\"} 1"),
        "{prom}"
    );

    // Stop: vm.shutdown through the VMM's socket; the process exits, files are gone.
    let out = d.ctl_ok(&["-o", "json", "vm", "stop", "web"]);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["state"], "Stopped", "{out}");
    assert!(st["pid"].is_null());
    assert_eq!(st["last_exit"]["reason"], "requested");
    assert_eq!(st["last_exit"]["status"], 0);
    wait_dead(pid, T);
    assert_eq!(list_state(&d, "web"), "Stopped");
    assert!(!d.run_dir.join("vms/web/api.sock").exists());
    assert!(!d.run_dir.join("vms/web.pid").exists());

    // Every transition was on the event stream, in order.
    let seen: Vec<String> = events
        .until("web", "Stopped")
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        seen,
        ["defined", "Starting", "Running", "Paused", "Running", "Stopping", "Stopped"]
    );

    // Logs written to files carry no terminal colour codes (neither vireod's nor the
    // VMM's, whose stderr vireod keeps as vireo.log).
    let vmm_log =
        std::fs::read_to_string(d.state_dir.join("vms/web/vireo.log")).unwrap_or_default();
    let vireod_log = d.log();
    assert!(vireod_log.contains("INFO"), "{vireod_log}");
    for (name, text) in [("vireod", &vireod_log), ("vireo", &vmm_log)] {
        assert!(
            !text.contains('\x1b'),
            "{name}'s log has escape codes:\n{text}"
        );
    }

    // Export, then delete: the VM and its files are gone.
    let export = d.ctl_ok(&["vm", "export", "web"]);
    let def: Value = serde_json::from_str(&export).unwrap();
    assert_eq!(def["priority"], "low");
    assert_eq!(def["config"]["memory"]["size"], 32u64 << 20);
    d.ctl_ok(&["vm", "delete", "web"]);
    assert_eq!(list_state(&d, "web"), "absent");
    assert!(!d.state_dir.join("vms/web").exists());
    assert!(
        d.processes().len() == 1,
        "only vireod is left: {:?}",
        d.processes()
    );
}

trait Text {
    fn ok_text(&self, path: &str) -> String;
}

impl Text for Daemon {
    fn ok_text(&self, path: &str) -> String {
        let (s, b) = self.api("GET", path, None);
        assert_eq!(s, 200, "{b}");
        b
    }
}

/// `--socket-group` (deprecated) still makes its members operators, but shares no
/// VM socket with them any more: vireod's socket is 0666 (callers are told apart by
/// their credentials), the VMs' sockets and their directory are root's alone.
#[test]
fn socket_group_members_are_operators_and_vm_sockets_stay_private() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test takes another user's ids: run it as root (as CI does)");
    }
    let d = Daemon::start(&["--no-autostart", "--socket-group", "65534"]);
    assert!(
        d.log().contains("--socket-group is deprecated"),
        "{}",
        d.log()
    );
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let meta = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.permissions().mode() & 0o777)
    };
    assert_eq!(meta(&d.socket), (0, 0, 0o666));
    assert_eq!(meta(&d.run_dir.join("vms")), (0, 0, 0o700));
    let member = common::caller::Caller {
        uid: common::caller::unused_ids() + 9,
        gid: 65534,
        groups: vec![],
    };
    let def = serde_json::json!({"config": common::counter_config(), "priority": "Off"});
    let r = member.request(&d.socket, "PUT", "/api/v1/vms/g", Some(&def.to_string()));
    assert_eq!(r.status, 201, "{}", r.body);
    let r = member.request(&d.socket, "PUT", "/api/v1/vms/g/start", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let st: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let sock = std::path::PathBuf::from(st["socket"].as_str().unwrap());
    assert_eq!(meta(&sock), (0, 0, 0o600));
    assert_eq!(
        member
            .try_request(&sock, "GET", "/api/v1/vm.info", None)
            .map(|r| r.status),
        Err(libc::EACCES)
    );
    let r = member.request(&d.socket, "PUT", "/api/v1/vms/g/kill", None);
    assert_eq!(r.status, 200, "{}", r.body);
}
