//! Saving a VM (Hyper-V's Save) through vireod: the guest's state goes to disk, the
//! VMM ends, the VM stays Saved across a vireod restart, and a start resumes the
//! guest where it was (its counter goes on) while discarding the state makes the
//! next start boot afresh. Refusals leave the VM as it was.

use crate::common;

use std::time::Duration;

use common::{wait_dead, Daemon, T};
use serde_json::Value;

/// The VM's saved-state snapshot directory under vireod's state directory.
fn saved_state(d: &Daemon, name: &str) -> std::path::PathBuf {
    d.state_dir.join("vms").join(name).join("saved/state")
}

/// Saves a running counter VM, restarts vireod, resumes it and checks the guest went
/// on from where it was; `extra` are vireod's flags (jailed VMMs by default).
fn save_restart_and_resume(extra: &[&str]) {
    let mut args = vec!["--no-autostart"];
    args.extend_from_slice(extra);
    let mut d = Daemon::start(&args);
    d.define_counter("web", "low", "never");
    let st = d.ok("PUT", "/api/v1/vms/web/start", None);
    let pid = st["pid"].as_i64().unwrap() as i32;
    d.wait_serial("web", "tick 20 ", T);

    // Save through vireoctl: the VMM is gone, the state is on disk, complete.
    let out = d.ctl_ok(&["-o", "json", "vm", "save", "web"]);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["state"], "Saved", "{out}");
    assert!(st["pid"].is_null(), "{out}");
    assert_eq!(st["last_exit"]["reason"], "saved", "{out}");
    wait_dead(pid, T);
    let last_before = *d.tick_numbers("web").last().unwrap();
    assert!(
        saved_state(&d, "web").join("snapshot.json").is_file(),
        "no complete saved state"
    );
    // Nothing runs: the counter does not move.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(*d.tick_numbers("web").last().unwrap(), last_before);

    // A saved VM's definition cannot change (the saved guest resumes with its own).
    let def = serde_json::json!({"config": common::counter_config(), "priority": "high"});
    let (s, body) = d.api("PUT", "/api/v1/vms/web/definition", Some(&def.to_string()));
    assert_eq!(s, 409, "{body}");
    assert!(body.contains("saved state"), "{body}");

    // vireod restarted: the VM is still Saved (the state on disk is the truth).
    d.terminate(T);
    d.spawn();
    assert_eq!(d.state("web"), "Saved");
    let list = d.ctl_ok(&["vm", "list", "--state", "saved"]);
    assert!(list.lines().any(|l| l.starts_with("web")), "{list}");

    // Start resumes the guest: its counter goes on past where it was saved, never
    // from the beginning; the spent state is gone.
    let st = d.ok("PUT", "/api/v1/vms/web/start", None);
    assert_eq!(st["state"], "Running", "{st}");
    d.wait_serial("web", &format!("tick {} ", last_before + 10), T);
    let ticks = d.tick_numbers("web");
    let resumed: Vec<u64> = ticks
        .iter()
        .copied()
        .skip_while(|&t| t <= last_before)
        .collect();
    assert!(
        resumed.first().is_some_and(|&t| t <= last_before + 3),
        "the guest did not resume where it was saved (last {last_before}): {ticks:?}"
    );
    assert!(
        !saved_state(&d, "web").exists(),
        "the spent saved state is still there"
    );
    eprintln!(
        "saved at tick {last_before}; resumed at {:?}; ticks on the serial: {}",
        resumed.first(),
        ticks.len()
    );

    // Save again, then discard: Stopped, and the next start boots afresh.
    let st = d.ok("PUT", "/api/v1/vms/web/save", None);
    assert_eq!(st["state"], "Saved", "{st}");
    let out = d.ctl_ok(&["-o", "json", "vm", "discard-saved-state", "web"]);
    assert!(out.contains("\"Stopped\""), "{out}");
    assert!(!saved_state(&d, "web").exists());
    let serial = d.state_dir.join("vms/web/serial.log");
    std::fs::write(&serial, "").unwrap();
    d.ok("PUT", "/api/v1/vms/web/start", None);
    d.wait_serial("web", "tick 3 ", T);
    let first = d.tick_numbers("web")[0];
    assert!(
        first <= 2,
        "a start after discarding booted afresh: ticks begin at {first}"
    );
    d.ok("PUT", "/api/v1/vms/web/kill", None);
}

