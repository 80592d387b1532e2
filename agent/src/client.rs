//! A small HTTP/1.1 client over unix sockets (vireod talks to each VMM's API with it,
//! vireoctl talks to vireod or straight to a VMM with it) and over mutual TLS (one
//! vireod talks to another's peer listener with it).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

use crate::throttle::{Throttle, Throttled};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {to}: {source}")]
    ConnectTcp {
        to: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {to} failed: {source}")]
    Handshake {
        to: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with {to} failed: {source}")]
    Http {
        to: String,
        #[source]
        source: hyper::Error,
    },
    #[error("bad request {0}")]
    Request(String),
    #[error("no answer from {to} within {timeout:?}")]
    Timeout { to: String, timeout: Duration },
}

/// Where a request goes.
#[derive(Clone)]
pub enum Endpoint {
    /// An API socket on this host.
    Unix(PathBuf),
    /// Another host's vireod: `host:port` over mutual TLS, its certificate checked for
    /// `server_name`.
    Https {
        authority: String,
        server_name: ServerName<'static>,
        tls: Arc<rustls::ClientConfig>,
    },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Https {
                authority,
                server_name,
                ..
            } => write!(f, "https://{authority} ({})", server_name.to_str()),
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// An HTTP/1 connection's sender, over whichever stream.
async fn handshake<S>(
    stream: S,
    to: &Endpoint,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ClientError::Http {
            to: to.to_string(),
            source,
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A peer that stops answering (its link cut, its host gone) is detected within
/// about half a minute instead of the request's whole timeout: data it does not
/// acknowledge for [`PEER_USER_TIMEOUT`] aborts the connection (`TCP_USER_TIMEOUT`),
/// and an idle connection (waiting for an answer) is probed by TCP keepalives. A
/// slow but live peer keeps acknowledging and is not affected.
pub const PEER_USER_TIMEOUT: Duration = Duration::from_secs(30);

fn dead_peer_detection(tcp: &tokio::net::TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(4);
    if let Err(e) = sock
        .set_tcp_keepalive(&keepalive)
        .and_then(|()| sock.set_tcp_user_timeout(Some(PEER_USER_TIMEOUT)))
    {
        tracing::debug!(error = %e, "no dead-peer detection on this connection");
    }
}

/// Connects to `to` (with the TLS handshake for a peer); with `throttle`, the bytes
/// written to a peer's TCP connection draw from it (TLS included).
async fn connect(
    to: &Endpoint,
    throttle: Option<&Arc<Throttle>>,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
    match to {
        Endpoint::Unix(socket) => {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: socket.to_path_buf(),
                    source,
                })?;
            handshake(stream, to).await
        }
        Endpoint::Https {
            authority,
            server_name,
            tls,
        } => {
            let tcp = tokio::net::TcpStream::connect(authority.as_str())
                .await
                .map_err(|source| ClientError::ConnectTcp {
                    to: to.to_string(),
                    source,
                })?;
            dead_peer_detection(&tcp);
            let tcp = Throttled::new(
                tcp,
                throttle.cloned().unwrap_or_else(|| Throttle::new(None)),
            );
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(server_name.clone(), tcp)
                .await
                .map_err(|source| ClientError::Handshake {
                    to: to.to_string(),
                    source,
                })?;
            handshake(stream, to).await
        }
    }
}

/// A whole response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

impl Response {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `{"error": "..."}` message of an error response (or the raw body).
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_string())
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Sends one request and returns the response head with its body still streaming
/// (for server-sent events).
pub async fn send(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<hyper::Response<Incoming>, ClientError> {
    send_to(&Endpoint::Unix(socket.to_path_buf()), method, path, body).await
}

/// [`send`] to any endpoint.
pub async fn send_to(
    to: &Endpoint,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<hyper::Response<Incoming>, ClientError> {
    send_via(to, None, method, path, body).await
}

/// [`send_to`], the request's bytes drawn from `throttle` (a peer only).
async fn send_via(
    to: &Endpoint,
    throttle: Option<&Arc<Throttle>>,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<hyper::Response<Incoming>, ClientError> {
    let mut sender = connect(to, throttle).await?;
    let host = match to {
        Endpoint::Unix(_) => "localhost".to_string(),
        Endpoint::Https { authority, .. } => authority.clone(),
    };
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| ClientError::Request(format!("{method} {path}: {e}")))?;
    sender
        .send_request(req)
        .await
        .map_err(|source| ClientError::Http {
            to: to.to_string(),
            source,
        })
}

/// Sends one request and reads the whole response, all within `timeout`.
pub async fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    request_to(
        &Endpoint::Unix(socket.to_path_buf()),
        method,
        path,
        body,
        timeout,
    )
    .await
}

/// [`request`] to any endpoint.
pub async fn request_to(
    to: &Endpoint,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    request_via(to, None, method, path, body, timeout).await
}

/// [`request_to`] with the bytes sent to a peer drawn from `throttle` (a bandwidth
/// limit, and the count of bytes on the wire).
pub async fn request_via(
    to: &Endpoint,
    throttle: Option<&Arc<Throttle>>,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let work = async {
        let resp = send_via(to, throttle, method, path, body).await?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|source| ClientError::Http {
                to: to.to_string(),
                source,
            })?
            .to_bytes();
        Ok(Response { status, body })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ClientError::Timeout {
            to: to.to_string(),
            timeout,
        })?
}
