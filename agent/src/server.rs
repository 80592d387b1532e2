//! vireod's REST API: axum on a unix socket (mode 0666; who may do what is
//! [`crate::authz`]'s decision). JSON in and out; every error
//! is `{"error": "..."}` with a 4xx status for what the caller can fix.

use std::collections::HashMap;
use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;

use crate::model::{IncomingRequest, MigrateRequest, VmDefinition};
use crate::supervisor::Supervisor;
use crate::{error_chain, AgentError};

type S = State<Arc<Supervisor>>;
type Q = Query<HashMap<String, String>>;

/// Binds `path` (a stale socket nobody listens on is replaced; a live one is an error).
/// Mode 0666: any local user may connect and is then told by [`crate::authz`] what
/// their uid may do (a 403 naming it); the file mode could admit only one group.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, AgentError> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(AgentError::io(
                "socket in use by another vireod",
                path,
                std::io::Error::from(std::io::ErrorKind::AddrInUse),
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| AgentError::io("cannot bind", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| AgentError::io("cannot set permissions of", path, e))?;
    l.set_nonblocking(true)
        .map_err(|e| AgentError::io("cannot bind", path, e))?;
    tokio::net::UnixListener::from_std(l).map_err(|e| AgentError::io("cannot bind", path, e))
}

/// The routes; [`crate::OPENAPI_YAML`] documents exactly these.
pub fn router(sup: Arc<Supervisor>) -> Router {
    Router::new()
        .route("/api/v1/host.info", get(host_info))
        .route("/api/v1/switches", get(switches))
        .route("/api/v1/openapi.yaml", get(openapi))
        .route("/api/v1/events", get(events))
        .route("/api/v1/export", get(export))
        .route("/api/v1/vms", get(list))
        .route(
            "/api/v1/vms/{name}",
            put(define).get(info).delete(delete_vm),
        )
        .route("/api/v1/vms/{name}/definition", put(set_definition))
        .route("/api/v1/vms/{name}/start", put(start))
        .route("/api/v1/vms/{name}/stop", put(stop))
        .route("/api/v1/vms/{name}/shutdown", put(shutdown))
        .route("/api/v1/vms/{name}/reset", put(reset))
        .route("/api/v1/vms/{name}/kill", put(kill))
        .route("/api/v1/vms/{name}/pause", put(pause))
        .route("/api/v1/vms/{name}/resume", put(resume))
        .route("/api/v1/vms/{name}/save", put(save))
        .route(
            "/api/v1/vms/{name}/saved-state",
            delete(discard_saved_state),
        )
        .route("/api/v1/vms/{name}/migrate", put(migrate))
        .route("/api/v1/vms/{name}/memory", put(resize_memory))
        .route("/api/v1/migrations", get(migrations))
        .route("/api/v1/migrations/incoming", post(incoming))
        .route("/api/v1/migrations/{id}", get(migration).delete(cancel))
        .route("/api/v1/vms/{name}/metrics", get(metrics))
        .route("/api/v1/vms/{name}/metrics/reset", put(metrics_reset))
        .route("/api/v1/vms/{name}/exits", get(exits))
        .route("/api/v1/vms/{name}/serial", get(serial).post(serial_input))
        .route("/api/v1/vms/{name}/guest-command", post(guest_command))
        .route("/api/v1/audit", get(crate::audit::list))
        .route("/metrics", get(prometheus))
        .fallback(|| async { error(404, "no such API endpoint".into()) })
        .with_state(sup)
}

/// An error answer: `status` with `{"error": message}`.
pub(crate) fn error(status: u16, message: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn reply<T: serde::Serialize>(r: Result<T, AgentError>) -> Response {
    match r {
        Ok(v) => (StatusCode::OK, Json(v)).into_response(),
        Err(e) => error(e.status(), error_chain(&e)),
    }
}

fn number(q: &Q, key: &str) -> Result<Option<u64>, Box<Response>> {
    match q.get(key) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            Box::new(error(
                400,
                format!("query parameter {key}={v:?} is not a number"),
            ))
        }),
    }
}

