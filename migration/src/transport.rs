//! Where a migration goes: `unix:/path/to.sock` or `tcp:host:port`, optionally with
//! mutual TLS on either (see [`crate::tls`]). Every socket gets timeouts so a peer that
//! vanishes ends the migration instead of hanging it, and TCP gets keepalives; TLS runs
//! on top of the same socket, so both still apply.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::tls::{ClientTls, ServerTls, TlsError};

/// How long a read or write may block before the peer counts as gone.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationUrl {
    Unix(PathBuf),
    Tcp(String),
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}: expected unix:/path or tcp:host:port")]
    BadUrl(String),
    #[error("{url}: {source}")]
    Io {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: {source}")]
    Tls {
        url: String,
        #[source]
        source: TlsError,
    },
    #[error("{url}: TLS handshake failed: {reason}")]
    Handshake { url: String, reason: String },
    #[error("{url}: no connection within {secs} s")]
    AcceptTimeout { url: String, secs: u64 },
}

impl std::fmt::Display for MigrationUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationUrl::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrationUrl::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl std::str::FromStr for MigrationUrl {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.starts_with('/') {
                return Ok(MigrationUrl::Unix(PathBuf::from(p)));
            }
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            if a.rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok())
            {
                return Ok(MigrationUrl::Tcp(a.to_string()));
            }
        }
        Err(TransportError::BadUrl(s.to_string()))
    }
}

/// A connected migration stream: plain unix or TCP, or either wrapped in TLS.
pub trait Stream: Read + Write + Send {
    /// A handle that cuts this connection from another thread: a read or write blocked
    /// on it (here or at the peer) fails at once instead of waiting for the timeout.
    fn cutter(&self) -> std::io::Result<Cutter>;
}

impl Stream for TcpStream {
    fn cutter(&self) -> std::io::Result<Cutter> {
        Cutter::of(self)
    }
}

impl Stream for UnixStream {
    fn cutter(&self) -> std::io::Result<Cutter> {
        Cutter::of(self)
    }
}

impl<C, S: Read + Write + AsFd> Stream for rustls::StreamOwned<C, S>
where
    Self: Read + Write + Send,
{
    fn cutter(&self) -> std::io::Result<Cutter> {
        Cutter::of(&self.sock)
    }
}

/// Shuts a socket down (both directions) from any thread; see [`Stream::cutter`].
pub struct Cutter(OwnedFd);

impl Cutter {
    fn of(s: &impl AsFd) -> std::io::Result<Self> {
        s.as_fd().try_clone_to_owned().map(Self)
    }

    pub fn cut(&self) {
        // SAFETY: shutdown(2) on a descriptor this value owns; no memory is involved.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Bounds how long a read of this socket may block (SO_RCVTIMEO).
    pub fn set_read_timeout(&self, t: std::time::Duration) -> std::io::Result<()> {
        let tv = libc::timeval {
            tv_sec: t.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(t.subsec_micros()),
        };
        // SAFETY: setsockopt on a descriptor this value owns, with a pointer to a
        // live timeval and its exact size.
        let r = unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Ends reading only: a blocked reader sees the end of the stream, while writing
    /// (e.g. an `Error` frame to the peer) still works.
    pub fn stop_reading(&self) {
        // SAFETY: as in `cut`.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RD) };
    }
}

impl MigrationUrl {
    fn io(&self) -> impl FnOnce(std::io::Error) -> TransportError + '_ {
        move |source| TransportError::Io {
            url: self.to_string(),
            source,
        }
    }

    /// The host of a TCP URL (what a TLS destination's certificate must name).
    pub fn host(&self) -> Option<&str> {
        match self {
            MigrationUrl::Unix(_) => None,
            MigrationUrl::Tcp(a) => a.rsplit_once(':').map(|(h, _)| h),
        }
    }

    /// Connects to a destination that is listening (without TLS).
    pub fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        self.connect_with(None)
    }

