//! vireod and its VMs under a real systemd: the shipped units (agent/systemd/), a real
//! `systemd --system` as PID 1 of its own PID, mount, network, UTS and IPC namespaces,
//! and vireod started as `vireod.service` (Type=notify), which starts each VM as
//! `vireo@NAME.service` (Type=notify, WatchdogSec=) through the real `systemctl`.
//!
//! Only the shipped units' paths are changed (to this test's binaries and
//! directories), the unit search path is this test's directory alone
//! (`SYSTEMD_UNIT_PATH`, so nothing of the host's sysinit runs), and the VM unit's
//! watchdog is shortened by a drop-in. The test is skipped, with a message, where it
//! cannot run (not root, no systemd binary, no unshare/nsenter).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{alive, http, processes_mentioning, T};
use serde_json::Value;

const SYSTEMD: &str = "/lib/systemd/systemd";

/// Targets the shipped units and systemd's default dependencies name; empty here.
const STAND_IN_TARGETS: &[&str] = &[
    "minimal",
    "sysinit",
    "basic",
    "shutdown",
    "multi-user",
    "slices",
    "network",
    "local-fs",
];

/// Cgroups a systemd at the root of the hierarchies creates (removed after the test
/// if they did not exist before it).
const SYSTEMD_CGROUPS: &[&str] = &["init.scope", "system.slice", "vireo.slice"];

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Why this host cannot run the test, if it cannot.
fn cannot_run() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (namespaces, systemd as PID 1)".into());
    }
    if !Path::new(SYSTEMD).exists() {
        return Some(format!("{SYSTEMD} is not installed"));
    }
    for tool in ["unshare", "nsenter"] {
        if !have(tool) {
            return Some(format!("{tool} (util-linux) is not installed"));
        }
    }
    None
}

/// `text` with `from` replaced by `to`; panics if `from` is absent, so that a change
/// to a shipped unit fails this test instead of silently testing something else.
fn replace(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "shipped unit no longer contains {from:?}"
    );
    text.replace(from, to)
}

