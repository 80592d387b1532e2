//! Dynamic Memory through vireod: two jailed VMMs run the `test=dynmem` guest under a
//! host budget of 1 GiB (`--memory-budget`). One guest's use grows towards 900 MiB: it
//! gets virtio-mem blocks plugged and uses them (it says so, pattern read back); the
//! other used 400 MiB at boot and then little: it is ballooned down to its minimum and
//! never below, and its VMM's RSS falls. A resize beyond the maximum is refused; a
//! VMM that stops answering is skipped while the other is still balanced; a vireod
//! restart re-derives everything from the VMMs.

use crate::common;

use std::time::{Duration, Instant};

use common::{http, Daemon, T};
use serde_json::{json, Value};

const M: u64 = 1 << 20;

fn definition(cmdline: &str, startup: u64, min: u64, max: u64) -> Value {
    json!({
        "config": {
            "payload": {"kernel": vireo_e2e::guest(), "cmdline": format!("test=dynmem {cmdline}")},
            "memory": {"size": startup * M},
        },
        "dynamic_memory": {"minimum": format!("{min}M"), "maximum": format!("{max}M")},
    })
}

/// Waits until `f` gives a value; panics with `what` and the last thing seen.
fn wait_for<V>(what: &str, d: &Daemon, mut f: impl FnMut() -> Result<V, String>) -> V {
    let deadline = Instant::now() + T * 2;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: never; last: {last}\nvireod log:\n{}", d.log())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn rss(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// The last complete `dynmem used_mib=...` line of a guest, as (key, value) pairs.
fn last_report(d: &Daemon, name: &str) -> Vec<(String, u64)> {
    let mut serial = d.serial(name);
    serial.truncate(serial.rfind('\n').map_or(0, |i| i + 1));
    let Some(line) = serial
        .lines()
        .rev()
        .find(|l| l.starts_with("dynmem used_mib="))
    else {
        return Vec::new();
    };
    line.split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

fn get(report: &[(String, u64)], key: &str) -> u64 {
    report.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
}

fn memory(d: &Daemon, name: &str) -> Value {
    d.vm(name)["memory"].clone()
}

fn vmm(d: &Daemon, name: &str, route: &str) -> Value {
    let sock = d.vm(name)["socket"].as_str().unwrap().to_string();
    let (s, body) = http(std::path::Path::new(&sock), "GET", route, None);
    assert_eq!(s, 200, "{route}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn memory_follows_use_within_the_budget_never_below_minimum() {
    let mut d = Daemon::start(&[
        "--no-autostart",
        "--keep-vms-on-exit",
        "--memory-budget",
        "1G",
        "--balance-interval-ms",
        "300",
    ]);
    // grow: boots with 256 MiB, may have 128..1024; wants 64 MiB, then 32 MiB more
    // every 250 ms up to 900.
    let grow = definition("use_mib=64 use_to_mib=900 use_step_mib=32", 256, 128, 1024);
    let st = d.ok("PUT", "/api/v1/vms/grow", Some(&grow.to_string()));
    // vireod derived the VMM's devices: boot 256 MiB, a 768 MiB hotplug region, a
    // balloon with statistics.
    let config = &st["definition"]["config"];
    assert_eq!(config["memory"]["size"], 256 * M, "{st}");
    assert_eq!(config["memory"]["hotplug_size"], 768 * M, "{st}");
    assert_eq!(config["balloon"]["stats_interval_s"], 1, "{st}");
    // idle: boots with 512 MiB (192..512), uses 400 MiB at first, then 16.
    let idle = definition("use_mib=400 use_to_mib=16 use_step_mib=400", 512, 192, 512);
    d.ok("PUT", "/api/v1/vms/idle", Some(&idle.to_string()));
    // vireoctl changes the settings it is given and keeps the others; a change that
    // breaks a rule is refused with its line and changes nothing.
    d.ctl_ok(&[
        "vm",
        "set",
        "grow",
        "--dynamic-memory",
        "weight=9000,buffer=25",
    ]);
    let dm = &d.vm("grow")["definition"]["dynamic_memory"];
    assert_eq!(
        (dm["weight"].as_u64(), dm["buffer"].as_u64()),
        (Some(9000), Some(25)),
        "{dm}"
    );
    assert_eq!(dm["maximum"], 1024 * M, "{dm}");
    let o = d.ctl(&["vm", "set", "grow", "--dynamic-memory", "min=300M"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("minimum <= startup <= maximum"),
        "{o:?}"
    );
    assert_eq!(
        d.vm("grow")["definition"]["dynamic_memory"]["minimum"],
        128 * M
    );
    // A definition out of order gets one clear line.
    let bad = definition("", 256, 512, 1024);
    let (s, body) = d.api("PUT", "/api/v1/vms/bad", Some(&bad.to_string()));
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("minimum <= startup <= maximum"), "{body}");

    d.ok("PUT", "/api/v1/vms/idle/start", None);
    d.wait_serial("idle", "dynmem ready", T);
    let idle_pid = d.pid("idle").unwrap();
    // Its 400 MiB are backed: the RSS before the balloon.
    let rss_busy = wait_for("idle's VMM to back its 400 MiB", &d, || {
        let r = rss(idle_pid);
        (r > 380 * M)
            .then_some(r)
            .ok_or(format!("rss {} MiB", r >> 20))
    });
    d.ok("PUT", "/api/v1/vms/grow/start", None);

    // grow gets memory plugged and uses it; the guest reads its pattern back.
    let report = wait_for("grow to use plugged memory", &d, || {
        let r = last_report(&d, "grow");
        (get(&r, "plugged_used_mib") >= 400 && get(&r, "verified") == 1)
            .then(|| r.clone())
            .ok_or(format!("{r:?}"))
    });
    eprintln!("grow: {report:?}");
    // idle is ballooned down to its minimum, never below.
    let mut lowest = u64::MAX;
    let idle_mem = wait_for("idle to be ballooned to its minimum", &d, || {
        let m = memory(&d, "idle");
        let assigned = m["assigned_bytes"].as_u64().unwrap_or(u64::MAX);
        lowest = lowest.min(assigned);
        (assigned == 192 * M)
            .then(|| m.clone())
            .ok_or(m.to_string())
    });
    assert!(lowest >= 192 * M, "idle went below its minimum: {lowest}");
    assert_eq!(idle_mem["target_bytes"], 192 * M, "{idle_mem}");
    let counters = vmm(&d, "idle", "/api/v1/vm.counters");
    assert_eq!(counters["balloon0"]["actual_bytes"], 320 * M, "{counters}");
    wait_for("idle's guest to report its balloon", &d, || {
        let r = last_report(&d, "idle");
        (get(&r, "balloon_mib") == 320)
            .then_some(())
            .ok_or(format!("{r:?}"))
    });
    // The host got the ballooned pages back.
    let rss_after = wait_for("idle's RSS to fall", &d, || {
        let r = rss(idle_pid);
        (r + 150 * M < rss_busy).then_some(r).ok_or(format!(
            "rss {} MiB (was {} MiB)",
            r >> 20,
            rss_busy >> 20
        ))
    });
    // grow has what the budget leaves (1 GiB - idle's 192 MiB), plugged: vireod's view
    // (its last round) and vm.info agree once the guest has plugged it.
    let (info, assigned) = wait_for("grow to hold the rest of the budget", &d, || {
        let info = vmm(&d, "grow", "/api/v1/vm.info");
        let grow_mem = memory(&d, "grow");
        let assigned = grow_mem["assigned_bytes"].as_u64().unwrap_or(0);
        assert!(
            assigned <= 832 * M,
            "grow above the budget's rest: {grow_mem}"
        );
        (assigned == 832 * M && info["memory_actual_size"] == assigned)
            .then(|| (info.clone(), assigned))
            .ok_or(format!("{grow_mem} {info}"))
    });
    assert!(
        info["memory_plugged_size"].as_u64().unwrap() >= 256 * M,
        "{info}"
    );
    eprintln!(
        "idle: rss {} -> {} MiB; grow: {} MiB assigned, {} MiB plugged",
        rss_busy >> 20,
        rss_after >> 20,
        assigned >> 20,
        info["memory_plugged_size"].as_u64().unwrap() >> 20
    );
    eprintln!(
        "memory targets set so far: {}",
        d.log().matches("memory target").count()
    );
    let list = d.ctl_ok(&["vm", "list"]);
    assert!(list.contains("192M (demand 192M)"), "{list}");

    // A resize beyond the maximum is refused, through the API and vireoctl.
    let (s, body) = d.api("PUT", "/api/v1/vms/grow/memory", Some(r#"{"memory":"2G"}"#));
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("outside its dynamic memory range"), "{body}");
    let o = d.ctl(&["vm", "resize", "idle", "--memory", "64M"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("192"), "{o:?}");

    // A VMM that does not answer is skipped; the other is still balanced.
    // SAFETY: kill with a pid of this test's VMM.
    unsafe { libc::kill(idle_pid, libc::SIGSTOP) };
    d.wait_log("VMM does not answer; skipping it");
    let at = memory(&d, "grow")["at_ms"].as_u64().unwrap();
    wait_for("grow to be balanced while idle is silent", &d, || {
        let now = memory(&d, "grow")["at_ms"].as_u64().unwrap();
        (now > at).then_some(()).ok_or(format!("at_ms {now}"))
    });
    assert_eq!(memory(&d, "idle")["unresponsive"], true);
    // SAFETY: as above.
    unsafe { libc::kill(idle_pid, libc::SIGCONT) };
    d.wait_log("VMM answers again");

    // vireod restarted (the VMs run on): the balancer picks up from the VMMs.
    d.terminate(T);
    d.spawn();
    let m = wait_for("the balancer's first round after the restart", &d, || {
        let m = memory(&d, "idle");
        (m["target_bytes"] == 192 * M)
            .then(|| m.clone())
            .ok_or(m.to_string())
    });
    assert_eq!(m["assigned_bytes"], 192 * M, "{m}");
    assert_eq!(d.pid("idle"), Some(idle_pid));
    d.ok("PUT", "/api/v1/vms/grow/kill", None);
    d.ok("PUT", "/api/v1/vms/idle/kill", None);
}

/// A static VM (boot memory, a hotplug region, a balloon) resized by hand: up through
/// virtio-mem, down through the balloon, and no further than its devices reach.
#[test]
fn a_static_vm_is_resized_through_the_devices_it_has() {
    let d = Daemon::start(&["--no-autostart"]);
    let def = json!({
        "config": {
            "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=dynmem use_mib=16"},
            "memory": {"size": 256 * M, "hotplug_size": 256 * M},
            "balloon": {},
        },
    });
    d.ok("PUT", "/api/v1/vms/s", Some(&def.to_string()));
    let (s, body) = d.api("PUT", "/api/v1/vms/s/memory", Some(r#"{"memory":"384M"}"#));
    assert_eq!(s, 409, "not running: {body}");
    d.ok("PUT", "/api/v1/vms/s/start", None);
    d.wait_serial("s", "dynmem ready", T);

    d.ctl_ok(&["vm", "resize", "s", "--memory", "384M"]);
    wait_for("the guest to plug 128 MiB", &d, || {
        let r = last_report(&d, "s");
        (get(&r, "plugged_mib") == 128 && get(&r, "balloon_mib") == 0)
            .then_some(())
            .ok_or(format!("{r:?}"))
    });
    assert_eq!(
        vmm(&d, "s", "/api/v1/vm.info")["memory_plugged_size"],
        128 * M
    );
    assert_eq!(memory(&d, "s")["target_bytes"], 384 * M);

    d.ctl_ok(&["vm", "resize", "s", "--memory", "128M"]);
    wait_for("the guest to unplug and balloon 128 MiB", &d, || {
        let r = last_report(&d, "s");
        (get(&r, "plugged_mib") == 0 && get(&r, "balloon_mib") == 128)
            .then_some(())
            .ok_or(format!("{r:?}"))
    });
    let c = vmm(&d, "s", "/api/v1/vm.counters");
    assert_eq!(c["balloon0"]["actual_bytes"], 128 * M, "{c}");

    // Beyond boot memory + hotplug region, or not in blocks: refused, nothing asked.
    let o = d.ctl(&["vm", "resize", "s", "--memory", "1G"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("above the VM's maximum of 512 MiB"), "{err}");
    let (s, body) = d.api("PUT", "/api/v1/vms/s/memory", Some(r#"{"memory":1000000}"#));
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("multiple of the 2 MiB block"), "{body}");
    let (s, body) = d.api("PUT", "/api/v1/vms/s/memory", Some(r#"{"size":"1G"}"#));
    assert_eq!(s, 400, "{body}");
    assert_eq!(memory(&d, "s")["target_bytes"], 128 * M);
    let c = vmm(&d, "s", "/api/v1/vm.counters");
    assert_eq!(c["balloon0"]["target_bytes"], 128 * M, "{c}");
    d.ok("PUT", "/api/v1/vms/s/kill", None);
}
