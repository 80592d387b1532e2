//! Drain (Hyper-V's "Pause - Drain Roles"), resume and fail-back, as decisions on a
//! [`Snapshot`] and the transactions that record them. The moves themselves (live
//! migrations) are carried out by each move's source node (vireod's
//! `cluster_moves`); ownership moves with a VM only once its migration committed.
//!
//! - **Drain** of node N: every VM N owns needs a place on another `up` node that can
//!   receive live migrations (a peer URL), where it fits as things are (no preemption);
//!   otherwise the drain is refused with the list, unless forced (those VMs stay on
//!   N). In one transaction: N's admin record becomes `draining` (placement skips it)
//!   and a queued move is written per VM. N's vireod moves them High first, a bounded
//!   number at once, and marks N `paused` when none is left unfinished.
//! - **Resume**: N is `up` again; with fail-back, each VM the drain moved that still
//!   runs where it went gets a move back to N.

use std::collections::BTreeMap;

use crate::failover::{view, Snapshot};
use crate::keys::{
    self, DrainInfo, MoveReason, MoveRecord, MoveState, NodeState, OwnerRecord, Priority,
};
use crate::placement::{self, Decision, NodeView, Reason};
use crate::store::{ClusterStore, CmpOp, Compare, Op, Revision, StoreResult, Txn};

/// The default number of moves a node runs at once.
pub const DEFAULT_CONCURRENCY: u32 = 2;

/// One VM of a drain and where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedMove {
    pub vm: String,
    pub to: String,
    pub priority: Priority,
}

/// What a drain of a node would do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainPlan {
    pub moves: Vec<PlannedMove>,
    /// VMs with no place, and why.
    pub no_place: Vec<(String, String)>,
}

/// Why a drain (or resume, release) was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("node {0} is not in the cluster (down, or never joined)")]
    UnknownNode(String),
    #[error("node {node} is {state:?}: {what}")]
    WrongState {
        node: String,
        state: NodeState,
        what: &'static str,
    },
    #[error("cannot drain {node}: no other node can take {}", list(.no_place))]
    NoPlace {
        node: String,
        no_place: Vec<(String, String)>,
    },
    #[error("the cluster changed while deciding; try again")]
    Raced,
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

