//! A cluster's small PKI (`vireoctl pki`): one host CA, and one certificate per host
//! signed by it. No openssl needed.
//!
//! - [`init_ca`] writes `ca.key` (0600) and `ca.crt` (0644) into a new 0700 directory;
//! - [`issue`] writes `host.key` (0600), `host.crt` (0644, the host name as CN and as a
//!   DNS SAN, more SANs on request, EKU serverAuth + clientAuth: a vireod is both the
//!   server and the client of its peers) and a copy of `ca.crt` into a 0700 directory:
//!   exactly what `vireod --tls-cert/--tls-key/--tls-ca` take.
//!
//! Nothing is overwritten: an existing key is an error, so a CA or a host identity is
//! never replaced by accident.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

pub const CA_KEY: &str = "ca.key";
pub const CA_CERT: &str = "ca.crt";
pub const HOST_KEY: &str = "host.key";
pub const HOST_CERT: &str = "host.crt";

/// Years a CA certificate is valid.
const CA_YEARS: i32 = 20;
/// Years a host certificate is valid.
const HOST_YEARS: i32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists: not overwritten (remove it first to replace it)")]
    Exists { path: PathBuf },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path} is not a CA certificate: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("invalid host name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("cannot make the certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What [`init_ca`] and [`issue`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes the host CA in `dir` (created 0700 if missing).
pub fn init_ca(dir: &Path, common_name: &str) -> Result<Written, PkiError> {
    private_dir(dir)?;
    let (key_path, cert_path) = (dir.join(CA_KEY), dir.join(CA_CERT));
    refuse_existing(&[&key_path, &cert_path])?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Vireo");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, CA_YEARS);
    let cert = params.self_signed(&key)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Written {
        cert: cert_path,
        key: key_path,
    })
}

/// Issues the certificate of host `name` (extra `sans`: DNS names or IP addresses)
/// signed by the CA in `ca_dir`; writes `host.key`, `host.crt` and `ca.crt` to `out`.
pub fn issue(ca_dir: &Path, name: &str, sans: &[String], out: &Path) -> Result<Written, PkiError> {
    validate_host_name(name)?;
    let Ca {
        key: ca_key,
        issuer,
        cert_path: ca_cert_path,
        cert_pem: ca_cert_pem,
    } = load_ca(ca_dir)?;

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = subject_alt_names(name, sans)?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, HOST_YEARS);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer, &ca_key)?;

    private_dir(out)?;
    let (key_path, cert_path, ca_copy) =
        (out.join(HOST_KEY), out.join(HOST_CERT), out.join(CA_CERT));
    refuse_existing(&[&key_path, &cert_path])?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    if ca_copy != ca_cert_path {
        write_replace(&ca_copy, ca_cert_pem.as_bytes(), 0o644)?;
    }
    Ok(Written {
        cert: cert_path,
        key: key_path,
    })
}

/// The CA of `ca_dir`: its key, and its certificate as rcgen's issuer.
struct Ca {
    key: KeyPair,
    issuer: rcgen::Certificate,
    cert_path: PathBuf,
    cert_pem: String,
}

fn load_ca(ca_dir: &Path) -> Result<Ca, PkiError> {
    let (ca_key_path, ca_cert_path) = (ca_dir.join(CA_KEY), ca_dir.join(CA_CERT));
    let ca_key_pem =
        std::fs::read_to_string(&ca_key_path).map_err(io("cannot read", &ca_key_path))?;
    let ca_cert_pem =
        std::fs::read_to_string(&ca_cert_path).map_err(io("cannot read", &ca_cert_path))?;
    let key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::BadKey {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    let ca_params =
        CertificateParams::from_ca_cert_pem(&ca_cert_pem).map_err(|e| PkiError::BadCa {
            path: ca_cert_path.clone(),
            reason: e.to_string(),
        })?;
    if !matches!(ca_params.is_ca, IsCa::Ca(_)) {
        return Err(PkiError::BadCa {
            path: ca_cert_path,
            reason: "its basic constraints do not make it a CA".into(),
        });
    }
    // The issuer as rcgen needs it: the CA's name and key (the signature of this
    // re-made CA certificate is never used).
    let issuer = ca_params.self_signed(&key)?;
    Ok(Ca {
        key,
        issuer,
        cert_path: ca_cert_path,
        cert_pem: ca_cert_pem,
    })
}

/// The CA's revocation list (PEM), which `vireod --tls-crl` takes.
pub const CA_CRL: &str = "ca.crl";
/// The serial numbers the CA has revoked (hex, one a line): the CRL is made from it.
pub const REVOKED: &str = "revoked";

/// Revokes the certificate `cert` (PEM, issued by the CA of `ca_dir`): adds its serial
/// to `ca_dir/revoked` and writes `ca_dir/ca.crl` anew (signed by the CA, valid for a
/// year) with every revoked serial. Returns the CRL's path.
pub fn revoke(ca_dir: &Path, cert: &Path) -> Result<PathBuf, PkiError> {
    let ca = load_ca(ca_dir)?;
    let bad = |reason: String| PkiError::BadKey {
        path: cert.to_path_buf(),
        reason,
    };
    let der = migration::pem::certs("certificate", cert)
        .map_err(|e| bad(e.to_string()))?
        .remove(0);
    let serial = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| bad(e.to_string()))?
        .1
        .raw_serial()
        .to_vec();
    let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
    let list_path = ca_dir.join(REVOKED);
    let mut serials: Vec<String> = match std::fs::read_to_string(&list_path) {
        Ok(t) => t
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io("cannot read", &list_path)(e)),
    };
    if !serials.contains(&hex) {
        serials.push(hex);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((now / 86_400) as i64 - 1);
    let revoked = serials
        .iter()
        .map(|h| {
            let bytes = (0..h.len())
                .step_by(2)
                .filter_map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
                .collect::<Vec<u8>>();
            rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: rcgen::date_time_ymd(y, m, d),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            }
        })
        .collect();
    let params = rcgen::CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(y, m, d),
        next_update: rcgen::date_time_ymd(y + 1, m, d.min(28)),
        crl_number: SerialNumber::from_slice(&(serials.len() as u64).to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca.issuer, &ca.key)?;
    write_replace(
        &list_path,
        format!("{}\n", serials.join("\n")).as_bytes(),
        0o600,
    )?;
    let crl_path = ca_dir.join(CA_CRL);
    write_replace(&crl_path, crl.pem()?.as_bytes(), 0o644)?;
    Ok(crl_path)
}

