//! Confinement of `vireo` seen from outside: a panicking thread ends the process (never
//! a dead vCPU in a VM that looks Running), and each thread's seccomp filter refuses
//! what its job does not need, killing the process with the system call named.
//!
//! The faults are injected through `vireo`'s `test-hooks` build (vmm/src/test_hooks.rs),
//! which this crate's dev-dependency turns on for test builds.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use vireo_e2e::{assert_killed_by_seccomp as assert_killed_for, Vireo};

const T: Duration = Duration::from_secs(30);

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_panicking_vcpu_aborts_the_process_and_names_the_thread() {
    let mut vm = Vireo::guest("test=counter period_ms=20", &[]);
    vm.cmd.env("VIREO_TEST_PANIC_VCPU", "now");
    let (out, _) = vm.run(T);
    let err = stderr(&out);
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{err}");
    assert!(
        err.contains("thread 'vireo-vcpu0' panicked at vmm/src/vcpu.rs:")
            && err.contains("test hook: VIREO_TEST_PANIC_VCPU"),
        "{err}"
    );
}

/// Runs the counter guest with `VIREO_TEST_SYSCALL=probe` and returns its output.
fn probe(probe: &str, args: &[&str]) -> std::process::Output {
    let mut vm = Vireo::guest("test=boot", args);
    vm.cmd.env("VIREO_TEST_SYSCALL", probe);
    vm.run(T).0
}

#[test]
fn the_vcpu_thread_cannot_open_files() {
    assert_killed_for(&probe("vcpu:openat", &[]), "vireo-vcpu0", "openat");
}

#[test]
fn the_vcpu_thread_cannot_start_processes() {
    assert_killed_for(&probe("vcpu:fork", &[]), "vireo-vcpu0", "clone");
}

#[test]
fn the_control_thread_cannot_exec() {
    assert_killed_for(&probe("control:execve", &[]), "vireo", "execve");
}

#[test]
fn the_control_thread_cannot_start_processes() {
    assert_killed_for(&probe("control:fork", &[]), "vireo", "clone");
}

/// Once confined (before the VM is created), the control thread opens nothing: files
/// are the file thread's (`vireo-files`).
#[test]
fn the_control_thread_cannot_open_files_after_start() {
    assert_killed_for(&probe("control:openat", &[]), "vireo", "openat");
}

/// The file thread opens files and nothing else: no socket, no ioctl, no process.
#[test]
fn the_file_thread_cannot_make_sockets_ioctls_or_processes() {
    assert_killed_for(&probe("files:socket", &[]), "vireo-files", "socket");
    let out = probe("files:ioctl-tiocsti", &[]);
    assert_killed_for(&out, "vireo-files", "ioctl");
    assert!(stderr(&out).contains("ioctl (16) with request 0x5412;"));
    assert_killed_for(&probe("files:fork", &[]), "vireo-files", "clone");
}

#[test]
fn the_control_thread_cannot_make_an_ioctl_outside_its_list() {
    let out = probe("control:ioctl-tiocsti", &[]);
    assert_killed_for(&out, "vireo", "ioctl");
    assert!(stderr(&out).contains("ioctl (16) with request 0x5412;"));
}

/// A `vireo` without a VM that starts receiving a migration on a unix socket with
/// `VIREO_TEST_SYSCALL=probe` set: the receive thread makes the call as it starts.
fn receive_probe(probe: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let child = std::process::Command::new(vireo_e2e::bin("vireo"))
        .arg("--api-socket")
        .arg(&sock)
        .env("VIREO_TEST_SYSCALL", probe)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    vireo_e2e::wait_for_socket(&sock, T);
    let body = serde_json::json!({
        "receiver_url": format!("unix:{}", dir.path().join("in.sock").display()),
        "secret": vireo_e2e::MIGRATION_SECRET,
        "config": {
            "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=boot"},
            "memory": {"size": 64u64 << 20},
        },
    });
    let (status, text) = vireo_e2e::api(
        &sock,
        "PUT",
        "vm.receive-migration",
        Some(&body.to_string()),
    );
    // 0: the receive thread's probe ended the process before the API answered.
    assert!(status == 204 || status == 0, "{status} {text}");
    vireo_e2e::wait_with_timeout(child, T)
}

#[test]
fn the_migration_receive_thread_cannot_open_files_or_make_ioctls() {
    // The thread that parses what a migration source sends (comm names are cut at 15
    // bytes: vireo-migrate-recv).
    assert_killed_for(
        &receive_probe("receive:openat"),
        "vireo-migrate-r",
        "openat",
    );
    assert_killed_for(
        &receive_probe("receive:socket"),
        "vireo-migrate-r",
        "socket",
    );
    let out = receive_probe("receive:ioctl-tiocsti");
    assert_killed_for(&out, "vireo-migrate-r", "ioctl");
}

