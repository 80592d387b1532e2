//! Where a migration goes: `unix:/path/to.sock` or `tcp:host:port`. Every socket gets
//! timeouts so a peer that vanishes ends the migration instead of hanging it, and TCP
//! gets keepalives.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

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

/// A connected migration stream.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

impl MigrationUrl {
    fn io(&self) -> impl FnOnce(std::io::Error) -> TransportError + '_ {
        move |source| TransportError::Io {
            url: self.to_string(),
            source,
        }
    }

    /// Connects to a destination that is listening.
    pub fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        match self {
            MigrationUrl::Unix(p) => {
                let s = UnixStream::connect(p).map_err(self.io())?;
                s.set_read_timeout(Some(IO_TIMEOUT)).map_err(self.io())?;
                s.set_write_timeout(Some(IO_TIMEOUT)).map_err(self.io())?;
                Ok(Box::new(s))
            }
            MigrationUrl::Tcp(a) => {
                let s = TcpStream::connect(a).map_err(self.io())?;
                tune_tcp(&s).map_err(self.io())?;
                Ok(Box::new(s))
            }
        }
    }

    /// Starts listening (so a source may connect as soon as this returns).
    pub fn listen(&self) -> Result<Listener, TransportError> {
        let url = self.to_string();
        match self {
            MigrationUrl::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p).map_err(self.io())?;
                Ok(Listener::Unix(l, p.clone(), url))
            }
            MigrationUrl::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(self.io())?;
                Ok(Listener::Tcp(l, url))
            }
        }
    }
}

/// A bound migration endpoint, waiting for its one source.
pub enum Listener {
    Unix(UnixListener, PathBuf, String),
    Tcp(TcpListener, String),
}

impl Listener {
    /// Accepts one source and stops listening (a unix socket file is removed).
    pub fn accept_one(self) -> Result<Box<dyn Stream>, TransportError> {
        let io = |url: &str| {
            let url = url.to_string();
            move |source| TransportError::Io { url, source }
        };
        match self {
            Listener::Unix(l, path, url) => {
                let accepted = l.accept();
                let _ = std::fs::remove_file(&path);
                let (s, _) = accepted.map_err(io(&url))?;
                s.set_read_timeout(Some(IO_TIMEOUT)).map_err(io(&url))?;
                s.set_write_timeout(Some(IO_TIMEOUT)).map_err(io(&url))?;
                Ok(Box::new(s))
            }
            Listener::Tcp(l, url) => {
                let (s, _) = l.accept().map_err(io(&url))?;
                tune_tcp(&s).map_err(io(&url))?;
                Ok(Box::new(s))
            }
        }
    }
}

fn tune_tcp(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
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
