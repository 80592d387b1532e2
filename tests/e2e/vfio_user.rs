//! vfio-user devices (docs/vfio.md): the VMM as the client of the tests' server
//! (`vireo-test-vfio-user`), the guest driving the function (`test=vfio-user`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vireo_e2e::{api, assert_guest_ok, bin, serial_line, wait_for_socket, Vireo};

const T: Duration = Duration::from_secs(30);

/// The test server on a socket in `dir`; killed on drop.
struct Server {
    child: Option<Child>,
    socket: PathBuf,
}

impl Server {
    fn start(dir: &Path, mode: &str) -> Self {
        let socket = dir.join(format!("{mode}.sock"));
        let child = Command::new(bin("vireo-test-vfio-user"))
            .arg("--socket")
            .arg(&socket)
            .arg("--mode")
            .arg(mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vireo-test-vfio-user");
        let start = Instant::now();
        while !socket.exists() {
            assert!(start.elapsed() < T, "the vfio-user server never listened");
            std::thread::sleep(Duration::from_millis(5));
        }
        Self {
            child: Some(child),
            socket,
        }
    }

    fn arg(&self) -> String {
        format!("socket={},id=fn0", self.socket.display())
    }

    /// Waits for the server to end (its client went away) and returns its report.
    fn report(mut self) -> String {
        let child = self.child.take().expect("server");
        let out = vireo_e2e::wait_with_timeout(child, T);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `Seccomp:` mode of the thread of `pid` named `name`.
fn seccomp_of(pid: u32, name: &str) -> Option<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.flatten().find_map(|t| {
        let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
        if comm.trim() != name {
            return None;
        }
        let status = std::fs::read_to_string(t.path().join("status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// The guest's whole check (scratch register, DMA of `len` bytes, one MSI-X vector)
/// against a fresh server in `dir`, with `extra` VMM arguments; asserts both sides.
fn drive_and_check(dir: &Path, extra: &[&str]) {
    let server = Server::start(dir, "normal");
    let arg = server.arg();
    let mut args = vec!["--memory", "size=256M,shared=on", "--user-device", &arg];
    args.extend_from_slice(extra);
    let (out, serial) = Vireo::guest("test=vfio-user len=8192 seed=17", &args).run(T);
    assert_guest_ok(&out, &serial);
    let line = serial_line(&serial, "vfio-user scratch=");
    assert_eq!(field(line, "scratch"), "0x5eedc0de", "{line}");
    assert_eq!(field(line, "status"), "1", "{line}");
    assert_eq!(field(line, "counter"), "1", "{line}");
    assert_eq!(field(line, "irqs"), "1", "{line}");
    assert_eq!(field(line, "dma_bytes"), "8192", "{line}");
    assert_eq!(field(line, "mismatches"), "0", "{line}");
    // The server's side of the same run: it saw the scratch write, wrote the bytes
    // into guest memory through its mapping and fired the vector once.
    let report = server.report();
    let line = serial_line(&report, "vfio-user-server: done");
    assert_eq!(field(line, "scratch"), "0x5eedc0de", "{report}");
    assert_eq!(field(line, "scratch_writes"), "1", "{report}");
    assert_eq!(field(line, "commands"), "1", "{report}");
    assert_eq!(field(line, "dma_bytes"), "8192", "{report}");
    assert_eq!(field(line, "irqs"), "1", "{report}");
}

#[test]
fn the_guest_drives_a_vfio_user_function_scratch_dma_and_msix() {
    let dir = tempfile::tempdir().unwrap();
    drive_and_check(dir.path(), &[]);
}

/// A jailed VMM (its own uid, root and mount namespace) reaches its server through
/// the one socket bound into the jail: the same DMA and interrupt outcomes.
#[test]
fn a_jailed_vmm_drives_a_vfio_user_function_through_its_bound_socket() {
    let dir = tempfile::tempdir().unwrap();
    let servers = dir.path().join("servers");
    std::fs::create_dir(&servers).unwrap();
    // Something else in the socket's directory that the jail must not show.
    std::fs::write(servers.join("other"), b"not for the VMM").unwrap();
    let jail = format!(
        "uid=100104,gid=100104,root={}",
        dir.path().join("root").display()
    );
    drive_and_check(&servers, &["--jail", &jail]);
    // Only the socket was bound and given to the jail's uid (the server removed it
    // when its client went): its directory and its neighbour were left alone.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&servers).unwrap().uid(), 0);
    assert_eq!(std::fs::metadata(servers.join("other")).unwrap().uid(), 0);
}

/// A user device whose socket path is not a socket: the jail refuses to start (it
/// never makes an empty file in a server's place).
#[test]
fn a_jailed_vmm_refuses_a_user_device_path_that_is_not_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    let jail = format!(
        "uid=100104,gid=100104,root={}",
        dir.path().join("root").display()
    );
    let (out, _serial) = Vireo::guest(
        "test=vfio-user len=8192 seed=17",
        &[
            "--memory",
            "size=256M,shared=on",
            "--user-device",
            &format!("socket={}", missing.display()),
            "--jail",
            &jail,
        ],
    )
    .run(T);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.sock"), "{err}");
    assert!(
        !missing.exists(),
        "the jail made a file at the socket's path"
    );
}

#[test]
fn a_killed_server_leaves_the_vm_running_with_an_all_ones_device() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut server = Server::start(dir.path(), "normal");
    let vm = Vireo::guest(
        "test=vfio-user-dead",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--memory",
            "size=256M,shared=on",
            "--user-device",
            &server.arg(),
        ],
    )
    .spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("vfio-user ready", T);
    server.kill();
    let serial = vm.wait_serial("vireo-guest: result", T);
    assert!(
        serial.contains("vfio-user gone id=0xffffffff"),
        "the guest must read all ones from the dead device:\n{serial}"
    );
    assert!(
        serial.contains("vfio-user after scratch=0xffffffff"),
        "{serial}"
    );
    let out = vm.wait(T);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the guest powered off cleanly; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vfio-user device failed") && err.contains("fn0"),
        "the failure is logged with the device's id:\n{err}"
    );
}

#[test]
fn a_dead_server_shows_in_vm_info_and_the_vmm_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut server = Server::start(dir.path(), "normal");
    let vm = Vireo::guest(
        "test=vfio-user-dead hold_ms=5000",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--memory",
            "size=256M,shared=on",
            "--user-device",
            &server.arg(),
        ],
    )
    .spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("vfio-user ready", T);
    // Paused while the server dies, so that vm.info is read before the guest ends.
    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 204);
    server.kill();
    assert_eq!(api(&sock, "PUT", "vm.resume", None).0, 204);
    let start = Instant::now();
    let info = loop {
        let (s, body) = api(&sock, "GET", "vm.info", None);
        if s != 200 {
            // The guest finished and the VMM exited: too late to look.
            panic!(
                "vm.info answered {s}: {body}\nserial:\n{}",
                vm.serial_text()
            );
        }
        let info: serde_json::Value = serde_json::from_str(&body).unwrap();
        if info["device_errors"].is_array() {
            break info;
        }
        assert!(start.elapsed() < T, "no device_errors in vm.info: {body}");
        std::thread::sleep(Duration::from_millis(1));
    };
    let fault = &info["device_errors"][0];
    assert_eq!(fault["id"], "fn0", "{info}");
    assert!(
        fault["error"]
            .as_str()
            .is_some_and(|e| e.contains("vfio-user server failed")),
        "{info}"
    );
    let (s, body) = api(&sock, "GET", "vm.counters", None);
    assert_eq!(s, 200, "{body}");
    let counters: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(counters["fn0"]["failed"], 1, "{body}");
    assert!(counters["fn0"]["region_reads"].as_u64() > Some(0), "{body}");
    let serial = vm.wait_serial("vireo-guest: result", T);
    assert!(serial.contains("vfio-user gone"), "{serial}");
    let out = vm.wait(T);
    assert_eq!(out.status.code(), Some(0));
}