    /// Connects, then (with `tls`) handshakes: the destination's certificate is checked
    /// against the CA for the URL's host (or the explicit server name), and this side's
    /// certificate is presented. The socket's timeouts and keepalives apply throughout.
    pub fn connect_with(&self, tls: Option<&ClientTls>) -> Result<Box<dyn Stream>, TransportError> {
        let name = match tls {
            Some(t) => {
                Some(
                    t.server_name_for(self.host())
                        .map_err(|source| TransportError::Tls {
                            url: self.to_string(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        let handshake = |e: std::io::Error| TransportError::Handshake {
            url: self.to_string(),
            reason: crate::tls::explain(&e),
        };
        match self {
            MigrationUrl::Unix(p) => {
                let s = UnixStream::connect(p).map_err(self.io())?;
                s.set_read_timeout(Some(IO_TIMEOUT)).map_err(self.io())?;
                s.set_write_timeout(Some(IO_TIMEOUT)).map_err(self.io())?;
                match (tls, name) {
                    (Some(t), Some(n)) => Ok(Box::new(t.handshake(n, s).map_err(handshake)?)),
                    _ => Ok(Box::new(s)),
                }
            }
            MigrationUrl::Tcp(a) => {
                let s = TcpStream::connect(a).map_err(self.io())?;
                tune_tcp(&s).map_err(self.io())?;
                match (tls, name) {
                    (Some(t), Some(n)) => Ok(Box::new(t.handshake(n, s).map_err(handshake)?)),
                    _ => Ok(Box::new(s)),
                }
            }
        }
    }

    /// Starts listening (so a source may connect as soon as this returns).
    pub fn listen(&self) -> Result<Listener, TransportError> {
        self.listen_with(None)
    }

    /// Starts listening; with `tls` every accepted stream must pass a mutual-TLS
    /// handshake before it is handed out.
    pub fn listen_with(&self, tls: Option<ServerTls>) -> Result<Listener, TransportError> {
        let url = self.to_string();
        let socket = match self {
            MigrationUrl::Unix(p) => {
                let stale = p.clone();
                let _ = confine::broker::run(confine::broker::FileOp::RemoveFile, move || {
                    std::fs::remove_file(stale)
                });
                let l = UnixListener::bind(p).map_err(self.io())?;
                Socket::Unix(l, p.clone())
            }
            MigrationUrl::Tcp(a) => Socket::Tcp(TcpListener::bind(a).map_err(self.io())?),
        };
        Ok(Listener { socket, url, tls })
    }
}

enum Socket {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// A bound migration endpoint. It stops listening when dropped (a unix socket file is
/// removed then).
pub struct Listener {
    socket: Socket,
    url: String,
    tls: Option<ServerTls>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Socket::Unix(_, path) = &self.socket {
            // On the VMM's file thread once it has one (the accepting thread drops it).
            let path = path.clone();
            let _ = confine::broker::run(confine::broker::FileOp::RemoveFile, move || {
                std::fs::remove_file(path)
            });
        }
    }
}

impl Listener {
    fn io(&self) -> impl FnOnce(std::io::Error) -> TransportError + '_ {
        move |source| TransportError::Io {
            url: self.url.clone(),
            source,
        }
    }

    /// Accepts one source and stops listening.
    pub fn accept_one(self) -> Result<Box<dyn Stream>, TransportError> {
        self.accept()
    }

    /// Waits (as long as it takes) for the next connection; see [`Listener::accept_within`].
    pub fn accept(&self) -> Result<Box<dyn Stream>, TransportError> {
        self.accept_within(None)
    }

    /// Accepts the next connection within `timeout` (None: no limit), with the
    /// stream's timeouts set and, if configured, the TLS handshake done.
    pub fn accept_within(
        &self,
        timeout: Option<Duration>,
    ) -> Result<Box<dyn Stream>, TransportError> {
        self.accept_pending(timeout)?.establish(self.tls.as_ref())
    }

    /// The TLS every accepted stream must pass, if any.
    pub fn tls(&self) -> Option<&ServerTls> {
        self.tls.as_ref()
    }

    /// Accepts the next connection within `timeout` (None: no limit) with its timeouts
    /// set, but does not handshake yet: [`Pending::establish`] does that, on whatever
    /// thread the caller likes (so a peer that stalls its handshake blocks only its own).
    pub fn accept_pending(&self, timeout: Option<Duration>) -> Result<Pending, TransportError> {
        if let Some(t) = timeout {
            self.wait_readable(t)?;
        }
        let (sock, peer) = match &self.socket {
            Socket::Unix(l, _) => {
                let (s, _) = l.accept().map_err(self.io())?;
                s.set_read_timeout(Some(IO_TIMEOUT)).map_err(self.io())?;
                s.set_write_timeout(Some(IO_TIMEOUT)).map_err(self.io())?;
                (PendingSocket::Unix(s), "unix peer".to_string())
            }
            Socket::Tcp(l) => {
                let (s, addr) = l.accept().map_err(self.io())?;
                tune_tcp(&s).map_err(self.io())?;
                (PendingSocket::Tcp(s), addr.to_string())
            }
        };
        Ok(Pending {
            sock,
            peer,
            url: self.url.clone(),
        })
    }

    fn wait_readable(&self, timeout: Duration) -> Result<(), TransportError> {
        let fd = match &self.socket {
            Socket::Unix(l, _) => l.as_raw_fd(),
            Socket::Tcp(l) => l.as_raw_fd(),
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll(2) on one pollfd that lives on this stack frame.
        let rc = unsafe { libc::poll(&mut p, 1, ms) };
        match rc {
            0 => Err(TransportError::AcceptTimeout {
                url: self.url.clone(),
                secs: timeout.as_secs(),
            }),
            n if n < 0 => Err(self.io()(std::io::Error::last_os_error())),
            _ => Ok(()),
        }
    }
}

enum PendingSocket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// An accepted connection whose TLS handshake (if any) is still to come.
pub struct Pending {
    sock: PendingSocket,
    peer: String,
    url: String,
}

impl Pending {
    /// Who connected (a TCP peer's address).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Handshakes (with `tls`) and hands out the stream.
    pub fn establish(self, tls: Option<&ServerTls>) -> Result<Box<dyn Stream>, TransportError> {
        let url = self.url;
        let handshake = |e: std::io::Error| TransportError::Handshake {
            url: url.clone(),
            reason: crate::tls::explain(&e),
        };
        match (self.sock, tls) {
            (PendingSocket::Unix(s), Some(t)) => Ok(Box::new(t.handshake(s).map_err(handshake)?)),
            (PendingSocket::Unix(s), None) => Ok(Box::new(s)),
            (PendingSocket::Tcp(s), Some(t)) => Ok(Box::new(t.handshake(s).map_err(handshake)?)),
            (PendingSocket::Tcp(s), None) => Ok(Box::new(s)),
        }
    }
}

fn tune_tcp(s: &TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a valid socket with a pointer to a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_what_is_expected() {
        assert_eq!(
            "unix:/run/m.sock".parse::<MigrationUrl>().unwrap(),
            MigrationUrl::Unix("/run/m.sock".into())
        );
        assert_eq!(
            "tcp:10.0.0.2:6000".parse::<MigrationUrl>().unwrap(),
            MigrationUrl::Tcp("10.0.0.2:6000".into())
        );
        for bad in ["unix:relative", "tcp:nohost", "tcp::1", "http://x", ""] {
            let e = bad.parse::<MigrationUrl>().unwrap_err();
            assert!(
                e.to_string()
                    .contains("expected unix:/path or tcp:host:port"),
                "{bad}"
            );
        }
    }
}
