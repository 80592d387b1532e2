//! Bulk requests: migrate, start, stop or save a selection of clustered VMs in one call
//! (`vireoctl vm migrate --selector priority=low --to b`, or a list of names), and the
//! cluster-wide migration queue.
//!
//! - **Selection**: names, or a selector of `KEY=VALUE` terms joined by commas, all of
//!   which must match: `priority` (high, medium, low, no-auto-start), `node` (the node
//!   that runs it now) and `class` (its anti-affinity class). Any other key is refused
//!   ([`BulkError::UnknownKey`], naming it).
//! - **Migrate** writes one queued move per VM (`vireo/moves/VM`, reason `bulk`, the
//!   request's id) — the drain's moves, carried out by each source's vireod the same
//!   way (`drain::next_moves`: High first and `concurrency` at once per source and per
//!   destination). The destination is a named node, or `auto`: placement picks, as
//!   for a failover (possible and preferred owners, soft anti-affinity, capacity; no
//!   preemption), among the up nodes with a peer URL other than the VM's own. Checked
//!   first, as a drain is: a VM without a place refuses the whole request with the
//!   list ([`BulkError::NoPlace`]) unless `force` (then they stay, reported as left);
//!   a VM already on the named node, or not running, is skipped (reported).
//! - **Start** marks off VMs pending (the failover controller places them, preempting
//!   lower priorities as it does); refused when one could not be placed even so,
//!   unless `force`. **Stop** turns VMs off: the ownership record becomes `off`, and
//!   the node running one kills its VMM (a power-off, not a guest shutdown).
//! - **Save** asks each selected running VM's owner to save it to the cluster's shared
//!   storage: a `vireo/saved/VM` record ([`SaveState::Requested`]) naming the owner and
//!   the VM's fencing token, written only while neither changed and no other save of
//!   it is recorded (`crate::saved`). VMs not running, or moving, are skipped.
//!   A start of saved VMs resumes them; a stop skips them.
//! - **Recorded** as `vireo/requests/ID` ([`BulkRecord`]), written with the first
//!   [`MOVES_PER_TXN`] moves (or ownership changes) in one transaction; later parts
//!   hold only while the record is unchanged (no cancel between).
//! - **Cancel** of a migrate request fails its moves not started yet (`cancelled: ...`)
//!   and marks the record cancelled; migrating moves finish (a live migration is not
//!   cut halfway).

use std::hash::{BuildHasher, Hasher};

use tracing::{info, warn};

use crate::drain::{commit_anchored, read_moves, write_moves, MOVES_PER_TXN};
use crate::failover::Snapshot;
use crate::keys::{self, BulkOp, BulkRecord, MoveRecord, MoveState, OwnerRecord, SavedRecord};
use crate::store::{ClusterStore, CmpOp, Compare, Op, Revision, StoreError, StoreResult, Txn};

/// The keys a selector may use.
pub const SELECTOR_KEYS: [&str; 3] = ["priority", "node", "class"];

/// What a bulk request refuses.
#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    #[error("selector key {0:?} is not supported (the keys are priority, node and class; terms joined by commas must all match)")]
    UnknownKey(String),
    #[error("selector {selector:?}: {why}")]
    BadSelector { selector: String, why: String },
    #[error("no clustered VM named {}", .0.join(", "))]
    UnknownVms(Vec<String>),
    #[error("no clustered VM matches {0}")]
    NoneSelected(String),
    #[error("node {0} is not in the cluster (down, or never joined)")]
    UnknownNode(String),
    #[error("migrate needs a destination: a node's name, or auto")]
    NoDestination,
    #[error("cannot {op}: {}", list(.no_place))]
    NoPlace {
        op: &'static str,
        no_place: Vec<(String, String)>,
    },
    #[error("no bulk request {0}")]
    UnknownRequest(String),
    #[error("bulk request {0} is no migration: it has no queued moves to cancel")]
    NotCancellable(String),
    #[error("the cluster changed while deciding; try again")]
    Raced,
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn list(v: &[(String, String)]) -> String {
    v.iter()
        .map(|(vm, why)| format!("{vm} ({why})"))
        .collect::<Vec<_>>()
        .join(", ")
}