/// A host name as a certificate carries it: a DNS name (letters, digits, `-`, `.`).
pub fn validate_host_name(name: &str) -> Result<(), PkiError> {
    let bad = |reason| {
        Err(PkiError::BadName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 253 {
        return bad("1 to 253 characters");
    }
    if name.parse::<IpAddr>().is_ok() {
        return bad("a host name, not an address (give addresses with --san)");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if !name.split('.').all(label_ok) {
        return bad("labels of letters, digits and '-' separated by '.'");
    }
    Ok(())
}

fn subject_alt_names(name: &str, sans: &[String]) -> Result<Vec<SanType>, PkiError> {
    let mut out = vec![SanType::DnsName(name.try_into()?)];
    for s in sans {
        let san = match s.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                validate_host_name(s)?;
                SanType::DnsName(s.as_str().try_into()?)
            }
        };
        if !out.contains(&san) {
            out.push(san);
        }
    }
    Ok(out)
}

/// From the start of the previous day (clocks of a cluster differ a little) for
/// `years` years; a random positive serial number.
fn validity(params: &mut CertificateParams, years: i32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (now / 86_400) as i64;
    let (y, m, d) = civil_from_days(days - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    params.not_after = rcgen::date_time_ymd(y + years, m, d.min(28));
    let mut serial = *uuid::Uuid::new_v4().as_bytes();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
}

/// The proleptic Gregorian date of a day number since 1970-01-01 (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as i32;
    (y, m, d)
}

/// Creates `dir` 0700 (and its parents) if missing; an existing one is made 0700.
fn private_dir(dir: &Path) -> Result<(), PkiError> {
    if dir.exists() && !dir.is_dir() {
        return Err(PkiError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("cannot create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("cannot set permissions of", dir))
}

fn refuse_existing(paths: &[&Path]) -> Result<(), PkiError> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(PkiError::Exists {
            path: p.to_path_buf(),
        }),
        None => Ok(()),
    }
}

/// Writes a new file with `mode` from the start (a key is never readable by others,
/// not even for a moment).
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io("cannot create", path))?;
    f.write_all(data).map_err(io("cannot write", path))?;
    f.sync_all().map_err(io("cannot write", path))?;
    // The umask may have taken bits away from a public file.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("cannot set permissions of", path))
}

fn write_replace(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    if path.exists() {
        std::fs::remove_file(path).map_err(io("cannot replace", path))?;
    }
    write_new(path, data, mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn host_names() {
        for good in ["host-a", "a.example.org", "h1"] {
            validate_host_name(good).unwrap();
        }
        for bad in ["", "-a", "a..b", "a_b", "10.0.0.1", "a b", "ä"] {
            assert!(validate_host_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nothing_is_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca");
        init_ca(&ca, "test CA").unwrap();
        let e = init_ca(&ca, "test CA").unwrap_err();
        assert!(matches!(e, PkiError::Exists { .. }), "{e}");
        let out = d.path().join("h");
        issue(&ca, "h", &[], &out).unwrap();
        let e = issue(&ca, "h", &[], &out).unwrap_err();
        assert!(matches!(e, PkiError::Exists { .. }), "{e}");
    }
}
