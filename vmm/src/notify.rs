//! systemd's readiness protocol: `READY=1` to `$NOTIFY_SOCKET` once the VM runs, so
//! that `vireo@NAME.service` (Type=notify) is "started" exactly when the guest is.
//! Without `NOTIFY_SOCKET` (not started by systemd) nothing is sent.
//! Sent from the main thread before its seccomp filter is installed.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. "READY=1"); false if there is no notify socket or it failed.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let sent = match path.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
        }
        None => sock.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = &sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
    sent.is_ok()
}
