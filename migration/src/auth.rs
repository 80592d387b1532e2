//! Who may join a migration: every stream (the control stream and each page stream)
//! proves that it knows the migration's one-time secret before it is used.
//!
//! ```text
//! source                                        destination
//!   Knock                        ──────────▶
//!                        ◀──────────   Challenge {nonce}      (32 fresh random bytes)
//!   Auth {session, stream, mac}  ──────────▶   mac == HMAC-SHA256(secret,
//!                                                 label | session | stream | nonce)?
//!                        ◀──────────   Joined                 (or Error {why}, closed)
//! ```
//! The nonce is the receiver's, new for every connection, so a recorded `Auth` cannot
//! be replayed on another connection; the MAC binds the session and the stream index,
//! so a proof for one stream cannot be used for another. The comparison is constant-time
//! (`ring::hmac::verify`). A migration without a secret (allowed on unix sockets only,
//! where the socket's permissions are the gate) runs the same exchange with an empty
//! key: the protocol is one, the proof then only says "speaks the protocol".

use std::io::{Read, Write};

use ring::hmac;

use crate::protocol::{self, Message, ProtocolError};

/// Bytes of a secret and of a nonce.
pub const SECRET_LEN: usize = 32;
pub const NONCE_LEN: usize = 32;
/// Bytes of a MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;

/// Domain separation: these MACs prove a join, nothing else.
const LABEL: &[u8] = b"vireo-migration-join-v2";

/// A migration's one-time secret: 32 random bytes, written as 64 hex digits.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; SECRET_LEN]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("secret: expected 64 hex digits ({SECRET_LEN} bytes), got {0} characters")]
    Length(usize),
    #[error("secret: '{0}' is not a hex digit")]
    NotHex(char),
    #[error("secret: no randomness from the system: {0}")]
    Random(String),
}

impl std::str::FromStr for Secret {
    type Err = SecretError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != SECRET_LEN * 2 {
            return Err(SecretError::Length(s.chars().count()));
        }
        let digit = |c: char| c.to_digit(16).ok_or(SecretError::NotHex(c));
        let mut out = [0u8; SECRET_LEN];
        let chars: Vec<char> = s.chars().collect();
        for (i, pair) in chars.chunks(2).enumerate() {
            out[i] = (digit(pair[0])? << 4 | digit(pair[1])?) as u8;
        }
        Ok(Self(out))
    }
}

impl Secret {
    /// A new random secret (what an orchestrator hands to both sides).
    pub fn generate() -> Result<Self, SecretError> {
        let mut b = [0u8; SECRET_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .map_err(|e| SecretError::Random(e.to_string()))?;
        Ok(Self(b))
    }

    /// The 64 hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A fresh challenge.
pub fn nonce() -> Result<[u8; NONCE_LEN], SecretError> {
    let mut n = [0u8; NONCE_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut n)
        .map_err(|e| SecretError::Random(e.to_string()))?;
    Ok(n)
}

fn key(secret: Option<&Secret>) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret.map_or(&[][..], |s| &s.0[..]))
}

fn message(session: u64, stream: u32, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut m = Vec::with_capacity(LABEL.len() + 12 + NONCE_LEN);
    m.extend_from_slice(LABEL);
    m.extend_from_slice(&session.to_le_bytes());
    m.extend_from_slice(&stream.to_le_bytes());
    m.extend_from_slice(nonce);
    m
}