/// vireo with a user device that cannot be set up: it must exit with an error naming
/// the device, before any guest code ran.
fn refused(user_device: &str, memory: &str) -> String {
    let (out, serial) = Vireo::guest(
        "test=boot",
        &["--memory", memory, "--user-device", user_device],
    )
    .run(T);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        !serial.contains("vireo-guest: boot"),
        "no VM may start:\n{serial}"
    );
    err
}

#[test]
fn a_missing_or_broken_server_is_refused_naming_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let err = refused(
        &format!("socket={},id=fn0", missing.display()),
        "size=128M,shared=on",
    );
    assert!(
        err.contains("vfio-user device fn0") && err.contains("cannot connect"),
        "{err}"
    );
    for mode in ["garbage", "close"] {
        let server = Server::start(dir.path(), mode);
        let err = refused(&server.arg(), "size=128M,shared=on");
        assert!(err.contains("vfio-user device fn0"), "{mode}: {err}");
        assert!(
            err.contains("version negotiation"),
            "{mode}: the first exchange fails: {err}"
        );
    }
    // Without shared memory the server could not map the guest's RAM.
    let server = Server::start(dir.path(), "normal");
    let err = refused(&server.arg(), "size=128M");
    assert!(err.contains("needs shared guest memory"), "{err}");
}

#[test]
fn snapshot_and_migration_of_a_vm_with_a_user_device_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut server = Server::start(dir.path(), "normal");
    let vm = Vireo::guest(
        "test=vfio-user-dead",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--memory",
            "size=256M,shared=on",
            "--user-device",
            &server.arg(),
        ],
    )
    .spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("vfio-user ready", T);
    // The interrupt forwarder runs under its own filter.
    let pid = vm.child.as_ref().unwrap().id();
    assert_eq!(
        seccomp_of(pid, "vireo-vfu-irq"),
        Some(2),
        "vireo-vfu-irq must run under a seccomp filter"
    );
    let snap = dir.path().join("snap");
    let url = format!(r#"{{"destination_url":"file://{}"}}"#, snap.display());
    let (s, body) = api(&sock, "PUT", "vm.snapshot", Some(&url));
    assert_eq!(s, 409, "{body}");
    assert!(
        body.contains("vfio-user device fn0 does not support migration"),
        "{body}"
    );
    assert!(
        !snap.join("state.json").exists() && !snap.exists(),
        "nothing written"
    );
    let dest = dir.path().join("mig.sock");
    let url = format!(r#"{{"destination_url":"unix:{}"}}"#, dest.display());
    let (s, body) = api(&sock, "PUT", "vm.send-migration", Some(&url));
    assert_eq!(s, 409, "{body}");
    assert!(
        body.contains("vfio-user device fn0 does not support migration"),
        "{body}"
    );
    // The VM runs on, its device too: the guest still reads the device until the
    // server goes.
    let (s, body) = api(&sock, "GET", "vm.info", None);
    assert_eq!(s, 200, "{body}");
    assert!(body.contains(r#""state":"Running""#), "{body}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!vm.serial_text().contains("vfio-user gone"));
    server.kill();
    let serial = vm.wait_serial("vireo-guest: result ok", T);
    assert!(serial.contains("vfio-user gone"), "{serial}");
    assert_eq!(vm.wait(T).status.code(), Some(0));
}