/// Writes the shipped units, with this test's paths, and the stand-ins to `units`.
fn install_units(units: &Path, state: &Path, run: &Path) {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let read = |n: &str| std::fs::read_to_string(shipped.join(n)).unwrap();
    let (state, run) = (state.to_str().unwrap(), run.to_str().unwrap());
    let vireo = common::bin("vireo");
    let vireo = vireo.to_str().unwrap();

    let mut vm = replace(
        &read("vireo@.service"),
        "/usr/bin/vireo ",
        &format!("{vireo} "),
    );
    vm = replace(&vm, "/var/lib/vireo", state);
    vm = replace(&vm, "/run/vireo", run);
    std::fs::write(units.join("vireo@.service"), vm).unwrap();

    let agent = replace(
        &read("vireod.service"),
        "ExecStart=/usr/bin/vireod --state-dir /var/lib/vireo --run-dir /run/vireo",
        &format!(
            "ExecStart={} --state-dir {state} --run-dir {run} --vireo-bin {vireo} \
             --meter-interval-ms 100 --storage-root {guest}",
            common::bin("vireod").display(),
            guest = common::guest_dir().display()
        ),
    );
    let agent = replace(
        &agent,
        "ReadWritePaths=/var/lib/vireo /run/vireo",
        &format!("ReadWritePaths={state} {run}"),
    );
    // StateDirectory=/RuntimeDirectory= would make /var/lib/vireo and /run/vireo; this
    // test's directories are given on the command line instead.
    let agent: String = agent
        .lines()
        .filter(|l| !l.starts_with("StateDirectory") && !l.starts_with("RuntimeDirectory"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(units.join("vireod.service"), agent).unwrap();
    std::fs::write(units.join("vireo.slice"), read("vireo.slice")).unwrap();

    // The watchdog, shortened: a frozen VMM is killed after 2 s instead of 10 s.
    let dropin = units.join("vireo@.service.d");
    std::fs::create_dir_all(&dropin).unwrap();
    std::fs::write(dropin.join("test.conf"), "[Service]\nWatchdogSec=2s\n").unwrap();

    // A checkout under /tmp or /var/tmp (a CI clone) would be hidden by the units'
    // PrivateTmp=yes: the binaries, the guest kernel and this test's directories live
    // there. Bind it back into both units; elsewhere the shipped units run unchanged.
    let workspace = vireo_e2e::workspace();
    if workspace.starts_with("/tmp") || workspace.starts_with("/var/tmp") {
        let bind = format!("[Service]\nBindPaths={}\n", workspace.display());
        std::fs::write(dropin.join("checkout.conf"), &bind).unwrap();
        let agent_dropin = units.join("vireod.service.d");
        std::fs::create_dir_all(&agent_dropin).unwrap();
        std::fs::write(agent_dropin.join("checkout.conf"), &bind).unwrap();
    }

    for t in STAND_IN_TARGETS {
        std::fs::write(
            units.join(format!("{t}.target")),
            format!("[Unit]\nDescription={t} (stand-in for this test)\n"),
        )
        .unwrap();
    }
}

/// Cgroup directories of the `SYSTEMD_CGROUPS` names that exist now.
fn systemd_cgroups() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in rd.flatten() {
            for name in SYSTEMD_CGROUPS {
                let p = h.path().join(name);
                if p.is_dir() {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// A `systemd --system` as PID 1 of fresh namespaces; killed (and with it everything
/// it started) on drop.
struct Pid1 {
    unshare: Child,
    /// systemd's pid as this test sees it.
    pid: i32,
    cgroups_before: Vec<PathBuf>,
    log: PathBuf,
}

impl Pid1 {
    fn start(units: &Path, log: PathBuf) -> Self {
        let cgroups_before = systemd_cgroups();
        let out = std::fs::File::create(&log).unwrap();
        let unshare = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount",
                "--mount-proc",
                "--net",
                "--uts",
                "--ipc",
                "--",
                "/bin/sh",
                "-c",
                &format!(
                    "mount -t tmpfs tmpfs /run && exec {SYSTEMD} --system --unit=minimal.target"
                ),
            ])
            .env("container", "vireo-test")
            // Its own log to the log file (no journald here).
            .env("SYSTEMD_LOG_TARGET", "console")
            .env("SYSTEMD_UNIT_PATH", units)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn unshare");
        let parent = unshare.id();
        let start = Instant::now();
        let pid = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
                    .unwrap_or_default();
            if let Some(p) = children.split_whitespace().next() {
                break p.parse::<i32>().unwrap();
            }
            assert!(start.elapsed() < T, "unshare started no child");
            std::thread::sleep(Duration::from_millis(10));
        };
        let me = Self {
            unshare,
            pid,
            cgroups_before,
            log,
        };
        let start = Instant::now();
        loop {
            let o = me.run(&["systemctl", "is-system-running"]);
            let state = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if state == "running" || state == "degraded" {
                break;
            }
            assert!(
                start.elapsed() < T,
                "systemd never came up ({state}): {}",
                std::fs::read_to_string(&me.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        me
    }

    /// Runs a command inside the namespaces (systemctl talks to this systemd).
    fn run(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-m", "-p", "--"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    fn systemctl(&self, args: &[&str]) -> String {
        let mut a = vec!["systemctl"];
        a.extend_from_slice(args);
        let o = self.run(&a);
        assert!(
            o.status.success(),
            "systemctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// One property of a unit (`systemctl show -p KEY --value`).
    fn property(&self, unit: &str, key: &str) -> String {
        self.systemctl(&["show", "-p", key, "--value", unit])
            .trim()
            .to_string()
    }

    fn journal(&self, unit: &str) -> String {
        String::from_utf8_lossy(
            &self
                .run(&["systemctl", "status", "--no-pager", "-l", unit])
                .stdout,
        )
        .into_owned()
    }
}

impl Drop for Pid1 {
    fn drop(&mut self) {
        // The namespace's init gone, the kernel kills every process in it.
        // SAFETY: kill with a pid this test started (through unshare) and a signal.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        let start = Instant::now();
        while alive(self.pid) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Its cgroups empty only once their processes are reaped: retry for a while.
        let start = Instant::now();
        loop {
            let left: Vec<PathBuf> = systemd_cgroups()
                .into_iter()
                .filter(|p| !self.cgroups_before.contains(p))
                .collect();
            for p in &left {
                common::remove_cgroup_tree(p);
            }
            if left.iter().all(|p| !p.exists()) || start.elapsed() > Duration::from_secs(10) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn ok(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Value {
    let (status, text) = http(socket, method, path, body);
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {text}"
    );
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

fn wait_until(what: &str, mut f: impl FnMut() -> Option<Value>) -> Value {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < T, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VMM serving `socket`, as this test (outside the PID namespace) sees it.
fn host_pid_of_vmm(socket: &Path) -> i32 {
    let needle = format!("--api-socket\0{}", socket.display());
    let pids = processes_mentioning(&needle);
    assert_eq!(pids.len(), 1, "VMMs serving {}: {pids:?}", socket.display());
    pids[0]
}

#[test]
fn vireod_runs_vms_as_units_of_a_real_systemd() {
    if let Some(why) = cannot_run() {
        vireo_e2e::skip_or_fail_under_ci(why);
        return;
    }
    // Not under /tmp: the units have PrivateTmp=yes (their /tmp is their own).
    let dir = tempfile::Builder::new()
        .prefix("sd")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let (units, state, run) = (
        dir.path().join("units"),
        dir.path().join("state"),
        dir.path().join("run"),
    );
    for d in [&units, &state, &run] {
        std::fs::create_dir_all(d).unwrap();
    }
    install_units(&units, &state, &run);
    let sd = Pid1::start(&units, dir.path().join("systemd.log"));

    // vireod as a Type=notify service: `start` returns once it sent READY=1.
    sd.systemctl(&["start", "vireod.service"]);
    assert_eq!(sd.property("vireod.service", "ActiveState"), "active");
    let sock = run.join("vireod.sock");
    let host = ok(&sock, "GET", "/api/v1/host.info", None);
    assert_eq!(
        host["launcher"], "systemd",
        "auto finds systemd as PID 1: {host}"
    );

    let def = serde_json::json!({"config": common::counter_config(), "cpu_weight": 250});
    ok(&sock, "PUT", "/api/v1/vms/web", Some(&def.to_string()));
    let unit = "vireo@web.service";
    let (code, body) = http(&sock, "PUT", "/api/v1/vms/web/start", None);
    assert_eq!(
        code,
        200,
        "{body}\njournal:\n{}\nvireo.log:\n{}",
        sd.journal(unit),
        std::fs::read_to_string(state.join("vms/web/vireo.log")).unwrap_or_default()
    );
    let st: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["state"], "Running", "{st}");
    // The unit's main process is the VMM vireod reports, in vireo.slice, at the VM's
    // CPU weight (set once it ran).
    assert_eq!(sd.property(unit, "ActiveState"), "active");
    assert_eq!(sd.property(unit, "MainPID"), st["pid"].to_string());
    assert_eq!(
        sd.property(unit, "ControlGroup"),
        "/vireo.slice/vireo@web.service"
    );
    wait_until("CPUWeight=250", || {
        (sd.property(unit, "CPUWeight") == "250").then_some(Value::Null)
    });
    let vm_sock = run.join("vms/web/api.sock");
    let counter = |s: &Path| ok(s, "GET", "/api/v1/vm.info", None);
    assert_eq!(counter(&vm_sock)["state"], "Running");
    // The unit's VMM jailed itself (issue 12; before, under systemd it ran as root in
    // the unit's sandbox, which left it every root-owned file it could see: vireod's
    // inventory, the other VMs' disks, the host key): its own uid, no capability,
    // no_new_privs, seccomp, and a root that holds only its own files.
    let vmm = host_pid_of_vmm(&vm_sock);
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let uid: u32 = field("Uid:")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((980000..=980999).contains(&uid), "{status}");
    for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(cap), "0000000000000000", "{cap}\n{status}");
    }
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(field("Seccomp:"), "2", "{status}");
    // In a PID namespace of its own, where it is PID 1 (`pidns=new`: it cloned itself
    // as it started and handed the child to systemd), and it is the unit's main
    // process itself: NSpid lists its pid here, in systemd's namespace, and 1.
    let nspid: Vec<String> = field("NSpid:")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(nspid.len(), 3, "{status}");
    assert_eq!(nspid[2], "1", "{status}");
    assert_eq!(sd.property(unit, "MainPID"), nspid[1], "{status}");
    let root = PathBuf::from(format!("/proc/{vmm}/root"));
    assert!(!root
        .join(state.strip_prefix("/").unwrap())
        .join("inventory.db")
        .exists());
    assert!(root
        .join(run.strip_prefix("/").unwrap())
        .join("vms/web/api.sock")
        .exists());
    let top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!top.iter().any(|n| n == "etc" || n == "usr"), "{top:?}");

    // Frozen, the VMM stops sending WATCHDOG=1: systemd kills it (WatchdogSignal=
    // SIGKILL) after WatchdogSec; vireod records the crash and restarts it (policy OnFailure) as a
    // new start of the unit.
    let first = st["pid"].clone();
    let frozen = host_pid_of_vmm(&vm_sock);
    // SAFETY: kill with the pid of the VMM this test started and a signal.
    unsafe { libc::kill(frozen, libc::SIGSTOP) };
    let restarted = wait_until("the watchdog's restart", || {
        let v = ok(&sock, "GET", "/api/v1/vms/web", None);
        (v["state"] == "Running" && v["pid"] != first).then_some(v)
    });
    let exits = ok(&sock, "GET", "/api/v1/vms/web/exits", None);
    assert_eq!(
        exits[0]["signal"],
        libc::SIGKILL,
        "{exits}\n{}\nvireo.log:\n{}",
        sd.journal(unit),
        std::fs::read_to_string(state.join("vms/web/vireo.log")).unwrap_or_default()
    );
    assert_eq!(exits[0]["reason"], "crashed", "{exits}");
    assert_eq!(sd.property(unit, "MainPID"), restarted["pid"].to_string());

    // vireod killed (KillMode=process: only vireod) is restarted by systemd
    // (Restart=on-failure) and adopts the VM that kept running in its unit.
    let vmm = host_pid_of_vmm(&vm_sock);
    sd.systemctl(&["kill", "-s", "KILL", "vireod.service"]);
    wait_until("vireod restarted by systemd", || {
        (sd.property("vireod.service", "NRestarts") == "1"
            && sd.property("vireod.service", "ActiveState") == "active"
            && http_ok(&sock))
        .then_some(Value::Null)
    });
    let v = ok(&sock, "GET", "/api/v1/vms/web", None);
    assert_eq!(v["state"], "Running", "{v}");
    assert_eq!(v["adopted"], true, "{v}");
    assert_eq!(v["pid"], restarted["pid"], "{v}");
    assert!(
        alive(vmm),
        "the VMM (pid {vmm}) did not outlive vireod: {}\n{}\nvireo.log:\n{}",
        ok(&sock, "GET", "/api/v1/vms/web/exits", None),
        sd.journal(unit),
        std::fs::read_to_string(state.join("vms/web/vireo.log")).unwrap_or_default()
    );

    // A clean stop: the exit status comes from the unit (ExecStopPost=), which
    // systemd itself forgets as soon as it collects the inactive unit.
    let st = ok(&sock, "PUT", "/api/v1/vms/web/stop", None);
    assert_eq!(st["state"], "Stopped", "{st}");
    assert_eq!(st["last_exit"]["status"], 0, "{st}\n{}", sd.journal(unit));
    assert_eq!(st["last_exit"]["reason"], "requested", "{st}");
    assert!(!alive(vmm));
    // The exit record is written by ExecStopPost=; systemd then tears down the
    // unit's private /tmp and mount namespace: "deactivating" for a moment.
    wait_until("the unit to become inactive", || {
        (sd.property(unit, "ActiveState") == "inactive").then_some(Value::Null)
    });
    assert!(
        !run.join("vms/web.exit").exists(),
        "exit record left behind"
    );
    assert!(
        !run.join("vms/web.env").exists(),
        "environment file left behind"
    );
}

fn http_ok(sock: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(sock).is_ok()
        && http(sock, "GET", "/api/v1/host.info", None).0 == 200
}
