//! Host identities issued by `vireoctl pki` and calls to a vireod's peer listener
//! (mutual TLS), for tests between hosts.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use agent::client::{self, Endpoint};
use agent::hosttls::{HostIdentity, IdentityFiles};
use rustls::pki_types::ServerName;

use super::{bin, Daemon, T};

/// A CA and host identities issued by `vireoctl pki`, in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let p = Pki {
            dir: tempfile::Builder::new().prefix("pki").tempdir().unwrap(),
        };
        let ca = p.ca_dir();
        p.pki(&["init", "--dir", ca.to_str().unwrap()]);
        p
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    pub fn pki(&self, args: &[&str]) -> String {
        let o = Command::new(bin("vireoctl"))
            .arg("pki")
            .args(args)
            .output()
            .expect("run vireoctl pki");
        assert!(
            o.status.success(),
            "vireoctl pki {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Issues host `name`'s identity into `<dir>/<name>/`.
    pub fn host(&self, name: &str) -> IdentityFiles {
        self.host_with_sans(name, &[])
    }

    /// [`Pki::host`] with extra subject alternative names (DNS names or IPs).
    pub fn host_with_sans(&self, name: &str, sans: &[&str]) -> IdentityFiles {
        let out = self.dir.path().join(name);
        let ca = self.ca_dir();
        let (ca, out_s) = (ca.to_str().unwrap(), out.to_str().unwrap());
        let mut args = vec!["issue", "--ca-dir", ca, "--name", name, "--out", out_s];
        for s in sans {
            args.extend(["--san", s]);
        }
        self.pki(&args);
        IdentityFiles {
            cert: out.join("host.crt"),
            key: out.join("host.key"),
            ca: out.join("ca.crt"),
        }
    }
}

impl Pki {
    /// Revokes `id`'s certificate: the CA's CRL (`<ca>/ca.crl`) lists it from now on.
    pub fn revoke(&self, id: &IdentityFiles) {
        let ca = self.ca_dir();
        self.pki(&[
            "revoke",
            "--ca-dir",
            ca.to_str().unwrap(),
            "--cert",
            id.cert.to_str().unwrap(),
        ]);
    }
}

/// vireod's flags for a host identity.
pub fn tls_args(id: &IdentityFiles) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        id.cert.display().to_string(),
        "--tls-key".into(),
        id.key.display().to_string(),
        "--tls-ca".into(),
        id.ca.display().to_string(),
    ]
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A vireod with identity `id`, a peer listener admitting `peers` and `extra` flags;
/// returns it and the listener's address.
pub fn host_daemon(id: &IdentityFiles, peers: &[&str], extra: &[&str]) -> (Daemon, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--no-autostart".to_string(),
        "--listen".into(),
        addr.clone(),
    ];
    args.extend(tls_args(id));
    for p in peers {
        args.extend(["--peer".to_string(), p.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start(&refs);
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            start.elapsed() < T,
            "peer listener {addr} never came up:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (d, addr)
}

/// The peer listener at `addr` (certificate name `name`) as host `id`.
pub fn endpoint(addr: &str, name: &str, id: &IdentityFiles) -> Endpoint {
    let tls: Arc<rustls::ClientConfig> = HostIdentity::load(id.clone())
        .unwrap()
        .client_config()
        .unwrap();
    Endpoint::Https {
        authority: addr.to_string(),
        server_name: ServerName::try_from(name.to_string()).unwrap(),
        tls,
    }
}

/// One request with a raw body; (status, JSON answer) or the error chain.
pub fn call_raw(
    to: &Endpoint,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, serde_json::Value), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(client::request_to(to, method, path, body, T))
        .map(|r| (r.status, r.json().unwrap_or(serde_json::Value::Null)))
        .map_err(|e| agent::error_chain(&e))
}
