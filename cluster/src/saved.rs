//! Saving clustered VMs (Hyper-V's Save of a clustered role): the records and the
//! transactions. The node agent (vireod) writes the snapshot itself, to the cluster's
//! shared storage; this module decides who may save, and when a save, a resume or a
//! discard holds.
//!
//! - **Save** ([`prepare`], then [`commit`]): only the VM's owner — its live
//!   incarnation, with no unfinished move of the VM — saves it. The commit is one
//!   transaction comparing the ownership record's revision (the fencing token the
//!   owner runs it under), the owner's lease, the move key's and the save key's
//!   revisions as [`prepare`] read them: a failover, a move or a stop that changed
//!   any of them first makes the save lose (the owner then throws the snapshot away
//!   and the VM goes on), and one that comes after finds the VM saved. It writes the
//!   ownership record `unowned: saved` and `vireo/saved/VM` ([`SaveState::Saved`]).
//! - **Saved**: failover leaves the VM alone (it is owned by no node, and not pending),
//!   no node runs it, and a drain does not see it.
//! - **Start**: a bulk start makes it pending as an off VM; the node the controller
//!   places it on finds `vireo/saved/VM` and resumes it from the shared state under
//!   its new fencing token ([`saved_of`]); once it runs, [`spent`] removes the record
//!   (then the node removes the files). A resume that fails makes it saved again
//!   ([`resume_failed`]).
//! - **Discard** ([`discard`]): a saved VM becomes off, its record goes (then the
//!   files).
//! - **Bulk save** writes [`SaveState::Requested`] records naming each VM's owner
//!   (`crate::bulk`); each owner carries its own out ([`requested_of`]) and, when it
//!   cannot, drops the request ([`drop_request`]).

use std::collections::BTreeMap;

use tracing::{info, warn};

use crate::failover::Snapshot;
use crate::keys::{self, ClusterEvent, MoveRecord, OwnerRecord, SaveState, SavedRecord, Unowned};
use crate::store::{
    ClusterStore, CmpOp, Compare, LeaseId, Op, Revision, StoreError, StoreResult, Txn,
};