mod plan;
mod selection;
#[cfg(test)]
mod tests;

pub use plan::plan;
pub use selection::{Selection, Selector, Term};

/// A bulk request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BulkRequest {
    pub op: BulkOp,
    pub selection: Selection,
    /// Migrate: a node's name, or `auto`.
    pub to: Option<String>,
    /// Act on the VMs that have a place; leave the others (reported).
    pub force: bool,
    /// Migrate: moves at once per source and per destination node.
    pub concurrency: u32,
}

/// What a request decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BulkPlan {
    /// Migrate: one move per VM.
    pub moves: Vec<MoveRecord>,
    /// Start/stop: each VM's new ownership record, over the revision read.
    pub owners: Vec<(String, OwnerRecord, Revision)>,
    /// Save: each VM's request to its owner (its `token`: the ownership record's
    /// revision read).
    pub saves: Vec<SavedRecord>,
    pub skipped: Vec<(String, String)>,
    pub no_place: Vec<(String, String)>,
}

/// A new request's id: its time and a random part (`b-MS-XXXX`).
fn new_id() -> String {
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("b-{}-{:04x}", keys::now_ms(), r & 0xffff)
}

/// Decides and records `req`. Returns the request's record and its plan.
pub async fn request<S: ClusterStore>(
    store: &S,
    req: &BulkRequest,
) -> Result<(BulkRecord, BulkPlan), BulkError> {
    let snap = Snapshot::read(store).await?;
    let moves = read_moves(store).await?;
    let saved = crate::saved::read_saved(store).await?;
    let id = new_id();
    let mut plan = plan(&snap, &moves, &saved, req, &id)?;
    let mut record = BulkRecord {
        id: id.clone(),
        op: req.op,
        selection: req.selection.text(),
        to: req.to.clone(),
        created_ms: keys::now_ms(),
        concurrency: req.concurrency,
        vms: plan
            .moves
            .iter()
            .map(|m| m.vm.clone())
            .chain(plan.owners.iter().map(|(vm, _, _)| vm.clone()))
            .chain(plan.saves.iter().map(|r| r.vm.clone()))
            .collect(),
        skipped: plan.skipped.clone(),
        left: plan.no_place.clone(),
        cancelled_ms: None,
    };
    let key = keys::request_key(&id);
    let (written, total, rev) = if req.op == BulkOp::Migrate {
        let Some((written, rev)) =
            commit_anchored(store, &key, keys::encode(&record), 0, &plan.moves, &moves).await?
        else {
            return Err(BulkError::Raced);
        };
        (written, plan.moves.len(), rev)
    } else if req.op == BulkOp::Save {
        let changes: Vec<Change> = plan.saves.iter().map(Change::save).collect();
        let Some((written, rev)) =
            write_changes(store, &key, keys::encode(&record), &changes).await?
        else {
            return Err(BulkError::Raced);
        };
        (written, plan.saves.len(), rev)
    } else {
        let changes: Vec<Change> = plan.owners.iter().map(Change::owner).collect();
        let Some((written, rev)) =
            write_changes(store, &key, keys::encode(&record), &changes).await?
        else {
            return Err(BulkError::Raced);
        };
        (written, plan.owners.len(), rev)
    };
    if written < total {
        // A later part lost: those VMs stay as they were, reported as left.
        let lost: Vec<String> = if req.op == BulkOp::Migrate {
            plan.moves
                .split_off(written)
                .into_iter()
                .map(|m| m.vm)
                .collect()
        } else if req.op == BulkOp::Save {
            plan.saves
                .split_off(written)
                .into_iter()
                .map(|r| r.vm)
                .collect()
        } else {
            plan.owners
                .split_off(written)
                .into_iter()
                .map(|(vm, _, _)| vm)
                .collect()
        };
        let why = "the cluster changed while the request was written";
        record.vms.retain(|vm| !lost.contains(vm));
        record
            .left
            .extend(lost.iter().map(|vm| (vm.clone(), why.to_string())));
        plan.no_place
            .extend(lost.into_iter().map(|vm| (vm, why.to_string())));
        let updated = store
            .txn(Txn {
                when: vec![Compare::ModRevision {
                    key: key.clone(),
                    op: CmpOp::Equal,
                    revision: rev,
                }],
                then: vec![Op::Put {
                    key,
                    value: keys::encode(&record),
                    lease: 0,
                }],
                otherwise: vec![],
            })
            .await?;
        if !updated.succeeded {
            warn!(
                id,
                "the bulk request changed (cancelled?) before its record was completed"
            );
        }
    }
    info!(id, op = ?req.op, acted = record.vms.len(), skipped = record.skipped.len(), left = record.left.len(), "bulk request recorded");
    Ok((record, plan))
}

