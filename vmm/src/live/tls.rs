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
    ServerTls::load(&TlsFiles {
        cert: Some(t.cert.clone()),
        key: Some(t.key.clone()),
        ca: t.ca.clone(),
    })
    .map_err(|e| e.to_string())
}
