//! The replication routes (unix socket) and their handlers: a VM's replication
//! (`/api/v1/vms/{name}/replication...`), every VM's (`/api/v1/replication`), and the
//! failovers and points of replicas on this host (`/api/v1/replicas/{vm}/...`).

use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use tracing::{info, warn};

use super::settings::yes;
use super::{error, EnableRequest, Replications};

type R = State<Arc<Replications>>;

/// The replication routes (unix socket).
pub fn router(r: Arc<Replications>) -> Router {
    Router::new()
        .route("/api/v1/replication", get(list))
        .route("/api/v1/vms/{name}/replication", get(status))
        .route("/api/v1/vms/{name}/replication", put(enable))
        .route("/api/v1/vms/{name}/replication", delete(disable))
        .route("/api/v1/vms/{name}/replication/pause", post(pause))
        .route("/api/v1/vms/{name}/replication/resume", post(resume))
        .route("/api/v1/vms/{name}/replication/bandwidth", put(bandwidth))
        .route("/api/v1/vms/{name}/replication/failover", post(failover))
        .route("/api/v1/vms/{name}/replication/reverse", post(reverse))
        .route("/api/v1/replicas/{vm}/failover", post(failover_here))
        .route("/api/v1/replicas/{vm}/points", get(points))
        .route("/api/v1/replicas/{vm}/test-failover", post(test_failover))
        .route("/api/v1/replicas/{vm}/test-failover", delete(end_test))
        .with_state(r)
}

/// 404: no such VM, or its replication is not enabled.
fn not_enabled(r: &Replications, name: &str) -> Response {
    if let Some(st) = r.failed_over_status(name) {
        // 409: no loop runs, the VM was failed over elsewhere.
        return error(StatusCode::CONFLICT, st.last_error.unwrap_or_default());
    }
    let msg = match r.sup.get(name) {
        Err(e) => e.to_string(),
        Ok(_) => format!("replication of {name:?} is not enabled"),
    };
    error(StatusCode::NOT_FOUND, msg)
}

async fn list(State(r): R) -> Response {
    Json(r.list()).into_response()
}

async fn status(State(r): R, UrlPath(name): UrlPath<String>) -> Response {
    match r.status(&name) {
        Some(s) => Json(s).into_response(),
        None => not_enabled(&r, &name),
    }
}

async fn enable(State(r): R, UrlPath(name): UrlPath<String>, body: axum::body::Bytes) -> Response {
    if r.sup.get(&name).is_err() {
        return not_enabled(&r, &name);
    }
    let req: EnableRequest = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("replication: {e}")),
    };
    match r.enable(&name, req) {
        Ok(s) => {
            info!(vm = %name, to = %s.to, "replication enabled");
            (StatusCode::OK, Json(s)).into_response()
        }
        Err((status, m)) => error(status, m),
    }
}

async fn disable(State(r): R, UrlPath(name): UrlPath<String>) -> Response {
    match r.disable(&name) {
        Some(s) => Json(s).into_response(),
        None => not_enabled(&r, &name),
    }
}

async fn pause(State(r): R, UrlPath(name): UrlPath<String>) -> Response {
    match r.set_paused(&name, true, None) {
        Some(s) => Json(s).into_response(),
        None => not_enabled(&r, &name),
    }
}

/// `PUT /api/v1/vms/{name}/replication/bandwidth` `{"mbit": N | "off" | null}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BandwidthRequest {
    mbit: serde_json::Value,
}

async fn bandwidth(
    State(r): R,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    if !r.running(&name) {
        return not_enabled(&r, &name);
    }
    let req: BandwidthRequest = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bandwidth: {e}")),
    };
    let mbit = match crate::throttle::parse_limit(&req.mbit) {
        Ok(m) => m,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    match r.set_bandwidth(&name, mbit) {
        Some(s) => Json(s).into_response(),
        None => not_enabled(&r, &name),
    }
}

async fn resume(State(r): R, UrlPath(name): UrlPath<String>) -> Response {
    match r.set_paused(&name, false, None) {
        Some(s) => Json(s).into_response(),
        None => not_enabled(&r, &name),
    }
}

/// `POST /api/v1/vms/{name}/replication/failover` `{"planned": true, "start": bool}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverRequest {
    planned: bool,
    /// Start the VM on the replica host (default true).
    #[serde(default = "yes")]
    start: bool,
}

