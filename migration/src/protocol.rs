//! The live-migration wire protocol: framed messages over one stream (unix or TCP).
//!
//! Every connection opens with the join exchange of [`crate::auth`] (Knock, Challenge,
//! Auth, Joined): the stream proves it knows the migration's secret, and says which stream
//! of which migration it is (0: the control stream). Then, on the control stream:
//!
//! ```text
//! source                                   destination
//!   Hello {version, config, shape}  ───▶   checks the version; compares the guest's
//!                                            shape with its own configuration (the
//!                                            source's config is never used to build)
//!   Pages {runs}*            ──────────▶   copies them in          (pre-copy rounds)
//!   ... the source pauses the VM, flushes and releases its disks ...
//!   Pages {last runs}        ──────────▶
//!   State {vCPUs, devices}   ──────────▶   opens the disks, restores, stays paused
//!                            ◀──────────   Ready             (or Error {why})
//!   Go                       ──────────▶   resumes the VM    ← the commit point:
//!                                            the source stops for good once Go is sent
//! ```
//! Any error before Go: the source resumes by itself, the destination discards its copy.
//!
//! **Parallel page streams** (`Hello.connections` = N > 1): after Hello the source opens
//! N more connections to the same URL, each joining as stream `lane + 1` of `session`. From
//! then on pages travel only on those N streams, split by the source; each stream ends
//! every pre-copy round with `RoundEnd {round}` (the last one after the switch-over with
//! `last` set). The destination lets no stream apply pages of round k+1 until every
//! stream has reached `RoundEnd {k}` (a barrier per round), so a page resent in a later
//! round is never overwritten by its older copy; and it answers `Ready` only once every
//! stream has passed its last `RoundEnd`. The first stream (the control stream) keeps
//! everything else, in order: disk operations, State, Ready, Go. With N = 1 (the
//! default) nothing of this is sent and the protocol is the single-stream one.
//!
//! A frame is `kind: u32 LE, len: u64 LE, payload`. Pages payloads are binary: a run
//! is `gpa: u64 LE, pages: u32 LE, zero: u8`, followed by the pages' bytes unless
//! `zero` (the destination zeroes them: a page may have been cleared since it was sent).

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// The protocol this Vireo speaks (both sides must agree).
/// 2: every stream joins with a proof of the secret; Hello carries the guest's shape.
pub const PROTOCOL_VERSION: u32 = 2;
pub const PAGE_SIZE: u64 = 4096;
/// Largest frame accepted: a batch of pages plus headers, or a big state document.
pub const MAX_FRAME: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("migration connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer sent a frame of {0} bytes (limit {MAX_FRAME})")]
    FrameTooBig(u64),
    #[error("peer sent unknown message kind {0}")]
    UnknownKind(u32),
    #[error("peer sent a malformed {what} message")]
    Malformed { what: &'static str },
    #[error("peer speaks migration protocol {theirs}, this Vireo {PROTOCOL_VERSION}")]
    Version { theirs: u32 },
    #[error("expected {expected}, peer sent {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    #[error("peer reported: {0}")]
    Peer(String),
    #[error("bad JSON in {what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// The opening message: who we are and the VM's configuration (JSON).
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub vireo: String,
    pub config: serde_json::Value,
    /// Shared-nothing: the disks' contents follow (`DiskBegin`, `DiskWrite`, ...).
    #[serde(default)]
    pub copy_storage: bool,
    /// Streams that carry pages (1: this one; N > 1: N more streams that join).
    #[serde(default = "one")]
    pub connections: u32,
    /// Names this migration in every stream's `Auth` (random per migration).
    #[serde(default)]
    pub session: u64,
    /// What the configuration does not say about the guest's hardware.
    #[serde(default)]
    pub shape: GuestShape,
}

/// What the guest sees that its configuration does not name: the destination must
/// offer the same, or the guest would find its hardware changed under it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestShape {
    /// Each disk's size in bytes, in configuration order.
    #[serde(default)]
    pub disk_sizes: Vec<u64>,
    /// The feature leaves of the CPUID the vCPUs got.
    #[serde(default)]
    pub cpuid: Vec<CpuidLeaf>,
}

pub use vireo_util::cpu_features::{cpuid_fingerprint, CpuidLeaf, FEATURE_LEAVES};

