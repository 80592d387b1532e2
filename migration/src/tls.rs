//! Mutual TLS for migration streams (rustls with the ring provider).
//!
//! Both sides load PEM files once, when the migration is requested (so a missing or
//! bad file is an immediate, named error), and then wrap every stream they open:
//! - the destination (TLS server) presents `cert`/`key` and *requires* a client
//!   certificate that chains to `ca` and names one of the allowed peers (its subject CN
//!   or one of its DNS names): a certificate from the right CA for another host is
//!   refused in the handshake ([`PeerAllowList`]);
//! - the source (TLS client) verifies the destination's certificate against `ca` for the
//!   server name (the URL's host, or an explicit one; a unix URL needs an explicit one),
//!   and presents its own `cert`/`key` when given.
//!
//! In TLS 1.3 a client finishes its handshake before the server has judged the client's
//! certificate, so a refused client would only notice at its next read. The server
//! therefore confirms every accepted handshake with one byte ([`ACCEPTED`]) that the
//! client waits for: a refusal is reported by `connect`, with the peer's alert.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::UnixTime;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

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

use crate::pem::{certs, key, roots};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
        let roots = roots(&files.ca)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
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
        let provider = provider();
        // Client certificates are required (the builder's default) and must chain to `ca`.
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(&files.ca)?),
            provider.clone(),
        )
        .build()
        .map_err(|e| crate::pem::PemError::BadCa {
            path: files.ca.clone(),
            reason: e.to_string(),
        })?;
        let verifier = Arc::new(PeerAllowList {
            inner: verifier,
            // Host names compare without case (as certificate_names gives them).
            allowed: allowed_peers
                .iter()
                .map(|a| a.to_ascii_lowercase())
                .collect(),
        });
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| mismatch(files, e))?;
        Ok(Self {
            config: Arc::new(config),
        })
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

/// A client certificate verifier: the CA's verdict first (WebPKI), then the
/// certificate's names (subject CN, DNS SANs) against the allow-list.
#[derive(Debug)]
pub struct PeerAllowList {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

pub use crate::pem::certificate_names;

impl ClientCertVerifier for PeerAllowList {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let names = certificate_names(end_entity).map_err(|e| {
            tracing::warn!(error = %e, "cannot read the names of a client certificate");
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        if names.iter().any(|n| self.allowed.iter().any(|a| a == n)) {
            Ok(verified)
        } else {
            tracing::warn!(
                peer = ?names,
                allowed = ?self.allowed,
                "refused a migration source: its certificate names no allowed peer"
            );
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

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
        E::NoCertificatesPresented => " (the peer presented no certificate)",
        E::InvalidMessage(_) => " (is the peer speaking TLS?)",
        _ => "",
    };
    format!("{tls}{hint}")
}
