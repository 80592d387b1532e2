//! The destination's door: who may become a stream of the incoming migration.
//!
//! An acceptor thread takes every connection until the deadline (or until the gate is
//! dropped: the migration has all its streams, or ended). Each connection gets its own
//! short-lived thread for its TLS handshake and the join exchange (`migration::auth`),
//! so a peer that stalls blocks nobody else. A connection that fails either — a
//! certificate not allowed, a wrong proof of the secret, garbage, silence — is refused,
//! logged and counted in `vm.migration-info`, and the gate goes on waiting for the real
//! source: a stranger who connects first cannot break the migration.
//!
//! Streams that proved the secret come to the receiver, which admits the control
//! stream (stream 0) first and then the page streams of the same session.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vireo_util::sync;

use migration::auth::{self, Claim, Secret};
use migration::tls::ServerTls;
use migration::transport::{Listener, Pending, Stream, TransportError};

use api::MigrationInfo;

/// How often the acceptor looks whether it should stop.
const ACCEPT_SLICE: Duration = Duration::from_millis(100);

/// A stream that proved the secret.
struct Proven {
    claim: Claim,
    stream: Box<dyn Stream>,
    peer: String,
}

pub struct Gate {
    proven: Receiver<Proven>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
    timeout: Duration,
    info: Arc<Mutex<MigrationInfo>>,
}

/// Counts (and logs) a refused connection where `vm.migration-info` shows it.
fn refused(info: &Mutex<MigrationInfo>, peer: &str, why: &str) {
    tracing::warn!(peer, reason = why, "refused a migration connection");
    let mut i = sync::lock(info);
    i.refused_connections += 1;
    i.last_refusal = Some(format!("{peer}: {why}"));
}

impl Gate {
    /// Starts accepting on `listener` until `timeout` from now.
    pub fn open(
        listener: Listener,
        secret: Option<Secret>,
        timeout: Duration,
        info: Arc<Mutex<MigrationInfo>>,
        seccomp: crate::seccomp::Filters,
    ) -> std::io::Result<Self> {
        let (tx, proven) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + timeout;
        let (stop2, info2) = (stop.clone(), info.clone());
        std::thread::Builder::new()
            .name("vireo-mig-gate".into())
            .spawn(move || accept_loop(listener, secret, deadline, &stop2, tx, info2, seccomp))?;
        Ok(Self {
            proven,
            stop,
            deadline,
            timeout,
            info,
        })
    }