/// One VM's change of a start, stop or save request: a write that holds only while
/// the keys compared are as read.
struct Change {
    when: Vec<Compare>,
    put: Op,
}

impl Change {
    /// Start/stop: the ownership record, over the revision read.
    fn owner((vm, o, r): &(String, OwnerRecord, Revision)) -> Change {
        Change {
            when: vec![Compare::ModRevision {
                key: keys::owner_key(vm),
                op: CmpOp::Equal,
                revision: *r,
            }],
            put: Op::Put {
                key: keys::owner_key(vm),
                value: keys::encode(o),
                lease: 0,
            },
        }
    }

    /// Save: the request to the owner, while the ownership is the one read (its
    /// token) and no other save of the VM is recorded.
    fn save(r: &SavedRecord) -> Change {
        Change {
            when: vec![
                Compare::ModRevision {
                    key: keys::owner_key(&r.vm),
                    op: CmpOp::Equal,
                    revision: r.token,
                },
                Compare::ModRevision {
                    key: keys::saved_key(&r.vm),
                    op: CmpOp::Equal,
                    revision: 0,
                },
            ],
            put: Op::Put {
                key: keys::saved_key(&r.vm),
                value: keys::encode(r),
                lease: 0,
            },
        }
    }
}

/// Writes the request record (`key`, new) with the first [`MOVES_PER_TXN`] changes,
/// then the others as long as the record is unchanged. Returns how many were written
/// and the record's revision; `None` when the first transaction lost.
async fn write_changes<S: ClusterStore>(
    store: &S,
    key: &str,
    value: Vec<u8>,
    changes: &[Change],
) -> StoreResult<Option<(usize, Revision)>> {
    let mut parts: Vec<&[Change]> = changes.chunks(MOVES_PER_TXN).collect();
    if parts.is_empty() {
        // Nothing to change: the record alone.
        parts.push(&[]);
    }
    let (mut rev, mut written) = (0, 0);
    for (i, part) in parts.into_iter().enumerate() {
        let first = i == 0;
        let mut when = vec![Compare::ModRevision {
            key: key.to_string(),
            op: CmpOp::Equal,
            revision: rev,
        }];
        let mut then = Vec::new();
        if first {
            then.push(Op::Put {
                key: key.to_string(),
                value: value.clone(),
                lease: 0,
            });
        }
        for c in part {
            when.extend(c.when.iter().cloned());
            then.push(c.put.clone());
        }
        let outcome = store
            .txn(Txn {
                when,
                then,
                otherwise: vec![],
            })
            .await?;
        if !outcome.succeeded {
            return Ok((!first).then_some((written, rev)));
        }
        if first {
            rev = outcome.revision;
        }
        written += part.len();
    }
    Ok(Some((written, rev)))
}