async fn host_info(State(s): S) -> Response {
    (StatusCode::OK, Json(s.host_info())).into_response()
}

async fn switches(State(s): S) -> Response {
    (StatusCode::OK, Json(s.switches())).into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/yaml")],
        crate::OPENAPI_YAML,
    )
        .into_response()
}

async fn list(State(s): S) -> Response {
    (StatusCode::OK, Json(s.list())).into_response()
}

async fn export(State(s): S) -> Response {
    (StatusCode::OK, Json(s.export())).into_response()
}

async fn define(State(s): S, UrlPath(name): UrlPath<String>, body: Bytes) -> Response {
    let def: VmDefinition = match api::json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => return error(400, format!("invalid VM definition: {e}")),
    };
    match s.define(&name, def) {
        Ok(st) => (StatusCode::CREATED, Json(st)).into_response(),
        Err(e) => error(e.status(), error_chain(&e)),
    }
}

/// A changed definition for a defined VM (`vireoctl vm set`, `vm edit`).
async fn set_definition(State(s): S, UrlPath(name): UrlPath<String>, b: Bytes) -> Response {
    // An unknown VM is 404 whatever the body.
    if let Err(e) = s.get(&name) {
        return error(e.status(), error_chain(&e));
    }
    let def: VmDefinition = match body("VM definition", &b) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    reply(s.set_definition(&name, def))
}

async fn info(State(s): S, UrlPath(name): UrlPath<String>) -> Response {
    reply(s.get(&name))
}

async fn delete_vm(State(s): S, UrlPath(name): UrlPath<String>) -> Response {
    match s.delete(&name) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(e.status(), error_chain(&e)),
    }
}

async fn start(State(s): S, UrlPath(name): UrlPath<String>) -> Response {
    reply(s.start(&name).await)
}

async fn stop(State(s): S, UrlPath(name): UrlPath<String>, q: Q) -> Response {
    let timeout = match number(&q, "timeout_s") {
        Ok(t) => t.map(Duration::from_secs),
        Err(r) => return *r,
    };
    reply(s.stop(&name, timeout).await)
}

async fn shutdown(State(s): S, UrlPath(name): UrlPath<String>, q: Q) -> Response {
    let timeout = match number(&q, "timeout_s") {
        Ok(t) => t.map(Duration::from_secs),
        Err(r) => return *r,
    };
    reply(s.shutdown(&name, timeout).await)
}

async fn reset(State(s): S, UrlPath(name): UrlPath<String>) -> Response {
    reply(s.reset(&name).await)
}

async fn kill(State(s): S, UrlPath(name): UrlPath<String>) -> Response {
    reply(s.kill(&name).await)
}

async fn pause(State(s): S, UrlPath(name): UrlPath<String>) -> Response {
    reply(s.pause(&name).await)
}

async fn resume(State(s): S, UrlPath(name): UrlPath<String>) -> Response {
    reply(s.resume(&name).await)
}

async fn save(State(s): S, UrlPath(name): UrlPath<String>) -> Response {
    reply(s.save(&name).await)
}

async fn discard_saved_state(State(s): S, UrlPath(name): UrlPath<String>) -> Response {
    reply(s.discard_saved_state(&name))
}

/// Parses a JSON body, or answers 400 with what is wrong.
fn body<T: serde::de::DeserializeOwned>(what: &str, body: &Bytes) -> Result<T, Box<Response>> {
    api::json::from_slice(body).map_err(|e| Box::new(error(400, format!("invalid {what}: {e}"))))
}

