//! The cluster's history (failover events, finished moves, bulk requests): reading
//! the event log, and pruning what only grows otherwise.
//!
//! Three prefixes keep what happened rather than what is: `vireo/events/` (one key per
//! failover decision), `vireo/moves/` (a VM's newest move, kept after it ended for the
//! queue's history and for fail-back) and `vireo/requests/` (bulk requests). Left alone
//! they grow with the cluster's age, and every read of them (the queue, the inventory
//! view's first read, the controllers' snapshots) with it. [`prune`] keeps:
//!
//! - the newest [`Retention::events`] events (their keys sort by the revision that
//!   decided them);
//! - every move not finished, every finished one younger than [`Retention::finished`],
//!   and, whatever its age, a drain's move while the drained node is still draining or
//!   paused (`node resume --failback` reads them);
//! - every bulk request with a move not finished, or whose last activity (created,
//!   cancelled, its moves' ends) is younger than [`Retention::finished`].
//!
//! Each deletion of a move or a request compares the key's revision as read, so a
//! record rewritten meanwhile (a new move of the VM) is never deleted; a lost
//! transaction leaves its part for the next pass. One node prunes: the first live node
//! by name ([`Pruner`]), once a minute.

use std::collections::BTreeSet;
use std::time::Duration;

use tracing::{debug, info};

use crate::drain::MOVES_PER_TXN;
use crate::keys::{self, BulkRecord, MoveReason, MoveRecord, NodeAdmin, NodeState};
use crate::store::{ClusterStore, CmpOp, Compare, KeyValue, Op, Revision, StoreResult, Txn};

/// What [`prune`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Events kept, the newest.
    pub events: usize,
    /// How long a finished move or a done bulk request is kept after its last activity.
    pub finished: Duration,
}

impl Default for Retention {
    /// 10,000 events (about 1 MiB in etcd); finished moves and requests for 7 days.
    fn default() -> Self {
        Retention {
            events: 10_000,
            finished: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// What one [`prune`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub events: usize,
    pub moves: usize,
    pub requests: usize,
}

impl Pruned {
    pub fn any(&self) -> bool {
        self.events + self.moves + self.requests > 0
    }
}

/// Deletes the history `retention` does not keep, as seen at `now_ms` (wall clock, ms
/// since the epoch: the records' times are wall-clock times).
pub async fn prune<S: ClusterStore>(
    store: &S,
    retention: &Retention,
    now_ms: u64,
) -> StoreResult<Pruned> {
    let horizon = now_ms.saturating_sub(retention.finished.as_millis() as u64);
    let moves = crate::drain::read_moves(store).await?;
    let (admins, _) = store.get_prefix(keys::ADMIN).await?;
    let held = drains_held(&admins);
    let (requests, _) = store.get_prefix(keys::REQUESTS).await?;

    let old_moves: Vec<(String, Revision)> = moves
        .values()
        .filter(|(m, _)| move_expired(m, horizon, &held))
        .map(|(m, rev)| (keys::move_key(&m.vm), *rev))
        .collect();
    let old_requests: Vec<(String, Revision)> = requests
        .iter()
        .filter_map(|kv| {
            let r: BulkRecord = keys::decode(&kv.value)?;
            request_expired(&r, moves.values().map(|(m, _)| m), horizon)
                .then(|| (kv.key.clone(), kv.mod_revision))
        })
        .collect();
    let pruned = Pruned {
        moves: delete_unchanged(store, &old_moves).await?,
        requests: delete_unchanged(store, &old_requests).await?,
        events: prune_events(store, retention.events).await?,
    };
    if pruned.any() {
        info!(
            events = pruned.events,
            moves = pruned.moves,
            requests = pruned.requests,
            "cluster history pruned"
        );
    }
    Ok(pruned)
}

/// The nodes whose drain's moves fail-back may still need: draining or paused.
fn drains_held(admins: &[KeyValue]) -> BTreeSet<String> {
    admins
        .iter()
        .filter_map(|kv| {
            let node = keys::name_of(keys::ADMIN, &kv.key)?;
            let admin: NodeAdmin = keys::decode(&kv.value)?;
            matches!(admin.state, NodeState::Draining | NodeState::Paused).then(|| node.to_string())
        })
        .collect()
}

/// Whether a move is finished, ended before `horizon` and not needed for a fail-back.
fn move_expired(m: &MoveRecord, horizon: u64, held: &BTreeSet<String>) -> bool {
    if !m.state.finished() || m.reason == MoveReason::Drain && held.contains(&m.drain_of) {
        return false;
    }
    // A finished move without an end time (written by an older vireod) ages from its start.
    m.finished_ms.or(m.started_ms).is_some_and(|t| t < horizon)
}

/// Whether a bulk request is done (no move of it unfinished) and its last activity
/// was before `horizon`.
fn request_expired<'a>(
    r: &BulkRecord,
    moves: impl Iterator<Item = &'a MoveRecord>,
    horizon: u64,
) -> bool {
    let mut last = r.created_ms.max(r.cancelled_ms.unwrap_or(0));
    for m in moves.filter(|m| m.request.as_deref() == Some(r.id.as_str())) {
        if !m.state.finished() {
            return false;
        }
        last = last.max(m.finished_ms.unwrap_or(0));
    }
    last < horizon
}

/// Deletes each key still at its revision, [`MOVES_PER_TXN`] per transaction (all of a
/// part or none: a part whose key changed is left for the next pass). Returns how many
/// were deleted.
async fn delete_unchanged<S: ClusterStore>(
    store: &S,
    keys: &[(String, Revision)],
) -> StoreResult<usize> {
    let mut deleted = 0;
    for part in keys.chunks(MOVES_PER_TXN) {
        let txn = Txn {
            when: part
                .iter()
                .map(|(key, revision)| Compare::ModRevision {
                    key: key.clone(),
                    op: CmpOp::Equal,
                    revision: *revision,
                })
                .collect(),
            then: part
                .iter()
                .map(|(key, _)| Op::Delete { key: key.clone() })
                .collect(),
            otherwise: vec![],
        };
        if store.txn(txn).await?.succeeded {
            deleted += part.len();
        } else {
            debug!(
                keys = part.len(),
                "a part of the history changed meanwhile: kept"
            );
        }
    }
    Ok(deleted)
}

/// Deletes the oldest events beyond the newest `keep`. Events are never rewritten:
/// their deletion compares nothing.
async fn prune_events<S: ClusterStore>(store: &S, keep: usize) -> StoreResult<usize> {
    let (events, _) = store.get_prefix(keys::EVENTS).await?;
    // Keys are `REVISION(20 digits)-N`: their order is the order of the decisions.
    let mut keys: Vec<&str> = events.iter().map(|kv| kv.key.as_str()).collect();
    keys.sort_unstable();
    let old = &keys[..keys.len().saturating_sub(keep)];
    for part in old.chunks(MOVES_PER_TXN) {
        let txn = Txn {
            when: vec![],
            then: part
                .iter()
                .map(|key| Op::Delete {
                    key: key.to_string(),
                })
                .collect(),
            otherwise: vec![],
        };
        store.txn(txn).await?;
    }
    Ok(old.len())
}

/// One event of the failover log as read: the revision of the transaction that
/// decided it and its place in it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LoggedEvent {
    pub revision: Revision,
    pub index: usize,
    #[serde(flatten)]
    pub event: keys::ClusterEvent,
}

