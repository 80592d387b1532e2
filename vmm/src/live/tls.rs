//! The API's TLS settings of a migration, loaded (files read, certificates checked) when
//! the migration is requested, so a bad file is the request's error, not the thread's.

use migration::tls::{ClientTls, ServerTls, TlsFiles};
use migration::transport::MigrationUrl;

/// The source's side; also checks that a server name can be had for `url`.
pub fn client(t: &api::SendMigrationTls, url: &MigrationUrl) -> Result<ClientTls, String> {
    let tls = ClientTls::load(
        &TlsFiles {
            cert: t.cert.clone(),
            key: t.key.clone(),
            ca: t.ca.clone(),
            crl: t.crl.clone(),
        },
        t.server_name.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    tls.server_name_for(url.host())
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(tls)
}

/// The destination's side.
pub fn server(t: &api::ReceiveMigrationTls) -> Result<ServerTls, String> {
    ServerTls::load(
        &TlsFiles {
            cert: Some(t.cert.clone()),
            key: Some(t.key.clone()),
            ca: t.ca.clone(),
            crl: t.crl.clone(),
        },
        &t.allowed_peers,
    )
    .map_err(|e| e.to_string())
}

/// What a migration over `url` must have: over TCP mutual TLS (or `insecure`, said
/// out loud) and a secret; over a unix socket neither (the socket's permissions are the
/// gate), though a secret given is used. Returns the parsed secret.
pub fn policy(
    url: &MigrationUrl,
    has_tls: bool,
    insecure: bool,
    secret: Option<&str>,
) -> Result<Option<migration::auth::Secret>, String> {
    let secret = secret
        .map(str::parse::<migration::auth::Secret>)
        .transpose()
        .map_err(|e| e.to_string())?;
    if let MigrationUrl::Tcp(_) = url {
        if !has_tls && !insecure {
            return Err(format!(
                "{url}: a TCP migration without mutual TLS is refused; give tls, or \
                 insecure: true to send the guest's memory in clear"
            ));
        }
        if secret.is_none() {
            return Err(format!(
                "{url}: a TCP migration needs secret (64 hex digits, the same on both sides)"
            ));
        }
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_needs_tls_or_insecure_and_a_secret_while_unix_needs_neither() {
        let tcp: MigrationUrl = "tcp:127.0.0.1:1".parse().unwrap();
        let unix: MigrationUrl = "unix:/run/m.sock".parse().unwrap();
        let hex = "ab".repeat(32);
        let e = policy(&tcp, false, false, Some(&hex)).unwrap_err();
        assert!(e.contains("without mutual TLS is refused"), "{e}");
        let e = policy(&tcp, true, false, None).unwrap_err();
        assert!(e.contains("needs secret"), "{e}");
        assert!(policy(&tcp, true, false, Some(&hex)).unwrap().is_some());
        assert!(policy(&tcp, false, true, Some(&hex)).unwrap().is_some());
        assert!(policy(&unix, false, false, None).unwrap().is_none());
        let e = policy(&unix, false, false, Some("12")).unwrap_err();
        assert!(e.contains("64 hex digits"), "{e}");
    }
}