async fn migrate(State(s): S, UrlPath(name): UrlPath<String>, b: Bytes) -> Response {
    // An unknown VM is 404 whatever the body.
    if let Err(e) = s.get(&name) {
        return error(e.status(), error_chain(&e));
    }
    let req: MigrateRequest = match body("migration request", &b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    match s.migrate(&name, req) {
        Ok(rec) => (StatusCode::ACCEPTED, Json(rec)).into_response(),
        Err(e) => error(e.status(), error_chain(&e)),
    }
}

/// A running VM's memory now (`vireoctl vm resize NAME --memory SIZE`).
async fn resize_memory(State(s): S, UrlPath(name): UrlPath<String>, b: Bytes) -> Response {
    // An unknown VM is 404 whatever the body.
    if let Err(e) = s.get(&name) {
        return error(e.status(), error_chain(&e));
    }
    let req: crate::model::MemoryResize = match body("memory resize", &b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    reply(s.resize_memory(&name, req.memory).await)
}

async fn migrations(State(s): S) -> Response {
    (StatusCode::OK, Json(s.migrations())).into_response()
}

async fn migration(State(s): S, UrlPath(id): UrlPath<String>) -> Response {
    reply(s.migration(&id))
}

async fn cancel(State(s): S, UrlPath(id): UrlPath<String>) -> Response {
    reply(s.cancel_migration(&id))
}

async fn incoming(State(s): S, b: Bytes) -> Response {
    let req: IncomingRequest = match body("incoming migration request", &b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    match s.incoming(req, None).await {
        Ok(rec) => (StatusCode::CREATED, Json(rec)).into_response(),
        Err(e) => error(e.status(), error_chain(&e)),
    }
}

async fn metrics(State(s): S, UrlPath(name): UrlPath<String>) -> Response {
    let r = s.inventory().metering(&name);
    reply(r.and_then(|m| m.ok_or(AgentError::UnknownVm(name))))
}

async fn metrics_reset(State(s): S, UrlPath(name): UrlPath<String>) -> Response {
    let r = s.inventory().reset_metering(&name, crate::now_ms());
    match r {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(404, AgentError::UnknownVm(name).to_string()),
        Err(e) => error(e.status(), error_chain(&e)),
    }
}

async fn exits(State(s): S, UrlPath(name): UrlPath<String>, q: Q) -> Response {
    match number(&q, "limit") {
        Ok(l) => reply(s.exits(&name, l.unwrap_or(20).min(1000) as usize)),
        Err(r) => *r,
    }
}

async fn serial(State(s): S, UrlPath(name): UrlPath<String>, q: Q) -> Response {
    match number(&q, "lines") {
        Ok(l) => match s.serial_tail(&name, l.unwrap_or(100).min(10_000) as usize) {
            Ok(lines) => {
                let mut text = lines.join("\n");
                if !text.is_empty() {
                    text.push('\n');
                }
                ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
            }
            Err(e) => error(e.status(), error_chain(&e)),
        },
        Err(r) => *r,
    }
}

/// One command to the guest's agent (`vm.guest-command` of its VMM): the guest's
/// reply, or the VMM's refusal with its status (504: the guest did not answer).
async fn guest_command(State(s): S, UrlPath(name): UrlPath<String>, b: Bytes) -> Response {
    if let Err(e) = s.get(&name) {
        return error(e.status(), error_chain(&e));
    }
    let req: api::GuestCommandRequest = match body("guest command", &b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    match s.guest_command(&name, &req).await {
        Ok((status, reply)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, Json(reply)).into_response()
        }
        Err(e) => error(e.status(), error_chain(&e)),
    }
}

/// Input for the guest's serial port: the raw body bytes.
async fn serial_input(State(s): S, UrlPath(name): UrlPath<String>, b: Bytes) -> Response {
    reply(
        s.serial_input(&name, &b)
            .await
            .map(|sent| serde_json::json!({"sent": sent, "of": b.len()})),
    )
}

async fn prometheus(State(s): S) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metering::prometheus(&s),
    )
        .into_response()
}

/// Server-sent events: one `data:` line of JSON per state change (`?vm=NAME` filters).
async fn events(State(s): S, q: Q) -> Response {
    let only = q.get("vm").cloned();
    let stream = BroadcastStream::new(s.subscribe()).filter_map(move |e| {
        let e = e.ok()?;
        if only.as_ref().is_some_and(|v| *v != e.vm) {
            return None;
        }
        let data = serde_json::to_string(&e).ok()?;
        Some(Ok::<_, Infallible>(
            SseEvent::default()
                .event(e.event.clone())
                .id(e.seq.to_string())
                .data(data),
        ))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