async fn failover(
    State(r): R,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    if !r.running(&name) {
        return not_enabled(&r, &name);
    }
    let start = match serde_json::from_slice::<FailoverRequest>(&body) {
        Ok(FailoverRequest {
            planned: true,
            start,
        }) => start,
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "here only a planned failover ({\"planned\": true}); an unplanned one is asked of the replica's vireod (POST /api/v1/replicas/{vm}/failover)".into(),
            )
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("failover: {e}")),
    };
    match r.planned_failover(&name, start).await {
        Ok(v) => Json(v).into_response(),
        Err((status, m)) => error(status, m),
    }
}

/// `POST /api/v1/vms/{name}/replication/reverse` `{"to": "HOST:PORT", ...}`: a VM
/// failed over to this host is replicated back to its old primary
/// ([`crate::replica_reverse`]).
async fn reverse(State(r): R, UrlPath(name): UrlPath<String>, body: axum::body::Bytes) -> Response {
    if r.sup.get(&name).is_err() {
        return not_enabled(&r, &name);
    }
    let req: crate::replica_reverse::ReverseRequest = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("reverse: {e}")),
    };
    match crate::replica_reverse::reverse(&r, &name, req).await {
        Ok(s) => (StatusCode::OK, Json(s)).into_response(),
        Err((status, m)) => {
            warn!(vm = %name, error = %m, "reverse replication refused");
            error(status, m)
        }
    }
}

/// `latest` (None) or a kept point's id (a number, or a string of digits).
fn point_id(v: &serde_json::Value) -> Result<Option<u64>, String> {
    match v {
        serde_json::Value::String(s) if s == "latest" => Ok(None),
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => s
            .parse()
            .map(Some)
            .map_err(|_| format!("point {s:?}: \"latest\" or a recovery point's id")),
        serde_json::Value::Number(n) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("point {n}: not a recovery point's id")),
        other => Err(format!(
            "point {other}: \"latest\" or a recovery point's id"
        )),
    }
}

/// `POST /api/v1/replicas/{vm}/failover` `{"point": "latest"|ID, "primary": NAME?}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverHereRequest {
    point: serde_json::Value,
    #[serde(default)]
    primary: Option<String>,
    /// Start the VM (default true).
    #[serde(default = "yes")]
    start: bool,
}

async fn failover_here(
    State(r): R,
    UrlPath(vm): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let req: FailoverHereRequest = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("failover: {e}")),
    };
    if req.point.is_null() {
        return error(
            StatusCode::BAD_REQUEST,
            "failover: name the point (\"latest\" or an id)".into(),
        );
    }
    let point = match point_id(&req.point) {
        Ok(p) => p,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    match r
        .failover_here(&vm, req.primary.as_deref(), point, req.start)
        .await
    {
        Ok(v) => Json(v).into_response(),
        Err(resp) => resp,
    }
}

#[derive(Debug, Default, Deserialize)]
struct PrimaryQuery {
    primary: Option<String>,
}

/// `GET /api/v1/replicas/{vm}/points[?primary=NAME]`: the kept recovery points.
async fn points(
    State(r): R,
    UrlPath(vm): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<PrimaryQuery>,
) -> Response {
    match r.points(&vm, q.primary.as_deref()).await {
        Ok(v) => Json(v).into_response(),
        Err(resp) => resp,
    }
}

/// `POST /api/v1/replicas/{vm}/test-failover` `{"point": "latest"|ID?, "primary"?, "start"?}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFailoverRequest {
    #[serde(default)]
    point: serde_json::Value,
    #[serde(default)]
    primary: Option<String>,
    #[serde(default = "yes")]
    start: bool,
}

async fn test_failover(
    State(r): R,
    UrlPath(vm): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let req: TestFailoverRequest = if body.is_empty() {
        TestFailoverRequest {
            point: serde_json::Value::Null,
            primary: None,
            start: true,
        }
    } else {
        match serde_json::from_slice(&body) {
            Ok(q) => q,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("test failover: {e}")),
        }
    };
    let point = match point_id(&req.point) {
        Ok(p) => p,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let (server, primary) = match r.replica_of(&vm, req.primary.as_deref()) {
        Ok(x) => x,
        Err(resp) => return *resp,
    };
    match crate::replica_failover::test_fail_over(&r.sup, &server, &primary, &vm, point, req.start)
        .await
    {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `DELETE /api/v1/replicas/{vm}/test-failover[?primary=NAME]`: the test VM and its
/// disks are removed.
async fn end_test(
    State(r): R,
    UrlPath(vm): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<PrimaryQuery>,
) -> Response {
    let (server, primary) = match r.replica_of(&vm, q.primary.as_deref()) {
        Ok(x) => x,
        Err(resp) => return *resp,
    };
    match crate::replica_failover::stop_test_failover(&r.sup, &server, &primary, &vm).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
