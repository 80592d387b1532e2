//! CPU isolation: VMMs boot in `<root>/boot` and run in `<root>/vms/NAME` with the
//! VM's relative weight (cgroup v1 cpu.shares); without cgroups nothing fails.

mod common;

use std::path::Path;

use common::{Daemon, T};
use serde_json::json;

const CPU: &str = "/sys/fs/cgroup/cpu";

fn cgroups_writable() -> bool {
    let probe = Path::new(common::CGROUP_TEST_ROOT).join("probe");
    let ok = std::fs::create_dir_all(&probe).is_ok() && probe.join("cpu.shares").exists();
    let _ = std::fs::remove_dir(&probe);
    ok
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// (name, cpu cgroup) of every thread of `pid`.
fn thread_cgroups(pid: i32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| {
            let tid: i32 = t.file_name().to_str()?.parse().ok()?;
            let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup")).ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            let cg = text.lines().find_map(|l| {
                let mut p = l.splitn(3, ':');
                let (_, c, path) = (p.next()?, p.next()?, p.next()?);
                c.split(',').any(|c| c == "cpu").then(|| path.to_string())
            })?;
            Some((comm.trim().to_string(), cg))
        })
        .collect()
}

#[test]
fn vmms_boot_in_the_boot_cgroup_and_run_in_their_own_with_the_vms_weight() {
    if !cgroups_writable() {
        vireo_e2e::skip_or_fail_under_ci(format!("no writable cgroup v1 cpu hierarchy at {CPU}"));
        return;
    }
    let d = Daemon::start(&["--no-autostart"]);
    let root = d.cgroup_root.clone();
    let rel = format!("/{}", root.strip_prefix(CPU).unwrap().display());
    let host = d.ok("GET", "/api/v1/host.info", None);
    assert_eq!(host["cpu_cgroup"], root.display().to_string(), "{host}");
    assert_eq!(read(&root.join("boot/cpu.shares")), "4096");
    assert_eq!(read(&root.join("vms/cpu.shares")), "256");

    let def = json!({"config": common::counter_config(), "cpu_weight": 300});
    d.ok("PUT", "/api/v1/vms/web", Some(&def.to_string()));
    let st = d.ok("PUT", "/api/v1/vms/web/start", None);
    let pid = st["pid"].as_i64().unwrap() as i32;
    // The vCPU in the VM's own group, the VMM's other threads (control loop, API)
    // with the VMMs.
    let cg = thread_cgroups(pid);
    let vcpu = cg
        .iter()
        .find(|(n, _)| n == "vireo-vcpu0")
        .unwrap_or_else(|| panic!("no vCPU thread: {cg:?}"));
    assert_eq!(vcpu.1, format!("{rel}/vms/web"), "{cg:?}");
    for (n, c) in &cg {
        if ["vireo", "vireo-api"].contains(&n.as_str()) {
            assert_eq!(*c, format!("{rel}/vmm"), "{cg:?}");
        }
    }
    assert_eq!(read(&root.join("vms/web/cpu.shares")), "3072");
    assert_eq!(read(&root.join("vmm/cpu.shares")), "2048");
    // A pause lends the vCPU the VMMs' share while it parks, then gives it back.
    d.ok("PUT", "/api/v1/vms/web/pause", None);
    let cg = thread_cgroups(pid);
    let vcpu = cg
        .iter()
        .find(|(n, _)| n == "vireo-vcpu0")
        .unwrap_or_else(|| panic!("no vCPU thread: {cg:?}"));
    assert_eq!(vcpu.1, format!("{rel}/vms/web"), "{cg:?}");
    d.ok("PUT", "/api/v1/vms/web/resume", None);
    // vireod itself stays where it was started.
    let own = agent::cgroup::cpu_cgroup_of(d.child.as_ref().unwrap().id() as i32).unwrap();
    assert!(!own.starts_with(&rel), "{own}");

    // A receiver whose VM has not arrived is still "booting".
    let req = json!({"name": "rx", "definition": {"config": common::counter_config()}});
    let (s, b) = d.api(
        "POST",
        "/api/v1/migrations/incoming",
        Some(&req.to_string()),
    );
    assert_eq!(s, 201, "{b}");
    let id = serde_json::from_str::<serde_json::Value>(&b).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let rx = d.pid("rx").unwrap();
    let cg = thread_cgroups(rx);
    assert!(
        !cg.is_empty() && cg.iter().all(|(_, c)| *c == format!("{rel}/boot")),
        "{cg:?}"
    );
    d.ok("DELETE", &format!("/api/v1/migrations/{id}"), None);
    let m = d.wait_migration(&id, T);
    assert_eq!(m["state"], "cancelled", "{m}");
    assert!(d.absent("rx"));
    common::wait_dead(rx, T);

    // Its cgroup goes with the VMM.
    d.ok("PUT", "/api/v1/vms/web/stop", None);
    assert!(!root.join("vms/web").exists());
}

#[test]
fn without_cgroups_or_where_none_can_be_made_vms_still_start() {
    let d = Daemon::start(&["--no-autostart", "--no-cpu-cgroups"]);
    assert!(d.ok("GET", "/api/v1/host.info", None)["cpu_cgroup"].is_null());
    d.define_counter("a", "Medium", "on-failure");
    let st = d.ok("PUT", "/api/v1/vms/a/start", None);
    let pid = st["pid"].as_i64().unwrap() as i32;
    let vireod = d.child.as_ref().unwrap().id() as i32;
    assert_eq!(
        agent::cgroup::cpu_cgroup_of(pid),
        agent::cgroup::cpu_cgroup_of(vireod)
    );

    // A directory that is not a cgroup: one warning, and the VM starts anyway.
    let plain = tempfile::tempdir().unwrap();
    let root = plain.path().join("vireo");
    let d2 = Daemon::start(&[
        "--no-autostart",
        "--cpu-cgroup-root",
        root.to_str().unwrap(),
    ]);
    assert!(d2.log().contains("CPU cgroups unavailable"), "{}", d2.log());
    assert!(d2.ok("GET", "/api/v1/host.info", None)["cpu_cgroup"].is_null());
    d2.define_counter("b", "Medium", "on-failure");
    let st = d2.ok("PUT", "/api/v1/vms/b/start", None);
    assert_eq!(st["state"], "Running", "{st}");
}
