//! The cluster's REST routes on a node (`/api/v1/cluster/...`): the cluster's status and
//! list, defining clustered VMs, a node's status, drain, resume and release, and the
//! routes of the cluster's other modules (updates, validation, bulk requests, the
//! migration queue, events, saved state) mounted in one router.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use cluster::failover::{define_vm, Snapshot};
use cluster::inventory::{self, ViewError};
use cluster::keys::{self, NodeState, Resources};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use vireo_util::cpu_features::CpuFeatures;

use crate::cluster_bulk as bulk;
use crate::cluster_update as update;
use crate::cluster_validate::route as validate;

use crate::cluster_node::{ClusterNode, ClusteredVmRequest};

/// Routes: `GET /api/v1/cluster`, `PUT /api/v1/cluster/vms/{name}` (and its saved
/// state's discard), a node's
/// status, drain, resume and release, updates, validation, bulk requests, the
/// migration queue and the failover events.
pub fn router(node: Option<Arc<ClusterNode>>) -> Router {
    Router::new()
        .route("/api/v1/cluster", get(status))
        .route("/api/v1/cluster/vms/{name}", put(define))
        .route(
            "/api/v1/cluster/vms/{name}/saved-state",
            delete(crate::cluster_save::discard),
        )
        .route("/api/v1/cluster/nodes/{node}", get(node_status))
        .route(
            "/api/v1/cluster/nodes/{node}/drain",
            post(drain).delete(cancel_drain),
        )
        .route("/api/v1/cluster/nodes/{node}/resume", post(resume))
        .route("/api/v1/cluster/nodes/{node}/release", post(release))
        .route(
            "/api/v1/cluster/update",
            get(update::status).post(update::start),
        )
        .route("/api/v1/cluster/validate", get(validate))
        .route("/api/v1/cluster/bulk", post(bulk::request))
        .route("/api/v1/cluster/bulk/{id}", delete(bulk::cancel))
        .route("/api/v1/cluster/migrations", get(bulk::queue))
        .route("/api/v1/cluster/events", get(crate::cluster_events::list))
        .with_state(node)
}

/// `POST /api/v1/cluster/nodes/{node}/drain`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainRequest {
    /// Drain even if some VMs have no place (they stay on the node).
    #[serde(default)]
    force: bool,
    /// Moves at once (default 2).
    #[serde(default)]
    concurrency: Option<u32>,
}

/// `POST /api/v1/cluster/nodes/{node}/resume`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeRequest {
    /// Move the VMs the drain moved back here.
    #[serde(default)]
    failback: bool,
    #[serde(default)]
    concurrency: Option<u32>,
}

/// An optional JSON body (empty: the defaults).
fn optional_body<T: for<'de> Deserialize<'de> + Default>(
    what: &str,
    body: &[u8],
) -> Result<T, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| format!("{what}: {e}"))
}

fn admin_error(e: cluster::drain::AdminError) -> Response {
    use cluster::drain::AdminError as E;
    let status = match &e {
        E::UnknownNode(_) => StatusCode::NOT_FOUND,
        E::WrongState { .. } | E::NoPlace { .. } | E::Raced => StatusCode::CONFLICT,
        E::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut body = serde_json::json!({ "error": e.to_string() });
    if let E::NoPlace { no_place, .. } = &e {
        body["no_place"] = serde_json::json!(no_place
            .iter()
            .map(|(vm, why)| serde_json::json!({"vm": vm, "reason": why}))
            .collect::<Vec<_>>());
    }
    (status, Json(body)).into_response()
}

fn moves_json(moves: &[cluster::drain::PlannedMove]) -> serde_json::Value {
    serde_json::json!(moves
        .iter()
        .map(|m| serde_json::json!({"vm": m.vm, "to": m.to, "priority": m.priority}))
        .collect::<Vec<_>>())
}

fn node_name(node: &str) -> Result<(), String> {
    crate::model::validate_name(node).map_err(|e| e.to_string())
}

async fn drain(
    State(node): N,
    UrlPath(target): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(node) = node else {
        return not_clustered();
    };
    if let Err(m) = node_name(&target) {
        return error(StatusCode::BAD_REQUEST, m);
    }
    let req: DrainRequest = match optional_body("drain", &body) {
        Ok(r) => r,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let concurrency = req
        .concurrency
        .unwrap_or(cluster::drain::DEFAULT_CONCURRENCY);
    if !(1..=64).contains(&concurrency) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("concurrency {concurrency}: expected 1..=64"),
        );
    }
    match cluster::drain::drain(&node.store, &target, req.force, concurrency).await {
        Ok(plan) => {
            info!(node = %target, moves = plan.moves.len(), left = plan.no_place.len(), "drain started");
            Json(serde_json::json!({
                "node": target,
                "moves": moves_json(&plan.moves),
                "left": plan.no_place.iter().map(|(vm, why)| serde_json::json!({"vm": vm, "reason": why})).collect::<Vec<_>>(),
            }))
            .into_response()
        }
        Err(e) => admin_error(e),
    }
}