/// The proof that stream `stream` of migration `session` knows `secret`.
pub fn mac(
    secret: Option<&Secret>,
    session: u64,
    stream: u32,
    nonce: &[u8; NONCE_LEN],
) -> [u8; MAC_LEN] {
    let tag = hmac::sign(&key(secret), &message(session, stream, nonce));
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Whether `mac` proves the secret (constant-time).
pub fn verify(
    secret: Option<&Secret>,
    session: u64,
    stream: u32,
    nonce: &[u8; NONCE_LEN],
    mac: &[u8; MAC_LEN],
) -> bool {
    hmac::verify(&key(secret), &message(session, stream, nonce), mac).is_ok()
}

/// A stream's claim, proven: which migration and which stream it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub session: u64,
    /// 0: the control stream; k > 0: page stream k - 1.
    pub stream: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Random(#[from] SecretError),
    #[error("wrong proof of the migration secret (session {session:#x}, stream {stream})")]
    BadMac { session: u64, stream: u32 },
    #[error("the destination refused the stream: {0}")]
    Refused(String),
}

/// Receiver: challenges a new connection and checks its proof. The caller decides
/// whether the (proven) claim fits the migration and answers with [`admit`] or
/// [`refuse`].
pub fn challenge<S: Read + Write + ?Sized>(
    stream: &mut S,
    secret: Option<&Secret>,
) -> Result<Claim, JoinError> {
    match protocol::recv(stream)? {
        Message::Knock => {}
        other => {
            return Err(ProtocolError::Unexpected {
                expected: "Knock",
                got: other.name(),
            }
            .into())
        }
    }
    let nonce = nonce()?;
    protocol::send(stream, &Message::Challenge { nonce })?;
    match protocol::recv(stream)? {
        Message::Auth {
            session,
            stream: index,
            mac,
        } => {
            if verify(secret, session, index, &nonce, &mac) {
                Ok(Claim {
                    session,
                    stream: index,
                })
            } else {
                Err(JoinError::BadMac {
                    session,
                    stream: index,
                })
            }
        }
        other => Err(ProtocolError::Unexpected {
            expected: "Auth",
            got: other.name(),
        }
        .into()),
    }
}

/// Receiver: the stream is in.
pub fn admit<S: Write + ?Sized>(stream: &mut S) -> Result<(), ProtocolError> {
    protocol::send(stream, &Message::Joined)
}

/// Receiver: the stream is out (best effort: the peer may be gone already).
pub fn refuse<S: Write + ?Sized>(stream: &mut S, why: &str) {
    let _ = protocol::send(stream, &Message::Error(why.to_string()));
}

/// Source: answers the destination's challenge for `claim` and waits to be admitted.
pub fn join<S: Read + Write + ?Sized>(
    stream: &mut S,
    secret: Option<&Secret>,
    claim: Claim,
) -> Result<(), JoinError> {
    protocol::send(stream, &Message::Knock)?;
    let nonce = match protocol::recv(stream)? {
        Message::Challenge { nonce } => nonce,
        Message::Error(why) => return Err(JoinError::Refused(why)),
        other => {
            return Err(ProtocolError::Unexpected {
                expected: "Challenge",
                got: other.name(),
            }
            .into())
        }
    };
    let mac = mac(secret, claim.session, claim.stream, &nonce);
    protocol::send(
        stream,
        &Message::Auth {
            session: claim.session,
            stream: claim.stream,
            mac,
        },
    )?;
    match protocol::recv(stream)? {
        Message::Joined => Ok(()),
        Message::Error(why) => Err(JoinError::Refused(why)),
        other => Err(ProtocolError::Unexpected {
            expected: "Joined",
            got: other.name(),
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn secret(b: u8) -> Secret {
        Secret([b; SECRET_LEN])
    }

    #[test]
    fn secrets_parse_from_64_hex_digits_only() {
        let s: Secret = "00ff".repeat(16).parse().unwrap();
        assert_eq!(s.0[0], 0x00);
        assert_eq!(s.0[1], 0xff);
        assert_eq!(s.to_hex(), "00ff".repeat(16));
        assert_eq!("abc".parse::<Secret>().unwrap_err(), SecretError::Length(3));
        assert_eq!(
            "zz".repeat(32).parse::<Secret>().unwrap_err(),
            SecretError::NotHex('z')
        );
        assert!("é".repeat(32).parse::<Secret>().is_err());
        assert_ne!(Secret::generate().unwrap(), Secret::generate().unwrap());
        assert_eq!(format!("{:?}", secret(7)), "Secret(..)");
    }

    #[test]
    fn a_mac_binds_the_secret_the_session_the_stream_and_the_nonce() {
        let n = [3u8; NONCE_LEN];
        let m = mac(Some(&secret(1)), 42, 2, &n);
        assert!(verify(Some(&secret(1)), 42, 2, &n, &m));
        assert!(!verify(Some(&secret(2)), 42, 2, &n, &m), "another secret");
        assert!(!verify(Some(&secret(1)), 43, 2, &n, &m), "another session");
        assert!(!verify(Some(&secret(1)), 42, 1, &n, &m), "another stream");
        assert!(
            !verify(Some(&secret(1)), 42, 2, &[4u8; NONCE_LEN], &m),
            "replayed"
        );
        assert!(!verify(None, 42, 2, &n, &m), "no secret");
    }

    fn run_join(
        rx_secret: Option<Secret>,
        tx_secret: Option<Secret>,
    ) -> (Result<Claim, String>, Result<(), String>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            join(
                &mut b,
                tx_secret.as_ref(),
                Claim {
                    session: 9,
                    stream: 1,
                },
            )
            .map_err(|e| e.to_string())
        });
        let got = challenge(&mut a, rx_secret.as_ref());
        match &got {
            Ok(_) => admit(&mut a).unwrap(),
            Err(e) => refuse(&mut a, &e.to_string()),
        }
        (got.map_err(|e| e.to_string()), t.join().unwrap())
    }

    #[test]
    fn a_stream_with_the_secret_joins_and_one_without_is_refused() {
        let (rx, tx) = run_join(Some(secret(5)), Some(secret(5)));
        assert_eq!(
            rx.unwrap(),
            Claim {
                session: 9,
                stream: 1
            }
        );
        tx.unwrap();
        let (rx, tx) = run_join(Some(secret(5)), Some(secret(6)));
        assert!(rx.unwrap_err().contains("wrong proof"));
        assert!(tx.unwrap_err().contains("refused"));
        let (rx, _) = run_join(Some(secret(5)), None);
        assert!(rx.unwrap_err().contains("wrong proof"));
        // Neither side has a secret (a unix socket): the exchange still runs.
        let (rx, tx) = run_join(None, None);
        rx.unwrap();
        tx.unwrap();
    }
}
