//! One VM's replication loop: a round every interval (cut, ship, commit), retried
//! with a doubling backoff, its figures kept in the status; a full replica pauses it
//! until the replica has room for the backlog again, a failover elsewhere ends it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};

use super::{lock, ReplicationStatus, Replications, MIN_INTERVAL};
use crate::client;
use crate::replica_primary::{ShipError, Shipper};

const MAX_BACKOFF: Duration = Duration::from_secs(60);
const CUT_TIMEOUT: Duration = Duration::from_secs(30);
/// A loop paused by a full replica asks it for its free space this often (or every
/// interval, if that is longer, up to a minute).
const FULL_PROBE: Duration = Duration::from_secs(5);
/// Free space the replica keeps beyond twice the backlog (each segment is staged,
/// then written to an image that may be sparse where it lands).
const FULL_HEADROOM: u64 = 16 << 20;

/// One VM's loop.
pub(super) async fn run(
    owner: std::sync::Weak<Replications>,
    shipper: Shipper,
    interval: Duration,
    log_budget: u64,
    status: Arc<Mutex<ReplicationStatus>>,
    mut paused: watch::Receiver<bool>,
) {
    let Some(sup) = owner.upgrade().map(|r| r.sup.clone()) else {
        return;
    };
    let name = shipper.vm.clone();
    let mut backoff = Duration::from_secs(1);
    let mut failing = false;
    let full_probe = interval.clamp(FULL_PROBE, MAX_BACKOFF);
    loop {
        while *paused.borrow_and_update() {
            // Paused by an operator: until they resume. Paused by a full replica:
            // also until the replica has room for what the logs hold.
            let self_paused = lock(&status).paused_reason.is_some();
            if !self_paused {
                if paused.changed().await.is_err() {
                    return;
                }
                continue;
            }
            tokio::select! {
                r = paused.changed() => {
                    if r.is_err() {
                        return;
                    }
                    continue;
                }
                _ = tokio::time::sleep(full_probe) => {}
            }
            if let Some(detail) = room_on_replica(&shipper).await {
                let Some(r) = owner.upgrade() else { return };
                r.set_paused(&name, false, Some(detail));
            }
        }
        let socket = sup.socket_path(&name);
        let cut_at = std::sync::atomic::AtomicU64::new(0);
        let cut_id = std::sync::atomic::AtomicU64::new(0);
        let cut_held_us = std::sync::atomic::AtomicU64::new(u64::MAX);
        // One vm.replica-cut request: the VMM's answer, or why there is none.
        let replica_cut = |body: serde_json::Value, what: &'static str| {
            let (socket, name) = (&socket, &name);
            async move {
                let r = client::request(
                    socket,
                    "PUT",
                    "/api/v1/vm.replica-cut",
                    Some(body.to_string().into_bytes()),
                    CUT_TIMEOUT,
                )
                .await
                .map_err(|e| format!("VM {name:?} (is it running?): {}", crate::error_chain(&e)))?;
                if !r.ok() {
                    return Err(format!("{what}: {}", r.error_message()));
                }
                Ok(r)
            }
        };
        let cut = || async {
            cut_at.store(crate::now_ms(), std::sync::atomic::Ordering::Relaxed);
            let body = serde_json::json!({ "log_budget": log_budget });
            let r = replica_cut(body, "vm.replica-cut").await?;
            let answer = r.json();
            let id = answer
                .as_ref()
                .and_then(|v| v["cut_id"].as_u64())
                .unwrap_or(0);
            cut_id.store(id, std::sync::atomic::Ordering::Relaxed);
            if let Some(held) = answer.as_ref().and_then(|v| v["held_us"].as_u64()) {
                cut_held_us.store(held, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(id)
        };
        // Every log of the VM restarted at one moment for a catch-up from the maps.
        let catch_up = || async {
            let body = serde_json::json!({ "log_budget": log_budget, "catch_up": true });
            replica_cut(body, "vm.replica-cut (catch-up)")
                .await
                .map(|_| ())
        };
        note_degraded(&shipper, &status, &sup, &name, log_budget);
        let began = std::time::Instant::now();
        let result = shipper.round_with(cut, catch_up).await;
        if let Err(ShipError::FailedOverElsewhere { .. }) = &result {
            // Retrying would be refused for good, and the VM must not run here —
            // unless the replica was failed over before this replication reached it
            // (a stale replica: an error like any other, for the operator).
            let Some(r) = owner.upgrade() else { return };
            if r.established(&name) {
                r.failed_over_elsewhere(&name, false).await;
                return;
            }
        }
        if result.is_ok() {
            if let Some(r) = owner.upgrade() {
                r.set_established(&name);
            }
        }
        let full = match &result {
            Err(e @ ShipError::ReplicaFull { .. }) => Some(format!("replica full: {e}")),
            _ => None,
        };
        let wait = {
            let mut st = lock(&status);
            st.rounds += 1;
            let held = cut_held_us.load(std::sync::atomic::Ordering::Relaxed);
            if held != u64::MAX {
                st.last_cut_held_us = Some(held);
                st.max_cut_held_us = st.max_cut_held_us.max(held);
            }
            match result {
                Ok(s) => {
                    if s.caught_up {
                        st.catch_ups += 1;
                        st.catch_up_bytes_sent += s.catch_up_bytes;
                        st.catch_up_region_bytes += s.catch_up_region_bytes;
                        sup.replication_event(
                            &name,
                            "replication-caught-up",
                            Some(format!(
                                "from the change logs' region maps: {} bytes of regions, {} bytes on the wire",
                                s.catch_up_region_bytes, s.catch_up_bytes
                            )),
                        );
                    }
                    st.base_bytes_sent += s.base_bytes;
                    st.base_differing_bytes += s.base_differing_bytes;
                    st.segment_bytes_sent += s.segment_bytes;
                    st.segments_sent += s.segments_sent;
                    if let Some(p) = s.point {
                        st.last_point = Some(p);
                        st.last_point_at_ms = Some(crate::now_ms());
                        st.last_point_cut_at_ms = (p
                            == cut_id.load(std::sync::atomic::Ordering::Relaxed))
                        .then(|| cut_at.load(std::sync::atomic::Ordering::Relaxed));
                    }
                    st.last_error = None;
                    if !st.paused {
                        st.state = "replicating".into();
                    }
                    backoff = Duration::from_secs(1);
                    if failing {
                        failing = false;
                        sup.replication_event(&name, "replication-recovered", None);
                    }
                    // The interval is from cut to cut: a round that took longer is
                    // followed by the next at once.
                    interval.saturating_sub(began.elapsed())
                }
                Err(e) => {
                    let msg = crate::error_chain(&e);
                    warn!(vm = %name, error = %msg, retry_in = ?backoff, "replication round failed");
                    st.failed_rounds += 1;
                    st.last_error = Some(msg.clone());
                    if !st.paused {
                        st.state = "retrying".into();
                    }
                    // A full replica pauses (below) with its own event.
                    if !failing && full.is_none() {
                        failing = true;
                        sup.replication_event(&name, "replication-failing", Some(msg));
                    }
                    let w = backoff.min(interval.max(MIN_INTERVAL) * 4).min(MAX_BACKOFF);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    w
                }
            }
        };
        note_degraded(&shipper, &status, &sup, &name, log_budget);
        if let Some(reason) = full {
            // Retrying now would fail the same way: paused until the replica has
            // room (or `replica resume`).
            let Some(r) = owner.upgrade() else { return };
            r.pause_for(&name, reason);
            failing = false;
            backoff = Duration::from_secs(1);
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            r = paused.changed() => if r.is_err() { return },
        }
    }
}

/// Shows whether a change log is over its budget (degraded to a region bitmap) in the
/// status, with an event when it became so.
fn note_degraded(
    shipper: &Shipper,
    status: &Mutex<ReplicationStatus>,
    sup: &crate::supervisor::Supervisor,
    name: &str,
    log_budget: u64,
) {
    let degraded = shipper.log_degraded();
    let was = std::mem::replace(&mut lock(status).log_degraded, degraded);
    if degraded && !was {
        warn!(vm = %name, log_budget, "a change log passed its budget: it keeps a region bitmap until a catch-up");
        sup.replication_event(
            name,
            "replication-log-degraded",
            Some(format!(
                "a change log passed its budget of {} MiB: it keeps a region bitmap, no recovery point until the replica caught up from it",
                log_budget >> 20
            )),
        );
    }
}

/// Why a loop paused by a full replica may go on (the replica's free space holds
/// twice the logs' backlog and [`FULL_HEADROOM`]), or None (no room yet, or no
/// answer).
async fn room_on_replica(shipper: &Shipper) -> Option<String> {
    let free = match shipper.status().await {
        Ok(st) => st.free_bytes?,
        Err(e) => {
            debug!(vm = %shipper.vm, error = %crate::error_chain(&e), "a full replica's status: no answer");
            return None;
        }
    };
    let backlog = shipper.backlog_bytes();
    let need = backlog.saturating_mul(2).saturating_add(FULL_HEADROOM);
    debug!(vm = %shipper.vm, free, backlog, need, "a full replica's room");
    (free >= need).then(|| {
        format!(
            "the replica has room again: {} MiB free for a backlog of {} MiB",
            free >> 20,
            backlog.div_ceil(1 << 20)
        )
    })
}
