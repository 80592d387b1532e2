//! vireod's host identity and who it admits as a peer (mutual TLS, rustls with ring).
//!
//! A host identity is three PEM files (`--tls-cert`, `--tls-key`, `--tls-ca`, as
//! `vireoctl pki issue` writes them). As a server (the peer listener) vireod presents
//! its certificate and requires a client certificate that chains to the CA *and*
//! names a host on the `--peer` allow-list (its CN or a DNS SAN): anything else fails
//! the handshake. As a client (the source of a migration) it verifies the destination's
//! certificate against the CA for the expected host name and presents its own.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use migration::allowlist::PeerAllowList;
use migration::pem;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pem(#[from] migration::pem::PemError),
    #[error("TLS: the certificate {cert} and the key {key} do not go together: {reason}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS: CA file {path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("TLS certificate {path} names no host (no CN, no DNS SAN)")]
    Nameless { path: PathBuf },
    #[error("TLS: {0}")]
    Config(String),
}

/// The three files of a host identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// This host's identity, loaded and checked at start and again on each
/// [`HostIdentity::reload`] (vireod: SIGHUP). Clones share the loaded files.
#[derive(Clone)]
pub struct HostIdentity {
    pub files: IdentityFiles,
    /// A PEM CRL of the CA (`--tls-crl`): peers whose certificates it revokes are
    /// refused in the handshake.
    pub crl: Option<PathBuf>,
    /// The host name the certificate carries (its CN, else its first DNS SAN); a
    /// replacement certificate must carry the same.
    pub name: String,
    loaded: Arc<RwLock<Arc<Loaded>>>,
}

/// The files' contents.
struct Loaded {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

impl std::fmt::Debug for HostIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostIdentity")
            .field("name", &self.name)
            .field("files", &self.files)
            .field("crl", &self.crl)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl HostIdentity {
    /// Loads and checks the files: the key goes with the certificate, the certificate
    /// names a host, the CA parses.
    pub fn load(files: IdentityFiles) -> Result<Self, TlsError> {
        Self::load_with_crl(files, None)
    }

    /// [`HostIdentity::load`], and the CA's revocation list `crl` (PEM).
    pub fn load_with_crl(files: IdentityFiles, crl: Option<PathBuf>) -> Result<Self, TlsError> {
        let (loaded, name) = Self::read(&files, crl.as_deref())?;
        Ok(Self {
            files,
            crl,
            name,
            loaded: Arc::new(RwLock::new(Arc::new(loaded))),
        })
    }

    /// Reads the files again (a rotated certificate and key, a new CA bundle or CRL);
    /// on any error the identity in use stays. The new certificate must name this host.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (loaded, name) = Self::read(&self.files, self.crl.as_deref())?;
        if name != self.name {
            return Err(TlsError::Config(format!(
                "the new certificate {} names {name}, not {}: not taken",
                self.files.cert.display(),
                self.name
            )));
        }
        *vireo_util::sync::write(&self.loaded) = Arc::new(loaded);
        Ok(())
    }

    fn read(files: &IdentityFiles, crl: Option<&Path>) -> Result<(Loaded, String), TlsError> {
        let chain = pem::certs("certificate", &files.cert)?;
        let key = pem::key(&files.key)?;
        let roots = pem::roots(&files.ca)?;
        let crls = crl.map(pem::crls).transpose()?.unwrap_or_default();
        let name = cert_names(&chain[0])
            .first()
            .cloned()
            .ok_or_else(|| TlsError::Nameless {
                path: files.cert.clone(),
            })?;
        let loaded = Loaded {
            chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
            crls,
        };
        // Builds both configs once so that a key of another certificate or a bad CRL
        // is named now.
        server_config_of(&loaded, files, BTreeSet::new())?;
        client_config_of(&loaded, files)?;
        Ok((loaded, name))
    }

    fn current(&self) -> Arc<Loaded> {
        vireo_util::sync::read(&self.loaded).clone()
    }

    /// When this host's certificate expires (ms since the epoch); None if it does not
    /// parse.
    pub fn not_after_ms(&self) -> Option<u64> {
        let l = self.current();
        let (_, cert) = x509_parser::parse_x509_certificate(l.chain.first()?.as_ref()).ok()?;
        u64::try_from(cert.validity().not_after.timestamp())
            .ok()
            .map(|s| s * 1000)
    }

    /// The peer listener's config: this host's certificate; a client certificate from
    /// the CA, not revoked, naming one of `peers` is required.
    pub fn server_config(&self, peers: BTreeSet<String>) -> Result<Arc<ServerConfig>, TlsError> {
        server_config_of(&self.current(), &self.files, peers)
    }

    /// The config to call a peer with: verifies its certificate against the CA (for
    /// the name the caller expects) and the CRL, and presents this host's.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        client_config_of(&self.current(), &self.files)
    }

    /// Whether a peer's certificate `chain` (leaf first), admitted earlier, is still
    /// trusted by the CA and CRL loaded now (after a reload): chains to the CA, valid
    /// now, not revoked. Err says why not.
    pub fn still_trusts(&self, chain: &[CertificateDer<'static>]) -> Result<(), String> {
        let l = self.current();
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| "no certificate".to_string())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            l.roots.clone(),
            provider(),
        )
        .with_crls(l.crls.iter().cloned())
        .build()
        .map_err(|e| e.to_string())?;
        verifier
            .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

fn mismatch(files: &IdentityFiles, e: rustls::Error) -> TlsError {
    TlsError::KeyMismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    }
}

fn server_config_of(
    l: &Loaded,
    files: &IdentityFiles,
    peers: BTreeSet<String>,
) -> Result<Arc<ServerConfig>, TlsError> {
    // The shared allow-list verifier: WebPKI (CA, validity, clientAuth, CRL), then
    // the certificate's names against `--peer`.
    let verifier = PeerAllowList::new(
        l.roots.clone(),
        l.crls.iter().cloned(),
        &peers,
        "peer refused: its certificate names no host on the --peer list",
    )
    .map_err(|e| TlsError::BadCa {
        path: files.ca.clone(),
        reason: e.to_string(),
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(l.chain.clone(), l.key.clone_key())
        .map_err(|e| mismatch(files, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn client_config_of(l: &Loaded, files: &IdentityFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(l.roots.clone(), provider())
        .with_crls(l.crls.iter().cloned())
        .build()
        .map_err(|e| TlsError::BadCa {
            path: files.ca.clone(),
            reason: e.to_string(),
        })?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(l.chain.clone(), l.key.clone_key())
        .map_err(|e| mismatch(files, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The host names a certificate carries: its DNS SANs, then its CN (lower case).
/// An unparsable certificate names nobody.
pub fn cert_names(cert: &CertificateDer<'_>) -> Vec<String> {
    pem::certificate_names(cert.as_ref()).unwrap_or_default()
}

/// How the audit trail names a peer: the name it was admitted as, then its
/// certificate's subject CN and DNS SANs (`host-a (CN host-a; DNS host-a, a.example)`).
pub fn identity_line(cert: &CertificateDer<'_>, admitted: &str) -> String {
    match pem::certificate_subject(cert.as_ref()) {
        Ok((cns, dns)) => format!("{admitted} (CN {}; DNS {})", cns.join(", "), dns.join(", ")),
        Err(_) => admitted.to_string(),
    }
}

/// The first name of `cert` on the allow-list, if any.
pub use migration::allowlist::admitted_name;