    /// The next proven stream before `until` (`started` + the time allowed).
    fn next(&self, started: Instant, until: Instant, waiting_for: &str) -> Result<Proven, String> {
        let left = until.saturating_duration_since(Instant::now());
        match self.proven.recv_timeout(left) {
            Ok(p) => Ok(p),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                let i = sync::lock(&self.info);
                let refusals = match (&i.last_refusal, i.refused_connections) {
                    (Some(last), n) => format!(" ({n} connections refused, the last: {last})"),
                    (None, _) => String::new(),
                };
                Err(format!(
                    "{waiting_for} did not join within {} s{refusals}",
                    until.saturating_duration_since(started).as_secs()
                ))
            }
        }
    }

    /// Admits `p` (tells it so); false if it is gone meanwhile.
    fn admit(&self, p: &mut Proven) -> bool {
        match auth::admit(p.stream.as_mut()) {
            Ok(()) => true,
            Err(e) => {
                refused(
                    &self.info,
                    &p.peer,
                    &format!("gone before it was admitted: {e}"),
                );
                false
            }
        }
    }

    fn refuse(&self, mut p: Proven, why: &str) {
        auth::refuse(p.stream.as_mut(), why);
        refused(&self.info, &p.peer, why);
    }

    /// Waits for the control stream (stream 0); returns its session and the stream.
    pub fn control(&mut self) -> Result<(u64, Box<dyn Stream>), String> {
        loop {
            let started = self.deadline - self.timeout;
            let mut p = self.next(started, self.deadline, "no migration source")?;
            if p.claim.stream != 0 {
                self.refuse(p, "a page stream before the control stream");
                continue;
            }
            if self.admit(&mut p) {
                tracing::info!(peer = %p.peer, "migration source joined");
                return Ok((p.claim.session, p.stream));
            }
        }
    }

    /// Waits for page streams 1..=n of `session` (within the I/O timeout, and the
    /// deadline); returns them in lane order.
    pub fn page_streams(&mut self, session: u64, n: u32) -> Result<Vec<Box<dyn Stream>>, String> {
        let started = Instant::now();
        let until = self
            .deadline
            .min(started + migration::transport::IO_TIMEOUT);
        let mut lanes: Vec<Option<Box<dyn Stream>>> = (0..n).map(|_| None).collect();
        while lanes.iter().any(Option::is_none) {
            let mut p = self.next(started, until, "the source's page streams")?;
            let lane = p.claim.stream.checked_sub(1).map(|l| l as usize);
            let free = lane.is_some_and(|l| lanes.get(l).is_some_and(Option::is_none));
            if p.claim.session != session {
                self.refuse(p, "a stream of another migration");
            } else if !free {
                let why = format!("stream {} is not a free page stream", p.claim.stream);
                self.refuse(p, &why);
            } else if let Some(l) = lane {
                if self.admit(&mut p) {
                    lanes[l] = Some(p.stream);
                }
            }
        }
        Ok(lanes.into_iter().flatten().collect())
    }
}

impl Drop for Gate {
    /// Stops accepting (the listener closes within [`ACCEPT_SLICE`]).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn accept_loop(
    listener: Listener,
    secret: Option<Secret>,
    deadline: Instant,
    stop: &AtomicBool,
    proven: Sender<Proven>,
    info: Arc<Mutex<MigrationInfo>>,
    seccomp: crate::seccomp::Filters,
) {
    let tls = listener.tls().cloned();
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        match listener.accept_pending(Some(ACCEPT_SLICE)) {
            Ok(pending) => {
                let (secret, tls, proven, info, seccomp) = (
                    secret.clone(),
                    tls.clone(),
                    proven.clone(),
                    info.clone(),
                    seccomp.clone(),
                );
                let spawned = std::thread::Builder::new()
                    .name("vireo-mig-join".into())
                    .spawn(move || {
                        // The TLS handshake and the proof of the secret parse what an
                        // unproven peer sends: no files, ioctls or new sockets here.
                        seccomp.apply_or_exit(crate::seccomp::ThreadKind::PageStream);
                        join(pending, tls.as_ref(), secret.as_ref(), &proven, &info)
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a thread for a migration connection");
                }
            }
            Err(TransportError::AcceptTimeout { .. }) => {}
            Err(e) => {
                tracing::warn!(error = %e, "accepting a migration connection");
                std::thread::sleep(ACCEPT_SLICE);
            }
        }
    }
    // Dropping the listener stops listening (and removes a unix socket's file).
}

/// One connection: handshake, join exchange; a proven stream goes to the receiver.
fn join(
    pending: Pending,
    tls: Option<&ServerTls>,
    secret: Option<&Secret>,
    proven: &Sender<Proven>,
    info: &Mutex<MigrationInfo>,
) {
    let peer = pending.peer().to_string();
    let mut stream = match pending.establish(tls) {
        Ok(s) => s,
        Err(e) => return refused(info, &peer, &e.to_string()),
    };
    match auth::challenge(stream.as_mut(), secret) {
        Ok(claim) => {
            // The receiver is gone (the migration ended): the stream just closes.
            let _ = proven.send(Proven {
                claim,
                stream,
                peer,
            });
        }
        Err(e) => {
            let why = e.to_string();
            auth::refuse(stream.as_mut(), &why);
            refused(info, &peer, &why);
        }
    }
}
