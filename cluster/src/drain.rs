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
//! - **More moves than one transaction holds** (etcd refuses more than
//!   `--max-txn-ops`, 128 by default, operations of a kind in one): the first
//!   transaction writes the admin record, marked `queueing`, with the first
//!   [`MOVES_PER_TXN`] moves; each next one writes [`MOVES_PER_TXN`] more and holds
//!   only while the admin record is still the one the first wrote (no cancel or
//!   resume came between) and each move's key is unchanged; a last one clears
//!   `queueing`, after which the node may be paused. A part that loses leaves its VMs
//!   and the later ones on the node, reported as left. Fail-back moves and a cancel's
//!   failed moves are written the same way.
//! - **Resume**: N is `up` again; with fail-back, each VM the drain moved that still
//!   runs where it went gets a move back to N.

use std::collections::BTreeMap;

use tracing::warn;
use vireo_util::cpu_features::CpuFeatures;

use crate::failover::{view, Snapshot};
use crate::keys::{
    self, DrainInfo, MoveReason, MoveRecord, MoveState, NodeState, OwnerRecord, Priority,
    VmDefinition,
};
use crate::placement::{self, Decision, NodeView, Reason, VmView};
use crate::store::{
    ClusterStore, CmpOp, Compare, KeyValue, Op, Revision, StoreResult, Txn, WatchEvent,
};
use crate::view::{apply_batch, Followed, View};

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
/// live migration, with what they run. Which of them suit each VM's CPU features is
/// [`live_view`]'s part.
pub(crate) fn targets(snap: &Snapshot, node: &str) -> Vec<NodeView> {
    node_views(snap, node, true)
}

/// VM `def`'s placement view for a live move from `from`: its possible owners narrowed
/// to the nodes [`cpu_compatible`] with `from` for it. None when no node is.
pub(crate) fn live_view(snap: &Snapshot, def: &VmDefinition, from: &str) -> Option<VmView> {
    let mut v = view(def);
    if v.possible_owners.is_empty() {
        // An empty list would mean every node.
        v.possible_owners = snap.nodes.keys().cloned().collect();
    }
    v.possible_owners
        .retain(|n| cpu_compatible(snap, def, from, n));
    (!v.possible_owners.is_empty()).then_some(v)
}

/// Whether VM `def` running on `from` can live-migrate to `to`: their VMMs give it the
/// same CPU features (`NodeRecord::cpuid`), which the destination VMM checks (a guest
/// keeps what it probed). For a VM in processor compatibility mode
/// (`VmDefinition::cpu_features`) the same within its set is enough; otherwise the
/// fingerprints must be equal. A node that published none restricts nothing.
pub fn cpu_compatible(snap: &Snapshot, def: &VmDefinition, from: &str, to: &str) -> bool {
    let cpuid = |n: &str| snap.nodes.get(n).and_then(|(r, _)| r.cpuid.as_deref());
    let (Some(a), Some(b)) = (cpuid(from), cpuid(to)) else {
        return true;
    };
    // Parsed only for a VM with a set: placement asks this for every VM and node.
    let Some(mask) = def
        .cpu_features
        .as_deref()
        .and_then(|m| CpuFeatures::parse(m).ok())
    else {
        return a == b;
    };
    match (CpuFeatures::parse(a), CpuFeatures::parse(b)) {
        (Ok(a), Ok(b)) => a.intersect(&mask) == b.intersect(&mask),
        _ => a == b,
    }
}