/// Why a save, resume or discard is refused.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("no clustered VM named {0}")]
    UnknownVm(String),
    #[error("{vm} is not run by {node} now (its owner: {owner}): only its owner saves it")]
    NotOwned {
        vm: String,
        node: String,
        owner: String,
    },
    #[error("{0} is being moved to another node: save it once the move ended")]
    Moving(String),
    #[error("{vm} is {state}: {action}")]
    WrongState {
        vm: String,
        state: String,
        action: &'static str,
    },
    #[error("the cluster changed while saving {0} (a failover, move or stop came first); the VM goes on")]
    Raced(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a save checked before the VM was paused: the revisions its commit compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveGuard {
    pub vm: String,
    pub node: String,
    pub lease: LeaseId,
    /// The ownership record's revision: the fencing token the VM runs under.
    pub token: Revision,
    /// `vireo/moves/VM`'s revision (0: none).
    pub move_revision: Revision,
    /// `vireo/saved/VM`'s revision (0: none; else a bulk request's).
    pub saved_revision: Revision,
    /// The bulk request that asked for this save.
    pub request: Option<String>,
}

fn owner_text(o: Option<&OwnerRecord>) -> String {
    match o {
        Some(OwnerRecord::Node { node, .. }) => node.clone(),
        Some(OwnerRecord::Unowned(u)) => format!("{u:?}").to_lowercase(),
        None => "none".into(),
    }
}

/// Checks that `node`'s live incarnation owns `vm` and that nothing moves it: what a
/// save needs before it pauses the VM.
pub async fn prepare<S: ClusterStore>(
    store: &S,
    vm: &str,
    node: &str,
) -> Result<SaveGuard, SaveError> {
    let Some(owner) = store.get(&keys::owner_key(vm)).await? else {
        return Err(SaveError::UnknownVm(vm.to_string()));
    };
    let record = keys::decode::<OwnerRecord>(&owner.value);
    let lease = store.get(&keys::node_key(node)).await?.map(|kv| kv.lease);
    let lease = match (&record, lease) {
        (Some(OwnerRecord::Node { node: n, lease: l }), Some(mine)) if n == node && *l == mine => {
            mine
        }
        _ => {
            return Err(SaveError::NotOwned {
                vm: vm.to_string(),
                node: node.to_string(),
                owner: owner_text(record.as_ref()),
            })
        }
    };
    let move_revision = match store.get(&keys::move_key(vm)).await? {
        Some(kv) => match keys::decode::<keys::MoveRecord>(&kv.value) {
            Some(m) if !m.state.finished() => return Err(SaveError::Moving(vm.to_string())),
            _ => kv.mod_revision,
        },
        None => 0,
    };
    let (saved_revision, request) = match store.get(&keys::saved_key(vm)).await? {
        Some(kv) => match keys::decode::<SavedRecord>(&kv.value) {
            Some(r) if r.state == SaveState::Requested => (kv.mod_revision, r.request),
            _ => {
                return Err(SaveError::WrongState {
                    vm: vm.to_string(),
                    state: "resuming".into(),
                    action: "its last saved state is not spent yet; try again once it runs",
                })
            }
        },
        None => (0, None),
    };
    Ok(SaveGuard {
        vm: vm.to_string(),
        node: node.to_string(),
        lease,
        token: owner.mod_revision,
        move_revision,
        saved_revision,
        request,
    })
}

/// Records the save `g` prepared, once its snapshot is complete on the shared
/// storage: the VM is saved, owned by no node. [`SaveError::Raced`] when anything it
/// checked changed since (nothing is written then).
pub async fn commit<S: ClusterStore>(store: &S, g: &SaveGuard) -> Result<Revision, SaveError> {
    let rec = SavedRecord {
        vm: g.vm.clone(),
        state: SaveState::Saved,
        node: g.node.clone(),
        token: g.token,
        request: g.request.clone(),
        at_ms: keys::now_ms(),
    };
    let txn = Txn {
        when: vec![
            rev_is(keys::owner_key(&g.vm), g.token),
            Compare::Lease {
                key: keys::node_key(&g.node),
                op: CmpOp::Equal,
                lease: g.lease,
            },
            rev_is(keys::move_key(&g.vm), g.move_revision),
            rev_is(keys::saved_key(&g.vm), g.saved_revision),
        ],
        then: vec![
            put(
                keys::owner_key(&g.vm),
                keys::encode(&OwnerRecord::Unowned(Unowned::Saved)),
            ),
            put(keys::saved_key(&g.vm), keys::encode(&rec)),
        ],
        otherwise: vec![],
    };
    let outcome = store.txn(txn).await?;
    if !outcome.succeeded {
        return Err(SaveError::Raced(g.vm.clone()));
    }
    info!(vm = %g.vm, node = %g.node, token = g.token, "clustered VM saved");
    event(store, outcome.revision, &g.vm, "saved", Some(&g.node)).await;
    Ok(outcome.revision)
}

/// `vm`'s saved state, when it has one (a start resumes it from it).
pub async fn saved_of<S: ClusterStore>(
    store: &S,
    vm: &str,
) -> Result<Option<(SavedRecord, Revision)>, StoreError> {
    Ok(store
        .get(&keys::saved_key(vm))
        .await?
        .and_then(|kv| Some((keys::decode::<SavedRecord>(&kv.value)?, kv.mod_revision)))
        .filter(|(r, _)| r.state == SaveState::Saved))
}

/// The VM resumed under `token` from the saved state whose record is at `revision`:
/// the record goes (the state is spent; the caller removes the files after). False
/// when the ownership or the record changed meanwhile (nothing written).
pub async fn spent<S: ClusterStore>(
    store: &S,
    vm: &str,
    token: Revision,
    revision: Revision,
) -> Result<bool, StoreError> {
    let outcome = store
        .txn(Txn {
            when: vec![
                rev_is(keys::owner_key(vm), token),
                rev_is(keys::saved_key(vm), revision),
            ],
            then: vec![Op::Delete {
                key: keys::saved_key(vm),
            }],
            otherwise: vec![],
        })
        .await?;
    Ok(outcome.succeeded)
}

/// A resume under `token` failed: the VM is saved again (no node runs it; its state
/// stays). False when its ownership changed meanwhile.
pub async fn resume_failed<S: ClusterStore>(
    store: &S,
    vm: &str,
    token: Revision,
    node: &str,
) -> Result<bool, StoreError> {
    let outcome = store
        .txn(Txn {
            when: vec![rev_is(keys::owner_key(vm), token)],
            then: vec![put(
                keys::owner_key(vm),
                keys::encode(&OwnerRecord::Unowned(Unowned::Saved)),
            )],
            otherwise: vec![],
        })
        .await?;
    if outcome.succeeded {
        warn!(vm, node, "the resume failed: the VM is saved again");
        event(store, outcome.revision, vm, "resume failed", Some(node)).await;
    }
    Ok(outcome.succeeded)
}

/// Discards a saved VM's saved state cluster-wide: it is off, its record gone.
/// Returns the record (the caller removes the files).
pub async fn discard<S: ClusterStore>(store: &S, vm: &str) -> Result<SavedRecord, SaveError> {
    let Some(owner) = store.get(&keys::owner_key(vm)).await? else {
        return Err(SaveError::UnknownVm(vm.to_string()));
    };
    let record = keys::decode::<OwnerRecord>(&owner.value);
    let saved = saved_of(store, vm).await?;
    let (rec, saved_rev) = match (&record, saved) {
        (Some(OwnerRecord::Unowned(Unowned::Saved)), Some(s)) => s,
        _ => {
            return Err(SaveError::WrongState {
                vm: vm.to_string(),
                state: match &record {
                    Some(OwnerRecord::Node { node, .. }) => format!("run by {node}"),
                    other => owner_text(other.as_ref()),
                },
                action: "only a saved VM has a saved state to discard",
            })
        }
    };
    let outcome = store
        .txn(Txn {
            when: vec![
                rev_is(keys::owner_key(vm), owner.mod_revision),
                rev_is(keys::saved_key(vm), saved_rev),
            ],
            then: vec![
                put(
                    keys::owner_key(vm),
                    keys::encode(&OwnerRecord::Unowned(Unowned::Off)),
                ),
                Op::Delete {
                    key: keys::saved_key(vm),
                },
            ],
            otherwise: vec![],
        })
        .await?;
    if !outcome.succeeded {
        return Err(SaveError::Raced(vm.to_string()));
    }
    info!(vm, "clustered VM's saved state discarded");
    event(store, outcome.revision, vm, "saved state discarded", None).await;
    Ok(rec)
}

/// The saves bulk requests asked of `node`, with their records' revisions.
pub async fn requested_of<S: ClusterStore>(
    store: &S,
    node: &str,
) -> Result<Vec<(SavedRecord, Revision)>, StoreError> {
    let (kvs, _) = store.get_prefix(keys::SAVED).await?;
    Ok(kvs
        .iter()
        .filter_map(|kv| Some((keys::decode::<SavedRecord>(&kv.value)?, kv.mod_revision)))
        .filter(|(r, _)| r.state == SaveState::Requested && r.node == node)
        .collect())
}

/// Drops a requested save that its node cannot carry out (`why` goes to the event
/// log). False when the record changed meanwhile.
pub async fn drop_request<S: ClusterStore>(
    store: &S,
    vm: &str,
    revision: Revision,
    why: &str,
) -> Result<bool, StoreError> {
    let outcome = store
        .txn(Txn {
            when: vec![rev_is(keys::saved_key(vm), revision)],
            then: vec![Op::Delete {
                key: keys::saved_key(vm),
            }],
            otherwise: vec![],
        })
        .await?;
    if outcome.succeeded {
        warn!(vm, why, "a requested save was not carried out");
        event(
            store,
            outcome.revision,
            vm,
            &format!("save failed: {why}"),
            None,
        )
        .await;
    }
    Ok(outcome.succeeded)
}

/// A bulk save of `selected` (request `id`): a request to the owner of each running VM
/// (its `token`: the ownership record's revision read), and the VMs skipped, with why.
/// `saved`: the VMs with a record under `vireo/saved/` ([`read_saved`]).
#[allow(clippy::type_complexity)]
pub(crate) fn plan_requests(
    snap: &Snapshot,
    moves: &BTreeMap<String, (MoveRecord, Revision)>,
    saved: &BTreeMap<String, SaveState>,
    selected: &[String],
    id: &str,
) -> (Vec<SavedRecord>, Vec<(String, String)>) {
    let (mut saves, mut skipped) = (Vec::new(), Vec::new());
    for vm in selected {
        let skip = match snap.owners.get(vm) {
            Some((OwnerRecord::Unowned(Unowned::Saved), _)) => Some("already saved".into()),
            _ if saved.get(vm) == Some(&SaveState::Requested) => {
                Some("a save of it is requested already".into())
            }
            _ if saved.contains_key(vm) => {
                Some("its last saved state is not spent yet (it is resuming)".into())
            }
            _ if moves.get(vm).is_some_and(|(m, _)| !m.state.finished()) => {
                Some("a move of it is unfinished: save it once the move ended".into())
            }
            Some((OwnerRecord::Node { node, lease }, rev)) if snap.alive(node, *lease) => {
                saves.push(SavedRecord {
                    vm: vm.clone(),
                    state: SaveState::Requested,
                    node: node.clone(),
                    token: *rev,
                    request: Some(id.to_string()),
                    at_ms: keys::now_ms(),
                });
                None
            }
            Some((OwnerRecord::Node { node, .. }, _)) => {
                Some(format!("its node {node} is gone: nothing runs it"))
            }
            Some((OwnerRecord::Unowned(u), _)) => {
                Some(format!("not running ({u:?}): only a running VM is saved").to_lowercase())
            }
            None => Some("no ownership record".into()),
        };
        if let Some(why) = skip {
            skipped.push((vm.clone(), why));
        }
    }
    (saves, skipped)
}

/// Every VM with a record under `vireo/saved/`, and its state.
pub async fn read_saved<S: ClusterStore>(store: &S) -> StoreResult<BTreeMap<String, SaveState>> {
    let (kvs, _) = store.get_prefix(keys::SAVED).await?;
    Ok(kvs
        .iter()
        .filter_map(|kv| {
            let vm = keys::name_of(keys::SAVED, &kv.key)?;
            let r = keys::decode::<SavedRecord>(&kv.value)?;
            Some((vm.to_string(), r.state))
        })
        .collect())
}

fn rev_is(key: String, revision: Revision) -> Compare {
    Compare::ModRevision {
        key,
        op: CmpOp::Equal,
        revision,
    }
}

fn put(key: String, value: Vec<u8>) -> Op {
    Op::Put {
        key,
        value,
        lease: 0,
    }
}

/// Records a decision in the event log (for people: losing it changes nothing).
async fn event<S: ClusterStore>(
    store: &S,
    revision: Revision,
    vm: &str,
    action: &str,
    node: Option<&str>,
) {
    let ev = ClusterEvent {
        vm: vm.to_string(),
        action: action.to_string(),
        from: node.map(String::from),
        to: None,
        at_ms: Some(keys::now_ms()),
    };
    if let Err(e) = store
        .put(&keys::event_key(revision, 0), keys::encode(&ev), 0)
        .await
    {
        warn!(vm, error = %e, "cannot record the cluster's event");
    }
}