#[test]
fn without_seccomp_the_probes_run() {
    // The same probe with filtering off proves the hook really makes the call.
    let out = probe("vcpu:openat", &["--seccomp", "false"]);
    let err = stderr(&out);
    assert!(
        err.contains("vireo: test hook: openat on the vcpu thread returned "),
        "{err}"
    );
    let out = probe("files:socket", &["--seccomp", "false"]);
    let err = stderr(&out);
    assert!(
        err.contains("vireo: test hook: socket on the files thread returned "),
        "{err}"
    );
    let out = probe("control:ioctl-tiocsti", &["--seccomp", "false"]);
    let err = stderr(&out);
    assert!(
        err.contains("vireo: test hook: ioctl-tiocsti on the control thread returned -1"),
        "{err}"
    );
}

/// `/proc/PID/status` field `key`.
fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// Every file (not directory) under `root`, procfs left out, as absolute jail paths.
fn files_under(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
            if rel == "/proc" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                dirs.push(p);
            } else {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

fn kill_and_collect(mut vm: vireo_e2e::Running) -> std::process::Output {
    let mut child = vm.child.take().unwrap();
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

#[test]
fn a_jailed_vmm_runs_as_its_own_user_without_capabilities_in_its_own_root() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let api_dir = dir.path().join("api");
    std::fs::create_dir(&api_dir).unwrap();
    let sock = api_dir.join("vm.sock");
    let cgroup = format!("vireo-e2e-jail-{}", std::process::id());
    let jail = format!(
        "uid=100101,gid=100101,root={},cgroup={cgroup},memory_max=1073741824,pids_max=64",
        dir.path().join("root").display()
    );
    let mut vm = Vireo::guest(
        "test=counter period_ms=20",
        &[
            "--disk",
            &format!("path={}", disk.display()),
            "--api-socket",
            sock.to_str().unwrap(),
            "--jail",
            &jail,
        ],
    );
    vm.cmd.env("VIREO_TEST_OPEN", "/etc/hostname");
    let serial = vm.serial.clone();
    let vm = vm.spawn();
    vm.wait_serial("tick 2 ", T);
    let pid = vm.child.as_ref().unwrap().id();

    assert_eq!(status_field(pid, "Uid:"), "100101\t100101\t100101\t100101");
    assert_eq!(status_field(pid, "Gid:"), "100101\t100101\t100101\t100101");
    assert_eq!(status_field(pid, "Groups:"), "");
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    assert_eq!(status_field(pid, "Seccomp:"), "2");

    // Its root holds what it was given and nothing else.
    let mut want = vec![
        vireo_e2e::guest().display().to_string(),
        disk.display().to_string(),
        serial.display().to_string(),
        // The size-capped serial file's rotation target (PATH.1).
        format!("{}.1", serial.display()),
        sock.display().to_string(),
        "/dev/kvm".to_string(),
        "/dev/urandom".to_string(),
    ];
    want.sort();
    assert_eq!(
        files_under(std::path::Path::new(&format!("/proc/{pid}/root"))),
        want
    );
    // Other namespaces than the host's: mount, IPC, UTS.
    for ns in ["mnt", "ipc", "uts"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(mine, its, "{ns} namespace");
    }
    // Its cgroups: the limits set and the process in them.
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for (controller, file, value) in [
        ("memory", "memory.limit_in_bytes", "1073741824"),
        ("pids", "pids.max", "64"),
    ] {
        let line = cgroups
            .lines()
            .find(|l| l.split(':').nth(1) == Some(controller))
            .unwrap();
        let path = line.splitn(3, ':').nth(2).unwrap();
        assert!(path.ends_with(&format!("/{cgroup}")), "{line}");
        let dir = format!("/sys/fs/cgroup/{controller}{path}");
        let got = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        assert_eq!(got.trim(), value, "{dir}/{file}");
    }
    // The API works through the jail.
    let (status, body) = vireo_e2e::api(&sock, "GET", "vm.info", None);
    assert_eq!(status, 200, "{body}");

    let out = kill_and_collect(vm);
    let err = stderr(&out);
    // A host file: not in its root (and openat is not even allowed on that thread
    // once filtered: the probe runs on the control thread, which may open files).
    assert!(
        err.contains("vireo: test hook: open /etc/hostname: error 2"),
        "{err}"
    );
    for controller in ["memory", "pids"] {
        let line = cgroups
            .lines()
            .find(|l| l.split(':').nth(1) == Some(controller))
            .unwrap();
        let _ = std::fs::remove_dir(format!(
            "/sys/fs/cgroup/{controller}{}",
            line.splitn(3, ':').nth(2).unwrap()
        ));
    }
}

/// `--jail ...,pidns=new` (what vireod asks of a VMM that systemd starts): `vireo`
/// clones itself into a PID namespace of its own; the VMM is PID 1 there, sees only
/// itself, and the parent left outside (no systemd to hand it to here) forwards
/// SIGTERM and ends as the VMM did: by SIGTERM.
#[test]
fn a_vmm_that_asks_for_its_own_pid_namespace_is_its_init_and_its_reaper_ends_as_it_does() {
    let dir = tempfile::tempdir().unwrap();
    let api_dir = dir.path().join("api");
    std::fs::create_dir(&api_dir).unwrap();
    let sock = api_dir.join("vm.sock");
    let jail = format!(
        "uid=100103,gid=100103,root={},pidns=new",
        dir.path().join("root").display()
    );
    let mut vm = Vireo::guest(
        "test=counter period_ms=20",
        &["--api-socket", sock.to_str().unwrap(), "--jail", &jail],
    );
    vm.cmd.env_remove("NOTIFY_SOCKET");
    let mut vm = vm.spawn();
    vm.wait_serial("tick 2 ", T);
    let reaper = vm.child.as_ref().unwrap().id();
    // The VMM: the reaper's only child, PID 1 of its namespace, jailed.
    let children =
        std::fs::read_to_string(format!("/proc/{reaper}/task/{reaper}/children")).unwrap();
    let vmm: u32 = children
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{children:?}"));
    assert_eq!(status_field(vmm, "NSpid:"), format!("{vmm}\t1"));
    assert_eq!(status_field(vmm, "Uid:"), "100103\t100103\t100103\t100103");
    assert_eq!(status_field(vmm, "Seccomp:"), "2");
    let mine = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let its = std::fs::read_link(format!("/proc/{vmm}/ns/pid")).unwrap();
    assert_ne!(mine, its, "pid namespace");
    // Its procfs shows one process: itself.
    let procs: Vec<String> = std::fs::read_dir(format!("/proc/{vmm}/root/proc"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
        .collect();
    assert_eq!(procs, ["1"]);
    let (status, body) = vireo_e2e::api(&sock, "GET", "vm.info", None);
    assert_eq!(status, 200, "{body}");

    // SIGTERM to the process that was started: the VMM gets it and ends, and so does
    // the reaper, by the same signal.
    let mut child = vm.child.take().unwrap();
    // SAFETY: kill with the pid of the child this test started.
    unsafe { libc::kill(reaper as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGTERM), "{st:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{vmm}")).exists(),
        "the VMM outlived its reaper"
    );
}

#[test]
fn a_jailed_vmm_snapshots_and_another_jailed_vmm_restores() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let api_dir = dir.path().join("api");
    std::fs::create_dir(&api_dir).unwrap();
    let sock = api_dir.join("vm.sock");
    let snaps = dir.path().join("snaps");
    std::fs::create_dir(&snaps).unwrap();
    let jail = |n: &str| {
        format!(
            "uid=100102,gid=100102,root={},bind={}",
            dir.path().join(n).display(),
            snaps.display()
        )
    };
    let vm = Vireo::guest(
        "test=counter period_ms=20",
        &[
            "--disk",
            &format!("path={}", disk.display()),
            "--api-socket",
            sock.to_str().unwrap(),
            "--jail",
            &jail("root1"),
        ],
    )
    .spawn();
    vm.wait_serial("tick 3 ", T);
    assert_eq!(vireo_e2e::api(&sock, "PUT", "vm.pause", None).0, 204);
    let snap = snaps.join("s1");
    let url = format!(r#"{{"destination_url":"file://{}"}}"#, snap.display());
    let (s, body) = vireo_e2e::api(&sock, "PUT", "vm.snapshot", Some(&url));
    assert_eq!(s, 204, "{body}");
    let ticks = vm.serial_text().matches("tick ").count();
    drop(vm);

    // The restored VM (another jailed process) counts on from where it was paused.
    let serial = dir.path().join("restored.log");
    let mut child = std::process::Command::new(vireo_e2e::bin("vireo"))
        .arg("--restore")
        .arg(format!("source_url=file://{},resume=on", snap.display()))
        .arg("--serial")
        .arg(format!("file={}", serial.display()))
        .arg("--jail")
        .arg(jail("root2"))
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if text.matches("tick ").count() >= 3 {
            break text;
        }
        if let Ok(Some(st)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!("restore exited with {st}: {}", stderr(&out));
        }
        assert!(start.elapsed() < T, "the restored VM does not run: {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    let first = text
        .lines()
        .find_map(|l| l.strip_prefix("tick "))
        .and_then(|r| r.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap();
    assert!(
        first + 1 >= ticks,
        "restored at tick {first}, paused after {ticks}"
    );
}