fn list(v: &[(String, String)]) -> String {
    v.iter()
        .map(|(vm, why)| format!("{vm} ({why})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The nodes placement may use for a VM leaving `node`: live, `up`, reachable for
/// live migration, with what they run.
fn targets(snap: &Snapshot, node: &str) -> Vec<NodeView> {
    let mut views: BTreeMap<&str, NodeView> = snap
        .nodes
        .iter()
        .map(|(name, (r, _))| {
            let usable = name != node && r.peer_url.is_some();
            (
                name.as_str(),
                NodeView {
                    name: name.clone(),
                    state: if usable { r.state } else { NodeState::Paused },
                    capacity: r.capacity,
                    running: vec![],
                },
            )
        })
        .collect();
    for (vm, (owner, _)) in &snap.owners {
        if let (OwnerRecord::Node { node: n, lease }, Some(def)) = (owner, snap.vms.get(vm)) {
            if snap.alive(n, *lease) {
                if let Some(v) = views.get_mut(n.as_str()) {
                    v.running.push(view(def));
                }
            }
        }
    }
    views.into_values().collect()
}

/// The VMs `node` (alive) owns, by name.
pub fn owned_by(snap: &Snapshot, node: &str) -> Vec<String> {
    snap.owners
        .iter()
        .filter(|(_, (o, _))| {
            matches!(o, OwnerRecord::Node { node: n, lease } if n == node && snap.alive(n, *lease))
        })
        .map(|(vm, _)| vm.clone())
        .collect()
}

/// Where each VM of `node` would go.
pub fn plan_drain(snap: &Snapshot, node: &str) -> DrainPlan {
    let to_place: Vec<_> = owned_by(snap, node)
        .iter()
        .filter_map(|vm| snap.vms.get(vm))
        .map(|d| (view(d), Reason::Start))
        .collect();
    let mut plan = DrainPlan::default();
    for d in placement::plan_without_preemption(&targets(snap, node), &to_place) {
        match d {
            Decision::Place { vm, node: to } => {
                let priority = snap.vms.get(&vm).map_or(Priority::Low, |d| d.priority);
                plan.moves.push(PlannedMove { vm, to, priority });
            }
            Decision::Wait { vm } | Decision::StayOff { vm } | Decision::Preempt { vm, .. } => {
                let why = snap.vms.get(&vm).map_or(String::new(), |d| {
                    format!(
                        "needs {} MiB and {} vCPUs on an up node with a peer URL",
                        d.needs.memory_mib, d.needs.vcpus
                    )
                });
                plan.no_place.push((vm, why));
            }
        }
    }
    plan
}

fn admin_of(snap: &Snapshot, node: &str) -> (keys::NodeAdmin, Revision) {
    snap.admin.get(node).cloned().unwrap_or_default()
}

/// The moves under `vireo/moves/`, by VM, with their revisions.
pub async fn read_moves<S: ClusterStore>(
    store: &S,
) -> StoreResult<BTreeMap<String, (MoveRecord, Revision)>> {
    let (kvs, _) = store.get_prefix(keys::MOVES).await?;
    Ok(kvs
        .into_iter()
        .filter_map(|kv| {
            let vm = keys::name_of(keys::MOVES, &kv.key)?.to_string();
            Some((
                vm,
                (keys::decode::<MoveRecord>(&kv.value)?, kv.mod_revision),
            ))
        })
        .collect())
}

fn queued(pm: &PlannedMove, from: &str, reason: MoveReason, drain_of: &str, c: u32) -> MoveRecord {
    MoveRecord {
        vm: pm.vm.clone(),
        from: from.to_string(),
        to: pm.to.clone(),
        priority: pm.priority,
        reason,
        drain_of: drain_of.to_string(),
        state: MoveState::Queued,
        concurrency: c.max(1),
        token_before: None,
        token_after: None,
        error: None,
        started_ms: None,
        finished_ms: None,
    }
}

/// Writes the admin record and the moves in one transaction that holds only if
/// neither the admin record nor any of the moves' keys changed since `snap`/`moves`.
async fn commit<S: ClusterStore>(
    store: &S,
    node: &str,
    admin: &keys::NodeAdmin,
    admin_rev: Revision,
    new_moves: &[MoveRecord],
    moves: &BTreeMap<String, (MoveRecord, Revision)>,
) -> Result<(), AdminError> {
    let mut when = vec![Compare::ModRevision {
        key: keys::admin_key(node),
        op: CmpOp::Equal,
        revision: admin_rev,
    }];
    let mut then = vec![Op::Put {
        key: keys::admin_key(node),
        value: keys::encode(admin),
        lease: 0,
    }];
    for m in new_moves {
        let key = keys::move_key(&m.vm);
        when.push(Compare::ModRevision {
            key: key.clone(),
            op: CmpOp::Equal,
            revision: moves.get(&m.vm).map_or(0, |(_, r)| *r),
        });
        then.push(Op::Put {
            key,
            value: keys::encode(m),
            lease: 0,
        });
    }
    let outcome = store
        .txn(Txn {
            when,
            then,
            otherwise: vec![],
        })
        .await?;
    if outcome.succeeded {
        Ok(())
    } else {
        Err(AdminError::Raced)
    }
}

/// Starts draining `node`: checks, marks it `draining` and queues its moves. Returns
/// the plan (with `force`, the VMs left in place are its `no_place`).
pub async fn drain<S: ClusterStore>(
    store: &S,
    node: &str,
    force: bool,
    concurrency: u32,
) -> Result<DrainPlan, AdminError> {
    let snap = Snapshot::read(store).await?;
    let Some((record, _)) = snap.nodes.get(node) else {
        return Err(AdminError::UnknownNode(node.to_string()));
    };
    if record.state != NodeState::Up {
        return Err(AdminError::WrongState {
            node: node.to_string(),
            state: record.state,
            what: "only an up node is drained",
        });
    }
    let moves = read_moves(store).await?;
    let mut plan = plan_drain(&snap, node);
    // A VM still in an unfinished move stays where it is.
    plan.moves.retain(|m| {
        let busy = moves.get(&m.vm).is_some_and(|(r, _)| !r.state.finished());
        if busy {
            plan.no_place
                .push((m.vm.clone(), "another move of it is unfinished".into()));
        }
        !busy
    });
    if !plan.no_place.is_empty() && !force {
        return Err(AdminError::NoPlace {
            node: node.to_string(),
            no_place: plan.no_place,
        });
    }
    let (mut admin, rev) = admin_of(&snap, node);
    // Nothing to move: paused at once.
    admin.state = if plan.moves.is_empty() {
        NodeState::Paused
    } else {
        NodeState::Draining
    };
    admin.drain = Some(DrainInfo {
        started_ms: keys::now_ms(),
        left: plan.no_place.iter().map(|(vm, _)| vm.clone()).collect(),
    });
    let records: Vec<MoveRecord> = plan
        .moves
        .iter()
        .map(|m| queued(m, node, MoveReason::Drain, node, concurrency))
        .collect();
    commit(store, node, &admin, rev, &records, &moves).await?;
    Ok(plan)
}

/// Ends `node`'s drain: it is `up` again. With `failback`, each VM its drain moved
/// that still runs on the node it went to is queued to move back; returns those.
pub async fn resume<S: ClusterStore>(
    store: &S,
    node: &str,
    failback: bool,
    concurrency: u32,
) -> Result<Vec<PlannedMove>, AdminError> {
    let snap = Snapshot::read(store).await?;
    let (mut admin, rev) = admin_of(&snap, node);
    if admin.state != NodeState::Paused {
        return Err(AdminError::WrongState {
            node: node.to_string(),
            state: admin.state,
            what: "only a paused (drained) node is resumed; wait for its drain to end",
        });
    }
    admin.state = NodeState::Up;
    let moves = read_moves(store).await?;
    let mut back = Vec::new();
    if failback {
        for (vm, (m, _)) in &moves {
            let moved_by_drain =
                m.reason == MoveReason::Drain && m.drain_of == node && m.state == MoveState::Moved;
            let still_there = matches!(snap.owners.get(vm),
                Some((OwnerRecord::Node { node: n, lease }, _)) if *n == m.to && snap.alive(n, *lease));
            if moved_by_drain && still_there {
                back.push(PlannedMove {
                    vm: vm.clone(),
                    to: node.to_string(),
                    priority: m.priority,
                });
            }
        }
    }
    let records: Vec<MoveRecord> = back
        .iter()
        .filter_map(|pm| {
            let (m, _) = moves.get(&pm.vm)?;
            Some(queued(pm, &m.to, MoveReason::Failback, node, concurrency))
        })
        .collect();
    commit(store, node, &admin, rev, &records, &moves).await?;
    Ok(back)
}

/// Cancels `node`'s drain: its moves not started yet are failed ("cancelled"), those
/// migrating finish (a live migration is not cut halfway: the VM ends up on one side,
/// whole), and the node is `up` again — it takes VMs and keeps the ones that stay.
/// Returns the cancelled moves' VMs. Refused unless the node is draining; a move that
/// starts meanwhile makes it [`AdminError::Raced`] (try again).
pub async fn cancel<S: ClusterStore>(store: &S, node: &str) -> Result<Vec<String>, AdminError> {
    let snap = Snapshot::read(store).await?;
    let (mut admin, rev) = admin_of(&snap, node);
    if admin.state != NodeState::Draining {
        return Err(AdminError::WrongState {
            node: node.to_string(),
            state: admin.state,
            what: "only a draining node's drain is cancelled",
        });
    }
    admin.state = NodeState::Up;
    let moves = read_moves(store).await?;
    let now = keys::now_ms();
    let cancelled: Vec<MoveRecord> = moves
        .values()
        .filter(|(m, _)| {
            m.reason == MoveReason::Drain && m.drain_of == node && m.state == MoveState::Queued
        })
        .map(|(m, _)| MoveRecord {
            state: MoveState::Failed,
            error: Some(format!("cancelled: the drain of {node} was cancelled")),
            finished_ms: Some(now),
            ..m.clone()
        })
        .collect();
    commit(store, node, &admin, rev, &cancelled, &moves).await?;
    Ok(cancelled.into_iter().map(|m| m.vm).collect())
}

/// `node release`: a quarantined node is `up` again, its departures forgotten.
pub async fn release<S: ClusterStore>(store: &S, node: &str) -> Result<(), AdminError> {
    let (mut admin, rev) = crate::admin::read(store, node).await?;
    if !crate::admin::release(&mut admin) {
        return Err(AdminError::WrongState {
            node: node.to_string(),
            state: admin.state,
            what: "only a quarantined node is released",
        });
    }
    if crate::admin::write_if(store, node, &admin, rev, vec![]).await? {
        Ok(())
    } else {
        Err(AdminError::Raced)
    }
}

/// Which queued moves of `from` may start now: none of a lower priority while one of
/// a higher priority is unfinished (High first), and no more than the moves'
/// concurrency running at once (`running`: this node's moves in progress).
pub fn next_moves(
    moves: &BTreeMap<String, (MoveRecord, Revision)>,
    from: &str,
    running: usize,
) -> Vec<(MoveRecord, Revision)> {
    let mine: Vec<&(MoveRecord, Revision)> = moves
        .values()
        .filter(|(m, _)| m.from == from && !m.state.finished())
        .collect();
    let Some(top) = mine.iter().map(|(m, _)| m.priority).max() else {
        return vec![];
    };
    let limit = mine
        .iter()
        .map(|(m, _)| m.concurrency.max(1) as usize)
        .min()
        .unwrap_or(1);
    let mut queued: Vec<(MoveRecord, Revision)> = mine
        .into_iter()
        .filter(|(m, _)| m.state == MoveState::Queued && m.priority == top)
        .cloned()
        .collect();
    queued.sort_by(|(a, _), (b, _)| a.vm.cmp(&b.vm));
    queued.truncate(limit.saturating_sub(running));
    queued
}
