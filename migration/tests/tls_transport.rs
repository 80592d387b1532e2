//! The TLS transport over real sockets: mutual TLS on TCP loopback and on a unix
//! socket, and every way a handshake or a certificate file can be wrong, each with the
//! error a user can act on. Certificates are made here with rcgen.

use std::path::{Path, PathBuf};
use std::time::Duration;

use migration::protocol::{self, Message};
use migration::tls::{ClientTls, ServerTls, TlsError, TlsFiles};
use migration::transport::{MigrationUrl, TransportError};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams,
    SerialNumber,
};

/// A CA and the PEM files of certificates it signed, in a directory.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: PathBuf,
    name: &'static str,
}

impl Ca {
    fn new(dir: &Path, name: &'static str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        Self {
            cert,
            key,
            dir: dir.to_path_buf(),
            name,
        }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// A leaf for `names` (server) or a client certificate; returns (cert, key) files.
    fn issue(&self, leaf: &str, names: &[&str], server: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, leaf);
        // The leaf's name is its serial, so a CRL can name it (see `crl`).
        p.serial_number = Some(SerialNumber::from_slice(leaf.as_bytes()));
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let c = self.dir.join(format!("{}-{leaf}.crt", self.name));
        let k = self.dir.join(format!("{}-{leaf}.key", self.name));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

impl Ca {
    /// A CRL of this CA revoking the leaves `revoked` (by name); returns its file.
    fn crl(&self, revoked: &[&str]) -> PathBuf {
        let params = CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2100, 1, 1),
            crl_number: SerialNumber::from(revoked.len() as u64 + 1),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|leaf| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(leaf.as_bytes()),
                    revocation_time: rcgen::date_time_ymd(2024, 1, 1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.cert, &self.key).unwrap();
        let path = self
            .dir
            .join(format!("{}-crl-{}.pem", self.name, revoked.join("-")));
        std::fs::write(&path, crl.pem().unwrap()).unwrap();
        path
    }
}

fn files(cert: Option<&(PathBuf, PathBuf)>, ca: &Ca) -> TlsFiles {
    TlsFiles {
        cert: cert.map(|c| c.0.clone()),
        key: cert.map(|c| c.1.clone()),
        ca: ca.ca_file(),
        crl: None,
    }
}

/// The allow-list of the tests' destinations: the client certificate's CN.
fn peers() -> Vec<String> {
    vec!["src".to_string()]
}

fn tcp_url() -> MigrationUrl {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("tcp:127.0.0.1:{port}").parse().unwrap()
}

/// Listens with `server`, connects with `client`; returns both sides' results after
/// one Go frame each way (when both handshakes succeed).
fn exchange(
    url: &MigrationUrl,
    server: ServerTls,
    client: &ClientTls,
) -> (Result<(), String>, Result<(), String>) {
    let listener = url.listen_with(Some(server)).unwrap();
    let dst = std::thread::spawn(move || -> Result<(), String> {
        let mut s = listener
            .accept_within(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        match protocol::recv(s.as_mut()).map_err(|e| e.to_string())? {
            Message::Go => {}
            other => return Err(format!("got {}", other.name())),
        }
        protocol::send(s.as_mut(), &Message::Ready).map_err(|e| e.to_string())
    });
    let src = (|| -> Result<(), String> {
        let mut s = url.connect_with(Some(client)).map_err(|e| e.to_string())?;
        protocol::send(s.as_mut(), &Message::Go).map_err(|e| e.to_string())?;
        match protocol::recv(s.as_mut()).map_err(|e| e.to_string())? {
            Message::Ready => Ok(()),
            other => Err(format!("got {}", other.name())),
        }
    })();
    (src, dst.join().unwrap())
}

#[test]
fn mutual_tls_over_tcp_and_unix_carries_frames_and_a_large_payload() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.issue("dst", &["localhost", "127.0.0.1"], true);
    let client = ca.issue("src", &[], false);
    let s = ServerTls::load(&files(Some(&server), &ca), &peers()).unwrap();
    // TCP: the server name is the URL's host (an IP address here).
    let c = ClientTls::load(&files(Some(&client), &ca), None).unwrap();
    let url = tcp_url();
    let listener = url.listen_with(Some(s.clone())).unwrap();
    let pages: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let sent = pages.clone();
    let dst = std::thread::spawn(move || {
        let mut st = listener.accept_one().unwrap();
        let Message::Pages(p) = protocol::recv(st.as_mut()).unwrap() else {
            panic!("pages")
        };
        protocol::send(st.as_mut(), &Message::Ready).unwrap();
        p
    });
    let mut st = url.connect_with(Some(&c)).unwrap();
    protocol::send(st.as_mut(), &Message::Pages(sent)).unwrap();
    assert!(matches!(
        protocol::recv(st.as_mut()).unwrap(),
        Message::Ready
    ));
    assert!(dst.join().unwrap() == pages, "8 MiB arrive intact");

    // A unix socket with an explicit server name.
    let unix: MigrationUrl = format!("unix:{}", dir.path().join("m.sock").display())
        .parse()
        .unwrap();
    let named = ClientTls::load(&files(Some(&client), &ca), Some("localhost")).unwrap();
    let (src, dst) = exchange(&unix, s.clone(), &named);
    assert_eq!((src, dst), (Ok(()), Ok(())));
    // ... which is required there: a unix URL has no host to check against.
    let e = unix.connect_with(Some(&c)).err().unwrap();
    assert!(matches!(e, TransportError::Tls { .. }), "{e}");
    assert!(e.to_string().contains("explicit server_name"), "{e}");
}