/// Every live node as placement sees it, with what it runs; `exclude` and (when
/// `need_peer`: a live migration's destination) nodes without a peer URL take nothing.
pub(crate) fn node_views(snap: &Snapshot, exclude: &str, need_peer: bool) -> Vec<NodeView> {
    let mut views: BTreeMap<&str, NodeView> = snap
        .nodes
        .iter()
        .map(|(name, (r, _))| {
            let usable = name != exclude && (!need_peer || r.peer_url.is_some());
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
    let mut plan = DrainPlan::default();
    let mut to_place = Vec::new();
    for d in owned_by(snap, node)
        .iter()
        .filter_map(|vm| snap.vms.get(vm))
    {
        match live_view(snap, d, node) {
            Some(v) => to_place.push((v, Reason::Start)),
            None => plan.no_place.push((
                d.name.clone(),
                format!("no other node gives it the CPU features it has on {node}"),
            )),
        }
    }
    for d in placement::plan_without_preemption(&targets(snap, node), &to_place) {
        match d {
            Decision::Place { vm, node: to } => {
                let priority = snap.vms.get(&vm).map_or(Priority::Low, |d| d.priority);
                plan.moves.push(PlannedMove { vm, to, priority });
            }
            Decision::Wait { vm } | Decision::StayOff { vm } | Decision::Preempt { vm, .. } => {
                let why = snap.vms.get(&vm).map_or(String::new(), |d| {
                    format!(
                        "needs {} MiB and {} vCPUs on an up node with a peer URL and the same CPU features",
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
    Ok(kvs.iter().filter_map(decode_move).collect())
}

/// A move key's VM and record (with the key's revision); `None` for a key that is not
/// a move's or does not parse.
pub fn decode_move(kv: &KeyValue) -> Option<(String, (MoveRecord, Revision))> {
    let vm = keys::name_of(keys::MOVES, &kv.key)?.to_string();
    Some((
        vm,
        (keys::decode::<MoveRecord>(&kv.value)?, kv.mod_revision),
    ))
}

/// Every move record at one revision, kept up by a watch (`MovesView`): each node's
/// move executor wakes on its changes instead of reading every move every turn.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MoveTable {
    pub moves: BTreeMap<String, (MoveRecord, Revision)>,
    /// The store revision the table is exactly.
    pub revision: Revision,
}

impl Followed for MoveTable {
    const PREFIX: &'static str = keys::MOVES;

    async fn read<S: ClusterStore>(store: &S) -> StoreResult<Self> {
        let (kvs, revision) = store.get_prefix_at(keys::MOVES, 0).await?;
        Ok(MoveTable {
            moves: kvs.iter().filter_map(decode_move).collect(),
            revision,
        })
    }

    fn revision(&self) -> Revision {
        self.revision
    }

    fn apply(&mut self, batch: &[WatchEvent]) -> bool {
        let moves = &mut self.moves;
        apply_batch(&mut self.revision, batch, |event| match event {
            WatchEvent::Put(kv) => match decode_move(kv) {
                Some((vm, m)) => {
                    moves.insert(vm, m);
                }
                None => {
                    if let Some(vm) = keys::name_of(keys::MOVES, &kv.key) {
                        warn!(key = %kv.key, "ignoring a move record that does not parse");
                        moves.remove(vm);
                    }
                }
            },
            WatchEvent::Delete { key, .. } => {
                if let Some(vm) = keys::name_of(keys::MOVES, key) {
                    moves.remove(vm);
                }
            }
        })
    }
}

/// A node's view of every move (see [`MoveTable`]).
pub type MovesView = View<MoveTable>;

pub(crate) fn queued(
    pm: &PlannedMove,
    from: &str,
    reason: MoveReason,
    drain_of: &str,
    c: u32,
) -> MoveRecord {
    MoveRecord {
        vm: pm.vm.clone(),
        from: from.to_string(),
        to: pm.to.clone(),
        priority: pm.priority,
        reason,
        drain_of: drain_of.to_string(),
        request: None,
        state: MoveState::Queued,
        concurrency: c.max(1),
        token_before: None,
        token_after: None,
        error: None,
        started_ms: None,
        finished_ms: None,
    }
}

/// Moves written per transaction. etcd refuses a transaction with more than
/// `--max-txn-ops` (128 by default) comparisons, or writes: each move takes one of
/// each, and the admin record one more.
pub const MOVES_PER_TXN: usize = 100;

/// Writes the admin record with the first [`MOVES_PER_TXN`] moves, in one transaction
/// that holds only if neither the admin record nor any of the moves' keys changed since
/// `admin_rev`/`moves`, then the other moves [`MOVES_PER_TXN`] at a time while the
/// admin record is still the one written (see the module's doc). Returns how many of
/// `new_moves` were written (all, or the first ones: a later part lost) and the admin
/// record's revision. The first transaction losing is [`AdminError::Raced`].
async fn commit<S: ClusterStore>(
    store: &S,
    node: &str,
    admin: &keys::NodeAdmin,
    admin_rev: Revision,
    new_moves: &[MoveRecord],
    moves: &BTreeMap<String, (MoveRecord, Revision)>,
) -> Result<(usize, Revision), AdminError> {
    let anchor = keys::admin_key(node);
    match commit_anchored(
        store,
        &anchor,
        keys::encode(admin),
        admin_rev,
        new_moves,
        moves,
    )
    .await?
    {
        Some(done) => Ok(done),
        None => Err(AdminError::Raced),
    }
}

/// [`commit`] with any record as the anchor (`anchor`, written as `value` if it is
/// still at `anchor_rev`; 0: it must not exist): a node's admin record for a drain, a
/// bulk request's record for its moves. `None` when the first transaction lost.
pub(crate) async fn commit_anchored<S: ClusterStore>(
    store: &S,
    anchor: &str,
    value: Vec<u8>,
    anchor_rev: Revision,
    new_moves: &[MoveRecord],
    moves: &BTreeMap<String, (MoveRecord, Revision)>,
) -> StoreResult<Option<(usize, Revision)>> {
    let mut parts = new_moves.chunks(MOVES_PER_TXN);
    let first = parts.next().unwrap_or_default();
    let put_anchor = Op::Put {
        key: anchor.to_string(),
        value,
        lease: 0,
    };
    let Some(anchor_now) =
        write_moves(store, anchor, anchor_rev, Some(put_anchor), first, moves).await?
    else {
        return Ok(None);
    };
    let mut written = first.len();
    for part in parts {
        if write_moves(store, anchor, anchor_now, None, part, moves)
            .await?
            .is_none()
        {
            tracing::warn!(
                anchor,
                written,
                of = new_moves.len(),
                "the cluster changed while the moves were written: the others are not"
            );
            break;
        }
        written += part.len();
    }
    Ok(Some((written, anchor_now)))
}

/// One transaction: `new_moves` (and `put_anchor`, if given) written if the anchor
/// record (`anchor`: a node's admin record, a bulk request's record) is at
/// `anchor_rev` and each move's key as in `moves`. Returns the anchor's revision after
/// it, `None` when a comparison failed.
pub(crate) async fn write_moves<S: ClusterStore>(
    store: &S,
    anchor: &str,
    anchor_rev: Revision,
    put_anchor: Option<Op>,
    new_moves: &[MoveRecord],
    moves: &BTreeMap<String, (MoveRecord, Revision)>,
) -> StoreResult<Option<Revision>> {
    let mut when = vec![Compare::ModRevision {
        key: anchor.to_string(),
        op: CmpOp::Equal,
        revision: anchor_rev,
    }];
    let writes_anchor = put_anchor.is_some();
    let mut then: Vec<Op> = put_anchor.into_iter().collect();
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
    if then.is_empty() {
        // Nothing to write: whether the anchor is still as read.
        let now = store.get(anchor).await?;
        let rev = now.map_or(0, |kv| kv.mod_revision);
        return Ok((rev == anchor_rev).then_some(rev));
    }
    let outcome = store
        .txn(Txn {
            when,
            then,
            otherwise: vec![],
        })
        .await?;
    Ok(outcome.succeeded.then_some(if writes_anchor {
        outcome.revision
    } else {
        anchor_rev
    }))
}

/// Starts draining `node`: checks, marks it `draining` and queues its moves. Returns
/// the plan (with `force`, the VMs left in place are its `no_place`).
pub async fn drain<S: ClusterStore>(
    store: &S,
    node: &str,
    force: bool,
    concurrency: u32,
) -> Result<DrainPlan, AdminError> {
    start_drain(store, node, force, concurrency, false).await
}

/// Drain on shutdown: `node`'s vireod is stopping. As [`drain`] with `force` (a VM
/// without a place stays, and is stopped as the node leaves), marked so that the
/// node resumes by itself when it comes back ([`resume_after_shutdown`]).
pub async fn drain_for_shutdown<S: ClusterStore>(
    store: &S,
    node: &str,
    concurrency: u32,
) -> Result<DrainPlan, AdminError> {
    start_drain(store, node, true, concurrency, true).await
}

/// A node coming back after its drain on shutdown ended is `up` again, and the VMs
/// that drain moved fail back to it (returned). `None`: its last drain was no
/// shutdown's, or has not ended (an operator's pause stays until `node resume`).
pub async fn resume_after_shutdown<S: ClusterStore>(
    store: &S,
    node: &str,
    concurrency: u32,
) -> Result<Option<Vec<PlannedMove>>, AdminError> {
    let (admin, _) = crate::admin::read(store, node).await?;
    let by_shutdown = admin.drain.as_ref().is_some_and(|d| d.on_shutdown);
    if admin.state != NodeState::Paused || !by_shutdown {
        return Ok(None);
    }
    resume(store, node, true, concurrency).await.map(Some)
}

async fn start_drain<S: ClusterStore>(
    store: &S,
    node: &str,
    force: bool,
    concurrency: u32,
    on_shutdown: bool,
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
    let queueing = plan.moves.len() > MOVES_PER_TXN;
    admin.drain = Some(DrainInfo {
        started_ms: keys::now_ms(),
        left: plan.no_place.iter().map(|(vm, _)| vm.clone()).collect(),
        queueing,
        on_shutdown,
    });
    let records: Vec<MoveRecord> = plan
        .moves
        .iter()
        .map(|m| queued(m, node, MoveReason::Drain, node, concurrency))
        .collect();
    let (written, admin_rev) = commit(store, node, &admin, rev, &records, &moves).await?;
    if !queueing {
        return Ok(plan);
    }
    // Every part written (or the rest given up): the node may be paused once its
    // moves end. VMs whose moves were not written stay, reported as left.
    let unwritten = plan.moves.split_off(written);
    if let Some(d) = admin.drain.as_mut() {
        d.queueing = false;
        d.left.extend(unwritten.iter().map(|m| m.vm.clone()));
    }
    plan.no_place.extend(unwritten.into_iter().map(|m| {
        (
            m.vm,
            "the cluster changed while its move was queued".to_string(),
        )
    }));
    if !crate::admin::write_if(store, node, &admin, admin_rev, vec![]).await? {
        // Cancelled or resumed meanwhile: that decision stands.
        return Err(AdminError::Raced);
    }
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
    let (written, _) = commit(store, node, &admin, rev, &records, &moves).await?;
    // Records and `back` are in the same order (a VM in `back` has a move record).
    back.truncate(written);
    Ok(back)
}

/// Cancels `node`'s drain: its moves not started yet are failed ("cancelled"), those
/// migrating finish (a live migration is not cut halfway: the VM ends up on one side,
/// whole), and the node is `up` again — it takes VMs and keeps the ones that stay.
/// Returns the cancelled moves' VMs. Refused unless the node is draining. A move that
/// starts between the read and the write (the source's executor runs every 200 ms)
/// makes the transaction lose: the cancel reads again and tries again, up to
/// [`CANCEL_TRIES`] times, before it is [`AdminError::Raced`].
pub async fn cancel<S: ClusterStore>(store: &S, node: &str) -> Result<Vec<String>, AdminError> {
    let mut tries = 0;
    loop {
        match cancel_once(store, node).await {
            Err(AdminError::Raced) if tries + 1 < CANCEL_TRIES => {
                tries += 1;
                tracing::debug!(node, tries, "drain cancel raced a move starting; again");
                tokio::time::sleep(std::time::Duration::from_millis(20 * tries as u64)).await;
            }
            other => return other,
        }
    }
}

/// One try of [`cancel`]: [`AdminError::Raced`] when its first transaction lost.
async fn cancel_once<S: ClusterStore>(store: &S, node: &str) -> Result<Vec<String>, AdminError> {
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
    let (written, admin_rev) = commit(store, node, &admin, rev, &cancelled, &moves).await?;
    let mut done: Vec<String> = cancelled[..written].iter().map(|m| m.vm.clone()).collect();
    // A part lost (a move started meanwhile): the node is up already; cancel what is
    // still queued, read again, while the admin record stays as written.
    for _ in 0..CANCEL_TRIES {
        if done.len() == cancelled.len() {
            break;
        }
        let moves = read_moves(store).await?;
        let rest: Vec<MoveRecord> = cancelled
            .iter()
            .filter(|c| !done.contains(&c.vm))
            .filter(|c| {
                moves
                    .get(&c.vm)
                    .is_some_and(|(m, _)| m.state == MoveState::Queued && m.drain_of == node)
            })
            .cloned()
            .collect();
        if rest.is_empty() {
            break;
        }
        for part in rest.chunks(MOVES_PER_TXN) {
            if write_moves(store, &keys::admin_key(node), admin_rev, None, part, &moves)
                .await?
                .is_some()
            {
                done.extend(part.iter().map(|m| m.vm.clone()));
            }
        }
    }
    Ok(done)
}

/// How many times a cancel tries again after losing its transaction to a move that
/// started, and reads the moves again to cancel those a lost part left.
const CANCEL_TRIES: usize = 5;

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

/// Which queued moves of `from` may start now. Per source: none of a lower priority
/// while one of a higher priority is unfinished (High first), and no more than the
/// moves' concurrency running at once (`running`: this node's moves in progress). Per
/// destination, whatever the source: none while a move of a higher priority into it
/// is unfinished, and no more migrating into it at once than the move's concurrency.
/// (The destination's count is as read; the move's start checks it again against
/// `vireo/intake/NODE`, which two sources cannot both take: see `cluster_moves`.)
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
    // Each destination: how many arrive now, and the highest priority still to.
    let mut arriving: BTreeMap<String, usize> = BTreeMap::new();
    let mut top_into: BTreeMap<&str, Priority> = BTreeMap::new();
    for (m, _) in moves.values().filter(|(m, _)| !m.state.finished()) {
        if m.state == MoveState::Migrating {
            *arriving.entry(m.to.clone()).or_default() += 1;
        }
        let t = top_into.entry(m.to.as_str()).or_insert(m.priority);
        *t = (*t).max(m.priority);
    }
    let mut out = Vec::new();
    let room = limit.saturating_sub(running);
    for (m, rev) in queued {
        if out.len() >= room {
            break;
        }
        let higher_waits = top_into.get(m.to.as_str()).is_some_and(|t| *t > m.priority);
        let here = arriving.get(&m.to).copied().unwrap_or(0);
        if higher_waits || here >= m.concurrency.max(1) as usize {
            continue;
        }
        arriving.insert(m.to.clone(), here + 1);
        out.push((m, rev));
    }
    out
}

/// Unfinished moves whose source node is not in the cluster (`live`: the nodes
/// registered now): its lease is gone, so it fenced itself and carries out none of them
/// (and its VMs fail over); a restarted vireod fails its own earlier ones anyway.
/// Left as they are they would hold their destination's slots and hold back its
/// lower-priority moves for ever: any node fails them.
pub fn abandoned(
    moves: &BTreeMap<String, (MoveRecord, Revision)>,
    live: &std::collections::BTreeSet<String>,
) -> Vec<(MoveRecord, Revision)> {
    moves
        .values()
        .filter(|(m, _)| !m.state.finished() && !live.contains(&m.from))
        .cloned()
        .collect()
}
