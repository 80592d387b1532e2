//! Mutual TLS for migration streams (rustls with the ring provider).
//!
//! Both sides load PEM files once, when the migration is requested (so a missing or
//! bad file is an immediate, named error), and then wrap every stream they open:
//! - the destination (TLS server) presents `cert`/`key` and *requires* a client
//!   certificate that chains to `ca` and names one of the allowed peers (its subject CN
//!   or one of its DNS names): a certificate from the right CA for another host is
//!   refused in the handshake ([`PeerAllowList`]), and so is one the CA's CRL (`crl`)
//!   revokes;
//! - the source (TLS client) verifies the destination's certificate against `ca` for the
//!   server name (the URL's host, or an explicit one; a unix URL needs an explicit one),
//!   and the CRL, and presents its own `cert`/`key` when given.
//!
//! In TLS 1.3 a client finishes its handshake before the server has judged the client's
//! certificate, so a refused client would only notice at its next read. The server
//! therefore confirms every accepted handshake with one byte ([`ACCEPTED`]) that the
//! client waits for: a refusal is reported by `connect`, with the peer's alert.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

/// The byte a TLS server writes once it has accepted the client's certificate.
pub const ACCEPTED: u8 = 0x56;

/// PEM files of one side. `cert` and `key` go together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// This side's certificate chain (leaf first).
    pub cert: Option<PathBuf>,
    /// The private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// The CA certificate(s) the peer's certificate must chain to.
    pub ca: PathBuf,
    /// The CA's revocation list (PEM): a peer certificate it revokes fails the
    /// handshake. Read when the migration is requested.
    pub crl: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pem(#[from] crate::pem::PemError),
    #[error("TLS: give both cert and key, or neither")]
    CertWithoutKey,
    #[error("TLS: the destination needs its own cert and key (sources must present one)")]
    ServerNeedsCert,
    #[error("TLS: the certificate {cert} and the key {key} do not go together: {reason}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS: '{0}' is not a valid server name (a DNS name or an IP address)")]
    ServerName(String),
    #[error("TLS: {0}")]
    Config(String),
    #[error("TLS: allowed_peers is empty (name the sources' certificate CNs or DNS names)")]
    NoAllowedPeers,
}

use crate::pem::{certs, crls, key, roots};

/// ring's suites with AES-128-GCM first. A migration stream is bulk data (the guest's
/// memory, ~GiB); TLS 1.3 makes AES-128-GCM the suite every peer must implement and
/// rustls' default order puts AES-256-GCM first, which costs ~10-35 % more CPU per byte
/// here (ring on this AES-NI/VAES machine, 16 KiB records: 6.7-9.3 GiB/s against
/// 5.0-8.3 GiB/s; docs/benchmarks.md). Both ends are Vireo and the client's order
/// decides, so the stream uses AES-128-GCM; the others stay acceptable.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(p)
}

/// This side's identity, both files loaded, or None.
fn identity(
    files: &TlsFiles,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsError> {
    match (&files.cert, &files.key) {
        (Some(c), Some(k)) => Ok(Some((certs("certificate", c)?, key(k)?))),
        (None, None) => Ok(None),
        _ => Err(TlsError::CertWithoutKey),
    }
}

/// The CRLs of `files`, none without one.
fn crls_of(files: &TlsFiles) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    Ok(files
        .crl
        .as_deref()
        .map(crls)
        .transpose()?
        .unwrap_or_default())
}

/// A verifier that cannot be built: a CRL rustls does not take, or a CA without roots.
fn bad_ca(files: &TlsFiles, e: rustls::server::VerifierBuilderError) -> TlsError {
    use rustls::server::VerifierBuilderError as V;
    TlsError::Pem(match (&e, &files.crl) {
        (V::InvalidCrl(_), Some(crl)) => crate::pem::PemError::Pem {
            what: "CRL",
            path: crl.clone(),
            reason: e.to_string(),
        },
        _ => crate::pem::PemError::BadCa {
            path: files.ca.clone(),
            reason: e.to_string(),
        },
    })
}

fn mismatch(files: &TlsFiles, e: rustls::Error) -> TlsError {
    TlsError::KeyMismatch {
        cert: files.cert.clone().unwrap_or_default(),
        key: files.key.clone().unwrap_or_default(),
        reason: e.to_string(),
    }
}

