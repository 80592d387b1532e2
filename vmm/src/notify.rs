//! systemd's notification protocol (sd_notify): `READY=1` to `$NOTIFY_SOCKET` once the
//! VM runs, so that `vireo@NAME.service` (Type=notify) is "started" exactly when the
//! guest is; `WATCHDOG=1` from the control loop while the VM is healthy (see
//! [`crate::watchdog`]). Without `NOTIFY_SOCKET` (not started by systemd) nothing is
//! sent.

use std::ffi::OsString;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;

/// An open way to `$NOTIFY_SOCKET`: the socket is made and connected once (before the
/// thread's seccomp filter, which allows sending but is best not asked to create
/// sockets, and before a jail hides the socket's path).
pub struct Notifier {
    sock: UnixDatagram,
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

/// The connection [`connect_early`] made, shared by every later notifier.
static EARLY: OnceLock<Option<Notifier>> = OnceLock::new();

/// Connects to `$NOTIFY_SOCKET` now: a jailed VMM (`--jail`) no longer sees its path
/// once confined, and a connected socket keeps reaching it.
pub fn connect_early() {
    EARLY.get_or_init(Notifier::connect);
}

impl Notifier {
    fn connect() -> Option<Self> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let made = address(&path).and_then(|addr| {
            let sock = UnixDatagram::unbound()?;
            sock.connect_addr(&addr)?;
            Ok(sock)
        });
        match made {
            Ok(sock) => Some(Self { sock }),
            Err(e) => {
                tracing::warn!(error = %e, socket = ?path, "unusable NOTIFY_SOCKET");
                None
            }
        }
    }

    /// From `$NOTIFY_SOCKET` (the connection of [`connect_early`] if it was made);
    /// None without it (or if it is unusable: logged).
    pub fn from_env() -> Option<Self> {
        match EARLY.get() {
            Some(early) => early
                .as_ref()
                .and_then(|n| n.sock.try_clone().ok())
                .map(|sock| Self { sock }),
            None => Self::connect(),
        }
    }

    /// Sends `state` (e.g. "READY=1"); false if it failed (logged).
    pub fn send(&self, state: &str) -> bool {
        match self.sock.send(state.as_bytes()) {
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
