//! HTTP/1.1 keep-alive towards one peer. A replication's requests (every interval a
//! status read, segment uploads and a commit) reuse open TLS connections instead of
//! paying a TCP and a TLS handshake each: two round trips more per request, 200 ms
//! on a link with 50 ms each way.
//!
//! A connection is kept idle at most [`IDLE_FOR`], and at most [`MAX_IDLE`] of them;
//! one the peer closed meanwhile is dropped when taken. A request that fails on a
//! reused connection before any answer (the peer closed it as the request went out)
//! goes once more on a new connection: the replication protocol takes a request
//! twice, as a round resends whatever it had no answer to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use tracing::debug;

use crate::client::{build_request, connect, read_whole, ClientError, Endpoint, Response};
use crate::throttle::Throttle;

/// How long a connection may wait idle for its next request.
pub const IDLE_FOR: Duration = Duration::from_secs(30);
/// The most idle connections kept (a round's concurrent requests each hold one).
pub const MAX_IDLE: usize = 8;

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// The open connections of one sender towards one peer (a [`Endpoint`] and a
/// [`Throttle`] fixed by its owner), and how many it opened.
#[derive(Default)]
pub struct KeptConnections {
    idle: Mutex<Vec<(Sender, Instant)>>,
    opened: AtomicU64,
}

impl KeptConnections {
    /// Connections opened so far (each a TCP and, to a peer, a TLS handshake).
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// An idle connection still open and ready for a request, if one is kept.
    async fn take(&self) -> Option<Sender> {
        loop {
            let (mut sender, since) = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.retain(|(s, since)| since.elapsed() < IDLE_FOR && !s.is_closed());
                idle.pop()?
            };
            if since.elapsed() < IDLE_FOR && sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn keep(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((sender, Instant::now()));
        }
    }

    /// Sends `method path` with `body` to `to` on a kept connection (or a new one
    /// whose writes draw from `throttle`) and reads the whole answer, all within
    /// `timeout`. The connection is kept for the next request.
    pub async fn request(
        &self,
        to: &Endpoint,
        throttle: Option<&Arc<Throttle>>,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let body = body.map(Bytes::from);
        let work = async {
            if let Some(mut sender) = self.take().await {
                match exchange(&mut sender, to, method, path, body.clone()).await {
                    Ok(r) => {
                        self.keep(sender);
                        return Ok(r);
                    }
                    Err(ClientError::Http { source, .. })
                        if source.is_canceled() || source.is_incomplete_message() =>
                    {
                        debug!(%to, %method, %path, error = %source,
                            "a kept connection closed under the request: sending it on a new one");
                    }
                    Err(e) => return Err(e),
                }
            }
            let mut sender = connect(to, throttle).await?;
            self.opened.fetch_add(1, Ordering::Relaxed);
            let r = exchange(&mut sender, to, method, path, body).await?;
            self.keep(sender);
            Ok(r)
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| ClientError::Timeout {
                to: to.to_string(),
                timeout,
            })?
    }
}

/// One request on `sender` and its whole answer.
async fn exchange(
    sender: &mut Sender,
    to: &Endpoint,
    method: &str,
    path: &str,
    body: Option<Bytes>,
) -> Result<Response, ClientError> {
    let resp = sender
        .send_request(build_request(to, method, path, body)?)
        .await
        .map_err(|source| ClientError::Http {
            to: to.to_string(),
            source,
        })?;
    read_whole(to, resp).await
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::routing::put;
    use axum::Router;

    /// A unix-socket server that counts the connections it accepted and closes each
    /// after `per_connection` requests (0: never).
    async fn server(dir: &std::path::Path, per_connection: usize) -> (Endpoint, Arc<AtomicU64>) {
        let path = dir.join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let app = Router::new().route("/echo", put(|body: Bytes| async move { body }));
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let app = app.clone();
                tokio::spawn(async move {
                    let served = Arc::new(AtomicU64::new(0));
                    let svc = hyper::service::service_fn(move |req| {
                        let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                        let app = app.clone();
                        async move {
                            let mut resp = tower::ServiceExt::oneshot(app, req).await?;
                            if per_connection > 0 && n as usize >= per_connection {
                                resp.headers_mut()
                                    .insert("connection", "close".parse().unwrap());
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (Endpoint::Unix(path), accepted)
    }

    async fn echo(k: &KeptConnections, to: &Endpoint, i: usize) {
        let body = format!("request {i}").into_bytes();
        let r = k
            .request(
                to,
                None,
                "PUT",
                "/echo",
                Some(body.clone()),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &body[..]));
    }

    /// Twenty requests one after another go on one connection.
    #[tokio::test]
    async fn requests_one_after_another_share_one_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (to, accepted) = server(dir.path(), 0).await;
        let k = KeptConnections::default();
        for i in 0..20 {
            echo(&k, &to, i).await;
        }
        assert_eq!((k.opened(), accepted.load(Ordering::SeqCst)), (1, 1));
    }

    /// A peer that closes a connection after every third request: every request is
    /// still answered, on a new connection when the kept one was closed.
    #[tokio::test]
    async fn a_connection_the_peer_closed_is_replaced_and_no_request_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (to, accepted) = server(dir.path(), 3).await;
        let k = KeptConnections::default();
        for i in 0..12 {
            echo(&k, &to, i).await;
        }
        assert_eq!(k.opened(), 4);
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    /// Concurrent requests each take their own connection; afterwards they are kept
    /// (up to MAX_IDLE) and reused.
    #[tokio::test]
    async fn concurrent_requests_open_one_connection_each_and_keep_them() {
        let dir = tempfile::tempdir().unwrap();
        let (to, _) = server(dir.path(), 0).await;
        let k = Arc::new(KeptConnections::default());
        let round = |k: Arc<KeptConnections>, to: Endpoint| async move {
            let tasks: Vec<_> = (0..4)
                .map(|i| {
                    let (k, to) = (k.clone(), to.clone());
                    tokio::spawn(async move { echo(&k, &to, i).await })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        };
        round(k.clone(), to.clone()).await;
        let first = k.opened();
        assert!((1..=4).contains(&first), "{first}");
        round(k.clone(), to.clone()).await;
        round(k.clone(), to.clone()).await;
        assert!(k.opened() <= 4, "connections were not kept: {}", k.opened());
    }
}