fn one() -> u32 {
    1
}

/// Most page streams a migration may open.
pub const MAX_CONNECTIONS: u32 = 16;

/// Shared-nothing: disk `index` of the configuration is coming; the destination makes
/// a new image of this format and geometry (named `name` in its storage directory).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskBegin {
    pub index: u32,
    pub name: String,
    pub format: String,
    pub size: u64,
    pub logical_sector: u32,
    pub physical_sector: u32,
}

/// One disk operation of a shared-nothing migration (copy or mirrored guest write).
#[derive(Debug, PartialEq, Eq)]
pub enum DiskOp {
    Write {
        index: u32,
        offset: u64,
        data: Vec<u8>,
    },
    Zeroes {
        index: u32,
        offset: u64,
        len: u64,
    },
}

/// One run of consecutive pages.
#[derive(Debug, PartialEq, Eq)]
pub struct PageRun<'a> {
    pub gpa: u64,
    pub pages: u32,
    /// None: the pages are all zero.
    pub data: Option<&'a [u8]>,
}

#[derive(Debug)]
pub enum Message {
    Hello(Hello),
    Pages(Vec<u8>),
    /// A Pages payload compressed with zstd (the receiver gets `Pages` back).
    PagesZstd(Vec<u8>),
    State(Vec<u8>),
    Ready,
    Go,
    Error(String),
    DiskBegin(DiskBegin),
    Disk(DiskOp),
    /// Source, first frame of every connection: asks for a challenge (the source
    /// speaks first, so a peer that is not what it expects fails at once).
    Knock,
    /// Destination, the answer to `Knock`: prove the secret over `nonce`.
    Challenge {
        nonce: [u8; crate::auth::NONCE_LEN],
    },
    /// Source: this is stream `stream` (0: control; k: page stream k - 1) of
    /// migration `session`; `mac` proves the secret (see [`crate::auth`]).
    Auth {
        session: u64,
        stream: u32,
        mac: [u8; crate::auth::MAC_LEN],
    },
    /// Destination: the stream is admitted.
    Joined,
    /// A page stream finished pre-copy round `round` (rounds count from 0); `last`: the
    /// final round, after the switch-over.
    RoundEnd {
        round: u32,
        last: bool,
    },
}

const K_HELLO: u32 = 1;
const K_PAGES: u32 = 2;
const K_STATE: u32 = 3;
const K_READY: u32 = 4;
const K_GO: u32 = 5;
const K_ERROR: u32 = 6;
const K_PAGES_ZSTD: u32 = 7;
const K_DISK_BEGIN: u32 = 8;
const K_DISK_WRITE: u32 = 9;
const K_DISK_ZEROES: u32 = 10;
const K_CHALLENGE: u32 = 13;
const K_KNOCK: u32 = 16;
const K_AUTH: u32 = 14;
const K_JOINED: u32 = 15;
const K_ROUND_END: u32 = 12;

/// zstd level for page batches: fast (guest memory compresses well or not at all).
const ZSTD_LEVEL: i32 = 1;

/// Compresses a Pages payload for [`Message::PagesZstd`].
pub fn compress_pages(payload: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    zstd::bulk::compress(payload, ZSTD_LEVEL).map_err(ProtocolError::Io)
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Pages(_) | Message::PagesZstd(_) => "Pages",
            Message::State(_) => "State",
            Message::Ready => "Ready",
            Message::Go => "Go",
            Message::Error(_) => "Error",
            Message::DiskBegin(_) => "DiskBegin",
            Message::Disk(_) => "Disk",
            Message::Knock => "Knock",
            Message::Challenge { .. } => "Challenge",
            Message::Auth { .. } => "Auth",
            Message::Joined => "Joined",
            Message::RoundEnd { .. } => "RoundEnd",
        }
    }
}

