//! A `vireod` run as one "host" of a benchmark: its own directories, optionally a host
//! identity from `vireoctl pki` and an HTTPS peer listener; its API over its unix
//! socket. Dropping it kills the vireod and every VMM it started.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{api, bin, guest, wait_for_socket};

/// A host CA and host identities made by `vireoctl pki`.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

/// A host identity's files (`--tls-cert`, `--tls-key`, `--tls-ca`).
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Identity {
    /// vireod's flags for it.
    pub fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        for (flag, p) in [
            ("--tls-cert", &self.cert),
            ("--tls-key", &self.key),
            ("--tls-ca", &self.ca),
        ] {
            a.push(flag.to_string());
            a.push(p.display().to_string());
        }
        a
    }
}

fn vireoctl(args: &[&str]) {
    let o = Command::new(bin("vireoctl"))
        .args(args)
        .output()
        .expect("run vireoctl");
    assert!(
        o.status.success(),
        "vireoctl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pki")
            .tempdir()
            .expect("tempdir");
        let ca = dir.path().join("ca");
        vireoctl(&["pki", "init", "--dir", &ca.display().to_string()]);
        Self { dir }
    }

    /// Issues host `name`'s identity.
    pub fn host(&self, name: &str) -> Identity {
        self.host_with_sans(name, &[])
    }

    /// [`Pki::host`] naming more subject alternative names (DNS names or IPs).
    pub fn host_with_sans(&self, name: &str, sans: &[&str]) -> Identity {
        let out = self.dir.path().join(name);
        let ca = self.dir.path().join("ca").display().to_string();
        let out_s = out.display().to_string();
        let mut args = vec![
            "pki", "issue", "--ca-dir", &ca, "--name", name, "--out", &out_s,
        ];
        for san in sans {
            args.extend(["--san", san]);
        }
        vireoctl(&args);
        Identity {
            cert: out.join("host.crt"),
            key: out.join("host.key"),
            ca: out.join("ca.crt"),
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// One running vireod.
pub struct VireodHost {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Child,
}

impl VireodHost {
    /// Starts vireod with `extra` flags (no autostart, no CPU cgroups, the test guest's
    /// directory as a storage root) and waits for its socket.
    pub fn start(extra: &[String]) -> Self {
        Self::start_in(None, extra)
    }

    /// [`VireodHost::start`] inside network namespace `netns` (its VMMs too).
    pub fn start_in(netns: Option<&crate::netns::NetNs>, extra: &[String]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vdh")
            .tempdir()
            .expect("tempdir");
        let socket = dir.path().join("run/vireod.sock");
        let log = std::fs::File::create(dir.path().join("vireod.log")).expect("log");
        let guest_dir = guest().parent().map(Path::to_path_buf).unwrap_or_default();
        let mut cmd = Command::new(bin("vireod"));
        if let Some(ns) = netns {
            ns.enter_on_exec(&mut cmd);
        }
        let child = cmd
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .arg("--vireo-bin")
            .arg(bin("vireo"))
            .arg("--no-autostart")
            .arg("--no-cpu-cgroups")
            .arg("--storage-root")
            .arg(&guest_dir)
            .arg("--storage-root")
            .arg(dir.path())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn vireod");
        wait_for_socket(&socket, Duration::from_secs(10));
        Self { dir, socket, child }
    }

    /// vireod's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One API call (`path` after `/api/v1/`): status and JSON body.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let body = body.map(|b| b.to_string());
        let (s, b) = api(&self.socket, method, path, body.as_deref());
        (
            s,
            serde_json::from_str(&b).unwrap_or(serde_json::Value::Null),
        )
    }

    /// An API call that must succeed.
    pub fn ok(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> serde_json::Value {
        let (s, v) = self.api(method, path, body);
        assert!(
            (200..300).contains(&s),
            "{method} {path}: {s} {v}\n{}",
            self.log()
        );
        v
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vireod.log")).unwrap_or_default()
    }

    /// VM `name`'s serial output file.
    pub fn serial_path(&self, name: &str) -> PathBuf {
        self.dir
            .path()
            .join("state/vms")
            .join(name)
            .join("serial.log")
    }

    /// Waits until VM `name` is in `state`.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let (_, v) = self.api("GET", &format!("vms/{name}"), None);
            if v["state"] == state {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "{name} not {state}: {v}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until migration `id` ended; returns its record.
    pub fn wait_migration(&self, id: &str, timeout: Duration) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let (_, v) = self.api("GET", &format!("migrations/{id}"), None);
            if ["completed", "failed", "cancelled"].contains(&v["state"].as_str().unwrap_or("")) {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "migration {id}: {v}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for VireodHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The VMMs it started outlive it (vireod adopts them on restart): end them.
        let needle = self.dir.path().to_string_lossy().into_owned();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if pid != std::process::id() as i32
                    && String::from_utf8_lossy(&cmd).contains(&needle)
                {
                    // SAFETY: kill(2) on a VMM of this vireod, found by its directory.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}