/// The newest `limit` events of the failover log (of those [`prune`] kept), newest
/// first. Keys that do not decode are skipped.
pub async fn recent_events<S: ClusterStore>(
    store: &S,
    limit: usize,
) -> StoreResult<Vec<LoggedEvent>> {
    let (kvs, _) = store.get_prefix(keys::EVENTS).await?;
    let mut events: Vec<LoggedEvent> = kvs
        .iter()
        .filter_map(|kv| {
            let name = keys::name_of(keys::EVENTS, &kv.key)?;
            let (revision, index) = name.split_once('-')?;
            Some(LoggedEvent {
                revision: revision.parse().ok()?,
                index: index.parse().ok()?,
                event: keys::decode(&kv.value)?,
            })
        })
        .collect();
    events.sort_by_key(|e| std::cmp::Reverse((e.revision, e.index)));
    events.truncate(limit);
    Ok(events)
}

/// Runs [`prune`] every [`Pruner::EVERY`] on the first live node by name only.
#[derive(Debug)]
pub struct Pruner {
    node: String,
    retention: Retention,
    last: Option<Duration>,
}

impl Pruner {
    /// How often the designated node prunes.
    pub const EVERY: Duration = Duration::from_secs(60);

    pub fn new(node: &str, retention: Retention) -> Self {
        Pruner {
            node: node.to_string(),
            retention,
            last: None,
        }
    }

    /// At local monotonic time `now`: prunes when due and this node is the first live
    /// node by name. `None` when nothing ran.
    pub async fn step<S: ClusterStore>(
        &mut self,
        store: &S,
        now: Duration,
    ) -> StoreResult<Option<Pruned>> {
        if self
            .last
            .is_some_and(|t| now.saturating_sub(t) < Self::EVERY)
        {
            return Ok(None);
        }
        self.last = Some(now);
        let (nodes, _) = store.get_prefix(keys::NODES).await?;
        let first = nodes
            .iter()
            .filter_map(|kv| keys::name_of(keys::NODES, &kv.key))
            .min();
        if first != Some(self.node.as_str()) {
            return Ok(None);
        }
        prune(store, &self.retention, keys::now_ms())
            .await
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SimStore;

    #[tokio::test]
    async fn a_record_rewritten_after_it_was_read_is_not_deleted() {
        let s = SimStore::new();
        s.put("vireo/moves/a", b"1".to_vec(), 0).await.unwrap();
        s.put("vireo/moves/b", b"1".to_vec(), 0).await.unwrap();
        let (kvs, _) = s.get_prefix(keys::MOVES).await.unwrap();
        let read: Vec<(String, Revision)> = kvs
            .iter()
            .map(|kv| (kv.key.clone(), kv.mod_revision))
            .collect();
        // A new move of `b` is written between the read and the deletion.
        s.put("vireo/moves/b", b"2".to_vec(), 0).await.unwrap();
        assert_eq!(delete_unchanged(&s, &read).await.unwrap(), 0);
        let (left, _) = s.get_prefix(keys::MOVES).await.unwrap();
        assert_eq!(left.len(), 2, "a part with a changed key deletes nothing");
        // Read again: both go.
        let read: Vec<(String, Revision)> = left
            .iter()
            .map(|kv| (kv.key.clone(), kv.mod_revision))
            .collect();
        assert_eq!(delete_unchanged(&s, &read).await.unwrap(), 2);
    }
}
