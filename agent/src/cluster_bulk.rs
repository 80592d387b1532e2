//! The API of bulk requests and of the cluster-wide migration queue
//! (`cluster::bulk`): `POST /api/v1/cluster/bulk` (migrate, start, stop or save a
//! selection of clustered VMs), `DELETE /api/v1/cluster/bulk/{id}` (cancel its
//! queued moves) and `GET /api/v1/cluster/migrations` (every move, with its request).
//! The moves are carried out by each source node's vireod (`cluster_moves`).

use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cluster::bulk::{self, BulkError, BulkRequest, Selection, Selector};
use cluster::keys::BulkOp;
use serde::Deserialize;
use tracing::info;

use crate::cluster_node::ClusterNode;
use crate::cluster_routes::{error, not_clustered};

type N = State<Option<Arc<ClusterNode>>>;

/// `POST /api/v1/cluster/bulk`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkBody {
    pub op: BulkOp,
    /// The VMs by name (or `selector`).
    #[serde(default)]
    pub names: Vec<String>,
    /// `KEY=VALUE[,KEY=VALUE]...` over priority, node and class (or `names`).
    #[serde(default)]
    pub selector: Option<String>,
    /// Migrate: a node's name, or `auto`.
    #[serde(default)]
    pub to: Option<String>,
    /// Act on the VMs that have a place; the others stay (reported).
    #[serde(default)]
    pub force: bool,
    /// Migrate: moves at once per source and per destination node (default 2).
    #[serde(default)]
    pub concurrency: Option<u32>,
}

/// The request `body` asks for, or why it is refused (400).
fn request_of(body: BulkBody) -> Result<BulkRequest, String> {
    let selection = match (body.names.is_empty(), body.selector) {
        (false, None) => {
            for n in &body.names {
                crate::model::validate_name(n).map_err(|e| format!("VM {n:?}: {e}"))?;
            }
            Selection::Names(body.names)
        }
        (true, Some(s)) => Selection::Selector(Selector::parse(&s).map_err(|e| e.to_string())?),
        _ => return Err("give either names or a selector".into()),
    };
    if let Some(to) = &body.to {
        if body.op != BulkOp::Migrate {
            return Err(format!("`to` is for migrate only, not {:?}", body.op).to_lowercase());
        }
        if to != "auto" {
            crate::model::validate_name(to).map_err(|e| format!("node {to:?}: {e}"))?;
        }
    }
    let concurrency = body
        .concurrency
        .unwrap_or(cluster::drain::DEFAULT_CONCURRENCY);
    if !(1..=64).contains(&concurrency) {
        return Err(format!("concurrency {concurrency}: expected 1..=64"));
    }
    Ok(BulkRequest {
        op: body.op,
        selection,
        to: body.to,
        force: body.force,
        concurrency,
    })
}

fn bulk_error(e: BulkError) -> Response {
    use BulkError as E;
    let status = match &e {
        E::UnknownKey(_) | E::BadSelector { .. } | E::NoDestination => StatusCode::BAD_REQUEST,
        E::UnknownVms(_) | E::NoneSelected(_) | E::UnknownNode(_) | E::UnknownRequest(_) => {
            StatusCode::NOT_FOUND
        }
        E::NoPlace { .. } | E::NotCancellable(_) | E::Raced => StatusCode::CONFLICT,
        E::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut body = serde_json::json!({ "error": e.to_string() });
    if let E::NoPlace { no_place, .. } = &e {
        body["no_place"] = reasons(no_place);
    }
    (status, Json(body)).into_response()
}

fn reasons(v: &[(String, String)]) -> serde_json::Value {
    serde_json::json!(v
        .iter()
        .map(|(vm, why)| serde_json::json!({"vm": vm, "reason": why}))
        .collect::<Vec<_>>())
}

/// `POST /api/v1/cluster/bulk`: decides and records a bulk request; answers its id,
/// its moves (migrate), the VMs acted on, skipped and left.
pub async fn request(State(node): N, body: axum::body::Bytes) -> Response {
    let Some(node) = node else {
        return not_clustered();
    };
    let parsed: BulkBody = match api::json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bulk request: {e}")),
    };
    let req = match request_of(parsed) {
        Ok(r) => r,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    match bulk::request(&node.store, &req).await {
        Ok((rec, plan)) => {
            info!(id = %rec.id, op = ?rec.op, vms = rec.vms.len(), "bulk request");
            Json(serde_json::json!({
                "id": rec.id,
                "op": rec.op,
                "vms": rec.vms,
                "moves": plan.moves.iter().map(|m| serde_json::json!({
                    "vm": m.vm, "from": m.from, "to": m.to, "priority": m.priority,
                })).collect::<Vec<_>>(),
                "skipped": reasons(&rec.skipped),
                "left": reasons(&rec.left),
            }))
            .into_response()
        }
        Err(e) => bulk_error(e),
    }
}

/// `DELETE /api/v1/cluster/bulk/{id}`: cancels a bulk migration's queued moves.
pub async fn cancel(State(node): N, UrlPath(id): UrlPath<String>) -> Response {
    let Some(node) = node else {
        return not_clustered();
    };
    match bulk::cancel(&node.store, &id).await {
        Ok(cancelled) => {
            Json(serde_json::json!({"id": id, "cancelled": cancelled})).into_response()
        }
        Err(e) => bulk_error(e),
    }
}

/// `GET /api/v1/cluster/migrations`: the cluster-wide migration queue.
pub async fn queue(State(node): N) -> Response {
    let Some(node) = node else {
        return not_clustered();
    };
    match bulk::queue(&node.store).await {
        Ok(q) => Json(q).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: serde_json::Value) -> Result<BulkRequest, String> {
        request_of(serde_json::from_value(json).map_err(|e| e.to_string())?)
    }

    #[test]
    fn a_body_names_vms_or_gives_a_selector_and_unknown_selector_keys_are_named() {
        let r = body(serde_json::json!({"op": "migrate", "selector": "priority=low", "to": "b"}))
            .unwrap();
        assert_eq!(r.concurrency, cluster::drain::DEFAULT_CONCURRENCY);
        let e = body(serde_json::json!({"op": "migrate", "selector": "prio=low", "to": "b"}))
            .unwrap_err();
        assert!(e.contains("\"prio\""), "{e}");
        for bad in [
            serde_json::json!({"op": "stop"}),
            serde_json::json!({"op": "stop", "names": ["a"], "selector": "node=b"}),
            serde_json::json!({"op": "stop", "names": ["a"], "to": "b"}),
            serde_json::json!({"op": "migrate", "names": ["../x"], "to": "b"}),
            serde_json::json!({"op": "migrate", "names": ["a"], "to": "b", "concurrency": 0}),
            serde_json::json!({"op": "reboot", "names": ["a"]}),
        ] {
            assert!(body(bad.clone()).is_err(), "{bad} accepted");
        }
    }
}
