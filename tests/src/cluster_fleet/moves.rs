//! The stand-in of vireod's move executor (agent/src/cluster_moves.rs) for drains:
//! on every change of the moves (its own watch-kept `MovesView`, as vireod's), or a
//! second after the last pass, the node starts those `cluster::drain::next_moves`
//! allows (High first, the drain's concurrency at once, each in a task) and carries
//! each out as
//! vireod does — the ownership rewritten with the move marked migrating (the token
//! grows), then, the "migration" done at once, the ownership moved to the destination
//! and the move recorded moved — and pauses the node once its drain has no unfinished
//! move. When the migration completes the stand-in VM runs on the destination (which
//! adopts it once it owns it, as vireod does) and no longer here; when ownership does
//! not follow, it runs here again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cluster::admin;
use cluster::drain::{next_moves, read_moves, MovesView};
use cluster::failover::Snapshot;
use cluster::keys::{self, MoveRecord, MoveState, NodeState, OwnerRecord};
use cluster::store::{CmpOp, Compare, Op, Revision, StoreResult, Txn};
use cluster::ClusterStore;
use tracing::warn;

use super::node::{bump, lock, Hosts, Running, Stats, Store};

/// How long vireod's executor waits for a change before it looks again anyway.
const IDLE: Duration = Duration::from_secs(1);

pub(crate) async fn run(store: Store, node: String, hosts: Hosts, stats: Arc<Stats>) {
    let view = MovesView::start(store.clone());
    let mut changes = view.changes();
    loop {
        if tokio::time::timeout(IDLE, changes.changed())
            .await
            .is_ok_and(|r| r.is_err())
        {
            return;
        }
        let Some(moves) = view.with(|t| t.moves.clone()) else {
            continue;
        };
        if let Err(e) = tick(&store, &node, &moves, &hosts, &stats).await {
            warn!(node, error = %e, "stand-in moves: pass failed");
        }
    }
}

async fn tick(
    store: &Store,
    node: &str,
    moves: &BTreeMap<String, (MoveRecord, Revision)>,
    hosts: &Hosts,
    stats: &Stats,
) -> StoreResult<()> {
    // Migrating from here with no execution left (its answer was lost: a timeout):
    // vireod records these; the stand-in completes them.
    for (m, rev) in moves.values() {
        if m.from == node
            && m.state == MoveState::Migrating
            && resume(store, node, m.clone(), *rev, hosts).await?
        {
            bump(&stats.moves, 1);
        }
    }
    // At once, as vireod runs each move in a task of its own.
    let mut running = tokio::task::JoinSet::new();
    for (m, rev) in next_moves(moves, node, 0) {
        let (store, node, hosts) = (store.clone(), node.to_string(), hosts.clone());
        running.spawn(async move { execute(&store, &node, m, rev, &hosts).await });
    }
    while let Some(done) = running.join_next().await {
        match done {
            Ok(Ok(true)) => bump(&stats.moves, 1),
            Ok(Err(e)) => warn!(node, error = %e, "stand-in move: cluster store"),
            _ => {}
        }
    }
    if !moves.values().any(|(m, _)| m.drain_of == node) {
        return Ok(());
    }
    let (mut a, rev) = admin::read(store, node).await?;
    let unfinished = read_moves(store)
        .await?
        .values()
        .any(|(m, _)| m.drain_of == node && !m.state.finished());
    let queueing = a.drain.as_ref().is_some_and(|d| d.queueing);
    if a.state == NodeState::Draining && !unfinished && !queueing {
        a.state = NodeState::Paused;
        admin::write_if(store, node, &a, rev, vec![]).await?;
    }
    Ok(())
}

/// Completes a move left migrating, or records it failed when the VM is no longer
/// this node's or the destination is gone.
async fn resume(
    store: &Store,
    node: &str,
    mut m: MoveRecord,
    move_rev: Revision,
    hosts: &Hosts,
) -> StoreResult<bool> {
    let owner = store.get(&keys::owner_key(&m.vm)).await?;
    let owner =
        owner.and_then(|kv| Some((keys::decode::<OwnerRecord>(&kv.value)?, kv.mod_revision)));
    let dest = store.get(&keys::node_key(&m.to)).await?.map(|kv| kv.lease);
    match (owner, dest) {
        (Some((OwnerRecord::Node { node: n, .. }, token)), Some(dest)) if n == node => {
            return finish(store, node, m, token, dest, hosts).await;
        }
        // Its ownership moved (only the record of it was lost).
        (Some((OwnerRecord::Node { node: n, .. }, token)), _) if n == m.to => {
            m.state = MoveState::Moved;
            m.token_after = Some(token);
            m.error = None;
        }
        _ => {
            m.state = MoveState::Failed;
            m.error = Some("stand-in: left migrating, and no longer owned here".into());
        }
    }
    m.finished_ms = Some(keys::now_ms());
    let txn = Txn {
        when: vec![cas(keys::move_key(&m.vm), move_rev)],
        then: vec![put(keys::move_key(&m.vm), keys::encode(&m))],
        otherwise: vec![],
    };
    store.txn(txn).await?;
    Ok(m.state == MoveState::Moved)
}

