//! Who a TLS server lets in: a client certificate that WebPKI accepts (chains to the
//! CA, valid now, EKU clientAuth, not on the CRL) *and* that names a host on an
//! allow-list (a DNS SAN or the subject CN, compared without case).
//!
//! One type for both of Vireo's mutual-TLS servers: vireod's peer listener (`--peer`)
//! and a receiving VMM's migration listener (`allowed_peers`). A certificate of the
//! right CA for a host that is not listed fails the handshake and is logged with its
//! names.

use std::collections::BTreeSet;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::pem::certificate_names;

/// The first of `cert`'s names (DNS SANs, then CN; lower case) on `allowed`, if any.
/// An unparsable certificate names nobody.
pub fn admitted_name(cert: &CertificateDer<'_>, allowed: &BTreeSet<String>) -> Option<String> {
    certificate_names(cert.as_ref())
        .unwrap_or_default()
        .into_iter()
        .find(|n| allowed.contains(n))
}

/// A client certificate verifier: WebPKI's verdict first, then the allow-list.
#[derive(Debug)]
pub struct PeerAllowList {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: BTreeSet<String>,
    /// What the refusal's log line says (whose list the certificate is not on).
    refusal: &'static str,
}

impl PeerAllowList {
    /// A verifier requiring client certificates that chain to `roots`, are not
    /// revoked by `crls`, and name one of `allowed`. `refusal` is the log line of a
    /// certificate of the CA that names no allowed host.
    pub fn new(
        roots: Arc<RootCertStore>,
        crls: impl IntoIterator<Item = CertificateRevocationListDer<'static>>,
        allowed: impl IntoIterator<Item = impl AsRef<str>>,
        refusal: &'static str,
    ) -> Result<Arc<Self>, VerifierBuilderError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .with_crls(crls)
            .build()?;
        Ok(Arc::new(Self {
            inner,
            allowed: allowed
                .into_iter()
                .map(|a| a.as_ref().to_ascii_lowercase())
                .collect(),
            refusal,
        }))
    }

    /// The allowed host names (lower case).
    pub fn allowed(&self) -> &BTreeSet<String> {
        &self.allowed
    }
}

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
        if names.iter().any(|n| self.allowed.contains(n)) {
            return Ok(verified);
        }
        tracing::warn!(peer = ?names, allowed = ?self.allowed, "{}", self.refusal);
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))
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