#[test]
fn handshake_failures_name_their_cause_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let other = Ca::new(dir.path(), "other");
    let server = ca.issue("dst", &["localhost", "127.0.0.1"], true);
    let client = ca.issue("src", &[], false);
    let stranger = other.issue("src", &[], false);
    let s = ServerTls::load(&files(Some(&server), &ca), &peers()).unwrap();

    // The source presents no certificate: the destination requires one.
    let c = ClientTls::load(&files(None, &ca), None).unwrap();
    let (src, dst) = exchange(&tcp_url(), s.clone(), &c);
    let (src, dst) = (src.unwrap_err(), dst.unwrap_err());
    assert!(src.contains("TLS handshake failed"), "{src}");
    assert!(src.contains("requires a client certificate"), "{src}");
    assert!(dst.contains("TLS handshake failed"), "{dst}");
    assert!(dst.contains("no certificates"), "{dst}");

    // The source's certificate is from a CA the destination does not trust.
    let c = ClientTls::load(
        &TlsFiles {
            ca: ca.ca_file(),
            ..files(Some(&stranger), &other)
        },
        None,
    )
    .unwrap();
    let (src, dst) = exchange(&tcp_url(), s.clone(), &c);
    let (src, dst) = (src.unwrap_err(), dst.unwrap_err());
    assert!(
        src.contains("does not trust this side's certificate"),
        "{src}"
    );
    assert!(dst.contains("UnknownIssuer"), "{dst}");

    // The source trusts another CA than the one that signed the destination.
    let c = ClientTls::load(&files(Some(&client), &other), None).unwrap();
    let (src, dst) = exchange(&tcp_url(), s.clone(), &c);
    let src = src.unwrap_err();
    assert!(src.contains("UnknownIssuer"), "{src}");
    assert!(src.contains("does not chain to the CA"), "{src}");
    assert!(dst.unwrap_err().contains("TLS handshake failed"));

    // The destination's certificate is for other names.
    let c = ClientTls::load(&files(Some(&client), &ca), Some("dst.example")).unwrap();
    let (src, _) = exchange(&tcp_url(), s.clone(), &c);
    let src = src.unwrap_err();
    assert!(src.contains("not valid for name"), "{src}");
    assert!(src.contains("server_name"), "{src}");

    // A source without TLS at all.
    let url = tcp_url();
    let listener = url.listen_with(Some(s)).unwrap();
    let dst = std::thread::spawn(move || listener.accept_one().map(|_| ()));
    let mut plain = url.connect().unwrap();
    let _ = protocol::send(plain.as_mut(), &Message::Go);
    let e = dst.join().unwrap().unwrap_err().to_string();
    assert!(e.contains("TLS handshake failed"), "{e}");
    assert!(e.contains("speaking TLS"), "{e}");
}

