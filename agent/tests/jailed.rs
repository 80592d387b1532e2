//! vireod jails every VMM (it runs as root here): seen from outside, through /proc, the
//! files on disk and what the VMMs themselves report (the `test-hooks` build of vireo
//! tries to open `VIREO_TEST_OPEN` once confined and logs the outcome).

use crate::common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::{Daemon, T};
use serde_json::{json, Value};

const FIRST: u32 = 980000;
const LAST: u32 = 980999;

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    vireo_e2e::skip_or_fail_under_ci("vireod jails its VMMs only when it runs as root");
    false
}

fn raw(p: &Path) -> PathBuf {
    std::fs::File::create(p).unwrap().set_len(1 << 20).unwrap();
    p.to_path_buf()
}

fn with_disk(disk: &Path) -> Value {
    let mut c = common::counter_config();
    c["disks"] = json!([{ "path": disk, "format": "raw" }]);
    json!({ "config": c, "restart": "never" })
}

/// A `Key:` line of /proc/PID/status, its fields.
fn status(pid: i32, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status:\n{text}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn uid_of(pid: i32) -> u32 {
    status(pid, "Uid")[0].parse().unwrap()
}

/// Every file and directory under `root`, as absolute paths inside it (procfs left out).
fn tree(root: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let inside = Path::new("/").join(p.strip_prefix(root).unwrap());
            if inside == Path::new("/proc") {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                todo.push(p);
            } else {
                out.insert(inside);
            }
        }
    }
    out
}

fn vmm_log(d: &Daemon, name: &str) -> String {
    std::fs::read_to_string(d.state_dir.join("vms").join(name).join("vireo.log"))
        .unwrap_or_default()
}

#[test]
fn each_vmm_runs_with_its_own_uid_no_capabilities_seccomp_and_in_a_pid_namespace() {
    if !as_root() {
        return;
    }
    let mut d = Daemon::start(&["--no-autostart"]);
    assert!(d.log().contains("VMMs are jailed"), "{}", d.log());
    let disks = [
        raw(&d.dir.path().join("a.raw")),
        raw(&d.dir.path().join("b.raw")),
    ];
    let mut uids = Vec::new();
    for (name, disk) in ["a", "b"].iter().zip(&disks) {
        d.ok(
            "PUT",
            &format!("/api/v1/vms/{name}"),
            Some(&with_disk(disk).to_string()),
        );
        d.ok("PUT", &format!("/api/v1/vms/{name}/start"), None);
        d.wait_serial(name, "tick 2 ", T);
        let pid = d.pid(name).unwrap();
        let uid = uid_of(pid);
        assert!((FIRST..=LAST).contains(&uid), "uid {uid}");
        assert_eq!(status(pid, "Uid"), vec![uid.to_string(); 4]);
        assert_eq!(status(pid, "Gid"), vec![uid.to_string(); 4]);
        for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status(pid, caps), ["0000000000000000"], "{caps}");
        }
        assert_eq!(status(pid, "NoNewPrivs"), ["1"]);
        assert_eq!(status(pid, "Seccomp"), ["2"]);
        // Its own PID namespace, where it is PID 1; vireod reports the host's pid.
        assert_eq!(status(pid, "NSpid"), [pid.to_string(), "1".to_string()]);
        let own_ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
        assert_ne!(own_ns, std::fs::read_link("/proc/self/ns/pid").unwrap());
        // Its disk is its own; nothing else of the storage root is.
        assert_eq!(std::fs::metadata(disk).unwrap().uid(), uid);
        uids.push(uid);
    }
    assert_ne!(uids[0], uids[1], "two VMs never share a uid");

    // Its root holds only its own files: kernel, disk, serial files, its API socket
    // and the device nodes; its procfs only itself.
    let pid = d.pid("a").unwrap();
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let serial = d.state_dir.join("vms/a/serial.log");
    let want: BTreeSet<PathBuf> = [
        vireo_e2e::guest(),
        disks[0].clone(),
        serial.clone(),
        PathBuf::from(format!("{}.1", serial.display())),
        d.run_dir.join("vms/a/api.sock"),
        PathBuf::from("/dev/kvm"),
        PathBuf::from("/dev/urandom"),
    ]
    .into_iter()
    .collect();
    assert_eq!(tree(&root), want);
    let procs: Vec<String> = std::fs::read_dir(root.join("proc"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
        .collect();
    assert_eq!(procs, ["1"]);

    // The uid stays the VM's across a restart of the VM and of vireod.
    d.ok("PUT", "/api/v1/vms/a/stop", None);
    d.ok("PUT", "/api/v1/vms/a/start", None);
    assert_eq!(uid_of(d.pid("a").unwrap()), uids[0]);
    d.terminate(T);
    d.spawn();
    d.ok("PUT", "/api/v1/vms/a/start", None);
    assert_eq!(uid_of(d.pid("a").unwrap()), uids[0]);
    d.ok("PUT", "/api/v1/vms/a/stop", None);

    // Deleted, a VM's disk goes back to root 0600 and its uid to the next VM.
    d.ok("DELETE", "/api/v1/vms/a", None);
    let m = std::fs::metadata(&disks[0]).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (0, 0, 0o600));
    d.ok(
        "PUT",
        "/api/v1/vms/c",
        Some(&with_disk(&disks[0]).to_string()),
    );
    d.ok("PUT", "/api/v1/vms/c/start", None);
    assert_eq!(uid_of(d.pid("c").unwrap()), uids[0]);
}

