//! A segment upload read as it arrives: the replica server stages a segment straight
//! from the request body (decompressing it into the staged file) instead of spooling
//! the compressed body to a file first. The spool was a third write of every byte the
//! guest wrote (spool, staged segment, image), measured by strace in the
//! replica-history bench.
//!
//! The body is async and the stager is synchronous (it runs on a blocking thread with
//! the VM's lock held), so a pump task sends the body's chunks over a small bounded
//! channel to an [`UploadReader`] on the stager's thread: the network is read only as
//! fast as the disk takes it. An upload that ends early or grows past its bound ends
//! the reader with an error and says why ([`UploadEnd`]), so the answer can be 400 or
//! 413 rather than "not zstd data".

use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use futures_util::StreamExt;
use tokio::sync::mpsc;

/// Chunks in flight between the body and the stager.
const CHUNKS_IN_FLIGHT: usize = 8;

/// Why an upload ended before its last byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UploadEnd {
    /// The connection failed or the client stopped sending.
    CutShort(String),
    /// More than the bound was sent.
    TooLarge { limit: u64 },
}

impl std::fmt::Display for UploadEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UploadEnd::CutShort(why) => write!(f, "the upload was cut short: {why}"),
            UploadEnd::TooLarge { limit } => write!(f, "a segment upload over {limit} bytes"),
        }
    }
}

/// The blocking side: reads the body's bytes in order; an early end is an error.
pub struct UploadReader {
    chunks: mpsc::Receiver<Result<Bytes, UploadEnd>>,
    current: Bytes,
    ended: Arc<Mutex<Option<UploadEnd>>>,
}

impl Read for UploadReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(end)) => {
                    let message = end.to_string();
                    *vireo_util::sync::lock(&self.ended) = Some(end);
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, message));
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// An upload split into its pump (to run on the async side, beside the stager) and
/// its reader (to hand to the stager); [`Upload::ended`] tells afterwards whether the
/// body ended early.
pub struct Upload {
    ended: Arc<Mutex<Option<UploadEnd>>>,
}

impl Upload {
    /// The pump future, the reader, and the handle that says how the upload ended.
    pub fn start(
        body: Body,
        limit: u64,
    ) -> (impl std::future::Future<Output = ()>, UploadReader, Upload) {
        let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let ended = Arc::new(Mutex::new(None));
        let pump = async move {
            let mut stream = body.into_data_stream();
            let mut total = 0u64;
            while let Some(chunk) = stream.next().await {
                let item = match chunk {
                    Ok(c) => {
                        total += c.len() as u64;
                        if total > limit {
                            Err(UploadEnd::TooLarge { limit })
                        } else {
                            Ok(c)
                        }
                    }
                    Err(e) => Err(UploadEnd::CutShort(e.to_string())),
                };
                let last = item.is_err();
                // The stager stopped reading (it refused the segment, or it was
                // applied already): the rest of the body is not needed.
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        };
        let reader = UploadReader {
            chunks: rx,
            current: Bytes::new(),
            ended: ended.clone(),
        };
        (pump, reader, Upload { ended })
    }

    /// How the body ended early, if it did (read once the stager returned).
    pub fn ended(&self) -> Option<UploadEnd> {
        vireo_util::sync::lock(&self.ended).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(chunks: Vec<Result<&'static [u8], &'static str>>) -> Body {
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| c.map(Bytes::from_static).map_err(io::Error::other)),
        );
        Body::from_stream(stream)
    }

    async fn read_all(body: Body, limit: u64) -> (io::Result<Vec<u8>>, Option<UploadEnd>) {
        let (pump, mut reader, upload) = Upload::start(body, limit);
        let read = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            // Small reads, so chunks are split across them.
            let mut buf = [0u8; 3];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return Ok(out),
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(e),
                }
            }
        });
        let (_, read) = tokio::join!(pump, read);
        (read.unwrap(), upload.ended())
    }

    #[tokio::test]
    async fn the_reader_gets_every_byte_in_order() {
        let body = body_of(vec![Ok(b"hello "), Ok(b""), Ok(b"segment"), Ok(b"!")]);
        let (got, ended) = read_all(body, 100).await;
        assert_eq!(got.unwrap(), b"hello segment!");
        assert_eq!(ended, None);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_ends_the_reader_as_too_large() {
        let body = body_of(vec![Ok(b"0123456789"), Ok(b"0123456789")]);
        let (got, ended) = read_all(body, 15).await;
        assert_eq!(got.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(ended, Some(UploadEnd::TooLarge { limit: 15 }));
    }

    #[tokio::test]
    async fn a_body_cut_short_ends_the_reader_with_why() {
        let body = body_of(vec![Ok(b"part"), Err("connection reset")]);
        let (got, ended) = read_all(body, 100).await;
        assert!(got.is_err());
        assert!(
            matches!(&ended, Some(UploadEnd::CutShort(why)) if why.contains("connection reset")),
            "{ended:?}"
        );
    }

    #[tokio::test]
    async fn a_reader_dropped_early_stops_the_pump() {
        let chunks: Vec<Result<&'static [u8], &'static str>> =
            (0..1000).map(|_| Ok(&b"0123456789"[..])).collect();
        let (pump, reader, upload) = Upload::start(body_of(chunks), u64::MAX);
        drop(reader);
        // Returns although nobody reads (the channel holds only a few chunks).
        tokio::time::timeout(std::time::Duration::from_secs(10), pump)
            .await
            .unwrap();
        assert_eq!(upload.ended(), None);
    }
}
