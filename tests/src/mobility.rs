//! VMMs that receive a migration or restore a snapshot, for the tests that move VMs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::{api, bin, config_field_of, secret_field, wait_for_socket, wait_with_timeout};

const T: Duration = Duration::from_secs(60);

/// A `vireo` with no VM, waiting for one on its API socket (`DIR/dst.sock`, serial in
/// `DIR/dst.log`); killed on drop.
pub struct Destination {
    pub child: Option<Child>,
    pub sock: PathBuf,
    pub serial: PathBuf,
}

impl Destination {
    pub fn start(dir: &Path) -> Self {
        let sock = dir.join("dst.sock");
        let serial = dir.join("dst.log");
        let child = Command::new(bin("vireo"))
            .arg("--api-socket")
            .arg(&sock)
            .arg("--serial")
            .arg(format!("file={}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the destination vireo");
        wait_for_socket(&sock, T);
        Self {
            child: Some(child),
            sock,
            serial,
        }
    }

    /// Listens for the VM of the VMM at `source` (its configuration is this
    /// destination's, as an orchestrator would hand it over).
    pub fn listen(&self, source: &Path, url: &str) {
        self.listen_with(source, url, "");
    }

    /// `extra`: more JSON fields, e.g. `,"tls":{...}`.
    pub fn listen_with(&self, source: &Path, url: &str, extra: &str) {
        self.listen_config(&config_field_of(source), url, extra);
    }

    /// Listens with `config` (`,"config":{...}`) and the tests' secret.
    pub fn listen_config(&self, config: &str, url: &str, extra: &str) {
        let body = format!(
            r#"{{"receiver_url":"{url}"{config}{}{extra}}}"#,
            secret_field()
        );
        let (s, b) = api(&self.sock, "PUT", "vm.receive-migration", Some(&body));
        assert_eq!(s, 204, "{b}");
    }

    /// The serial output so far.
    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    pub fn wait(mut self) -> Output {
        wait_with_timeout(self.child.take().expect("a running destination"), T)
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends the VM of the VMM at `sock` to `url`; `extra`: more JSON fields for the
/// request, e.g. `,"compress":true`.
pub fn send_with(sock: &Path, url: &str, extra: &str) {
    let body = format!(r#"{{"destination_url":"{url}"{}{extra}}}"#, secret_field());
    let (s, b) = api(sock, "PUT", "vm.send-migration", Some(&body));
    assert_eq!(s, 204, "{b}");
}

/// Live-migrates the VM of the VMM at `source` over a unix socket in `dir` into a
/// fresh [`Destination`] and waits for the source to hand over and exit cleanly.
pub fn migrate_to_new_vmm(source: &Path, source_vmm: crate::Running, dir: &Path) -> Destination {
    let dst = Destination::start(dir);
    let url = format!("unix:{}", dir.join("mig.sock").display());
    dst.listen(source, &url);
    send_with(source, &url, "");
    let out = source_vmm.wait(T);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dst
}

/// A fresh `vireo` restoring the snapshot in `snap` and running it, serial into
/// `serial`, with an API socket if given.
pub fn restore(snap: &Path, serial: &Path, api_socket: Option<&Path>) -> Child {
    let mut c = Command::new(bin("vireo"));
    c.arg("--restore")
        .arg(format!("source_url=file://{},resume=on", snap.display()))
        .arg("--serial")
        .arg(format!("file={}", serial.display()));
    if let Some(s) = api_socket {
        c.arg("--api-socket").arg(s);
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the restoring vireo")
}