#[test]
fn a_jailed_vmm_cannot_open_another_vms_disk_or_a_storage_root_file() {
    if !as_root() {
        return;
    }
    let mut d = Daemon::start(&["--no-autostart"]);
    let a_disk = raw(&d.dir.path().join("a.raw"));
    let b_disk = raw(&d.dir.path().join("b.raw"));
    d.terminate(T);
    // Every VMM, once confined, tries to open a's disk.
    d.env
        .push(("VIREO_TEST_OPEN".into(), a_disk.display().to_string()));
    d.spawn();
    for (name, disk) in [("a", &a_disk), ("b", &b_disk)] {
        d.ok(
            "PUT",
            &format!("/api/v1/vms/{name}"),
            Some(&with_disk(disk).to_string()),
        );
        d.ok("PUT", &format!("/api/v1/vms/{name}/start"), None);
    }
    // The probe runs once the control thread is confined, which may come a moment
    // after the VM reports running.
    let line = |d: &Daemon, name: &str| {
        let start = std::time::Instant::now();
        loop {
            let log = vmm_log(d, name);
            if let Some(l) = log.lines().find(|l| l.contains("test hook: open")) {
                return l.to_string();
            }
            assert!(start.elapsed() < T, "{name}: no probe line in\n{log}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    // a reaches its own disk (the probe works); b does not even see it (ENOENT).
    assert!(line(&d, "a").ends_with(": opened"), "{}", line(&d, "a"));
    assert!(line(&d, "b").ends_with(": error 2"), "{}", line(&d, "b"));
    // Nor does b see the root's other files, e.g. vireod's inventory.
    d.terminate(T);
    d.env.retain(|(k, _)| k != "VIREO_TEST_OPEN");
    let inventory = d.state_dir.join("inventory.db");
    d.env
        .push(("VIREO_TEST_OPEN".into(), inventory.display().to_string()));
    d.spawn();
    std::fs::remove_file(d.state_dir.join("vms/b/vireo.log")).unwrap();
    d.ok("PUT", "/api/v1/vms/b/start", None);
    assert!(line(&d, "b").ends_with(": error 2"), "{}", line(&d, "b"));
}

#[test]
fn sigterm_and_sigkill_end_a_jailed_vmm_and_are_recorded_as_those_signals() {
    if !as_root() {
        return;
    }
    let d = Daemon::start(&["--no-autostart"]);
    for (name, sig) in [("t", libc::SIGTERM), ("k", libc::SIGKILL)] {
        d.define_counter(name, "Off", "never");
        d.ok("PUT", &format!("/api/v1/vms/{name}/start"), None);
        d.wait_serial(name, "tick 2 ", T);
        let pid = d.pid(name).unwrap();
        // SAFETY: kill with the pid vireod reports and a signal.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        let v = d.wait_state(name, "Crashed", T);
        let e = &v["last_exit"];
        assert_eq!(e["pid"], pid, "{v}");
        assert_eq!(e["signal"], sig, "{v}");
        assert!(e["status"].is_null(), "{v}");
        assert!(!common::alive(pid));
    }
}

#[test]
fn jail_uids_run_out_with_a_clear_error() {
    if !as_root() {
        return;
    }
    let d = Daemon::start(&["--no-autostart", "--jail-uids", "990500-990500"]);
    d.define_counter("one", "Off", "never");
    d.define_counter("two", "Off", "never");
    d.ok("PUT", "/api/v1/vms/one/start", None);
    assert_eq!(uid_of(d.pid("one").unwrap()), 990500);
    let (code, body) = d.api("PUT", "/api/v1/vms/two/start", None);
    assert_eq!(code, 500, "{body}");
    assert!(
        body.contains("every jail uid of --jail-uids 990500-990500 is taken"),
        "{body}"
    );
    assert_eq!(d.state("two"), "Stopped");
}

#[test]
fn no_jail_runs_the_vmm_as_root_in_the_hosts_pid_namespace_with_a_warning() {
    if !as_root() {
        return;
    }
    let d = Daemon::start(&["--no-autostart", "--no-jail"]);
    assert!(
        d.log().contains("--no-jail: every VMM runs unconfined"),
        "{}",
        d.log()
    );
    d.define_counter("free", "Off", "never");
    d.ok("PUT", "/api/v1/vms/free/start", None);
    d.wait_serial("free", "tick 2 ", T);
    let pid = d.pid("free").unwrap();
    assert_eq!(uid_of(pid), 0);
    assert_eq!(status(pid, "NSpid"), [pid.to_string()]);
    d.ok("PUT", "/api/v1/vms/free/stop", None);
    assert_eq!(d.vm("free")["last_exit"]["reason"], "requested");
}

#[test]
fn a_jailed_vm_migrates_shared_nothing_between_two_vireods_into_a_storage_dir_of_its_own() {
    if !as_root() {
        return;
    }
    // Same-host vireods that name each other (--peer-socket).
    let (src, dst) = Daemon::pair(&["--no-autostart"], &["--no-autostart"]);
    let disk = src.dir.path().join("m.raw");
    let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&disk, &pattern).unwrap();
    let mut def = with_disk(&disk);
    def["config"]["disks"][0]["size"] = json!(1u64 << 20);
    src.ok("PUT", "/api/v1/vms/m", Some(&def.to_string()));
    src.ok("PUT", "/api/v1/vms/m/start", None);
    src.wait_serial("m", "tick 5 ", T);
    let src_uid = uid_of(src.pid("m").unwrap());

    // A storage_dir that holds files already would be handed to the VM's uid: refused.
    let busy = dst.dir.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    raw(&busy.join("someone-elses.raw"));
    let (code, body) = src.api(
        "PUT",
        "/api/v1/vms/m/migrate",
        Some(
            &json!({"destination_agent": dst.socket, "copy_storage": true, "storage_dir": busy})
                .to_string(),
        ),
    );
    let refused = if code == 202 {
        let id: Value = serde_json::from_str(&body).unwrap();
        src.wait_migration(id["id"].as_str().unwrap(), T)
    } else {
        json!({"state": "failed", "error": body})
    };
    assert_eq!(refused["state"], "failed", "{refused}");
    assert!(
        refused["error"]
            .to_string()
            .contains("must be an empty directory"),
        "{refused}"
    );
    assert_eq!(src.state("m"), "Running");

    // Into an empty one: the source VMM reaches the destination's unix receiver
    // through vireod's relay in its own run directory.
    let incoming = dst.dir.path().join("incoming");
    std::fs::create_dir(&incoming).unwrap();
    let rec = src.migrate(
        "m",
        &json!({"destination_agent": dst.socket, "copy_storage": true, "storage_dir": incoming}),
    );
    let done = src.wait_migration(rec["id"].as_str().unwrap(), T);
    assert_eq!(done["state"], "completed", "{done}\n{}", dst.log());
    let v = dst.wait_state("m", "Running", T);
    let pid = v["pid"].as_i64().unwrap() as i32;
    let dst_uid = uid_of(pid);
    assert!((FIRST..=LAST).contains(&dst_uid));
    assert_eq!(status(pid, "NSpid")[1], "1");
    let copied = incoming.join("m.raw");
    assert_eq!(std::fs::read(&copied).unwrap(), pattern);
    assert_eq!(std::fs::metadata(&copied).unwrap().uid(), dst_uid);
    // The source's disk is untouched and still its (former) VM's.
    assert_eq!(std::fs::read(&disk).unwrap(), pattern);
    assert_eq!(std::fs::metadata(&disk).unwrap().uid(), src_uid);
    let ticks = dst.tick_numbers("m");
    dst.wait_serial(
        "m",
        &format!("tick {} ", ticks.last().copied().unwrap_or(0) + 3),
        T,
    );
}

#[test]
fn a_jailed_vmms_storage_roots_end_at_its_jail() {
    if !as_root() {
        return;
    }
    // A storage root others may traverse, with a file anyone may read that is not
    // this VM's: a root opened before the jail would still reach it.
    let mut d = Daemon::start(&["--no-autostart"]);
    use std::os::unix::fs::PermissionsExt;
    let public = d.dir.path().join("public.raw");
    std::fs::write(&public, b"not yours").unwrap();
    for (p, mode) in [(d.dir.path(), 0o755), (public.as_path(), 0o644)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let own = raw(&d.dir.path().join("own.raw"));
    d.terminate(T);
    d.env.push((
        "VIREO_TEST_OPEN_BENEATH".into(),
        public.display().to_string(),
    ));
    d.spawn();
    d.ok("PUT", "/api/v1/vms/v", Some(&with_disk(&own).to_string()));
    d.ok("PUT", "/api/v1/vms/v/start", None);
    let start = std::time::Instant::now();
    let line = loop {
        let log = vmm_log(&d, "v");
        if let Some(l) = log.lines().find(|l| l.contains("test hook: open beneath")) {
            break l.to_string();
        }
        assert!(start.elapsed() < T, "no probe line in\n{log}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(line.contains(": refused: "), "{line}");
    assert!(line.contains("No such file"), "{line}");
    // Its own disk, opened the same way, works: the VM runs.
    d.wait_serial("v", "tick 2 ", T);
}

#[test]
fn a_jailed_vm_runs_on_a_differencing_vhdx_with_its_parent_bound_read_only() {
    if !as_root() {
        return;
    }
    let d = Daemon::start(&["--no-autostart"]);
    let base = d.dir.path().join("base.vhdx");
    let child = d.dir.path().join("child.vhdx");
    let img = |args: &[&str]| {
        let out = std::process::Command::new(common::bin("vireo-img"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    img(&["create", "-f", "vhdx", base.to_str().unwrap(), "8M"]);
    img(&[
        "create",
        "-f",
        "vhdx",
        "-b",
        "base.vhdx",
        "-F",
        "vhdx",
        child.to_str().unwrap(),
    ]);
    // A shared base: readable by every VM's uid, owned by none of them.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut c = common::counter_config();
    c["disks"] = json!([{ "path": child, "format": "vhdx" }]);
    let def = json!({ "config": c, "restart": "never" });
    d.ok("PUT", "/api/v1/vms/diff", Some(&def.to_string()));
    d.ok("PUT", "/api/v1/vms/diff/start", None);
    d.wait_serial("diff", "tick 2 ", T);
    let pid = d.pid("diff").unwrap();
    let files = tree(Path::new(&format!("/proc/{pid}/root")));
    assert!(files.contains(&base), "{files:?}");
    assert_eq!(
        std::fs::metadata(&base).unwrap().uid(),
        0,
        "the base is not chowned"
    );
    assert_eq!(std::fs::metadata(&child).unwrap().uid(), uid_of(pid));
}

/// A clustered disk's fencing record (`DISK.fence`, beside the image) is in the jail
/// and the VM's own: the jailed VMM records its token there (before, the record was not
/// bound, so a jailed VMM could not create it in its read-only jail root and the
/// start failed). A record holding a newer token still refuses the disk.
#[test]
fn a_jailed_vmm_records_its_fencing_token_beside_its_disk() {
    if !as_root() {
        return;
    }
    let d = Daemon::start(&["--no-autostart"]);
    let disk = raw(&d.dir.path().join("f.raw"));
    let record = d.dir.path().join("f.raw.fence");
    let mut def = with_disk(&disk);
    def["config"]["disks"][0]["fencing_token"] = json!(7);
    d.ok("PUT", "/api/v1/vms/f", Some(&def.to_string()));
    d.ok("PUT", "/api/v1/vms/f/start", None);
    d.wait_serial("f", "tick 2 ", T);
    let uid = uid_of(d.pid("f").unwrap());
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        format!("token={:020}\n", 7)
    );
    let m = std::fs::metadata(&record).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (uid, 0o600));
    d.ok("PUT", "/api/v1/vms/f/stop", None);
    // Another node took the VM over meanwhile: its newer token refuses this one.
    std::fs::write(&record, format!("token={:020}\n", 9)).unwrap();
    let (s, b) = d.api("PUT", "/api/v1/vms/f/start", None);
    assert_eq!(s, 500, "{b}");
    assert!(b.contains("older than the 9 recorded"), "{b}");
}
