//! `GET /api/v1/cluster/events`: the failover controller's decisions, newest first
//! (`cluster::history`: the store keeps the newest `--cluster-keep-events`).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use crate::cluster_node::ClusterNode;
use crate::cluster_routes::{error, not_clustered};

type N = State<Option<Arc<ClusterNode>>>;

/// How many events an answer holds unless `limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 100;
/// The most events one answer holds.
pub const MAX_LIMIT: usize = 10_000;

/// The query of `GET /api/v1/cluster/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// At most this many events (1..=10,000; default 100), the newest.
    #[serde(default)]
    pub limit: Option<usize>,
}

/// `GET /api/v1/cluster/events[?limit=N]`.
pub async fn list(
    State(node): N,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(node) = node else {
        return not_clustered();
    };
    let limit = match query {
        Ok(Query(q)) => q.limit.unwrap_or(DEFAULT_LIMIT),
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if !(1..=MAX_LIMIT).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit: {limit} is not between 1 and {MAX_LIMIT}"),
        );
    }
    match cluster::history::recent_events(&node.store, limit).await {
        Ok(events) => Json(serde_json::json!({ "events": events })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}
