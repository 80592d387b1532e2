//! Harness for Vireo's end-to-end tests: finds the binaries, builds the PVH test guest,
//! runs `vireo` as a user would, reads the guest's serial output, talks to the API socket.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod cluster_fleet;
pub mod etcd;
pub mod mobility;
#[path = "../guest/netframe.rs"]
pub mod netframe;
pub mod netns;
#[path = "../guest/pattern.rs"]
pub mod pattern;
pub mod seqdisk;
pub mod tls_certs;
pub mod vireod_host;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A binary of the workspace, built by `cargo build --bins` (scripts/test does it first)
/// next to this test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // Tests run from target/<profile>/deps/, binaries (the bench) from target/<profile>/.
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.ends_with("deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        dir
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (cargo build --release --bins)",
        p.display()
    );
    p
}

/// Builds (once, under a file lock shared by parallel test processes) and returns the
/// test guest ELF.
pub fn guest() -> PathBuf {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            let dir = workspace().join("tests/guest");
            let lock = std::fs::File::create(std::env::temp_dir().join("vireo-guest-build.lock"))
                .expect("create guest build lock");
            // SAFETY: flock on a valid fd; released when `lock` is dropped.
            unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
            let out = Command::new(dir.join("build.sh"))
                .output()
                .expect("run tests/guest/build.sh");
            assert!(
                out.status.success(),
                "guest build failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        })
        .clone()
}

/// True when QEMU and qemu-img are installed (scripts/setup installs them).
pub fn have_qemu() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A `vireo` invocation with its serial output captured in a file.
pub struct Vireo {
    pub cmd: Command,
    pub serial: PathBuf,
    _dir: tempfile::TempDir,
}

impl Vireo {
    /// `vireo --kernel <guest> --cmdline <cmdline> --serial file=<tmp>` plus `args`.
    pub fn guest(cmdline: &str, args: &[&str]) -> Self {
        Self::payload(&guest(), None, cmdline, args)
    }

    /// Any kernel (and initramfs), serial captured in a file.
    pub fn payload(kernel: &Path, initramfs: Option<&Path>, cmdline: &str, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let serial = dir.path().join("serial.log");
        let mut cmd = Command::new(bin("vireo"));
        if let Some(rd) = initramfs {
            cmd.arg("--initramfs").arg(rd);
        }
        cmd.arg("--kernel")
            .arg(kernel)
            .arg("--cmdline")
            .arg(cmdline)
            .arg("--serial")
            .arg(format!("file={}", serial.display()))
            .args(args)
            .stdin(Stdio::null());
        Self {
            cmd,
            serial,
            _dir: dir,
        }
    }

    /// Runs to completion (bounded by `timeout`); returns the output and the serial text.
    pub fn run(mut self, timeout: Duration) -> (Output, String) {
        let child = self
            .cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vireo");
        let finished = wait_or_kill(child, timeout);
        let serial = std::fs::read_to_string(&self.serial).unwrap_or_default();
        match finished {
            Ok(out) => (out, serial),
            Err(out) => panic!(
                "process did not finish within {timeout:?}; stderr:\n{}\nserial:\n{serial}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    pub fn spawn(mut self) -> Running {
        let child = self
            .cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vireo");
        Running {
            child: Some(child),
            serial: self.serial.clone(),
            _dir: self._dir,
        }
    }
}

/// A running `vireo`; killed on drop.
pub struct Running {
    pub child: Option<Child>,
    pub serial: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until the serial output contains `needle`.
    pub fn wait_serial(&self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        let mut seen_at: Option<Instant> = None;
        loop {
            let s = self.serial_text();
            if let Some(at) = s.find(needle) {
                // Serial output arrives in pieces: wait for the rest of the line the needle
                // starts, so callers never read a half-written line (a bare prompt without
                // a newline is returned after a grace period).
                let line_done = s[at + needle.len()..].contains('\n');
                let since = *seen_at.get_or_insert_with(Instant::now);
                if line_done || since.elapsed() > Duration::from_secs(2) {
                    return s;
                }
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {needle:?} on serial; got:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn wait(mut self, timeout: Duration) -> Output {
        let child = self.child.take().expect("child");
        wait_with_timeout(child, timeout)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for `child`, killing it (and failing the test) after `timeout`.
pub fn wait_with_timeout(child: Child, timeout: Duration) -> Output {
    wait_or_kill(child, timeout).unwrap_or_else(|out| {
        panic!(
            "process did not finish within {timeout:?}; stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Asserts that `out` is a process its seccomp violation handler (the `sandbox`
/// crate's, shared by `vireo` and `vireo-switch`) ended, status 159, for `thread`
/// making `syscall`.
pub fn assert_killed_by_seccomp(out: &Output, thread: &str, syscall: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(159), "{err}");
    assert!(
        err.contains(&format!(
            "seccomp: thread {thread} made the forbidden system call {syscall} ("
        )),
        "{err}"
    );
}

/// Waits for `child`; after `timeout` kills it and gives what it printed as the error.
fn wait_or_kill(mut child: Child, timeout: Duration) -> Result<Output, Output> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return Ok(child.wait_with_output().expect("collect output")),
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                return Err(child.wait_with_output().expect("collect output"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("wait failed: {e}"),
        }
    }
}

/// The guest's result line must be `result ok`.
pub fn assert_guest_ok(out: &Output, serial: &str) {
    assert!(
        serial.contains("vireo-guest: result ok"),
        "guest did not report ok.\nserial:\n{serial}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "vireo exit status; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One line of the serial output that starts with `prefix`.
pub fn serial_line<'a>(serial: &'a str, prefix: &str) -> &'a str {
    serial
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{serial}"))
}

/// Minimal HTTP/1.1 client over the VMM's unix socket.
pub fn api(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = UnixStream::connect(socket).expect("connect to API socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read response");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Waits until the API socket accepts connections.
pub fn wait_for_socket(path: &Path, timeout: Duration) {
    let start = Instant::now();
    while UnixStream::connect(path).is_err() {
        assert!(
            start.elapsed() < timeout,
            "API socket {} never came up",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// True when the tests run under CI (`CI=true` in the environment, as `.ci/run` sets).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The one way a test steps aside where this host cannot run it: prints `SKIP: <why>` to
/// stderr, and the caller returns. Under CI a skip is a test that cannot fail, so there it
/// fails the test instead (with the same reason). Tests that cannot run on CI machines at
/// all are excluded by name in scripts/test, with their reason printed.
#[track_caller]
pub fn skip_or_fail_under_ci(why: impl std::fmt::Display) {
    if under_ci() {
        panic!("CI=true and this test cannot run here: {why}");
    }
    eprintln!("SKIP: {why}");
}

/// The one-time secret the migration tests give both sides (any 64 hex digits do; a
/// real orchestrator makes a random one per migration).
pub const MIGRATION_SECRET: &str =
    "5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e70001";

/// `,"secret":"..."` for vm.send-migration and vm.receive-migration.
pub fn secret_field() -> String {
    format!(r#","secret":"{MIGRATION_SECRET}""#)
}

/// The configuration of the VM in the VMM at `sock`, as `vm.info` shows it (what an
/// orchestrator would hand the destination as its own definition of the VM).
pub fn vm_config(sock: &Path) -> serde_json::Value {
    let (s, b) = api(sock, "GET", "vm.info", None);
    assert_eq!(s, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    v["config"].clone()
}

/// `,"config":{...}` for vm.receive-migration: the VM of the VMM at `source_sock`.
pub fn config_field_of(source_sock: &Path) -> String {
    format!(r#","config":{}"#, vm_config(source_sock))
}

#[cfg(test)]
mod tests {
    /// Calls the skip helper only when run by the test below (VIREO_SKIP_PROBE set).
    #[test]
    fn skip_probe() {
        if std::env::var_os("VIREO_SKIP_PROBE").is_some() {
            super::skip_or_fail_under_ci("probe reason");
        }
    }

    /// Runs `skip_probe` in a child test process with and without CI=true: a skip fails
    /// the test under CI and passes (with its reason on stderr) outside it.
    #[test]
    fn a_skip_fails_under_ci_and_is_reported_outside_it() {
        let exe = std::env::current_exe().unwrap();
        let run = |ci: &str| {
            std::process::Command::new(&exe)
                .args(["--exact", "tests::skip_probe", "--nocapture"])
                .env("VIREO_SKIP_PROBE", "1")
                .env("CI", ci)
                .output()
                .unwrap()
        };
        let out = run("true");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a skip passed under CI: {stderr}");
        assert!(
            stderr.contains("CI=true and this test cannot run here: probe reason"),
            "{stderr}"
        );
        let out = run("false");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("SKIP: probe reason"), "{stderr}");
    }
}
