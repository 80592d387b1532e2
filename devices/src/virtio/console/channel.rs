//! The host end of the guest agent's port: bounded byte buffers in both directions,
//! shared between the console's port worker and the VMM thread that talks to the
//! guest agent.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use vireo_util::sync;
use vmm_sys_util::eventfd::EventFd;

/// Most bytes the host holds for the guest (commands not yet taken by the driver).
pub const MAX_TO_GUEST: usize = 64 << 10;
/// Most bytes the host holds from the guest (replies not yet read); more is dropped.
pub const MAX_FROM_GUEST: usize = 1 << 20;

/// Errors of the host end.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error(
        "the guest agent port holds {held} bytes for the guest; {len} more would pass its \
         {MAX_TO_GUEST}-byte bound"
    )]
    Full { held: usize, len: usize },
    #[error("cannot wake the console's port worker: {0}")]
    Wake(#[source] std::io::Error),
    #[error("no complete reply from the guest agent before the deadline ({held} bytes held)")]
    Timeout { held: usize },
}

#[derive(Default)]
struct State {
    to_guest: VecDeque<u8>,
    from_guest: VecDeque<u8>,
    /// Whether a guest program has the port open (the driver said PORT_OPEN).
    guest_open: bool,
    /// Bytes from the guest dropped because `from_guest` was full.
    dropped: u64,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when bytes arrive from the guest.
    arrived: Condvar,
    /// Written when bytes for the guest are queued (the port worker polls it).
    wake: EventFd,
}

/// The host end of the guest agent's port (cheap to clone; all clones are one port).
#[derive(Clone)]
pub struct AgentChannel {
    shared: Arc<Shared>,
}

impl AgentChannel {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                arrived: Condvar::new(),
                wake: EventFd::new(libc::EFD_NONBLOCK)?,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        sync::lock(&self.shared.state)
    }

    /// Queues `bytes` for the guest (whole or not at all). They reach it once a guest
    /// program has the port open.
    pub fn send(&self, bytes: &[u8]) -> Result<(), ChannelError> {
        {
            let mut s = self.state();
            let held = s.to_guest.len();
            if held + bytes.len() > MAX_TO_GUEST {
                return Err(ChannelError::Full {
                    held,
                    len: bytes.len(),
                });
            }
            s.to_guest.extend(bytes);
        }
        self.shared.wake.write(1).map_err(ChannelError::Wake)
    }

    /// Forgets what either side has not taken yet (before a new exchange).
    pub fn discard(&self) {
        let mut s = self.state();
        s.to_guest.clear();
        s.from_guest.clear();
    }

    /// Waits until the bytes from the guest contain `delim`, then takes them up to and
    /// including it; [`ChannelError::Timeout`] at `deadline` (the bytes stay).
    pub fn recv_until(&self, delim: u8, deadline: Instant) -> Result<Vec<u8>, ChannelError> {
        let mut s = self.state();
        loop {
            if let Some(pos) = s.from_guest.iter().position(|&b| b == delim) {
                return Ok(s.from_guest.drain(..=pos).collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ChannelError::Timeout {
                    held: s.from_guest.len(),
                });
            }
            s = match self.shared.arrived.wait_timeout(s, deadline - now) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Whether a guest program has the port open.
    pub fn guest_open(&self) -> bool {
        self.state().guest_open
    }

    /// Bytes from the guest dropped because the host buffer was full.
    pub fn dropped(&self) -> u64 {
        self.state().dropped
    }

    // The port's side: the worker's (and a test's stand-in for a guest).

    /// Takes every byte waiting for the guest.
    pub fn take_for_guest(&self) -> Vec<u8> {
        self.state().to_guest.drain(..).collect()
    }

    pub(super) fn wake_fd(&self) -> RawFd {
        self.shared.wake.as_raw_fd()
    }

    pub(super) fn clear_wake(&self) {
        let _ = self.shared.wake.read();
    }

    pub(super) fn set_guest_open(&self, open: bool) {
        self.state().guest_open = open;
    }

    /// Runs `f` on the bytes waiting for the guest (it takes what it delivers).
    pub(super) fn with_to_guest<R>(&self, f: impl FnOnce(&mut VecDeque<u8>) -> R) -> R {
        f(&mut self.state().to_guest)
    }

    /// Appends bytes from the guest, at most up to [`MAX_FROM_GUEST`]; returns how
    /// many were dropped.
    pub fn push_from_guest(&self, bytes: &[u8]) -> usize {
        let mut s = self.state();
        let room = MAX_FROM_GUEST.saturating_sub(s.from_guest.len());
        let take = bytes.len().min(room);
        s.from_guest.extend(&bytes[..take]);
        let dropped = bytes.len() - take;
        s.dropped = s.dropped.saturating_add(dropped as u64);
        drop(s);
        if take > 0 {
            self.shared.arrived.notify_all();
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_reply_is_taken_through_its_delimiter_and_the_rest_waits() {
        let c = AgentChannel::new().unwrap();
        let reader = c.clone();
        let t = std::thread::spawn(move || {
            reader
                .recv_until(b'\n', Instant::now() + Duration::from_secs(60))
                .unwrap()
        });
        c.push_from_guest(b"{\"return\": {}}\n{\"ret");
        assert_eq!(t.join().unwrap(), b"{\"return\": {}}\n");
        // The partial second reply is no reply: a deadline already past says so.
        match c.recv_until(b'\n', Instant::now()) {
            Err(ChannelError::Timeout { held: 5 }) => {}
            other => panic!("{other:?}"),
        }
        c.discard();
        match c.recv_until(b'\n', Instant::now()) {
            Err(ChannelError::Timeout { held: 0 }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn both_directions_are_bounded() {
        let c = AgentChannel::new().unwrap();
        c.send(&vec![b'x'; MAX_TO_GUEST]).unwrap();
        match c.send(b"y") {
            Err(ChannelError::Full { held, len: 1 }) if held == MAX_TO_GUEST => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(c.with_to_guest(|q| q.len()), MAX_TO_GUEST);
        assert_eq!(c.push_from_guest(&vec![b'z'; MAX_FROM_GUEST - 1]), 0);
        assert_eq!(c.push_from_guest(b"abc"), 2);
        assert_eq!(c.dropped(), 2);
    }
}