/// `DELETE /api/v1/cluster/nodes/{node}/drain`: cancels a running drain.
async fn cancel_drain(State(node): N, UrlPath(target): UrlPath<String>) -> Response {
    let Some(node) = node else {
        return not_clustered();
    };
    if let Err(m) = node_name(&target) {
        return error(StatusCode::BAD_REQUEST, m);
    }
    match cluster::drain::cancel(&node.store, &target).await {
        Ok(cancelled) => {
            info!(node = %target, cancelled = cancelled.len(), "drain cancelled");
            Json(
                serde_json::json!({"node": target, "state": NodeState::Up, "cancelled": cancelled}),
            )
            .into_response()
        }
        Err(e) => admin_error(e),
    }
}

async fn resume(
    State(node): N,
    UrlPath(target): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(node) = node else {
        return not_clustered();
    };
    if let Err(m) = node_name(&target) {
        return error(StatusCode::BAD_REQUEST, m);
    }
    let req: ResumeRequest = match optional_body("resume", &body) {
        Ok(r) => r,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let concurrency = req
        .concurrency
        .unwrap_or(cluster::drain::DEFAULT_CONCURRENCY)
        .clamp(1, 64);
    match cluster::drain::resume(&node.store, &target, req.failback, concurrency).await {
        Ok(back) => {
            info!(node = %target, failback = back.len(), "node resumed");
            Json(serde_json::json!({"node": target, "state": NodeState::Up, "failback": moves_json(&back)}))
                .into_response()
        }
        Err(e) => admin_error(e),
    }
}

async fn release(State(node): N, UrlPath(target): UrlPath<String>) -> Response {
    let Some(node) = node else {
        return not_clustered();
    };
    if let Err(m) = node_name(&target) {
        return error(StatusCode::BAD_REQUEST, m);
    }
    match cluster::drain::release(&node.store, &target).await {
        Ok(()) => {
            info!(node = %target, "node released from quarantine");
            Json(serde_json::json!({"node": target, "state": NodeState::Up})).into_response()
        }
        Err(e) => admin_error(e),
    }
}

/// A node's state (`down` when it has no live registration), departures, last drain
/// and its moves (those of its drain and fail-back).
async fn node_status(State(node): N, UrlPath(target): UrlPath<String>) -> Response {
    let Some(node) = node else {
        return not_clustered();
    };
    if let Err(m) = node_name(&target) {
        return error(StatusCode::BAD_REQUEST, m);
    }
    let read = async {
        let snap = Snapshot::read(&node.store).await?;
        let moves = cluster::drain::read_moves(&node.store).await?;
        Ok::<_, cluster::StoreError>((snap, moves))
    };
    let (snap, moves) = match read.await {
        Ok(r) => r,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let (admin, _) = snap.admin.get(&target).cloned().unwrap_or_default();
    let state = match snap.nodes.get(&target) {
        Some((r, _)) => r.state,
        None if snap.admin.contains_key(&target) => NodeState::Down,
        None => {
            return error(
                StatusCode::NOT_FOUND,
                format!("node {target} is not in the cluster"),
            )
        }
    };
    let mine: Vec<_> = moves
        .values()
        .filter(|(m, _)| m.drain_of == target)
        .map(|(m, _)| m)
        .collect();
    let count = |st: keys::MoveState| mine.iter().filter(|m| m.state == st).count();
    Json(serde_json::json!({
        "name": target,
        "state": state,
        "owned": cluster::drain::owned_by(&snap, &target),
        "departures": admin.departures,
        "drain": admin.drain,
        "progress": {
            "queued": count(keys::MoveState::Queued),
            "migrating": count(keys::MoveState::Migrating),
            "moved": count(keys::MoveState::Moved),
            "failed": count(keys::MoveState::Failed),
        },
        "moves": mine,
    }))
    .into_response()
}

type N = State<Option<Arc<ClusterNode>>>;

pub(crate) fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(serde_json::json!({ "error": msg }))).into_response()
}

