//! `vm.guest-command`: one qemu-guest-agent command over the console's agent port
//! (`org.qemu.guest_agent.0`), as libvirt sends them: `guest-sync-delimited` first, so
//! that a reply left over from an earlier command that timed out is skipped, then the
//! command, whose reply is one JSON line.
//!
//! The exchange runs on a thread of its own (`vireo-guest-cmd`, under the control
//! thread's filter: futexes, eventfd writes), one at a time: a guest that never answers
//! holds the request until its deadline and nothing else.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::{ApiError, ApiRequest, GuestCommandRequest};
use devices::virtio::console::{AgentChannel, ChannelError};

/// How long a command waits for the guest unless the request says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(5_000);
/// The longest wait a request may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_millis(300_000);
/// Most bytes of one reply line (what the host end holds at most).
const MAX_REPLY: usize = devices::virtio::console::MAX_FROM_GUEST;
/// The byte a guest agent sends before its reply to `guest-sync-delimited`.
const SYNC_MARK: u8 = 0xFF;

/// Errors of one exchange with the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum GuestAgentError {
    #[error(
        "this VM has no guest agent channel (create it with guest_agent: true or --guest-agent)"
    )]
    NoChannel,
    #[error("another guest command is in progress (one at a time)")]
    Busy,
    #[error("timeout_ms must be between 1 and {}", MAX_TIMEOUT.as_millis())]
    BadTimeout,
    #[error(
        "the guest agent did not answer {what} within {ms} ms (guest port {open})",
        open = if *.guest_open { "open" } else { "not opened by any guest program" }
    )]
    Timeout {
        what: &'static str,
        ms: u128,
        guest_open: bool,
    },
    #[error("the guest agent's reply to {what} is not JSON: {source}")]
    BadReply {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot send to the guest agent: {0}")]
    Channel(#[from] ChannelError),
    #[error("cannot start the guest command thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl From<GuestAgentError> for ApiError {
    fn from(e: GuestAgentError) -> Self {
        let m = e.to_string();
        match e {
            GuestAgentError::NoChannel | GuestAgentError::Busy => ApiError::conflict(m),
            GuestAgentError::BadTimeout => ApiError::bad_request(m),
            GuestAgentError::Timeout { .. } => ApiError::gateway_timeout(m),
            GuestAgentError::BadReply { .. } => ApiError::bad_gateway(m),
            GuestAgentError::Channel(_) | GuestAgentError::Thread(_) => ApiError::internal(m),
        }
    }
}

/// Sends one command and returns the guest's reply; a fresh sync id per exchange.
pub fn exchange(
    ch: &AgentChannel,
    req: &GuestCommandRequest,
    sync_id: u64,
) -> Result<serde_json::Value, GuestAgentError> {
    let timeout = match req.timeout_ms {
        None => DEFAULT_TIMEOUT,
        Some(0) => return Err(GuestAgentError::BadTimeout),
        Some(ms) if Duration::from_millis(ms) > MAX_TIMEOUT => {
            return Err(GuestAgentError::BadTimeout)
        }
        Some(ms) => Duration::from_millis(ms),
    };
    let deadline = Instant::now() + timeout;
    let timed_out = |what| GuestAgentError::Timeout {
        what,
        ms: timeout.as_millis(),
        guest_open: ch.guest_open(),
    };
    ch.discard();
    let sync = serde_json::json!({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}});
    ch.send(format!("{sync}\n").as_bytes())?;
    // Everything up to the sync mark is stale; the line after it must carry our id.
    loop {
        ch.recv_until(SYNC_MARK, deadline)
            .map_err(|_| timed_out("guest-sync-delimited"))?;
        let line = ch
            .recv_until(b'\n', deadline)
            .map_err(|_| timed_out("guest-sync-delimited"))?;
        let reply: serde_json::Value =
            serde_json::from_slice(&line).map_err(|source| GuestAgentError::BadReply {
                what: "guest-sync-delimited",
                source,
            })?;
        if reply.get("return").and_then(|r| r.as_u64()) == Some(sync_id) {
            break;
        }
        tracing::debug!(%reply, "guest agent: stale sync reply skipped");
    }
    let mut cmd = serde_json::json!({"execute": req.execute});
    if let Some(a) = &req.arguments {
        cmd["arguments"] = a.clone();
    }
    ch.send(format!("{cmd}\n").as_bytes())?;
    let line = ch
        .recv_until(b'\n', deadline)
        .map_err(|_| timed_out("the command"))?;
    debug_assert!(line.len() <= MAX_REPLY);
    serde_json::from_slice(&line).map_err(|source| GuestAgentError::BadReply {
        what: "the command",
        source,
    })
}