#[test]
fn a_client_certificate_from_the_right_ca_but_not_allowed_is_refused_in_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.issue("dst", &["localhost", "127.0.0.1"], true);
    let allowed = ca.issue("src", &[], false);
    let by_dns = ca.issue("host-b", &["src-b.vireo.test"], false);
    let other_host = ca.issue("intruder", &["intruder.vireo.test"], false);
    let s = ServerTls::load(
        &files(Some(&server), &ca),
        &["src".to_string(), "src-b.vireo.test".to_string()],
    )
    .unwrap();
    // Allowed by its CN, and by a DNS name.
    for leaf in [&allowed, &by_dns] {
        let c = ClientTls::load(&files(Some(leaf), &ca), None).unwrap();
        let (src, dst) = exchange(&tcp_url(), s.clone(), &c);
        assert_eq!((src, dst), (Ok(()), Ok(())));
    }
    // Same CA, another host: refused in the handshake, and told so.
    let c = ClientTls::load(&files(Some(&other_host), &ca), None).unwrap();
    let (src, dst) = exchange(&tcp_url(), s.clone(), &c);
    let (src, dst) = (src.unwrap_err(), dst.unwrap_err());
    assert!(src.contains("TLS handshake failed"), "{src}");
    assert!(src.contains("see its allowed_peers"), "{src}");
    assert!(dst.contains("names no allowed peer"), "{dst}");
    // An empty allow-list is a configuration error, not "anyone from the CA".
    let e = ServerTls::load(&files(Some(&server), &ca), &[]).unwrap_err();
    assert!(matches!(e, TlsError::NoAllowedPeers), "{e}");
}

/// The CA's CRL on either side (issue 11: before, the migration TLS read no CRL and a
/// revoked host's certificate got in as long as it chained to the CA): a destination
/// given a CRL refuses a revoked source in the handshake, a source given one refuses a
/// revoked destination; both say it was a revocation. The same certificates pass
/// without the CRL, and a CRL revoking someone else changes nothing.
#[test]
fn a_certificate_the_crl_revokes_is_refused_on_either_side() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.issue("dst", &["localhost", "127.0.0.1"], true);
    let client = ca.issue("src", &[], false);
    let src_revoked = ca.crl(&["src"]);
    let dst_revoked = ca.crl(&["dst"]);
    let nobody_revoked = ca.crl(&["someone-else"]);
    let with_crl = |cert: &(PathBuf, PathBuf), crl: Option<&PathBuf>| TlsFiles {
        crl: crl.cloned(),
        ..files(Some(cert), &ca)
    };
    let server_tls = |crl| ServerTls::load(&with_crl(&server, crl), &peers()).unwrap();
    let client_tls = |crl| ClientTls::load(&with_crl(&client, crl), None).unwrap();

    // Without a CRL, and with one revoking someone else, both get in.
    for crl in [None, Some(&nobody_revoked)] {
        let (src, dst) = exchange(&tcp_url(), server_tls(crl), &client_tls(crl));
        assert_eq!((src, dst), (Ok(()), Ok(())));
    }
    // The destination's CRL revokes the source.
    let (src, dst) = exchange(
        &tcp_url(),
        server_tls(Some(&src_revoked)),
        &client_tls(None),
    );
    let (src, dst) = (src.unwrap_err(), dst.unwrap_err());
    assert!(dst.contains("TLS handshake failed"), "{dst}");
    assert!(dst.contains("Revoked"), "{dst}");
    assert!(src.contains("CertificateRevoked"), "{src}");
    assert!(src.contains("revokes this side's certificate"), "{src}");
    // The source's CRL revokes the destination.
    let (src, _) = exchange(
        &tcp_url(),
        server_tls(None),
        &client_tls(Some(&dst_revoked)),
    );
    let src = src.unwrap_err();
    assert!(src.contains("Revoked"), "{src}");
    assert!(
        src.contains("the CA's CRL revokes the peer's certificate"),
        "{src}"
    );
    // A CRL file that is not one is a named error at load.
    let garbage = dir.path().join("garbage-crl.pem");
    std::fs::write(&garbage, "not a CRL\n").unwrap();
    let e = ServerTls::load(&with_crl(&server, Some(&garbage)), &peers()).unwrap_err();
    assert!(e.to_string().contains("garbage-crl.pem"), "{e}");
    assert!(e.to_string().contains("CRL"), "{e}");
}

