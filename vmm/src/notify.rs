//! systemd's notification protocol (sd_notify): `READY=1` to `$NOTIFY_SOCKET` once the
//! VM runs, so that `vireo@NAME.service` (Type=notify) is "started" exactly when the
//! guest is; `WATCHDOG=1` from the control loop while the VM is healthy (see
//! [`crate::watchdog`]). Without `NOTIFY_SOCKET` (not started by systemd) nothing is
//! sent.

use std::ffi::OsString;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// An open way to `$NOTIFY_SOCKET`: the socket is made once (before the thread's
/// seccomp filter, which allows sending but is best not asked to create sockets).
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

fn address(path: &OsString) -> std::io::Result<SocketAddr> {
    match path.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        None => SocketAddr::from_pathname(path),
    }
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; None without it (or if it is unusable: logged).
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let made = address(&path).and_then(|addr| Ok((UnixDatagram::unbound()?, addr)));
        match made {
            Ok((sock, addr)) => Some(Self { sock, addr }),
            Err(e) => {
                tracing::warn!(error = %e, socket = ?path, "unusable NOTIFY_SOCKET");
                None
            }
        }
    }

    /// Sends `state` (e.g. "READY=1"); false if it failed (logged).
    pub fn send(&self, state: &str) -> bool {
        match self.sock.send_to_addr(state.as_bytes(), &self.addr) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, state, "cannot notify systemd");
                false
            }
        }
    }
}

/// Sends `state` once (e.g. "READY=1"); false if there is no notify socket or it
/// failed.
pub fn notify(state: &str) -> bool {
    Notifier::from_env().is_some_and(|n| n.send(state))
}