/// Serves `vm.guest-command` requests: one at a time, each on its own thread.
#[derive(Default)]
pub struct GuestCommands {
    busy: Arc<AtomicBool>,
    next_sync: Arc<AtomicU64>,
}

impl GuestCommands {
    /// Answers `req` from a new thread (or at once when it cannot start).
    pub fn start(&self, channel: Option<AgentChannel>, cmd: GuestCommandRequest, req: ApiRequest) {
        let Some(ch) = channel else {
            return req.respond(Err(GuestAgentError::NoChannel.into()));
        };
        if self.busy.swap(true, Ordering::AcqRel) {
            return req.respond(Err(GuestAgentError::Busy.into()));
        }
        // The process id in the high half: a stale reply left by another VMM run (a
        // restored or migrated guest) does not match.
        let count = self.next_sync.fetch_add(1, Ordering::Relaxed) + 1;
        let sync_id = (u64::from(std::process::id()) << 32) | (count & 0xFFFF_FFFF);
        let busy = self.busy.clone();
        let spawned = std::thread::Builder::new()
            .name("vireo-guest-cmd".into())
            .spawn({
                let busy = busy.clone();
                move || {
                    let result = exchange(&ch, &cmd, sync_id);
                    match &result {
                        Ok(_) => tracing::info!(command = %cmd.execute, "guest command answered"),
                        Err(e) => tracing::warn!(command = %cmd.execute, error = %e, "guest command failed"),
                    }
                    busy.store(false, Ordering::Release);
                    req.respond(result.map(Some).map_err(ApiError::from));
                }
            });
        if let Err(e) = spawned {
            busy.store(false, Ordering::Release);
            // The closure (and the request in it) was dropped: the client sees the
            // VMM drop the request.
            tracing::error!("{}", GuestAgentError::Thread(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(execute: &str, timeout_ms: Option<u64>) -> GuestCommandRequest {
        GuestCommandRequest {
            execute: execute.into(),
            arguments: None,
            timeout_ms,
        }
    }

    /// A stand-in guest agent: answers each line it gets with `answer(line)`.
    fn fake_guest(
        ch: &AgentChannel,
        lines: usize,
        answer: impl Fn(&serde_json::Value) -> Vec<u8> + Send + 'static,
    ) -> std::thread::JoinHandle<Vec<serde_json::Value>> {
        let ch = ch.clone();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = Vec::new();
            while got.len() < lines {
                buf.extend(ch.take_for_guest());
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
                    ch.push_from_guest(&answer(&v));
                    got.push(v);
                }
                std::thread::yield_now();
            }
            got
        })
    }

    #[test]
    fn a_stale_reply_is_skipped_and_the_command_reply_comes_back() {
        let ch = AgentChannel::new().unwrap();
        let guest = fake_guest(&ch, 2, |v| match v["execute"].as_str() {
            Some("guest-sync-delimited") => {
                let id = v["arguments"]["id"].as_u64().unwrap();
                // A late reply of an earlier command and an old sync, then ours.
                let mut b = b"{\"return\": {\"frozen\": 1}}\n".to_vec();
                b.push(SYNC_MARK);
                b.extend_from_slice(b"{\"return\": 7}\n");
                b.push(SYNC_MARK);
                b.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
                b
            }
            _ => b"{\"return\": {\"version\": \"test\"}}\n".to_vec(),
        });
        let reply = exchange(&ch, &req("guest-ping", Some(60_000)), 42).unwrap();
        assert_eq!(reply, serde_json::json!({"return": {"version": "test"}}));
        let seen = guest.join().unwrap();
        assert_eq!(seen[0]["arguments"]["id"], 42);
        assert_eq!(seen[1], serde_json::json!({"execute": "guest-ping"}));
    }

    #[test]
    fn a_silent_guest_is_a_504_and_a_garbled_one_a_502() {
        let ch = AgentChannel::new().unwrap();
        let e = exchange(&ch, &req("guest-ping", Some(1)), 1).unwrap_err();
        assert!(
            matches!(
                e,
                GuestAgentError::Timeout {
                    what: "guest-sync-delimited",
                    guest_open: false,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(ApiError::from(e).status, 504);

        let guest = fake_guest(&ch, 1, |_| [&[SYNC_MARK][..], b"not json\n"].concat());
        let e = exchange(&ch, &req("guest-ping", Some(60_000)), 2).unwrap_err();
        guest.join().unwrap();
        assert_eq!(ApiError::from(e).status, 502);

        for t in [0, 300_001] {
            let e = exchange(&ch, &req("guest-ping", Some(t)), 3).unwrap_err();
            assert_eq!(ApiError::from(e).status, 400);
        }
    }
}