#[test]
fn bad_certificate_files_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.issue("dst", &["localhost"], true);
    let other = ca.issue("other", &["localhost"], true);
    let missing = dir.path().join("missing.pem");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();

    let e = ServerTls::load(
        &TlsFiles {
            cert: Some(missing.clone()),
            ..files(Some(&server), &ca)
        },
        &peers(),
    )
    .unwrap_err();
    assert!(
        matches!(e, TlsError::Pem(migration::pem::PemError::Read { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("missing.pem"), "{e}");
    assert!(e.to_string().contains("No such file"), "{e}");

    let e = ClientTls::load(
        &TlsFiles {
            ca: garbage.clone(),
            ..files(None, &ca)
        },
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("garbage.pem"), "{e}");
    assert!(e.to_string().contains("no PEM certificate"), "{e}");

    let e = ServerTls::load(
        &TlsFiles {
            key: Some(garbage.clone()),
            ..files(Some(&server), &ca)
        },
        &peers(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("no PEM private key"), "{e}");

    // A key of another certificate.
    let e = ServerTls::load(
        &TlsFiles {
            key: Some(other.1.clone()),
            ..files(Some(&server), &ca)
        },
        &peers(),
    )
    .unwrap_err();
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");

    let e = ClientTls::load(
        &TlsFiles {
            key: None,
            ..files(Some(&server), &ca)
        },
        None,
    )
    .unwrap_err();
    assert!(matches!(e, TlsError::CertWithoutKey), "{e}");
    let e = ServerTls::load(&files(None, &ca), &peers()).unwrap_err();
    assert!(matches!(e, TlsError::ServerNeedsCert), "{e}");
    let e = ClientTls::load(&files(None, &ca), Some("not a name!")).unwrap_err();
    assert!(matches!(e, TlsError::ServerName(_)), "{e}");
}

/// Migration streams are bulk data: both ends prefer AES-128-GCM (cheaper per byte than
/// rustls' default first choice, AES-256-GCM), so that is what a handshake between two
/// Vireo ends negotiates.
#[test]
fn migration_streams_negotiate_aes_128_gcm() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.issue("dst", &["localhost"], true);
    let client = ca.issue("src", &[], false);
    let s = ServerTls::load(&files(Some(&server), &ca), &peers()).unwrap();
    let c = ClientTls::load(&files(Some(&client), &ca), None).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut cc = rustls::ClientConnection::new(c.rustls_config(), name).unwrap();
    let mut sc = rustls::ServerConnection::new(s.rustls_config()).unwrap();
    // The handshake in memory: each side's output is the other's input.
    for _ in 0..10 {
        let mut wire = Vec::new();
        while cc.wants_write() {
            cc.write_tls(&mut wire).unwrap();
        }
        if !wire.is_empty() {
            sc.read_tls(&mut wire.as_slice()).unwrap();
            sc.process_new_packets().unwrap();
        }
        let mut wire = Vec::new();
        while sc.wants_write() {
            sc.write_tls(&mut wire).unwrap();
        }
        if !wire.is_empty() {
            cc.read_tls(&mut wire.as_slice()).unwrap();
            cc.process_new_packets().unwrap();
        }
        if !cc.is_handshaking() && !sc.is_handshaking() {
            break;
        }
    }
    assert!(
        !cc.is_handshaking() && !sc.is_handshaking(),
        "handshake done"
    );
    for suite in [cc.negotiated_cipher_suite(), sc.negotiated_cipher_suite()] {
        assert_eq!(
            suite.map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }
}