#[test]
fn a_saved_vm_survives_a_vireod_restart_and_resumes_where_it_was() {
    save_restart_and_resume(&[]);
}

#[test]
fn an_unjailed_vmm_saves_and_resumes_too() {
    save_restart_and_resume(&["--no-jail"]);
}

#[test]
fn saves_that_cannot_be_are_refused_and_the_vm_goes_on() {
    let d = Daemon::start(&["--no-autostart"]);
    d.define_counter("web", "low", "never");
    // Not running: nothing to save; no saved state to discard.
    let (s, body) = d.api("PUT", "/api/v1/vms/web/save", None);
    assert_eq!(s, 409, "{body}");
    assert!(body.contains("Stopped"), "{body}");
    let (s, body) = d.api("DELETE", "/api/v1/vms/web/saved-state", None);
    assert_eq!(s, 409, "{body}");
    let (s, _) = d.api("PUT", "/api/v1/vms/nope/save", None);
    assert_eq!(s, 404);

    // A save the VMM cannot carry out (its saved-state area made unwritable by a
    // file in the way) fails with the VMM's reason; the VM runs on, unpaused.
    d.ok("PUT", "/api/v1/vms/web/start", None);
    d.wait_serial("web", "tick 5 ", T);
    let area = d.state_dir.join("vms/web/saved");
    std::fs::remove_dir_all(&area).unwrap();
    std::fs::write(&area, "not a directory").unwrap();
    let (s, body) = d.api("PUT", "/api/v1/vms/web/save", None);
    assert!(s >= 400, "{s} {body}");
    assert_eq!(d.state("web"), "Running");
    let n = *d.tick_numbers("web").last().unwrap();
    d.wait_serial("web", &format!("tick {} ", n + 5), T);
    d.ok("PUT", "/api/v1/vms/web/kill", None);
}

#[test]
fn a_vm_whose_stop_action_is_save_is_saved_when_vireod_stops_and_resumes_when_it_starts() {
    let mut d = Daemon::start(&[]);
    let def = serde_json::json!({
        "config": common::counter_config(),
        "priority": "low",
        "restart": "never",
        "stop_action": "save",
    });
    d.ok("PUT", "/api/v1/vms/web", Some(&def.to_string()));
    // Its neighbour keeps the default stop action (turn-off): it boots afresh.
    d.define_counter("plain", "low", "never");
    assert_eq!(d.vm("plain")["definition"]["stop_action"], Value::Null);
    d.ok("PUT", "/api/v1/vms/web/start", None);
    d.ok("PUT", "/api/v1/vms/plain/start", None);
    d.wait_serial("web", "tick 10 ", T);
    d.wait_serial("plain", "tick 10 ", T);

    // vireod stops (no --keep-vms-on-exit): web is saved, plain turned off.
    d.terminate(T);
    let last_before = *d.tick_numbers("web").last().unwrap();
    assert!(saved_state(&d, "web").join("snapshot.json").is_file());
    assert!(!saved_state(&d, "plain").exists());

    // vireod starts again (automatic start): web resumes where it was, plain boots.
    d.spawn();
    d.wait_state("web", "Running", T);
    d.wait_state("plain", "Running", T);
    d.wait_serial("web", &format!("tick {} ", last_before + 5), T);
    let ticks = d.tick_numbers("web");
    let resumed = ticks.iter().copied().find(|&t| t > last_before);
    assert!(
        resumed.is_some_and(|t| t <= last_before + 3),
        "web did not resume where it was saved (last {last_before}): {ticks:?}"
    );
    d.wait_serial("plain", "tick 3 ", T);
    let first = d.tick_numbers("plain")[0];
    assert!(
        first <= 2,
        "plain did not boot afresh: ticks begin at {first}"
    );
    assert_eq!(d.vm("web")["definition"]["stop_action"], "save");
    d.ok("PUT", "/api/v1/vms/web/kill", None);
    d.ok("PUT", "/api/v1/vms/plain/kill", None);
}
