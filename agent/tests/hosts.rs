//! vireod between hosts: host identities made by `vireoctl pki`, the HTTPS peer
//! listener (mutual TLS, an allow-list of peer host names, host-to-host routes only),
//! and live migration between two real vireods over `https://` with the VMMs' stream
//! in TLS. The two "hosts" are two vireods on 127.0.0.1 ports with their own
//! directories and certificates.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use agent::client::{self, Endpoint};
use agent::hosttls::{HostIdentity, IdentityFiles};
use common::pki::{free_port, tls_args, Pki};
use common::{alive, bin, Daemon, T};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};

/// A vireod with a host identity and a peer listener admitting `peers`; returns it
/// and its listener's address.
fn host_daemon(id: &IdentityFiles, peers: &[&str]) -> (Daemon, String) {
    host_daemon_with(id, peers, &[])
}

/// A source host's vireod: its identity for TLS, no autostart, no listener.
fn source_daemon(id: &IdentityFiles) -> Daemon {
    let args = tls_args(id);
    let mut refs: Vec<&str> = args.iter().map(String::as_str).collect();
    refs.push("--no-autostart");
    Daemon::start(&refs)
}

/// [`host_daemon`] with more flags.
fn host_daemon_with(id: &IdentityFiles, peers: &[&str], extra: &[&str]) -> (Daemon, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--no-autostart".to_string(),
        "--listen".into(),
        addr.clone(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(tls_args(id));
    for p in peers {
        args.extend(["--peer".to_string(), p.to_string()]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start(&refs);
    wait_listening(&addr, &d);
    (d, addr)
}

fn wait_listening(addr: &str, d: &Daemon) {
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < T,
            "peer listener {addr} never came up:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn openssl(args: &[&str]) -> (bool, String) {
    let o = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl (scripts/setup installs it)");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn pki_init_and_issue_make_certificates_openssl_verifies_with_private_files() {
    let pki = Pki::new();
    let ca = pki.ca_dir();
    assert_eq!(mode(&ca), 0o700);
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    assert_eq!(mode(&ca.join("ca.crt")), 0o644);
    let a = pki.host_with_sans("host-a", &["10.0.0.7", "a.example.org"]);
    let out = a.cert.parent().unwrap();
    assert_eq!(mode(out), 0o700);
    assert_eq!(mode(&a.key), 0o600);
    assert_eq!(mode(&a.cert), 0o644);
    assert_eq!(mode(&a.ca), 0o644);

    let ca_crt = ca.join("ca.crt");
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        ca_crt.to_str().unwrap(),
        "-purpose",
        "sslserver",
        a.cert.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        a.ca.to_str().unwrap(),
        "-purpose",
        "sslclient",
        a.cert.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let (ok, text) = openssl(&["x509", "-in", a.cert.to_str().unwrap(), "-noout", "-text"]);
    assert!(ok, "{text}");
    assert!(text.contains("Subject: CN = host-a"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(
        text.contains("DNS:host-a, IP Address:10.0.0.7, DNS:a.example.org"),
        "{text}"
    );
    assert!(
        text.contains("CA:FALSE") || !text.contains("CA:TRUE"),
        "{text}"
    );
    // The key is the certificate's.
    let (_, cert_pub) = openssl(&["x509", "-in", a.cert.to_str().unwrap(), "-noout", "-pubkey"]);
    let (_, key_pub) = openssl(&["pkey", "-in", a.key.to_str().unwrap(), "-pubout"]);
    assert_eq!(cert_pub, key_pub);

    // A certificate of another CA does not verify against this one.
    let other = Pki::new();
    let b = other.host("host-b");
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        ca_crt.to_str().unwrap(),
        b.cert.to_str().unwrap(),
    ]);
    assert!(!ok, "another CA's certificate verified: {text}");

    // Nothing is overwritten; a bad host name is refused with one line.
    let again = Command::new(bin("vireoctl"))
        .args(["pki", "init", "--dir", ca.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already exists"), "{err}");
    let bad = Command::new(bin("vireoctl"))
        .args([
            "pki",
            "issue",
            "--ca-dir",
            ca.to_str().unwrap(),
            "--name",
            "a/../b",
        ])
        .args(["--out", pki.dir.path().join("x").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("invalid host name"), "{err}");
    assert!(!pki.dir.path().join("x").exists());
}

fn roots(ca: &Path) -> rustls::RootCertStore {
    let mut r = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        r.add(c.unwrap()).unwrap();
    }
    r
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An endpoint of the peer listener at `addr` (certificate name `name`) with `tls`.
fn endpoint(addr: &str, name: &str, tls: Arc<rustls::ClientConfig>) -> Endpoint {
    Endpoint::Https {
        authority: addr.to_string(),
        server_name: ServerName::try_from(name.to_string()).unwrap(),
        tls,
    }
}

/// One request on the peer listener; Err(the error chain) when TLS refuses.
fn call(
    to: &Endpoint,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(client::request_to(
        to,
        method,
        path,
        body.map(|b| b.to_string().into_bytes()),
        T,
    ))
    .map(|r| (r.status, r.json().unwrap_or(Value::Null)))
    .map_err(|e| agent::error_chain(&e))
}

#[test]
fn the_peer_listener_admits_only_listed_hosts_of_the_ca_and_only_host_to_host_routes() {
    let pki = Pki::new();
    let b = pki.host("host-b");
    let a = pki.host("host-a");
    let c = pki.host("host-c"); // right CA, not on the list
    let other_pki = Pki::new();
    let other = other_pki.host("host-a"); // the listed name, another CA
    let (dst, addr) = host_daemon(&b, &["host-a"]);
    let tls_of = |id: &IdentityFiles| {
        HostIdentity::load(id.clone())
            .unwrap()
            .client_config()
            .unwrap()
    };

    // No client certificate.
    let anonymous = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(&b.ca))
        .with_no_client_auth();
    let refused = [
        ("no client certificate", Arc::new(anonymous)),
        ("a certificate of another CA", {
            // It trusts host-b's CA (so that only the server's judgement counts).
            let id = HostIdentity::load(IdentityFiles {
                ca: b.ca.clone(),
                ..other.clone()
            })
            .unwrap();
            id.client_config().unwrap()
        }),
        ("a CA certificate of a host not on --peer", tls_of(&c)),
    ];
    for (what, tls) in refused {
        let to = endpoint(&addr, "host-b", tls);
        let r = call(&to, "POST", "/api/v1/migrations/incoming", Some(json!({})));
        let err = r.expect_err(&format!("{what}: admitted"));
        assert!(
            err.contains("alert") || err.contains("reset") || err.contains("closed"),
            "{what}: {err}"
        );
    }
    // Each refusal is logged with its reason (the unlisted host by name).
    for reason in [
        "peer sent no certificates",
        "invalid peer certificate: BadSignature",
        "names no host on the --peer list",
        r#"["host-c"]"#,
        "invalid peer certificate: ApplicationVerificationFailure",
    ] {
        dst.wait_log(reason);
    }

    // The listed host of the CA gets in, but only to the host-to-host routes.
    let good = endpoint(&addr, "host-b", tls_of(&a));
    let (s, v) = call(
        &good,
        "POST",
        "/api/v1/migrations/incoming",
        Some(json!({})),
    )
    .unwrap();
    assert_eq!(s, 400, "the route is served: {v}");
    for (method, path, body) in [
        ("GET", "/api/v1/vms", None),
        ("GET", "/api/v1/host.info", None),
        ("GET", "/api/v1/export", None),
        ("GET", "/api/v1/migrations", None),
        ("GET", "/metrics", None),
        (
            "PUT",
            "/api/v1/vms/evil",
            Some(json!({"config": common::counter_config()})),
        ),
        ("PUT", "/api/v1/vms/evil/start", None),
        ("GET", "/api/v1/vms/evil/serial", None),
        ("GET", "/api/v1/openapi.yaml", None),
    ] {
        let (s, v) = call(&good, method, path, body).unwrap();
        assert_eq!(s, 404, "{method} {path}: {v}");
    }
    // Nothing was defined through it.
    assert!(dst.absent("evil"));
    let list = dst.ok("GET", "/api/v1/vms", None);
    assert_eq!(list, json!([]), "{list}");

    // The server is checked too: a peer expecting another name refuses host-b.
    let wrong_name = endpoint(&addr, "host-x", tls_of(&a));
    let err = call(&wrong_name, "GET", "/api/v1/vms", None).unwrap_err();
    assert!(err.contains("certificate"), "{err}");
}

/// The destination's side over the peer listener, driven by hand as host-a: the
/// receiver (vireod's TLS gateway) listens on TCP with TLS (a TLS client of the CA completes a
/// handshake as host-b and gets the receiver's go-ahead byte); only host-a sees and
/// cancels its incoming migration, which removes it.
#[test]
fn an_incoming_migration_from_a_peer_gets_a_tls_receiver_only_that_peer_sees() {
    let pki = Pki::new();
    let a = pki.host("host-a");
    let b = pki.host("host-b");
    let c = pki.host("host-c");
    let (dst, addr) = host_daemon(&b, &["host-a", "host-c"]);
    let as_a = endpoint(
        &addr,
        "host-b",
        HostIdentity::load(a.clone())
            .unwrap()
            .client_config()
            .unwrap(),
    );
    let as_c = endpoint(
        &addr,
        "host-b",
        HostIdentity::load(c.clone())
            .unwrap()
            .client_config()
            .unwrap(),
    );
    let def = json!({"config": common::counter_config(), "priority": "Medium"});
    let secret = "ab".repeat(32);
    let body =
        json!({"name": "w", "definition": def, "source": "claims to be host-z", "secret": secret});
    let (s, rec) = call(&as_a, "POST", "/api/v1/migrations/incoming", Some(body)).unwrap();
    assert_eq!(s, 201, "{rec}\n{}", dst.log());
    // The source is what the certificate proved, not what the body claimed.
    assert_eq!(rec["peer"], "host-a", "{rec}");
    assert_eq!(rec["peer_host"], "host-a", "{rec}");
    let url = rec["receiver_url"].as_str().unwrap();
    assert!(
        url.starts_with("tcp:127.0.0.1:"),
        "a TCP receiver for a peer: {rec}"
    );
    assert_eq!(dst.state("w"), "Incoming");
    let id = rec["id"].as_str().unwrap();

    // Another peer does not see it and cannot cancel it.
    let (s, v) = call(&as_c, "GET", &format!("/api/v1/migrations/{id}"), None).unwrap();
    assert_eq!(s, 404, "{v}");
    let (s, v) = call(&as_c, "DELETE", &format!("/api/v1/migrations/{id}"), None).unwrap();
    assert_eq!(s, 404, "{v}");
    // Its source does, and its cancel discards the VM here.
    let (s, v) = call(&as_a, "GET", &format!("/api/v1/migrations/{id}"), None).unwrap();
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(&as_a, "DELETE", &format!("/api/v1/migrations/{id}"), None).unwrap();
    assert_eq!(s, 200, "{v}");
    let start = std::time::Instant::now();
    while !dst.absent("w") {
        assert!(
            start.elapsed() < T,
            "the incoming VM stayed:\n{}",
            dst.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = dst.wait_migration(id, T);
    assert_eq!(m["state"], "cancelled", "{m}");
    // Each peer request is in the audit trail with the peer's certificate identity
    // (issue 11, part 4; before, the peer listener recorded nothing): host-a's
    // incoming migration and cancel, host-c's refused read and cancel; host-a's
    // successful read (a progress poll) is not a row.
    let audit = dst.ok("GET", "/api/v1/audit?limit=100", None);
    let rows: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["role"] == "peer")
        .collect();
    let seen: Vec<(String, String, u64, String)> = rows
        .iter()
        .map(|e| {
            (
                e["method"].as_str().unwrap().to_string(),
                e["route"].as_str().unwrap().to_string(),
                e["status"].as_u64().unwrap(),
                e["peer"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let (ia, ic) = (
        "host-a (CN host-a; DNS host-a)",
        "host-c (CN host-c; DNS host-c)",
    );
    let row = |m: &str, r: &str, s: u64, p: &str| (m.into(), r.into(), s, p.into());
    assert_eq!(
        seen,
        vec![
            row("POST", "/api/v1/migrations/incoming", 201, ia),
            row("GET", "/api/v1/migrations/{id}", 404, ic),
            row("DELETE", "/api/v1/migrations/{id}", 404, ic),
            row("DELETE", "/api/v1/migrations/{id}", 200, ia),
        ],
        "{audit}"
    );
    assert_eq!(rows[0]["vm"], "w", "{audit}");
    assert_eq!(rows[3]["vm"], "w", "{audit}");
    assert!(rows.iter().all(|e| e["uid"].is_null()), "{audit}");
    assert!(
        rows[1]["detail"].as_str().unwrap().contains("no migration"),
        "{audit}"
    );
    let table = dst.ctl_ok(&["audit"]);
    assert!(
        table.contains("peer host-a (CN host-a; DNS host-a)"),
        "{table}"
    );

    // A second one: its receiver (vireod's gateway) speaks TLS with host-b's identity to host-a
    // (the handshake completes for the name host-b and the receiver sends its go-ahead
    // byte); a connection that then proves no secret, and a plain TCP one, are refused
    // and counted while the receiver keeps waiting for its source.
    let body = json!({"name": "w2", "definition": def, "secret": secret});
    let (s, rec) = call(&as_a, "POST", "/api/v1/migrations/incoming", Some(body)).unwrap();
    assert_eq!(s, 201, "{rec}\n{}", dst.log());
    let id = rec["id"].as_str().unwrap();
    let receiver = rec["receiver_url"]
        .as_str()
        .unwrap()
        .strip_prefix("tcp:")
        .unwrap();
    let tls = HostIdentity::load(a.clone())
        .unwrap()
        .client_config()
        .unwrap();
    let mut conn =
        rustls::ClientConnection::new(tls, ServerName::try_from("host-b").unwrap()).unwrap();
    let mut sock = std::net::TcpStream::connect(receiver).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).unwrap();
    }
    let mut stream = rustls::Stream::new(&mut conn, &mut sock);
    let mut byte = [0u8; 1];
    std::io::Read::read_exact(&mut stream, &mut byte).unwrap();
    assert_eq!(byte[0], 0x56, "the receiver's TLS go-ahead");
    drop(sock);
    let refused = |n: u64| {
        let start = std::time::Instant::now();
        loop {
            let (_, m) = call(&as_a, "GET", &format!("/api/v1/migrations/{id}"), None).unwrap();
            if m["progress"]["refused_connections"].as_u64().unwrap_or(0) >= n {
                return m;
            }
            assert!(start.elapsed() < T, "not {n} refusals: {m}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let m = refused(1);
    assert_eq!(m["state"], "running", "{m}");
    let mut plain = std::net::TcpStream::connect(receiver).unwrap();
    std::io::Write::write_all(&mut plain, b"VIREO plain text\n").unwrap();
    drop(plain);
    let m = refused(2);
    assert_eq!(m["state"], "running", "{m}");
    let (s, v) = call(&as_a, "DELETE", &format!("/api/v1/migrations/{id}"), None).unwrap();
    assert_eq!(s, 200, "{v}");
    let m = dst.wait_migration(id, T);
    assert_eq!(m["state"], "cancelled", "{m}");
}

/// A peer may name files beneath this host's storage roots in the definition it
/// sends, but not another VM's disk (issue 11: a peer host could name a stopped VM's
/// disk as its arriving VM's disk, or as its initramfs, and read it through its own
/// guest). The same path, a hard link to it (another name, the same file) and the
/// initramfs are each refused with the owner named; nothing is defined or started,
/// and the disk keeps its bytes.
#[test]
fn a_peer_cannot_name_another_vms_disk_in_an_arriving_vm() {
    let pki = Pki::new();
    let a = pki.host("host-a");
    let b = pki.host("host-b");
    let (dst, addr) = host_daemon(&b, &["host-a"]);
    let disk = dst.dir.path().join("victim.raw");
    let secret: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&disk, &secret).unwrap();
    let link = dst.dir.path().join("alias.raw");
    std::fs::hard_link(&disk, &link).unwrap();
    let mut cfg = common::counter_config();
    cfg["disks"] = json!([{"path": disk, "format": "raw"}]);
    dst.ok(
        "PUT",
        "/api/v1/vms/victim",
        Some(&json!({"config": cfg}).to_string()),
    );
    let as_a = endpoint(
        &addr,
        "host-b",
        HostIdentity::load(a.clone())
            .unwrap()
            .client_config()
            .unwrap(),
    );
    let secret_hex = "ab".repeat(32);
    let attempts = [
        (
            "disk 0",
            json!({"disks": [{"path": disk, "format": "raw"}]}),
        ),
        (
            "disk 0",
            json!({"disks": [{"path": link, "format": "raw"}]}),
        ),
        ("payload.initramfs", json!({"initramfs": disk})),
    ];
    for (what, change) in attempts {
        let mut cfg = common::counter_config();
        if let Some(disks) = change.get("disks") {
            cfg["disks"] = disks.clone();
        }
        if let Some(i) = change.get("initramfs") {
            cfg["payload"]["initramfs"] = i.clone();
        }
        let body = json!({"name": "thief", "definition": {"config": cfg}, "secret": secret_hex});
        let (s, v) = call(&as_a, "POST", "/api/v1/migrations/incoming", Some(body)).unwrap();
        assert_eq!(s, 400, "{change}: {v}\n{}", dst.log());
        let msg = v.to_string();
        assert!(msg.contains(what), "{msg}");
        assert!(msg.contains("a disk of VM victim on this host"), "{msg}");
        assert!(dst.absent("thief"), "{change}");
    }
    assert!(dst.migrations().is_empty());
    assert_eq!(std::fs::read(&disk).unwrap(), secret);
    // The victim itself is untouched and still starts.
    dst.ok("PUT", "/api/v1/vms/victim/start", None);
    dst.wait_serial("victim", "tick 3 ", T);
}

#[test]
fn a_vm_migrates_between_two_vireods_over_https_and_tls_and_no_vmm_sees_the_host_key() {
    let pki = Pki::new();
    let a = pki.host("host-a");
    let b = pki.host("host-b");
    let (dst, addr) = host_daemon(&b, &["host-a"]);
    let src = source_daemon(&a);
    src.define_counter("m", "Medium", "on-failure");
    src.ok("PUT", "/api/v1/vms/m/start", None);
    src.wait_serial("m", "tick 20 ", T);
    let pid = src.pid("m").unwrap();

    let to = format!("https://{addr}");
    let rec = src.migrate(
        "m",
        &json!({"destination_agent": to, "destination_name": "host-b"}),
    );
    assert_eq!(rec["peer"], to, "{rec}");
    let done = src.wait_migration(rec["id"].as_str().unwrap(), T);
    assert_eq!(
        done["state"],
        "completed",
        "{done}\nsrc:\n{}\ndst:\n{}",
        src.log(),
        dst.log()
    );
    // The stream went over TCP (the peer's receiver) in TLS, which vireod spoke (the
    // receiving VMM listened on a socket in its own run directory; asserted below).
    let url = done["receiver_url"].as_str().unwrap();
    assert!(url.starts_with("tcp:127.0.0.1:"), "{done}");
    // The VM belongs to the destination and counts on from where it was.
    assert!(src.absent("m"));
    common::wait_dead(pid, T);
    let v = dst.wait_state("m", "Running", T);
    assert!(alive(v["pid"].as_i64().unwrap() as i32));
    let ticks = dst.tick_numbers("m");
    let first = *ticks.first().unwrap_or(&0);
    assert!(
        first > 20,
        "the guest started over on the destination: {ticks:?}"
    );
    let last = *ticks.last().unwrap_or(&0);
    dst.wait_serial("m", &format!("tick {} ", last + 10), T);
    // The receiving VMM cannot reach host-b's private key (issue 12: vireod used to
    // copy the identity into the VM's run directory, which its jail shows, and the VMM
    // loaded it, so a guest that escaped into its VMM got the host's identity). Every
    // file the VMM sees (its root, as /proc shows it) is searched for the key's DER and
    // PEM text; the same search finds the guest's ticks in the serial log it writes.
    let vmm = v["pid"].as_i64().unwrap() as i32;
    assert!(
        visible_files_hold(vmm, b"tick "),
        "the scan does not see the VMM's files"
    );
    for (what, needle) in key_material(&b.key) {
        assert!(
            !visible_files_hold(vmm, &needle),
            "a file the receiving VMM sees holds host-b's private key ({what})"
        );
    }
    assert!(
        !dst.run_dir.join("vms/m/tls").exists(),
        "no identity copy in the VM's run directory"
    );
    assert!(
        dst.log().contains("vireod receives with TLS"),
        "{}",
        dst.log()
    );
    let incoming = dst
        .migrations()
        .into_iter()
        .find(|r| r["vm"] == "m")
        .unwrap();
    assert_eq!(incoming["peer"], "host-a", "{incoming}");
    assert_eq!(incoming["state"], "completed", "{incoming}");

    // A source without a host identity cannot call https:// at all (400, nothing queued).
    let plain = Daemon::start(&["--no-autostart"]);
    plain.define_counter("n", "Medium", "on-failure");
    plain.ok("PUT", "/api/v1/vms/n/start", None);
    let (s, b) = plain.api(
        "PUT",
        "/api/v1/vms/n/migrate",
        Some(&json!({"destination_agent": to}).to_string()),
    );
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("host identity"), "{b}");
    assert!(plain.migrations().is_empty());
}

/// `connections: 4` between two vireods: each of the VMM's page streams crosses as a
/// mutual TLS connection of its own (the gateways carry the protocol's stream and four
/// more on both hosts, so encryption spreads over vireod's threads), and the VM arrives
/// and counts on.
#[test]
fn page_streams_between_vireods_each_cross_in_a_tls_connection_of_their_own() {
    let pki = Pki::new();
    let a = pki.host("host-a");
    let b = pki.host("host-b");
    let (dst, addr) = host_daemon(&b, &["host-a"]);
    let src = source_daemon(&a);
    src.define_counter("m", "Medium", "on-failure");
    src.ok("PUT", "/api/v1/vms/m/start", None);
    src.wait_serial("m", "tick 5 ", T);
    let rec = src.migrate(
        "m",
        &json!({"destination_agent": format!("https://{addr}"), "destination_name": "host-b",
                "connections": 4}),
    );
    let done = src.wait_migration(rec["id"].as_str().unwrap(), T);
    assert_eq!(
        done["state"],
        "completed",
        "{done}\nsrc:\n{}\ndst:\n{}",
        src.log(),
        dst.log()
    );
    assert_eq!(done["streams"], 5, "source gateway: {done}");
    let incoming = dst
        .migrations()
        .into_iter()
        .find(|r| r["vm"] == "m")
        .unwrap();
    assert_eq!(incoming["streams"], 5, "destination gateway: {incoming}");
    assert_eq!(incoming["peer"], "host-a", "{incoming}");
    dst.wait_state("m", "Running", T);
    let first = *dst.tick_numbers("m").first().unwrap_or(&0);
    assert!(first > 5, "the guest started over on the destination");
    dst.wait_serial("m", &format!("tick {} ", first + 10), T);
}

/// The private key in `key` (PEM) as a process that loaded it may hold it: its DER,
/// and the first line of its PEM text.
fn key_material(key: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let pem = std::fs::read_to_string(key).unwrap();
    let line = pem
        .lines()
        .find(|l| !l.starts_with("-----") && l.len() >= 40)
        .unwrap()
        .as_bytes()
        .to_vec();
    let der = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    vec![("DER", der.secret_der().to_vec()), ("PEM", line)]
}

/// Whether `needle` is in a regular file (of at most 64 MiB) that process `pid` can
/// see in its root directory (its jail), /proc and /dev left out.
fn visible_files_hold(pid: i32, needle: &[u8]) -> bool {
    fn walk(dir: &Path, needle: &[u8]) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            let p = e.path();
            if t.is_dir() && walk(&p, needle) {
                return true;
            }
            let small = e.metadata().is_ok_and(|m| m.len() <= 64 << 20);
            if t.is_file() && small {
                if let Ok(bytes) = std::fs::read(&p) {
                    if bytes.windows(needle.len()).any(|w| w == needle) {
                        return true;
                    }
                }
            }
        }
        false
    }
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    std::fs::read_dir(&root).unwrap().flatten().any(|e| {
        let skip = ["proc", "dev", "sys"].iter().any(|n| e.file_name() == *n);
        let t = e.file_type().unwrap();
        !skip
            && if t.is_dir() {
                walk(&e.path(), needle)
            } else {
                t.is_file()
                    && std::fs::read(e.path())
                        .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            }
    })
}

#[test]
fn a_destination_with_another_name_is_refused_and_the_vm_stays() {
    let pki = Pki::new();
    let a = pki.host("host-a");
    let b = pki.host("host-b");
    let (dst, addr) = host_daemon(&b, &["host-a"]);
    let src = source_daemon(&a);
    src.define_counter("s", "Medium", "on-failure");
    src.ok("PUT", "/api/v1/vms/s/start", None);
    src.wait_serial("s", "tick 5 ", T);
    let pid = src.pid("s").unwrap();
    // The caller expects host-x at that address; host-b answers.
    let rec = src.migrate(
        "s",
        &json!({"destination_agent": format!("https://{addr}"), "destination_name": "host-x"}),
    );
    let done = src.wait_migration(rec["id"].as_str().unwrap(), T);
    assert_eq!(done["state"], "failed", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(src.state("s"), "Running");
    assert_eq!(src.pid("s"), Some(pid));
    assert!(dst.absent("s"));
    assert!(dst.migrations().is_empty());
}

/// Sends vireod SIGHUP and waits until it logged its `n`th reload.
fn sighup(d: &Daemon, n: usize) {
    let pid = d.child.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) on the vireod this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let start = std::time::Instant::now();
    while d.log().matches("host identity reloaded").count() < n {
        assert!(start.elapsed() < T, "no reload:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Revocation and rotation without a restart (issue 11, part 6; before, vireod read its
/// identity once and knew no CRL): `vireoctl pki revoke` writes the CA's CRL; a vireod
/// given it with `--tls-crl` refuses the revoked host from the first handshake after
/// SIGHUP (not before: the reload is what takes it), while other peers still get in;
/// a replacement certificate of the same host copied over `--tls-cert/--tls-key` is
/// what the listener presents after the next SIGHUP.
#[test]
fn a_revoked_peer_is_refused_after_sighup_and_a_rotated_certificate_is_served() {
    let pki = Pki::new();
    let a = pki.host("host-a");
    let b = pki.host("host-b");
    let c = pki.host("host-c");
    let z = pki.host("host-z");
    let ca = pki.ca_dir();
    pki.revoke(&z);
    let crl = pki.dir.path().join("b-crl.pem");
    std::fs::copy(ca.join("ca.crl"), &crl).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--no-autostart".to_string(),
        "--listen".into(),
        addr.clone(),
    ];
    args.extend(tls_args(&b));
    args.extend(["--tls-crl".into(), crl.display().to_string()]);
    for p in ["host-a", "host-c", "host-z"] {
        args.extend(["--peer".to_string(), p.to_string()]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let dst = Daemon::start(&refs);
    wait_listening(&addr, &dst);
    let tls_of = |id: &IdentityFiles| {
        HostIdentity::load(id.clone())
            .unwrap()
            .client_config()
            .unwrap()
    };
    let probe = |id: &IdentityFiles| {
        call(
            &endpoint(&addr, "host-b", tls_of(id)),
            "GET",
            "/api/v1/migrations/none",
            None,
        )
    };
    assert_eq!(probe(&a).unwrap().0, 404, "host-a gets in");
    assert!(probe(&z).is_err(), "host-z is revoked from the start");

    pki.revoke(&a);
    std::fs::copy(ca.join("ca.crl"), &crl).unwrap();
    assert_eq!(probe(&a).unwrap().0, 404, "the CRL in use until the reload");
    sighup(&dst, 1);
    let err = probe(&a).unwrap_err();
    assert!(
        err.to_lowercase().contains("revoked") || err.contains("certificate"),
        "{err}"
    );
    dst.wait_log("Revoked");
    assert_eq!(probe(&c).unwrap().0, 404, "host-c still gets in");

    // Rotation: a new certificate and key for host-b over the files vireod reads.
    let out = pki.dir.path().join("host-b-2");
    pki.pki(&[
        "issue",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--name",
        "host-b",
        "--out",
        out.to_str().unwrap(),
    ]);
    let served = || {
        let mut conn =
            rustls::ClientConnection::new(tls_of(&c), ServerName::try_from("host-b").unwrap())
                .unwrap();
        let mut sock = std::net::TcpStream::connect(&addr).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).unwrap();
        }
        conn.peer_certificates().unwrap()[0].clone().into_owned()
    };
    let first = CertificateDer::from_pem_file(&b.cert).unwrap();
    assert_eq!(served(), first);
    std::fs::copy(out.join("host.crt"), &b.cert).unwrap();
    std::fs::copy(out.join("host.key"), &b.key).unwrap();
    sighup(&dst, 2);
    let second = CertificateDer::from_pem_file(&b.cert).unwrap();
    assert_ne!(first, second);
    assert_eq!(served(), second, "the rotated certificate is served");
    assert_eq!(probe(&c).unwrap().0, 404);
    // A replacement that names another host is not taken; the one in use stays.
    std::fs::copy(&c.cert, &b.cert).unwrap();
    std::fs::copy(&c.key, &b.key).unwrap();
    let pid = dst.child.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) on the vireod this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let log = dst.wait_log("not reloaded");
    assert!(log.contains("names host-c, not host-b"), "{log}");
    assert_eq!(served(), second);
}

/// The migration streams' TLS reads the CRL as each migration starts (issue 11;
/// before, only vireod's listener did, so a host revoked after vireod's last reload
/// still got its migration stream in). The destination's vireod still admits host-a
/// on its peer listener (its CRL was read before host-a was revoked; no SIGHUP), but
/// the migration's TLS (vireod's gateway, which reads `--tls-crl` when the migration
/// starts) refuses host-a's stream in the handshake, naming the revocation on both
/// sides, and the VM stays on its source, counting.
#[test]
fn a_migration_from_a_host_revoked_since_the_reload_is_refused_in_the_streams_handshake() {
    let pki = Pki::new();
    let a = pki.host("host-a");
    let b = pki.host("host-b");
    let z = pki.host("host-z");
    let ca = pki.ca_dir();
    pki.revoke(&z); // a CRL to start with: host-a is not on it
    let crl = pki.dir.path().join("b-crl.pem");
    std::fs::copy(ca.join("ca.crl"), &crl).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--no-autostart".to_string(),
        "--listen".into(),
        addr.clone(),
        "--peer".into(),
        "host-a".into(),
        "--tls-crl".into(),
        crl.display().to_string(),
    ];
    args.extend(tls_args(&b));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let dst = Daemon::start(&refs);
    wait_listening(&addr, &dst);
    let src = source_daemon(&a);
    src.define_counter("r", "Medium", "on-failure");
    src.ok("PUT", "/api/v1/vms/r/start", None);
    src.wait_serial("r", "tick 5 ", T);
    let pid = src.pid("r").unwrap();

    pki.revoke(&a);
    std::fs::copy(ca.join("ca.crl"), &crl).unwrap();
    let rec = src.migrate(
        "r",
        &json!({"destination_agent": format!("https://{addr}"), "destination_name": "host-b"}),
    );
    let done = src.wait_migration(rec["id"].as_str().unwrap(), T);
    assert_eq!(
        done["state"],
        "failed",
        "{done}\nsrc:\n{}\ndst:\n{}",
        src.log(),
        dst.log()
    );
    // vireod's peer listener let host-a in (its CRL predates the revocation): the
    // refusal is the migration stream's, in its TLS handshake.
    assert!(
        done["receiver_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("tcp:")),
        "{done}"
    );
    let err = done["error"].as_str().unwrap();
    assert!(err.contains("TLS handshake failed"), "{err}");
    assert!(err.contains("CertificateRevoked"), "{err}");
    assert!(err.contains("revokes this side's certificate"), "{err}");
    // The destination's record says the same from its side: the source's certificate
    // was revoked; the VM never arrived.
    let incoming = dst
        .migrations()
        .into_iter()
        .find(|r| r["vm"] == "r")
        .unwrap();
    let incoming = dst.wait_migration(incoming["id"].as_str().unwrap(), T);
    assert_ne!(incoming["state"], "completed", "{incoming}");
    let refusal = incoming["progress"]["last_refusal"].as_str().unwrap_or("");
    assert!(refusal.contains("Revoked"), "{incoming}");
    let start = std::time::Instant::now();
    while !dst.absent("r") {
        assert!(start.elapsed() < T, "the VM stayed:\n{}", dst.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The VM stays on its source, the same process, counting on.
    assert_eq!(src.state("r"), "Running");
    assert_eq!(src.pid("r"), Some(pid));
    let last = *src.tick_numbers("r").last().unwrap();
    src.wait_serial("r", &format!("tick {} ", last + 3), T);
}

/// A host revoked while its migration runs loses it at the destination's next reload
/// (issue 11: revocation mid-migration; before, a CRL reloaded by SIGHUP reached only
/// new handshakes, so streams admitted earlier carried the VM on). The destination
/// vireod's gateway checks every stream it carries against the CA and CRL it now
/// holds and cuts host-a's: the migration fails, the VM keeps running on its source
/// (same process, still dirtying its pages), and the destination holds nothing.
#[test]
fn a_host_revoked_mid_migration_loses_its_streams_at_the_reload_and_the_vm_stays() {
    let pki = Pki::new();
    let a = pki.host("host-a");
    let b = pki.host("host-b");
    let z = pki.host("host-z");
    let ca = pki.ca_dir();
    pki.revoke(&z);
    let crl = pki.dir.path().join("b-crl.pem");
    std::fs::copy(ca.join("ca.crl"), &crl).unwrap();
    let (dst, addr) = host_daemon_with(&b, &["host-a"], &["--tls-crl", crl.to_str().unwrap()]);
    let src = source_daemon(&a);
    // 1024 pages rewritten 4000 times a second, sent at 1 MiB/s: the first copy round
    // alone takes ~4 s, and the migration never converges.
    let def = json!({
        "config": {
            "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=dirty pages=1024 rate=4000"},
            "memory": {"size": 64u64 << 20},
        },
        "priority": "Medium",
    });
    src.ok("PUT", "/api/v1/vms/d", Some(&def.to_string()));
    src.ok("PUT", "/api/v1/vms/d/start", None);
    src.wait_serial("d", "dirty pass=", T);
    let pid = src.pid("d").unwrap();
    let rec = src.migrate(
        "d",
        &json!({"destination_agent": format!("https://{addr}"), "destination_name": "host-b",
                "bandwidth_mib_s": 1}),
    );
    let id = rec["id"].as_str().unwrap();
    // The stream is being carried: the destination's receiver has bytes.
    let start = std::time::Instant::now();
    loop {
        let carried = dst
            .migrations()
            .into_iter()
            .any(|r| r["vm"] == "d" && r["progress"]["bytes_sent"].as_u64().unwrap_or(0) > 0);
        if carried {
            break;
        }
        assert!(start.elapsed() < T, "no bytes arrived:\n{}", dst.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The sending VMM, mid-migration, cannot reach host-a's private key either: the
    // source's gateway speaks the TLS (the scan finds the guest's output it writes).
    assert!(
        visible_files_hold(pid, b"dirty pass="),
        "the scan does not see the sending VMM's files"
    );
    for (what, needle) in key_material(&a.key) {
        assert!(
            !visible_files_hold(pid, &needle),
            "a file the sending VMM sees holds host-a's private key ({what})"
        );
    }
    pki.revoke(&a);
    std::fs::copy(ca.join("ca.crl"), &crl).unwrap();
    sighup(&dst, 1);
    let done = src.wait_migration(id, T);
    assert_eq!(
        done["state"],
        "failed",
        "{done}\nsrc:\n{}\ndst:\n{}",
        src.log(),
        dst.log()
    );
    let log = dst.log();
    assert!(
        log.contains("cut the migration streams of peers no longer trusted"),
        "{log}"
    );
    assert!(
        log.contains("CertificateRevoked") || log.contains("Revoked"),
        "{log}"
    );
    let start = std::time::Instant::now();
    while !dst.absent("d") {
        assert!(start.elapsed() < T, "the VM stayed:\n{}", dst.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The VM stays on its source, the same process, running.
    assert_eq!(src.wait_state("d", "Running", T)["state"], "Running");
    assert_eq!(src.pid("d"), Some(pid));
}

/// Two consecutive ports that can be bound on 127.0.0.1 now, below the usual
/// ephemeral range (so that other tests' port-0 binds do not take them meanwhile).
fn two_free_ports() -> u16 {
    let base = 22000 + (std::process::id() % 4000) as u16 * 2;
    (0..2000u16)
        .map(|i| 22000 + (base - 22000 + i * 2) % 8000)
        .find(|&p| {
            std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
        })
        .expect("two free ports")
}

/// `vireod --migration-ports FIRST-LAST` (issue 11; before, receivers took any free
/// port, so a firewall could not admit them by port): a port of the range that another
/// process holds is skipped; once every port is held the incoming migration is refused
/// with 503 and one line, and nothing is defined or started; a migration's port is
/// free again when it ends, cancelled or completed; a peer cannot pick a port outside.
#[test]
fn migration_ports_skip_busy_ports_refuse_when_exhausted_and_come_back_when_a_migration_ends() {
    let pki = Pki::new();
    let a = pki.host("host-a");
    let b = pki.host("host-b");
    let p = two_free_ports();
    let busy = std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
    let range = format!("{p}-{}", p + 1);
    let (dst, addr) = host_daemon_with(&b, &["host-a"], &["--migration-ports", &range]);
    let as_a = endpoint(
        &addr,
        "host-b",
        HostIdentity::load(a.clone())
            .unwrap()
            .client_config()
            .unwrap(),
    );
    let def = json!({"config": common::counter_config(), "priority": "Medium"});
    let secret = "ab".repeat(32);
    let incoming = |name: &str| {
        let body = json!({"name": name, "definition": def, "secret": secret});
        call(&as_a, "POST", "/api/v1/migrations/incoming", Some(body)).unwrap()
    };
    let cancel = |rec: &Value| {
        let id = rec["id"].as_str().unwrap();
        let (s, v) = call(&as_a, "DELETE", &format!("/api/v1/migrations/{id}"), None).unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!(dst.wait_migration(id, T)["state"], "cancelled");
    };
    let second = format!("tcp:127.0.0.1:{}", p + 1);

    // The first port is another process's: the receiver gets the second.
    let (s, w1) = incoming("w1");
    assert_eq!(s, 201, "{w1}\n{}", dst.log());
    assert_eq!(w1["receiver_url"], second.as_str(), "{w1}");
    // Both held: refused with one line, nothing defined, no VMM started.
    let processes = dst.processes().len();
    let (s, v) = incoming("w2");
    assert_eq!(s, 503, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains(&format!("no free migration port in {range} on 127.0.0.1")),
        "{e}"
    );
    assert!(
        e.contains("1 held by migrations of this vireod, 1 in use by other processes"),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");
    assert!(dst.absent("w2"));
    assert!(dst.migrations().iter().all(|r| r["vm"] != "w2"));
    assert_eq!(dst.processes().len(), processes, "a VMM was started");
    // A peer cannot ask for a port of its own.
    let body = json!({"name": "w3", "definition": def, "secret": secret,
        "receiver_url": format!("tcp:127.0.0.1:{}", free_port())});
    let (s, v) = call(&as_a, "POST", "/api/v1/migrations/incoming", Some(body)).unwrap();
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("--migration-ports"),
        "{v}"
    );
    assert!(dst.absent("w3"));

    // Cancelled: its port is free again.
    cancel(&w1);
    dst.wait_log("migration port freed");
    let (s, w4) = incoming("w4");
    assert_eq!(s, 201, "{w4}\n{}", dst.log());
    assert_eq!(w4["receiver_url"], second.as_str(), "{w4}");
    cancel(&w4);
    // The other process lets its port go: the range starts there again.
    drop(busy);

    // A real migration from host-a takes the first port and, once completed, frees it.
    let src = source_daemon(&a);
    src.define_counter("m", "Medium", "on-failure");
    src.ok("PUT", "/api/v1/vms/m/start", None);
    src.wait_serial("m", "tick 5 ", T);
    let rec = src.migrate(
        "m",
        &json!({"destination_agent": format!("https://{addr}"), "destination_name": "host-b"}),
    );
    let done = src.wait_migration(rec["id"].as_str().unwrap(), T);
    assert_eq!(
        done["state"],
        "completed",
        "{done}\nsrc:\n{}\ndst:\n{}",
        src.log(),
        dst.log()
    );
    let first = format!("tcp:127.0.0.1:{p}");
    assert_eq!(done["receiver_url"], first.as_str(), "{done}");
    dst.wait_state("m", "Running", T);
    let arrived = dst
        .migrations()
        .into_iter()
        .find(|r| r["vm"] == "m")
        .unwrap();
    assert_eq!(arrived["state"], "completed", "{arrived}");
    let start = std::time::Instant::now();
    let (s, w5) = loop {
        // The port is freed just after the record says completed.
        let (s, w5) = incoming("w5");
        if s == 201 && w5["receiver_url"] == first.as_str() {
            break (s, w5);
        }
        if s == 201 {
            cancel(&w5);
        }
        assert!(start.elapsed() < T, "{s} {w5}\n{}", dst.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(s, 201);
    cancel(&w5);
}

/// Posts an incoming migration of `cfg` (and `extra` fields) as the peer `as_peer`.
fn post_incoming(as_peer: &Endpoint, cfg: Value, extra: Value) -> (u16, Value) {
    let mut body =
        json!({"name": "arrival", "definition": {"config": cfg}, "secret": "ab".repeat(32)});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    call(as_peer, "POST", "/api/v1/migrations/incoming", Some(body)).unwrap()
}

fn with_disk(path: &Path) -> Value {
    let mut cfg = common::counter_config();
    cfg["disks"] = json!([{"path": path, "format": "raw", "size": 1u64 << 20}]);
    cfg
}

/// `--peer-storage`: a peer with a storage scope migrates a VM whose files lie beneath
/// it, and an arriving VM of its naming a kernel, disk or storage_dir elsewhere beneath
/// the storage roots is refused naming the scope (another peer, without one, may name
/// the same file). On a replica server no peer may name another primary's replica.
/// Whatever was refused is untouched (bytes, owner) and left no VM or record.
#[test]
fn a_peer_with_a_storage_scope_names_only_files_beneath_it_and_no_peer_names_another_primarys_replica(
) {
    use std::os::unix::fs::MetadataExt;
    let pki = Pki::new();
    let (a, b, d) = (pki.host("host-a"), pki.host("host-b"), pki.host("host-d"));
    let shared = tempfile::tempdir().unwrap();
    let root = shared.path();
    for dir in ["scope-a/empty", "outside/empty", "replicas/host-c/vm1"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    let secret: Vec<u8> = (0..1u32 << 20).map(|i| (i * 13 % 251) as u8).collect();
    let outside_disk = root.join("outside/data.raw");
    let replica_disk = root.join("replicas/host-c/vm1/disk.raw");
    let kernel_copy = root.join("outside/kernel");
    for f in [&outside_disk, &replica_disk] {
        std::fs::write(f, &secret).unwrap();
    }
    std::fs::copy(vireo_e2e::guest(), &kernel_copy).unwrap();
    let guest = common::guest_dir();
    let (root_s, guest_s) = (root.display().to_string(), guest.display().to_string());
    let scope_a = format!("host-a={}", root.join("scope-a").display());
    let scope_a_guest = format!("host-a={guest_s}");
    let replicas = root.join("replicas").display().to_string();
    let (dst, addr) = host_daemon_with(
        &b,
        &["host-a", "host-c", "host-d"],
        &[
            "--storage-root",
            &root_s,
            "--storage-root",
            &guest_s,
            "--peer-storage",
            &scope_a,
            "--peer-storage",
            &scope_a_guest,
            "--replica-dir",
            &replicas,
            "--replica-allow",
            "host-c",
        ],
    );
    let as_peer = |id: &IdentityFiles| {
        endpoint(
            &addr,
            "host-b",
            HostIdentity::load(id.clone())
                .unwrap()
                .client_config()
                .unwrap(),
        )
    };
    let (as_a, as_d) = (as_peer(&a), as_peer(&d));
    let owner = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid())
    };
    let replica_owner = owner(&replica_disk);

    // host-a, scoped: every path elsewhere is refused, naming what and the scope.
    let mut kernel_elsewhere = common::counter_config();
    kernel_elsewhere["payload"]["kernel"] = json!(kernel_copy);
    let attempts = [
        ("disk 0", with_disk(&outside_disk), json!({})),
        ("disk 0", with_disk(&replica_disk), json!({})),
        ("payload.kernel", kernel_elsewhere, json!({})),
        (
            "storage_dir",
            with_disk(&root.join("scope-a/copy.raw")),
            json!({"storage_dir": root.join("outside/empty")}),
        ),
    ];
    for (what, cfg, extra) in attempts {
        let (s, v) = post_incoming(&as_a, cfg, extra.clone());
        let msg = v.to_string();
        assert_eq!(s, 400, "{what} {extra}: {msg}\n{}", dst.log());
        assert!(msg.contains(what), "{msg}");
        assert!(
            msg.contains("peer host-a may name files only beneath its --peer-storage"),
            "{msg}"
        );
        assert!(dst.absent("arrival"));
    }
    // host-d has no scope: the file host-a may not name, it may (the receiver is made;
    // host-d cancels it) — but not another primary's replica, nor put a copy there.
    let (s, v) = post_incoming(&as_d, with_disk(&outside_disk), json!({}));
    assert_eq!(s, 201, "{v}\n{}", dst.log());
    let id = v["id"].as_str().unwrap().to_string();
    let (s, v) = call(&as_d, "DELETE", &format!("/api/v1/migrations/{id}"), None).unwrap();
    assert_eq!(s, 200, "{v}");
    let start = std::time::Instant::now();
    while !dst.absent("arrival") {
        assert!(
            start.elapsed() < T,
            "the cancelled arrival stays\n{}",
            dst.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = [
        ("disk 0", with_disk(&replica_disk), json!({})),
        (
            "storage_dir",
            with_disk(&root.join("outside/copy.raw")),
            json!({"storage_dir": root.join("replicas/host-c/vm1")}),
        ),
    ];
    for (what, cfg, extra) in refused {
        let (s, v) = post_incoming(&as_d, cfg, extra.clone());
        let msg = v.to_string();
        assert_eq!(s, 400, "{what} {extra}: {msg}");
        assert!(msg.contains(what), "{msg}");
        assert!(msg.contains("another primary's replica"), "{msg}");
        assert!(dst.absent("arrival"));
    }
    assert_eq!(std::fs::read(&replica_disk).unwrap(), secret);
    assert_eq!(std::fs::read(&outside_disk).unwrap(), secret);
    assert_eq!(
        owner(&replica_disk),
        replica_owner,
        "the replica changed owner"
    );
    assert!(std::fs::read_dir(root.join("outside/empty"))
        .unwrap()
        .next()
        .is_none());
    assert_eq!(dst.migrations().len(), 1, "only host-d's cancelled arrival");

    // Within its scope host-a migrates a VM here for real.
    let src = source_daemon(&a);
    src.define_counter("m", "Medium", "on-failure");
    src.ok("PUT", "/api/v1/vms/m/start", None);
    src.wait_serial("m", "tick 10 ", T);
    let rec = src.migrate(
        "m",
        &json!({"destination_agent": format!("https://{addr}"), "destination_name": "host-b"}),
    );
    let done = src.wait_migration(rec["id"].as_str().unwrap(), T);
    assert_eq!(done["state"], "completed", "{done}\ndst:\n{}", dst.log());
    let last = *dst.tick_numbers("m").last().unwrap_or(&0);
    assert!(last > 10, "the guest started over");
    dst.wait_serial("m", &format!("tick {} ", last + 5), T);
}

/// `--peer-storage` names a --peer and a directory beneath a storage root, or vireod
/// does not start (exit 1, one line naming the flag).
#[test]
fn a_peer_storage_flag_for_no_peer_or_outside_the_roots_stops_vireod() {
    let pki = Pki::new();
    let b = pki.host("host-b");
    let outside = tempfile::tempdir().unwrap();
    let cases = [
        (
            format!("host-z={}", common::guest_dir().display()),
            "host-z is not a --peer",
        ),
        (
            format!("host-a={}", outside.path().display()),
            "outside every storage root",
        ),
    ];
    for (flag, why) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(bin("vireod"));
        cmd.args(["--state-dir", &dir.path().join("s").display().to_string()])
            .args(["--run-dir", &dir.path().join("r").display().to_string()])
            .args(["--no-cpu-cgroups", "--no-autostart"])
            .args(["--storage-root", &common::guest_dir().display().to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--peer", "host-a", "--peer-storage", &flag])
            .args(tls_args(&b));
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{flag}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--peer-storage"), "{err}");
        assert!(err.contains(why), "{err}");
    }
}
