//! vireod dies and comes back; VMMs die and are recorded and restarted per policy;
//! automatic start in priority order; host shutdown lowest priority first.

use crate::common;

use std::time::{Duration, Instant};

use common::{alive, bin, wait_dead, Daemon, T};
use serde_json::Value;

fn kill9(pid: i32) {
    // SAFETY: kill with a pid and a signal.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

#[test]
fn kill_9_vireod_with_5_vms_running_they_keep_running_and_are_readopted() {
    let mut d = Daemon::start(&["--no-autostart"]);
    let names: Vec<String> = (0..5).map(|i| format!("vm{i}")).collect();
    for n in &names {
        d.define_counter(n, "Off", "on-failure");
        d.ok("PUT", &format!("/api/v1/vms/{n}/start"), None);
    }
    d.ok("PUT", "/api/v1/vms/vm4/pause", None);
    let pids: Vec<i32> = names.iter().map(|n| d.pid(n).unwrap()).collect();
    for n in &names[..4] {
        d.wait_serial(n, "tick 3 ", T);
    }

    d.kill9();
    // Every VMM still runs and its guest still makes progress without vireod.
    std::thread::sleep(Duration::from_millis(200));
    for (n, pid) in names.iter().zip(&pids) {
        assert!(alive(*pid), "{n} (pid {pid}) died with vireod");
    }
    let before = d.ticks("vm0");
    d.wait_serial("vm0", &format!("tick {} ", before + 5), T);

    d.spawn();
    let list = d.ok("GET", "/api/v1/vms", None);
    for (v, pid) in list.as_array().unwrap().iter().zip(&pids) {
        assert_eq!(v["pid"].as_i64(), Some(i64::from(*pid)), "{v}");
        assert_eq!(v["adopted"], true, "{v}");
        let want = if v["name"] == "vm4" {
            "Paused"
        } else {
            "Running"
        };
        assert_eq!(v["state"], want, "{v}");
    }
    // The re-adopted VMs are fully managed: resume, stop.
    d.ok("PUT", "/api/v1/vms/vm4/resume", None);
    d.wait_serial("vm4", "tick 3 ", T);
    let st = d.ok("PUT", "/api/v1/vms/vm3/stop", None);
    assert_eq!(st["state"], "Stopped");
    wait_dead(pids[3], T);

    // A re-adopted VMM that dies is noticed (not vireod's child: status unknown, which
    // counts as a failure) and restarted per its on-failure policy.
    kill9(pids[0]);
    let start = std::time::Instant::now();
    let v = loop {
        let v = d.vm("vm0");
        if v["state"] == "Running" && v["pid"].as_i64() != Some(i64::from(pids[0])) {
            break v;
        }
        assert!(start.elapsed() < T, "vm0 not restarted: {v}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(v["restarts"], 1, "{v}");
    assert_eq!(v["adopted"], false);
    assert_eq!(v["last_exit"]["reason"], "unknown", "{v}");
    assert!(
        v["last_exit"]["serial_tail"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().starts_with("tick ")),
        "{v}"
    );
}

#[test]
fn kill_9_of_a_vmm_is_recorded_and_restarted_or_not_per_policy() {
    let d = Daemon::start(&["--no-autostart"]);
    d.define_counter("phoenix", "Off", "on-failure");
    d.define_counter("mortal", "Off", "never");
    for n in ["phoenix", "mortal"] {
        d.ok("PUT", &format!("/api/v1/vms/{n}/start"), None);
        d.wait_serial(n, "tick 3 ", T);
    }
    let p1 = d.pid("phoenix").unwrap();
    let p2 = d.pid("mortal").unwrap();
    kill9(p1);
    kill9(p2);

    let v = d.wait_state("mortal", "Crashed", T);
    assert!(v["pid"].is_null());
    let e = &v["last_exit"];
    assert_eq!(e["reason"], "crashed", "{v}");
    assert_eq!(e["signal"], 9, "{v}");
    assert!(e["status"].is_null());
    assert!(
        e["serial_tail"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().starts_with("tick ")),
        "{v}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.state("mortal"), "Crashed", "never: not restarted");

    let start = std::time::Instant::now();
    let v = loop {
        let v = d.vm("phoenix");
        if v["state"] == "Running" && v["pid"].as_i64() != Some(i64::from(p1)) {
            break v;
        }
        assert!(start.elapsed() < T, "phoenix not restarted: {v}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(v["restarts"], 1);
    assert_eq!(v["last_exit"]["signal"], 9);
    // The restarted guest boots afresh (a new serial log).
    let new_pid = v["pid"].as_i64().unwrap() as i32;
    d.wait_serial("phoenix", "tick 3 ", T);
    // The exit history keeps the crash.
    let exits = d.ok("GET", "/api/v1/vms/phoenix/exits", None);
    assert_eq!(exits[0]["pid"], p1, "{exits}");
    // A crashed VM can be started again by hand.
    let st = d.ok("PUT", "/api/v1/vms/mortal/start", None);
    assert_eq!(st["state"], "Running");
    assert_eq!(st["restarts"], 0);
    assert!(alive(new_pid));
}

#[test]
fn restart_cap_stops_a_crash_loop() {
    let d = Daemon::start(&["--no-autostart"]);
    let def = serde_json::json!({
        "config": common::counter_config(),
        "restart": "always",
        "max_restarts": 2,
    });
    d.ok("PUT", "/api/v1/vms/loop", Some(&def.to_string()));
    d.ok("PUT", "/api/v1/vms/loop/start", None);
    let mut killed = serde_json::Value::Null;
    for round in 0..3 {
        // Running again with a new VMM (on a busy host vireod may not have seen the
        // last kill yet: the old pid still shows Running for a moment).
        let start = std::time::Instant::now();
        let v = loop {
            let v = d.wait_state("loop", "Running", T);
            if v["pid"] != killed {
                break v;
            }
            assert!(start.elapsed() < T, "not restarted: {v}");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(v["restarts"], round);
        killed = v["pid"].clone();
        kill9(v["pid"].as_i64().unwrap() as i32);
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = d.wait_state("loop", "Crashed", T);
    std::thread::sleep(Duration::from_millis(600));
    let v2 = d.vm("loop");
    assert_eq!(v2["state"], "Crashed", "capped at 2 restarts: {v} {v2}");
    assert_eq!(v2["restarts"], 2);
}

fn started_order(d: &Daemon) -> Vec<String> {
    let list = d.ok("GET", "/api/v1/vms", None);
    let mut v: Vec<(u64, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| {
            Some((
                v["started_at_ms"].as_u64()?,
                v["name"].as_str()?.to_string(),
            ))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, n)| n).collect()
}

#[test]
fn automatic_start_in_priority_order_and_shutdown_lowest_priority_first() {
    let mut d = Daemon::start(&["--no-autostart"]);
    for (n, p) in [
        ("a-low", "Low"),
        ("b-high", "High"),
        ("c-off", "Off"),
        ("d-medium", "Medium"),
        ("e-high", "High"),
    ] {
        d.define_counter(n, p, "on-failure");
    }
    assert_eq!(d.terminate(T), Some(0));
    // One start at a time makes the order exact.
    d.args = vec!["--max-concurrent-starts".into(), "1".into()];
    d.spawn();
    let start = std::time::Instant::now();
    while started_order(&d).len() < 4
        || ["a-low", "b-high", "d-medium", "e-high"]
            .iter()
            .any(|n| d.state(n) != "Running")
    {
        assert!(
            start.elapsed() < T,
            "automatic start incomplete: {}",
            d.ok("GET", "/api/v1/vms", None)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let order = started_order(&d);
    assert_eq!(order.len(), 4);
    let mut highs = order[..2].to_vec();
    highs.sort();
    assert_eq!(highs, ["b-high", "e-high"], "{order:?}");
    assert_eq!(order[2..], ["d-medium", "a-low"], "{order:?}");
    assert_eq!(
        d.state("c-off"),
        "Stopped",
        "Off is not started automatically"
    );

    // Host shutdown (SIGTERM without --keep-vms-on-exit): every VM stopped, lowest
    // priority first.
    d.ok("PUT", "/api/v1/vms/c-off/start", None);
    let pids: Vec<i32> = ["a-low", "b-high", "c-off", "d-medium", "e-high"]
        .iter()
        .map(|n| d.pid(n).unwrap())
        .collect();
    assert_eq!(d.terminate(T), Some(0));
    for p in &pids {
        wait_dead(*p, T);
    }
    d.args = vec!["--no-autostart".into()];
    d.spawn();
    let at = |n: &str| -> u64 {
        let e = d.ok("GET", &format!("/api/v1/vms/{n}/exits?limit=1"), None);
        assert_eq!(e[0]["reason"], "requested", "{n}: {e}");
        e[0]["at_ms"].as_u64().unwrap()
    };
    let (off, low, med, high1, high2) = (
        at("c-off"),
        at("a-low"),
        at("d-medium"),
        at("b-high"),
        at("e-high"),
    );
    assert!(
        off <= low && low <= med && med <= high1.min(high2),
        "{off} {low} {med} {high1} {high2}"
    );
    let list = d.ok("GET", "/api/v1/vms", None);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|v| v["state"] == "Stopped"),
        "{list}"
    );
}

#[test]
fn keep_vms_on_exit_leaves_them_running_for_the_next_vireod() {
    let mut d = Daemon::start(&["--no-autostart", "--keep-vms-on-exit"]);
    d.define_counter("keep", "High", "on-failure");
    let st: Value = d.ok("PUT", "/api/v1/vms/keep/start", None);
    let pid = st["pid"].as_i64().unwrap() as i32;
    assert_eq!(d.terminate(T), Some(0));
    assert!(alive(pid), "VMM survives a vireod restart-for-upgrade");
    assert!(!d.socket.exists(), "vireod removes its socket");
    // The next vireod (with automatic start on) adopts it instead of starting another.
    d.args = vec![];
    d.spawn();
    let v = d.wait_state("keep", "Running", T);
    assert_eq!(v["pid"], pid);
    assert_eq!(v["adopted"], true);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        common::processes_mentioning(&d.run_dir.join("vms/keep/api.sock").to_string_lossy()).len(),
        1
    );
}

/// A VMM started by a vireod of the first release (its socket `<run>/vms/NAME.sock`,
/// no run directory of its own) is re-adopted by this vireod after an upgrade, and
/// reached through `vms/NAME/api.sock` (before, this vireod looked only for the new
/// socket, declared the VM crashed and left its VMM running unsupervised).
#[test]
fn a_vmm_of_the_old_run_directory_layout_is_re_adopted_after_an_upgrade() {
    let mut d = Daemon::start(&["--no-autostart"]);
    d.define_counter("old", "High", "on-failure");
    d.ok("PUT", "/api/v1/vms/old/start", None);
    let config = std::fs::read(d.run_dir.join("vms/old.json")).unwrap();
    d.ok("PUT", "/api/v1/vms/old/stop", None);
    assert_eq!(d.terminate(T), Some(0));
    // The VMM as the old vireod started it.
    let cfg = d.dir.path().join("old-config.json");
    std::fs::write(&cfg, config).unwrap();
    let legacy = d.run_dir.join("vms/old.sock");
    let mut vmm = std::process::Command::new(bin("vireo"))
        .arg("--config")
        .arg(&cfg)
        .arg("--api-socket")
        .arg(&legacy)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = vmm.id() as i32;
    let start = Instant::now();
    while !legacy.exists() {
        assert!(start.elapsed() < T, "the old-layout VMM did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let ticks = agent::procfs::stat(pid).unwrap().start_ticks;
    std::fs::write(d.run_dir.join("vms/old.pid"), format!("{pid} {ticks}\n")).unwrap();
    d.spawn();
    let v = d.wait_state("old", "Running", T);
    assert_eq!(v["pid"], pid, "{v}\n{}", d.log());
    assert_eq!(v["adopted"], true, "{v}");
    // Reached through the new path: pause and resume go to that VMM.
    assert!(d.run_dir.join("vms/old/api.sock").exists());
    assert_eq!(
        d.ok("PUT", "/api/v1/vms/old/pause", None)["state"],
        "Paused"
    );
    assert_eq!(
        d.ok("PUT", "/api/v1/vms/old/resume", None)["state"],
        "Running"
    );
    d.wait_serial("old", "tick 3 ", T);
    // A stop ends it, and its old socket goes with it.
    assert_eq!(
        d.ok("PUT", "/api/v1/vms/old/stop", None)["state"],
        "Stopped"
    );
    let status = vmm.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!legacy.exists(), "the old socket stays");
}

#[test]
fn a_vmm_whose_vcpu_panics_is_recorded_as_crashed_with_the_thread_named() {
    // The VMMs vireod starts inherit the test hook (the `test-hooks` build of vireo):
    // vCPU 0 panics at its first exit after a pause and resume, once the VM runs.
    let mut d = Daemon::start(&["--no-autostart"]);
    d.terminate(T);
    d.env.push((
        "VIREO_TEST_PANIC_VCPU".to_string(),
        "after-resume".to_string(),
    ));
    d.spawn();
    d.define_counter("brittle", "Off", "never");
    d.ok("PUT", "/api/v1/vms/brittle/start", None);
    d.wait_serial("brittle", "tick 2 ", T);
    assert_eq!(d.state("brittle"), "Running");
    d.ok("PUT", "/api/v1/vms/brittle/pause", None);
    // The vCPU may panic before the VMM has answered the resume.
    let _ = d.api("PUT", "/api/v1/vms/brittle/resume", None);
    let v = d.wait_state("brittle", "Crashed", T);
    let e = &v["last_exit"];
    assert_eq!(e["reason"], "crashed", "{v}");
    assert_eq!(e["signal"], libc::SIGABRT, "{v}");
    let log = std::fs::read_to_string(d.state_dir.join("vms/brittle/vireo.log")).unwrap();
    assert!(
        log.contains("thread 'vireo-vcpu0' panicked at vmm/src/vcpu.rs:"),
        "{log}"
    );
}

/// A VMM vireod does not know of still serves a VM's socket (left by another
/// incarnation): starting the VM is refused before anything is spawned or written,
/// and that VMM's serial output and socket are left as they were.
#[test]
fn a_start_is_refused_while_an_unknown_vmm_answers_on_the_vms_socket() {
    let d = Daemon::start(&["--no-autostart"]);
    d.define_counter("web", "Off", "never");
    let run = d.run_dir.join("vms/web");
    std::fs::create_dir_all(&run).unwrap();
    let socket = run.join("api.sock");
    let _other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let serial = d.state_dir.join("vms/web/serial.log");
    std::fs::create_dir_all(serial.parent().unwrap()).unwrap();
    std::fs::write(&serial, "the other VMM's output\n").unwrap();

    let (status, body) = d.api("PUT", "/api/v1/vms/web/start", None);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("a VMM still answers"), "{body}");
    assert_eq!(
        std::fs::read_to_string(&serial).unwrap(),
        "the other VMM's output\n"
    );
    assert!(socket.exists(), "the other VMM's socket was removed");
    assert_eq!(d.vm("web")["state"], "Stopped");
    assert!(d.pid("web").is_none());
}