pub(crate) fn not_clustered() -> Response {
    error(
        StatusCode::CONFLICT,
        "this vireod is not a cluster node (start it with --cluster-etcd and --node-name)".into(),
    )
}

/// `GET /api/v1/cluster`'s query: how current the list must be.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// The view as it is, without asking etcd (it lags etcd by the watch's delay).
    #[serde(default)]
    pub stale: bool,
    /// At least this revision (a write's, e.g. `PUT /api/v1/cluster/vms/{name}`'s
    /// `revision`: read-your-writes), without asking etcd.
    #[serde(default)]
    pub min_revision: Option<i64>,
}

/// How long a list waits for the view to reach the revision it needs before it reads
/// etcd itself.
const LIST_WAIT: Duration = Duration::from_secs(1);

/// Nodes and clustered VMs, from this node's inventory view. By default the list is
/// linearizable: the view first reaches etcd's current revision (one count-only
/// read); `?min_revision=N` waits for N only, `?stale=true` for nothing. The answer
/// says the revision it is (`revision`) and where it came from (`source`: `view`, or
/// `etcd` when the view could not reach the revision in time and the four prefixes
/// were read directly, at one revision).
async fn status(
    State(node): N,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(node) = node else {
        return not_clustered();
    };
    let q = match query {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let ready = match (q.stale, q.min_revision) {
        (true, _) => match node.view.revision() {
            Some(_) => Ok(()),
            None => Err(ViewError::NotReady),
        },
        (false, Some(at)) => node.view.wait_for(at, LIST_WAIT).await,
        (false, None) => node.view.catch_up(&node.store, LIST_WAIT).await.map(drop),
    };
    let listed = match ready {
        Ok(()) => node.view.with(|inv| {
            list_json(
                &node.node,
                "view",
                &inventory::list(&inv.snapshot, inv.revision),
            )
        }),
        Err(e) => {
            warn!(error = %e, "cluster list: reading etcd instead of the inventory view");
            None
        }
    };
    let body = match listed {
        Some(b) => b,
        None => match Snapshot::read_consistent(&node.store).await {
            Ok((snap, at)) => list_json(&node.node, "etcd", &inventory::list(&snap, at)),
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        },
    };
    match body {
        Ok(b) => ([(axum::http::header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The list's JSON: `{"node", "source", "revision", "nodes", "vms"}`.
fn list_json(
    me: &str,
    source: &str,
    list: &inventory::ClusterList<'_>,
) -> Result<Vec<u8>, serde_json::Error> {
    #[derive(Serialize)]
    struct Listed<'a> {
        node: &'a str,
        source: &'a str,
        #[serde(flatten)]
        list: &'a inventory::ClusterList<'a>,
    }
    serde_json::to_vec(&Listed {
        node: me,
        source,
        list,
    })
}

/// The CPU features a VM in processor compatibility mode gets: those every live node
/// that published its own has (`NodeRecord::cpuid`), within `asked` (the
/// configuration's `cpus.features`) if given. Refused when no node published any, or
/// when the set lacks the x86-64 baseline.
pub fn compatibility_set(
    snap: &Snapshot,
    asked: Option<&CpuFeatures>,
) -> Result<CpuFeatures, String> {
    let sets: Vec<CpuFeatures> = snap
        .nodes
        .iter()
        .filter_map(|(n, (r, _))| {
            let f = r.cpuid.as_deref()?;
            CpuFeatures::parse(f)
                .map_err(
                    |e| warn!(node = %n, error = %e, "a node's CPU fingerprint does not parse"),
                )
                .ok()
        })
        .collect();
    let common = CpuFeatures::common(&sets).ok_or(
        "processor compatibility: no live node published its CPU features (a node needs /dev/kvm)",
    )?;
    let set = match asked {
        Some(a) => a.intersect(&common),
        None => common,
    };
    // What a VM's mask must keep (the x86-64 baseline).
    CpuFeatures::parse_mask(&set.to_string())
        .map_err(|e| format!("processor compatibility: the nodes' common set: {e}"))
}

async fn define(
    State(node): N,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(node) = node else {
        return not_clustered();
    };
    if let Err(e) = crate::model::validate_name(&name) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let req: ClusteredVmRequest = match api::json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("clustered VM: {e}")),
    };
    // Checked as a local definition would be (paths beneath the storage roots).
    if let Err(e) = req.definition.validate() {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let mut definition = req.definition;
    if req.cpu_compat {
        let snap = match Snapshot::read(&node.store).await {
            Ok(s) => s,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        };
        match compatibility_set(&snap, definition.config.cpus.features.as_ref()) {
            Ok(set) => definition.config.cpus.features = Some(set),
            Err(why) => return error(StatusCode::BAD_REQUEST, format!("{name}: {why}")),
        }
    }
    let c = &definition.config;
    let def = keys::VmDefinition {
        name: name.clone(),
        priority: req.priority,
        needs: Resources {
            memory_mib: c.memory.size >> 20,
            vcpus: u32::from(c.cpus.boot),
        },
        preferred_owners: req.preferred_owners,
        possible_owners: req.possible_owners,
        anti_affinity: req.anti_affinity,
        config: match serde_json::to_value(&definition) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        },
        cpu_features: c.cpus.features.as_ref().map(ToString::to_string),
    };
    match define_vm(&node.store, &def, req.start).await {
        // `revision`: a `GET /api/v1/cluster?min_revision=` at it shows the VM.
        Ok(revision) => Json(serde_json::json!({
            "name": name,
            "priority": def.priority,
            "needs": def.needs,
            "cpu_features": def.cpu_features,
            "revision": revision,
        }))
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::keys::NodeRecord;

    const OLD: &str = "1.0:0000000000000000000000010700a371,7.0:00000000000000010000000000000000,80000001.0:00000000000000000000000020100800";
    const NEW: &str = "1.0:0000000000000000100000010700a371,7.0:00000000000100010000000000000000,80000001.0:00000000000000000000000020100800";

    fn snap(fingerprints: &[Option<&str>]) -> Snapshot {
        let mut s = Snapshot::default();
        for (i, f) in fingerprints.iter().enumerate() {
            let name = format!("n{i}");
            let rec = NodeRecord {
                name: name.clone(),
                version: "t".into(),
                capacity: Resources {
                    memory_mib: 1024,
                    vcpus: 4,
                },
                cpu_features: vec![],
                cpuid: f.map(String::from),
                state: NodeState::Up,
                peer_url: None,
            };
            s.nodes.insert(name, (rec, 1));
        }
        s
    }

    /// The set is what every node that published one has, within the VM's own mask;
    /// nodes without a fingerprint do not count; none at all, or a set without the
    /// x86-64 baseline, is refused with one line.
    #[test]
    fn the_compatibility_set_is_the_nodes_common_features_within_the_vms_own() {
        let set = compatibility_set(&snap(&[Some(NEW), Some(OLD), None]), None).unwrap();
        assert_eq!(set.to_string(), OLD);
        let asked = CpuFeatures::parse(
            "1.0:0000000000000000000000000700a371,80000001.0:00000000000000000000000020100800",
        )
        .unwrap();
        let set = compatibility_set(&snap(&[Some(NEW), Some(NEW)]), Some(&asked)).unwrap();
        assert_eq!(set, asked);
        let e = compatibility_set(&snap(&[None]), None).unwrap_err();
        assert!(e.contains("no live node published"), "{e}");
        let bare = "1.0:0000000000000000000000000000a371";
        let e = compatibility_set(&snap(&[Some(NEW), Some(bare)]), None).unwrap_err();
        assert!(e.contains("baseline") && !e.contains('\n'), "{e}");
    }
}
