//! Certificates for the TLS migration tests and the bench, made with rcgen: a CA, and
//! leaves it signs, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: PathBuf,
    name: String,
}

/// A certificate and its key, as files.
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Self {
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
            name: name.to_string(),
        }
    }

    pub fn file(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, leaf: &str, names: &[&str]) -> Leaf {
        self.issue(leaf, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate.
    pub fn client(&self, leaf: &str) -> Leaf {
        self.issue(leaf, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, leaf: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, leaf);
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let out = Leaf {
            cert: self.dir.join(format!("{}-{leaf}.crt", self.name)),
            key: self.dir.join(format!("{}-{leaf}.key", self.name)),
        };
        std::fs::write(&out.cert, cert.pem()).unwrap();
        std::fs::write(&out.key, key.serialize_pem()).unwrap();
        out
    }
}

/// `,"tls":{...}` for vm.receive-migration, letting in the client certificate the
/// tests call "src" (`ca.client("src")`).
pub fn receive_tls(server: &Leaf, ca: &Ca) -> String {
    receive_tls_allowing(server, ca, &["src"])
}

/// `,"tls":{...}` for vm.receive-migration with these `allowed_peers`.
pub fn receive_tls_allowing(server: &Leaf, ca: &Ca, peers: &[&str]) -> String {
    format!(
        r#","tls":{{"cert":"{}","key":"{}","ca":"{}","allowed_peers":{}}}"#,
        server.cert.display(),
        server.key.display(),
        ca.file().display(),
        serde_json::to_string(peers).unwrap()
    )
}

/// `,"tls":{...}` for vm.send-migration (without a client certificate if `client` is None).
pub fn send_tls(client: Option<&Leaf>, ca: &Ca) -> String {
    match client {
        Some(c) => format!(
            r#","tls":{{"ca":"{}","cert":"{}","key":"{}"}}"#,
            ca.file().display(),
            c.cert.display(),
            c.key.display()
        ),
        None => format!(r#","tls":{{"ca":"{}"}}"#, ca.file().display()),
    }
}