/// The source's side: verifies the destination, presents its own certificate if any.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Loads the files; `server_name` overrides the host of the URL (and is needed for
    /// a unix URL).
    pub fn load(files: &TlsFiles, server_name: Option<&str>) -> Result<Self, TlsError> {
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots(&files.ca)?), provider())
                .with_crls(crls_of(files)?)
                .build()
                .map_err(|e| bad_ca(files, e))?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_webpki_verifier(verifier);
        let config = match identity(files)? {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| mismatch(files, e))?,
            None => builder.with_no_client_auth(),
        };
        let server_name = server_name.map(parse_server_name).transpose()?;
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The rustls configuration, for a caller that drives the handshake itself
    /// (vireod's migration gateway, on tokio); it must then wait for [`ACCEPTED`].
    pub fn rustls_config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// The name the destination's certificate must carry: the explicit one, else `host`.
    pub fn server_name_for(&self, host: Option<&str>) -> Result<ServerName<'static>, TlsError> {
        match (&self.server_name, host) {
            (Some(n), _) => Ok(n.clone()),
            (None, Some(h)) => parse_server_name(h),
            (None, None) => Err(TlsError::Config(
                "TLS over a unix socket needs an explicit server_name".into(),
            )),
        }
    }

    /// Handshakes over `sock` (already connected, timeouts set) and waits for the
    /// server's confirmation.
    pub fn handshake<S: Read + Write>(
        &self,
        name: ServerName<'static>,
        mut sock: S,
    ) -> std::io::Result<rustls::StreamOwned<ClientConnection, S>> {
        let mut conn = ClientConnection::new(self.config.clone(), name)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let mut ok = [0u8; 1];
        tls.read_exact(&mut ok)?;
        if ok[0] != ACCEPTED {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the peer is not a Vireo TLS migration endpoint",
            ));
        }
        Ok(tls)
    }
}

fn parse_server_name(s: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    ServerName::try_from(bare.to_string()).map_err(|_| TlsError::ServerName(s.to_string()))
}

/// The destination's side: presents its certificate, requires the source's.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the files; only client certificates that name one of `allowed_peers`
    /// (subject CN or DNS SAN) get in.
    pub fn load(files: &TlsFiles, allowed_peers: &[String]) -> Result<Self, TlsError> {
        if allowed_peers.is_empty() {
            return Err(TlsError::NoAllowedPeers);
        }
        let (chain, key) = identity(files)?.ok_or(TlsError::ServerNeedsCert)?;
        // Client certificates are required, must chain to `ca`, must not be on the CRL
        // and must name an allowed peer.
        let verifier = PeerAllowList::new(
            Arc::new(roots(&files.ca)?),
            crls_of(files)?,
            allowed_peers,
            "refused a migration source: its certificate names no allowed peer",
        )
        .map_err(|e| bad_ca(files, e))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| mismatch(files, e))?;
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// The rustls configuration, for a caller that drives the handshake itself
    /// (vireod's migration gateway, on tokio); it must then write [`ACCEPTED`].
    pub fn rustls_config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Handshakes over an accepted `sock` and confirms it to the client.
    pub fn handshake<S: Read + Write>(
        &self,
        mut sock: S,
    ) -> std::io::Result<rustls::StreamOwned<ServerConnection, S>> {
        let mut conn = ServerConnection::new(self.config.clone())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        let mut tls = rustls::StreamOwned::new(conn, sock);
        tls.write_all(&[ACCEPTED])?;
        tls.flush()?;
        Ok(tls)
    }
}

pub use crate::allowlist::PeerAllowList;
pub use crate::pem::certificate_names;

/// A handshake failure in words a user can act on (rustls's own, plus a hint).
pub fn explain(e: &std::io::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return e.to_string();
    };
    let hint = match tls {
        E::AlertReceived(A::CertificateRequired) => {
            " (the peer requires a client certificate: give cert and key)"
        }
        E::AlertReceived(A::AccessDenied) => {
            " (the destination does not allow this side's certificate: see its allowed_peers)"
        }
        E::InvalidCertificate(C::ApplicationVerificationFailure) => {
            " (the peer's certificate names no allowed peer)"
        }
        E::AlertReceived(A::UnknownCA | A::BadCertificate | A::CertificateUnknown) => {
            " (the peer does not trust this side's certificate: check its CA)"
        }
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            " (the peer's certificate does not chain to the CA given here)"
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            " (the peer's certificate is not for this server name: see server_name)"
        }
        E::AlertReceived(A::CertificateRevoked) => {
            " (the peer's CRL revokes this side's certificate)"
        }
        E::InvalidCertificate(C::Revoked) => " (the CA's CRL revokes the peer's certificate)",
        E::NoCertificatesPresented => " (the peer presented no certificate)",
        E::InvalidMessage(_) => " (is the peer speaking TLS?)",
        _ => "",
    };
    format!("{tls}{hint}")
}