fn frame<W: Write + ?Sized>(w: &mut W, kind: u32, payload: &[u8]) -> Result<(), ProtocolError> {
    let mut hdr = [0u8; 12];
    hdr[..4].copy_from_slice(&kind.to_le_bytes());
    hdr[4..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    w.write_all(&hdr)?;
    w.write_all(payload)?;
    Ok(())
}

pub fn send<W: Write + ?Sized>(w: &mut W, m: &Message) -> Result<(), ProtocolError> {
    match m {
        Message::Hello(h) => {
            let b = serde_json::to_vec(h).map_err(|source| ProtocolError::Json {
                what: "Hello",
                source,
            })?;
            frame(w, K_HELLO, &b)?
        }
        Message::Pages(p) => frame(w, K_PAGES, p)?,
        Message::PagesZstd(p) => frame(w, K_PAGES_ZSTD, p)?,
        Message::DiskBegin(d) => {
            let b = serde_json::to_vec(d).map_err(|source| ProtocolError::Json {
                what: "DiskBegin",
                source,
            })?;
            frame(w, K_DISK_BEGIN, &b)?
        }
        Message::Disk(DiskOp::Write {
            index,
            offset,
            data,
        }) => {
            let mut b = Vec::with_capacity(12 + data.len());
            b.extend_from_slice(&index.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(data);
            frame(w, K_DISK_WRITE, &b)?
        }
        Message::Disk(DiskOp::Zeroes { index, offset, len }) => {
            let mut b = Vec::with_capacity(20);
            b.extend_from_slice(&index.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
            frame(w, K_DISK_ZEROES, &b)?
        }
        Message::State(s) => frame(w, K_STATE, s)?,
        Message::Ready => frame(w, K_READY, &[])?,
        Message::Go => frame(w, K_GO, &[])?,
        Message::Error(e) => frame(w, K_ERROR, e.as_bytes())?,
        Message::Knock => frame(w, K_KNOCK, &[])?,
        Message::Challenge { nonce } => frame(w, K_CHALLENGE, nonce)?,
        Message::Auth {
            session,
            stream,
            mac,
        } => {
            let mut b = Vec::with_capacity(12 + mac.len());
            b.extend_from_slice(&session.to_le_bytes());
            b.extend_from_slice(&stream.to_le_bytes());
            b.extend_from_slice(mac);
            frame(w, K_AUTH, &b)?
        }
        Message::Joined => frame(w, K_JOINED, &[])?,
        Message::RoundEnd { round, last } => {
            let mut b = [0u8; 5];
            b[..4].copy_from_slice(&round.to_le_bytes());
            b[4] = u8::from(*last);
            frame(w, K_ROUND_END, &b)?
        }
    }
    w.flush()?;
    Ok(())
}

/// How much of a payload is read at a time: a frame's buffer grows with the bytes that
/// actually arrive, by at most this much ahead of them.
const READ_CHUNK: usize = 64 << 10;

/// Reads a `len`-byte payload into a buffer that grows with what the peer sends, so a
/// header that claims [`MAX_FRAME`] bytes and then stops costs what was sent, not 64 MiB.
fn read_payload<R: Read + ?Sized>(r: &mut R, len: u64) -> std::io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| std::io::ErrorKind::InvalidData)?;
    let mut payload = Vec::new();
    while payload.len() < len {
        let start = payload.len();
        let want = (len - start).min(READ_CHUNK);
        payload.resize(start + want, 0);
        match r.read(&mut payload[start..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => payload.truncate(start + n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => payload.truncate(start),
            Err(e) => return Err(e),
        }
    }
    Ok(payload)
}

pub fn recv<R: Read + ?Sized>(r: &mut R) -> Result<Message, ProtocolError> {
    let mut hdr = [0u8; 12];
    r.read_exact(&mut hdr)?;
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&hdr[4..]);
    let len = u64::from_le_bytes(len8);
    if len > MAX_FRAME {
        return Err(ProtocolError::FrameTooBig(len));
    }
    let payload = read_payload(r, len)?;
    Ok(match kind {
        K_HELLO => {
            let h: Hello =
                serde_json::from_slice(&payload).map_err(|source| ProtocolError::Json {
                    what: "Hello",
                    source,
                })?;
            if h.version != PROTOCOL_VERSION {
                return Err(ProtocolError::Version { theirs: h.version });
            }
            Message::Hello(h)
        }
        K_PAGES => Message::Pages(payload),
        // Decompressed here, bounded: a lying frame cannot make us allocate more.
        K_PAGES_ZSTD => Message::Pages(
            zstd::bulk::decompress(&payload, MAX_FRAME as usize).map_err(|_| {
                ProtocolError::Malformed {
                    what: "compressed Pages",
                }
            })?,
        ),
        K_STATE => Message::State(payload),
        K_DISK_BEGIN => Message::DiskBegin(serde_json::from_slice(&payload).map_err(|source| {
            ProtocolError::Json {
                what: "DiskBegin",
                source,
            }
        })?),
        K_DISK_WRITE | K_DISK_ZEROES => {
            let bad = || ProtocolError::Malformed { what: "Disk" };
            let index = u32::from_le_bytes(
                payload
                    .get(..4)
                    .ok_or_else(bad)?
                    .try_into()
                    .map_err(|_| bad())?,
            );
            let offset = u64::from_le_bytes(
                payload
                    .get(4..12)
                    .ok_or_else(bad)?
                    .try_into()
                    .map_err(|_| bad())?,
            );
            if kind == K_DISK_WRITE {
                Message::Disk(DiskOp::Write {
                    index,
                    offset,
                    data: payload[12..].to_vec(),
                })
            } else {
                let len = u64::from_le_bytes(
                    payload
                        .get(12..20)
                        .ok_or_else(bad)?
                        .try_into()
                        .map_err(|_| bad())?,
                );
                Message::Disk(DiskOp::Zeroes { index, offset, len })
            }
        }
        K_CHALLENGE => Message::Challenge {
            nonce: payload
                .as_slice()
                .try_into()
                .map_err(|_| ProtocolError::Malformed { what: "Challenge" })?,
        },
        K_AUTH => {
            let bad = || ProtocolError::Malformed { what: "Auth" };
            if payload.len() != 12 + crate::auth::MAC_LEN {
                return Err(bad());
            }
            let session = u64::from_le_bytes(payload[..8].try_into().map_err(|_| bad())?);
            let stream = u32::from_le_bytes(payload[8..12].try_into().map_err(|_| bad())?);
            let mac = payload[12..].try_into().map_err(|_| bad())?;
            Message::Auth {
                session,
                stream,
                mac,
            }
        }
        K_JOINED => Message::Joined,
        K_KNOCK => Message::Knock,
        K_ROUND_END => {
            let b: [u8; 5] = payload
                .as_slice()
                .try_into()
                .map_err(|_| ProtocolError::Malformed { what: "RoundEnd" })?;
            Message::RoundEnd {
                round: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                last: b[4] != 0,
            }
        }
        K_READY => Message::Ready,
        K_GO => Message::Go,
        K_ERROR => Message::Error(String::from_utf8_lossy(&payload).into_owned()),
        k => return Err(ProtocolError::UnknownKind(k)),
    })
}

/// Appends one run to a Pages payload.
pub fn push_run(buf: &mut Vec<u8>, gpa: u64, pages: u32, data: Option<&[u8]>) {
    buf.extend_from_slice(&gpa.to_le_bytes());
    buf.extend_from_slice(&pages.to_le_bytes());
    buf.push(u8::from(data.is_none()));
    if let Some(d) = data {
        buf.extend_from_slice(d);
    }
}

/// The runs of a Pages payload; a truncated or lying payload is an error.
pub fn runs(payload: &[u8]) -> Result<Vec<PageRun<'_>>, ProtocolError> {
    let bad = ProtocolError::Malformed { what: "Pages" };
    let mut out = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        if rest.len() < 13 {
            return Err(bad);
        }
        let gpa = u64::from_le_bytes(
            rest[..8]
                .try_into()
                .map_err(|_| ProtocolError::Malformed { what: "Pages" })?,
        );
        let pages = u32::from_le_bytes(
            rest[8..12]
                .try_into()
                .map_err(|_| ProtocolError::Malformed { what: "Pages" })?,
        );
        let zero = rest[12] != 0;
        rest = &rest[13..];
        let data = if zero {
            None
        } else {
            let n = (pages as usize)
                .checked_mul(PAGE_SIZE as usize)
                .ok_or(ProtocolError::Malformed { what: "Pages" })?;
            if rest.len() < n {
                return Err(ProtocolError::Malformed { what: "Pages" });
            }
            let (d, r) = rest.split_at(n);
            rest = r;
            Some(d)
        };
        out.push(PageRun { gpa, pages, data });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that sends `data` and then ends, noting the largest buffer it was asked
    /// to fill (what the receiver had allocated for the bytes still to come).
    struct Stingy {
        data: std::io::Cursor<Vec<u8>>,
        largest_ask: usize,
    }

    impl Read for Stingy {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.largest_ask = self.largest_ask.max(buf.len());
            self.data.read(buf)
        }
    }

    #[test]
    fn a_frame_claiming_64_mib_costs_only_what_arrives() {
        let mut data = K_STATE.to_le_bytes().to_vec();
        data.extend_from_slice(&MAX_FRAME.to_le_bytes());
        data.extend_from_slice(&[9u8; 100]);
        let mut peer = Stingy {
            data: std::io::Cursor::new(data),
            largest_ask: 0,
        };
        match recv(&mut peer) {
            Err(ProtocolError::Io(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof)
            }
            other => panic!("expected the end of the stream, got {other:?}"),
        }
        assert!(
            peer.largest_ask <= READ_CHUNK,
            "asked to fill {} bytes at once",
            peer.largest_ask
        );
    }

    #[test]
    fn a_frame_arriving_in_small_pieces_is_read_whole() {
        let mut buf = Vec::new();
        let state: Vec<u8> = (0..3 * READ_CHUNK + 5).map(|i| i as u8).collect();
        send(&mut buf, &Message::State(state.clone())).unwrap();
        // At most 1000 bytes per read, interrupted now and then, like a slow socket.
        struct Trickle(std::io::Cursor<Vec<u8>>, u32);
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                self.1 += 1;
                if self.1.is_multiple_of(7) {
                    return Err(std::io::ErrorKind::Interrupted.into());
                }
                let n = buf.len().min(1000);
                self.0.read(&mut buf[..n])
            }
        }
        match recv(&mut Trickle(std::io::Cursor::new(buf), 0)).unwrap() {
            Message::State(s) => assert_eq!(s, state),
            other => panic!("expected State, got {}", other.name()),
        }
    }

    #[test]
    fn messages_round_trip_through_a_byte_stream() {
        let mut buf = Vec::new();
        let hello = Hello {
            version: PROTOCOL_VERSION,
            vireo: "test".into(),
            config: serde_json::json!({"cpus": 2}),
            copy_storage: false,
            connections: 1,
            session: 0,
            shape: GuestShape::default(),
        };
        send(&mut buf, &Message::Hello(hello)).unwrap();
        let mut pages = Vec::new();
        push_run(&mut pages, 0x1000, 2, Some(&[7u8; 8192]));
        push_run(&mut pages, 0x9000, 5, None);
        send(&mut buf, &Message::Pages(pages)).unwrap();
        send(&mut buf, &Message::Go).unwrap();
        let op = DiskOp::Write {
            index: 1,
            offset: 4096,
            data: vec![3; 512],
        };
        send(&mut buf, &Message::Disk(op)).unwrap();
        send(
            &mut buf,
            &Message::Disk(DiskOp::Zeroes {
                index: 0,
                offset: 8,
                len: 9,
            }),
        )
        .unwrap();
        let mut r = &buf[..];
        let Message::Hello(h) = recv(&mut r).unwrap() else {
            panic!("hello")
        };
        assert_eq!(h.config["cpus"], 2);
        let Message::Pages(p) = recv(&mut r).unwrap() else {
            panic!("pages")
        };
        let runs = runs(&p).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(
            (runs[0].gpa, runs[0].pages, runs[0].data.map(|d| d.len())),
            (0x1000, 2, Some(8192))
        );
        assert_eq!(
            runs[1],
            PageRun {
                gpa: 0x9000,
                pages: 5,
                data: None
            }
        );
        assert!(matches!(recv(&mut r).unwrap(), Message::Go));
        let Message::Disk(op) = recv(&mut r).unwrap() else {
            panic!("disk")
        };
        assert_eq!(
            op,
            DiskOp::Write {
                index: 1,
                offset: 4096,
                data: vec![3; 512]
            }
        );
        let Message::Disk(op) = recv(&mut r).unwrap() else {
            panic!("disk")
        };
        assert_eq!(
            op,
            DiskOp::Zeroes {
                index: 0,
                offset: 8,
                len: 9
            }
        );
        assert!(
            matches!(recv(&mut r), Err(ProtocolError::Io(_))),
            "end of stream"
        );
    }

    #[test]
    fn page_stream_frames_round_trip_and_old_hellos_mean_one_stream() {
        let mut buf = Vec::new();
        send(
            &mut buf,
            &Message::Auth {
                session: 0xdead_beef_0123,
                stream: 3,
                mac: [9; 32],
            },
        )
        .unwrap();
        send(&mut buf, &Message::Challenge { nonce: [4; 32] }).unwrap();
        send(&mut buf, &Message::Joined).unwrap();
        send(
            &mut buf,
            &Message::RoundEnd {
                round: 7,
                last: true,
            },
        )
        .unwrap();
        let mut r = &buf[..];
        assert!(matches!(
            recv(&mut r).unwrap(),
            Message::Auth {
                session: 0xdead_beef_0123,
                stream: 3,
                mac: [9, ..]
            }
        ));
        assert!(matches!(
            recv(&mut r).unwrap(),
            Message::Challenge { nonce: [4, ..] }
        ));
        assert!(matches!(recv(&mut r).unwrap(), Message::Joined));
        let mut short = Vec::new();
        frame(&mut short, K_AUTH, &[0; 12]).unwrap();
        assert!(matches!(
            recv(&mut &short[..]),
            Err(ProtocolError::Malformed { what: "Auth" })
        ));
        assert!(matches!(
            recv(&mut r).unwrap(),
            Message::RoundEnd {
                round: 7,
                last: true
            }
        ));
        let mut short = Vec::new();
        frame(&mut short, K_ROUND_END, &[1, 2]).unwrap();
        assert!(matches!(
            recv(&mut &short[..]),
            Err(ProtocolError::Malformed { what: "RoundEnd" })
        ));
        // A Hello without the optional fields: one stream, no shape.
        let h: Hello =
            serde_json::from_str(r#"{"version":2,"vireo":"0.1","config":null}"#).unwrap();
        assert_eq!((h.connections, h.session), (1, 0));
        assert_eq!(h.shape, GuestShape::default());
    }

    #[test]
    fn compressed_pages_arrive_as_pages() {
        let mut pages = Vec::new();
        push_run(&mut pages, 0x2000, 4, Some(&[0x5a; 4 * 4096]));
        let z = compress_pages(&pages).unwrap();
        assert!(z.len() < pages.len() / 10, "a uniform page compresses");
        let mut buf = Vec::new();
        send(&mut buf, &Message::PagesZstd(z)).unwrap();
        let Message::Pages(back) = recv(&mut &buf[..]).unwrap() else {
            panic!("pages")
        };
        assert_eq!(back, pages);
        let mut bad = Vec::new();
        frame(&mut bad, K_PAGES_ZSTD, b"not zstd").unwrap();
        assert!(matches!(
            recv(&mut &bad[..]),
            Err(ProtocolError::Malformed { .. })
        ));
    }

    #[test]
    fn hostile_frames_are_errors_not_allocations() {
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&K_PAGES.to_le_bytes());
        hdr.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            recv(&mut &hdr[..]),
            Err(ProtocolError::FrameTooBig(_))
        ));
        let mut p = Vec::new();
        push_run(&mut p, 0, 3, Some(&[1u8; 4096])); // claims 3 pages, carries 1
        assert!(runs(&p).is_err());
        assert!(runs(&[1, 2, 3]).is_err());
        let mut other = Vec::new();
        frame(&mut other, 99, &[]).unwrap();
        assert!(matches!(
            recv(&mut &other[..]),
            Err(ProtocolError::UnknownKind(99))
        ));
        let mut old = Vec::new();
        let h = serde_json::to_vec(&Hello {
            version: 0,
            vireo: "old".into(),
            config: serde_json::Value::Null,
            copy_storage: false,
            connections: 1,
            session: 0,
            shape: GuestShape::default(),
        })
        .unwrap();
        frame(&mut old, K_HELLO, &h).unwrap();
        assert!(matches!(
            recv(&mut &old[..]),
            Err(ProtocolError::Version { theirs: 0 })
        ));
    }
}