/// Cancels bulk request `id`: its moves not started yet fail (`cancelled: ...`), those
/// migrating finish; the record is marked cancelled. Returns the cancelled moves' VMs.
pub async fn cancel<S: ClusterStore>(store: &S, id: &str) -> Result<Vec<String>, BulkError> {
    let key = keys::request_key(id);
    let Some(kv) = store.get(&key).await? else {
        return Err(BulkError::UnknownRequest(id.to_string()));
    };
    let Some(mut record) = keys::decode::<BulkRecord>(&kv.value) else {
        return Err(BulkError::UnknownRequest(id.to_string()));
    };
    if record.op != BulkOp::Migrate {
        return Err(BulkError::NotCancellable(id.to_string()));
    }
    let now = keys::now_ms();
    record.cancelled_ms = Some(record.cancelled_ms.unwrap_or(now));
    let moves = read_moves(store).await?;
    let cancel_of = |m: &MoveRecord| MoveRecord {
        state: MoveState::Failed,
        error: Some(format!("cancelled: bulk request {id} was cancelled")),
        finished_ms: Some(now),
        ..m.clone()
    };
    let mine = |m: &MoveRecord| m.request.as_deref() == Some(id) && m.state == MoveState::Queued;
    let cancelled: Vec<MoveRecord> = moves
        .values()
        .filter(|(m, _)| mine(m))
        .map(|(m, _)| cancel_of(m))
        .collect();
    let Some((written, rev)) = commit_anchored(
        store,
        &key,
        keys::encode(&record),
        kv.mod_revision,
        &cancelled,
        &moves,
    )
    .await?
    else {
        return Err(BulkError::Raced);
    };
    let mut done: Vec<String> = cancelled[..written].iter().map(|m| m.vm.clone()).collect();
    // A part lost (a move started meanwhile): cancel what is still queued.
    for _ in 0..CANCEL_TRIES {
        if done.len() == cancelled.len() {
            break;
        }
        let moves = read_moves(store).await?;
        let rest: Vec<MoveRecord> = moves
            .values()
            .filter(|(m, _)| mine(m) && !done.contains(&m.vm))
            .map(|(m, _)| cancel_of(m))
            .collect();
        if rest.is_empty() {
            break;
        }
        for part in rest.chunks(MOVES_PER_TXN) {
            if write_moves(store, &key, rev, None, part, &moves)
                .await?
                .is_some()
            {
                done.extend(part.iter().map(|m| m.vm.clone()));
            }
        }
    }
    info!(id, cancelled = done.len(), "bulk request cancelled");
    Ok(done)
}

/// How many times a cancel reads the moves again to cancel those a lost part left.
const CANCEL_TRIES: usize = 5;

/// The cluster-wide migration queue: every move (drains', fail-backs', bulk
/// requests'), running ones first, then queued in the order they start (High first,
/// then by name), then finished ones, latest first; and the bulk requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Queue {
    pub moves: Vec<MoveRecord>,
    pub requests: Vec<BulkRecord>,
}

pub async fn queue<S: ClusterStore>(store: &S) -> StoreResult<Queue> {
    let moves = read_moves(store).await?;
    let (kvs, _) = store.get_prefix(keys::REQUESTS).await?;
    let mut q = Queue {
        moves: moves.into_values().map(|(m, _)| m).collect(),
        requests: kvs
            .iter()
            .filter_map(|kv| keys::decode::<BulkRecord>(&kv.value))
            .collect(),
    };
    sort_queue(&mut q.moves);
    q.requests.sort_by_key(|r| std::cmp::Reverse(r.created_ms));
    Ok(q)
}

/// Running, then queued (High first, then by name), then finished (latest first).
pub fn sort_queue(moves: &mut [MoveRecord]) {
    let rank = |s: MoveState| match s {
        MoveState::Migrating => 0,
        MoveState::Queued => 1,
        MoveState::Moved | MoveState::Failed => 2,
    };
    moves.sort_by(|a, b| {
        rank(a.state).cmp(&rank(b.state)).then_with(|| {
            if a.state.finished() {
                b.finished_ms.cmp(&a.finished_ms).then(a.vm.cmp(&b.vm))
            } else {
                b.priority.cmp(&a.priority).then(a.vm.cmp(&b.vm))
            }
        })
    });
}