fn cas(key: String, revision: Revision) -> Compare {
    Compare::ModRevision {
        key,
        op: CmpOp::Equal,
        revision,
    }
}

fn lease_is(node: &str, lease: i64) -> Compare {
    Compare::Lease {
        key: keys::node_key(node),
        op: CmpOp::Equal,
        lease,
    }
}

fn put(key: String, value: Vec<u8>) -> Op {
    Op::Put {
        key,
        value,
        lease: 0,
    }
}

/// One move, as vireod carries it out with a migration that completes at once.
/// Returns whether the VM moved; a move that cannot be made is recorded failed.
async fn execute(
    store: &Store,
    node: &str,
    mut m: MoveRecord,
    move_rev: Revision,
    hosts: &Hosts,
) -> StoreResult<bool> {
    // As vireod's executor: the few records this move checks.
    let snap = Snapshot::read_some(store, &[node, &m.to], &[&m.vm]).await?;
    let mine = snap.nodes.get(node).map(|(_, l)| *l);
    let dest = snap
        .nodes
        .get(&m.to)
        .filter(|(r, _)| r.state == NodeState::Up)
        .map(|(_, l)| *l);
    let owned = match (snap.owners.get(&m.vm), mine) {
        (Some((o @ OwnerRecord::Node { node: n, lease }, rev)), Some(l))
            if n == node && *lease == l =>
        {
            Some((o.clone(), *rev))
        }
        _ => None,
    };
    let (Some(lease), Some(dest), Some((owner, token_before))) = (mine, dest, owned) else {
        m.state = MoveState::Failed;
        m.error = Some("stand-in: not owned here, or the destination is not up".into());
        let txn = Txn {
            when: vec![cas(keys::move_key(&m.vm), move_rev)],
            then: vec![put(keys::move_key(&m.vm), keys::encode(&m))],
            otherwise: vec![],
        };
        store.txn(txn).await?;
        return Ok(false);
    };
    m.state = MoveState::Migrating;
    m.token_before = Some(token_before);
    m.started_ms = Some(keys::now_ms());
    let okey = keys::owner_key(&m.vm);
    let bumped = store
        .txn(Txn {
            when: vec![
                cas(okey.clone(), token_before),
                cas(keys::move_key(&m.vm), move_rev),
                lease_is(node, lease),
            ],
            then: vec![
                put(okey.clone(), keys::encode(&owner)),
                put(keys::move_key(&m.vm), keys::encode(&m)),
            ],
            otherwise: vec![],
        })
        .await?;
    if !bumped.succeeded {
        return Ok(false);
    }
    finish(store, node, m, bumped.revision, dest, hosts).await
}

/// The end of a move whose ownership was rewritten with token `token`: the
/// "migration" completed at once, the ownership moves to the destination (incarnation
/// `dest`) and the move is recorded.
async fn finish(
    store: &Store,
    node: &str,
    mut m: MoveRecord,
    token: Revision,
    dest: i64,
    hosts: &Hosts,
) -> StoreResult<bool> {
    let okey = keys::owner_key(&m.vm);
    // The migration completed: the VM runs on the destination, no longer here.
    let host = |n: &str| -> Option<Running> { lock(hosts).get(n).cloned() };
    if let Some(here) = host(node) {
        lock(&here).remove(&m.vm);
    }
    if let Some(there) = host(&m.to) {
        lock(&there).insert(m.vm.clone(), token);
    }
    let to = OwnerRecord::Node {
        node: m.to.clone(),
        lease: dest,
    };
    let moved = store
        .txn(Txn {
            when: vec![cas(okey.clone(), token), lease_is(&m.to, dest)],
            then: vec![put(okey, keys::encode(&to))],
            otherwise: vec![],
        })
        .await?;
    m.state = if moved.succeeded {
        MoveState::Moved
    } else {
        // The destination drops its copy; it runs here again, still owned here.
        if let Some(there) = host(&m.to) {
            lock(&there).remove(&m.vm);
        }
        if let Some(here) = host(node) {
            lock(&here).insert(m.vm.clone(), token);
        }
        MoveState::Failed
    };
    m.token_after = moved.succeeded.then_some(token);
    m.finished_ms = Some(keys::now_ms());
    store
        .put(&keys::move_key(&m.vm), keys::encode(&m), 0)
        .await?;
    Ok(moved.succeeded)
}
