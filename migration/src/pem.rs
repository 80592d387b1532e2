//! PEM files of a TLS identity: certificates, a private key, CA roots, revocation
//! lists, and the host names a certificate carries. One place for the migration
//! streams' TLS ([`crate::tls`]) and vireod's host identity.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::RootCertStore;

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read TLS {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS {what} {path}: {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS: CA file {path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
}

/// The bytes of `path` (`what` names it in the error), read on the VMM's file thread
/// once it has one ([`confine::broker`]).
pub fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, PemError> {
    let owned = path.to_path_buf();
    confine::broker::run(confine::broker::FileOp::ReadTlsFiles, move || {
        std::fs::read(&owned)
    })
    .map_err(|source| PemError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate of the PEM file `path` (at least one).
pub fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let pem = read(what, path)?;
    let bad = |reason: String| PemError::Pem {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// The private key of the PEM file `path` (PKCS#8, PKCS#1 or SEC1).
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let pem = read("key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| PemError::Pem {
        what: "key",
        path: path.to_path_buf(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key in it".into(),
            e => e.to_string(),
        },
    })
}

/// The CA certificates of `path` as trust roots.
pub fn roots(path: &Path) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for c in certs("CA", path)? {
        roots.add(c).map_err(|e| PemError::BadCa {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Every certificate revocation list of the PEM file `path` (at least one).
pub fn crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, PemError> {
    let pem = read("CRL", path)?;
    let bad = |reason: String| PemError::Pem {
        what: "CRL",
        path: path.to_path_buf(),
        reason,
    };
    let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if crls.is_empty() {
        return Err(bad("no PEM X509 CRL in it".into()));
    }
    Ok(crls)
}

/// A certificate's subject CNs and DNS SANs, as written in it.
pub fn certificate_subject(der: &[u8]) -> Result<(Vec<String>, Vec<String>), String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let cns = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                dns.push((*d).to_string());
            }
        }
    }
    Ok((cns, dns))
}

/// The host names a certificate carries, lower case: its DNS SANs, then its subject
/// CNs (each once). An unparsable certificate is an error.
pub fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    let (cns, dns) = certificate_subject(der)?;
    let mut names: Vec<String> = Vec::new();
    for n in dns.iter().chain(&cns) {
        let n = n.to_ascii_lowercase();
        if !names.contains(&n) {
            names.push(n);
        }
    }
    Ok(names)
}
