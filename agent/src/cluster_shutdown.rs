//! Drain on shutdown (Hyper-V's `DrainOnShutdown`): a clustered vireod asked to stop
//! first live-migrates its clustered VMs to other nodes, as `node drain --force`
//! does, and only then leaves the cluster (stopping what stayed: VMs without a
//! place, or a drain that ran out of time). Without it every clustered VM of a node
//! being updated or rebooted would be stopped and restarted elsewhere.
//!
//! The drain is marked as the shutdown's: when the node's vireod comes back, the node
//! resumes by itself (`up`) and the VMs that drain moved fail back. A node an
//! operator drained or paused before stays paused until `node resume`.

use std::time::{Duration, Instant};

use cluster::drain::{self, AdminError};
use cluster::keys::NodeState;
use tracing::{info, warn};

use crate::cluster_node::ClusterNode;

/// Moves of a shutdown drain at once (vireoctl's default for `node drain`).
pub const CONCURRENCY: u32 = 2;

/// How often the drain's progress is read (and a refused start asked again).
const POLL: Duration = Duration::from_millis(250);

/// How long a drain that cannot start for the store's sake is tried again.
const STORE_RETRY: Duration = Duration::from_secs(10);

/// Drains `node` before it leaves and waits for the drain to end, at most `limit`.
/// Past it, the moves not started are cancelled and those migrating are given
/// `finish` more to end (a live migration is not cut halfway): what stays is stopped
/// by the leave that follows and starts elsewhere.
pub async fn drain_before_leaving(node: &ClusterNode, limit: Duration, finish: Duration) {
    // A store that does not answer once (a loaded host, an etcd election) is asked
    // again for a while: giving up at once would stop every clustered VM instead.
    let asked = Instant::now();
    let started = loop {
        match drain::drain_for_shutdown(&node.store, &node.node, CONCURRENCY).await {
            Err(e @ (AdminError::Store(_) | AdminError::Raced))
                if asked.elapsed() + POLL < limit.min(STORE_RETRY) =>
            {
                warn!(node = %node.node, error = %e, "drain on shutdown: the cluster store did not answer; asking again");
                tokio::time::sleep(POLL).await;
            }
            r => break r,
        }
    };
    match started {
        Ok(plan) => info!(
            node = %node.node,
            moves = plan.moves.len(),
            staying = plan.no_place.len(),
            "drain on shutdown: moving this node's clustered VMs away"
        ),
        // Already draining (an operator's drain): wait for it as for ours.
        Err(AdminError::WrongState {
            state: NodeState::Draining,
            ..
        }) => info!(node = %node.node, "drain on shutdown: a drain is under way; waiting for it"),
        Err(AdminError::WrongState { state, .. }) => {
            info!(node = %node.node, ?state, "drain on shutdown: nothing to drain");
            return;
        }
        Err(e) => {
            warn!(node = %node.node, error = %e, "drain on shutdown failed: the clustered VMs are stopped instead");
            return;
        }
    }
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        match cluster::admin::read(&node.store, &node.node).await {
            Ok((admin, _)) if admin.state != NodeState::Draining => {
                info!(node = %node.node, took_ms = t0.elapsed().as_millis(), state = ?admin.state, "drain on shutdown ended");
                return;
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "drain on shutdown: cannot read the node's state"),
        }
        tokio::time::sleep(POLL).await;
    }
    match drain::cancel(&node.store, &node.node).await {
        Ok(cancelled) => warn!(
            node = %node.node,
            cancelled = cancelled.len(),
            "drain on shutdown ran out of time: its moves not started are cancelled"
        ),
        Err(e) => {
            warn!(node = %node.node, error = %e, "drain on shutdown ran out of time and could not be cancelled")
        }
    }
    let t1 = Instant::now();
    while t1.elapsed() < finish && migrating(node).await {
        tokio::time::sleep(POLL).await;
    }
}

/// Whether a move of this node's drain is migrating now (or unreadable: wait).
async fn migrating(node: &ClusterNode) -> bool {
    match drain::read_moves(&node.store).await {
        Ok(moves) => moves.values().any(|(m, _)| {
            m.drain_of == node.node && m.state == cluster::keys::MoveState::Migrating
        }),
        Err(_) => true,
    }
}

/// On joining: a node paused by its own drain on shutdown is `up` again and the VMs
/// that drain moved fail back. Whether this is settled (false: try again later).
pub async fn resume_after_shutdown(node: &ClusterNode) -> bool {
    match drain::resume_after_shutdown(&node.store, &node.node, CONCURRENCY).await {
        Ok(Some(back)) => {
            info!(
                node = %node.node,
                failing_back = back.len(),
                "back after a drain on shutdown: node up, its VMs failing back"
            );
            true
        }
        Ok(None) => true,
        Err(e) => {
            warn!(node = %node.node, error = %e, "cannot resume after a drain on shutdown; trying again");
            false
        }
    }
}
