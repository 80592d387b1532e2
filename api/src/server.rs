//! The HTTP/1.1 server on a unix socket (axum on a current-thread tokio runtime in its
//! own thread). Routes follow Cloud Hypervisor's names.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use tokio::sync::oneshot;

use crate::types::{
    file_url_path, ApiError, ApiRequest, ApiResponse, GuestCommandRequest, MigrateDiskRequest,
    ReceiveMigrationRequest, ReplicaCutRequest, ResizeRequest, RestoreRequest,
    SendMigrationRequest, SnapshotRequest, VmAction, WriteLease,
};
use crate::VmConfig;

/// How long in-flight requests may take once the server is asked to stop.
const GRACE: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("API socket {path} is in use by a running process")]
    InUse { path: String },
    #[error("cannot create API socket {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the API thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Hands an API request to the control loop; false when the loop is gone.
pub type Dispatch = std::sync::Arc<dyn Fn(ApiRequest) -> bool + Send + Sync>;

#[derive(Clone)]
struct AppState {
    dispatch: Dispatch,
}

/// The running server. [`ServerHandle::shutdown`] (or drop) stops accepting, lets
/// in-flight responses finish, and removes the socket.
pub struct ServerHandle {
    pub path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // On the VMM's file thread once it has one.
        let path = self.path.clone();
        let _ = confine::broker::run(confine::broker::FileOp::RemoveFile, move || {
            std::fs::remove_file(path)
        });
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Binds `path` (mode 0600; a stale socket nobody listens on is replaced) and serves
/// the per-VM API, forwarding each request through `dispatch`.
/// `on_thread_start` runs first on the server's thread (the VMM installs its seccomp
/// filter there).
pub fn serve(
    path: &Path,
    dispatch: Dispatch,
    on_thread_start: Box<dyn FnOnce() + Send>,
) -> Result<ServerHandle, ServerError> {
    let p = path.display().to_string();
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse { path: p });
        }
        let _ = std::fs::remove_file(path);
    }
    let std_listener =
        std::os::unix::net::UnixListener::bind(path).map_err(|source| ServerError::Bind {
            path: p.clone(),
            source,
        })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ServerError::Bind {
            path: p.clone(),
            source,
        }
    })?;
    std_listener
        .set_nonblocking(true)
        .map_err(|source| ServerError::Bind {
            path: p.clone(),
            source,
        })?;
    let state = AppState { dispatch };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("vireo-api".into())
        .spawn(move || {
            on_thread_start();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the API runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot use the API socket");
                        return;
                    }
                };
                let (grace_tx, grace_rx) = oneshot::channel::<()>();
                let serve = axum::serve(listener, router(state)).with_graceful_shutdown(async {
                    let _ = grace_rx.await;
                });
                let task = tokio::spawn(async move {
                    if let Err(e) = serve.await {
                        tracing::error!(error = %e, "API server stopped");
                    }
                });
                let _ = stop_rx.await;
                let _ = grace_tx.send(());
                // In-flight responses get a bounded time to finish.
                let _ = tokio::time::timeout(GRACE, task).await;
            });
        })
        .map_err(ServerError::Thread)?;
    Ok(ServerHandle {
        path: path.to_path_buf(),
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/vmm.ping", get(|s| action(s, VmAction::Ping)))
        .route(
            "/api/v1/vmm.shutdown",
            put(|s| action(s, VmAction::VmmShutdown)),
        )
        .route("/api/v1/vm.create", put(create))
        .route("/api/v1/vm.boot", put(|s| action(s, VmAction::Boot)))
        .route("/api/v1/vm.pause", put(|s| action(s, VmAction::Pause)))
        .route("/api/v1/vm.resume", put(|s| action(s, VmAction::Resume)))
        .route(
            "/api/v1/vm.shutdown",
            put(|s| action(s, VmAction::Shutdown)),
        )
        .route("/api/v1/vm.reboot", put(|s| action(s, VmAction::Reboot)))
        .route(
            "/api/v1/vm.power-button",
            put(|s| action(s, VmAction::PowerButton)),
        )
        .route("/api/v1/vm.snapshot", put(snapshot))
        .route("/api/v1/vm.restore", put(restore))
        .route("/api/v1/vm.send-migration", put(send_migration))
        .route("/api/v1/vm.migrate-disk", put(migrate_disk))
        .route("/api/v1/vm.resize", put(resize))
        .route(
            "/api/v1/vm.migrate-disk-cancel",
            put(|s| action(s, VmAction::MigrateDiskCancel)),
        )
        .route(
            "/api/v1/vm.migrate-disk-info",
            get(|s| action(s, VmAction::MigrateDiskInfo)),
        )
        .route("/api/v1/vm.receive-migration", put(receive_migration))
        .route(
            "/api/v1/vm.migration-info",
            get(|s| action(s, VmAction::MigrationInfo)),
        )
        .route("/api/v1/vm.replica-cut", put(replica_cut))
        .route("/api/v1/vm.serial-input", put(serial_input))
        .route("/api/v1/vm.guest-command", put(guest_command))
        .route("/api/v1/vm.lease", put(lease))
        .route("/api/v1/vm.info", get(|s| action(s, VmAction::Info)))
        .route(
            "/api/v1/vm.counters",
            get(|s| action(s, VmAction::Counters)),
        )
        .route("/api/v1/vm.events", get(|s| action(s, VmAction::Events)))
        .fallback(|| async { error_response(ApiError::not_found("no such API endpoint")) })
        .with_state(state)
}

fn error_response(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(serde_json::json!({ "error": e.message }))).into_response()
}

async fn create(State(state): State<AppState>, body: Bytes) -> Response {
    match crate::json::from_slice::<VmConfig>(&body) {
        Ok(cfg) => action(State(state), VmAction::Create(Box::new(cfg))).await,
        Err(e) => error_response(ApiError::bad_request(format!("invalid VM config: {e}"))),
    }
}

async fn snapshot(State(state): State<AppState>, body: Bytes) -> Response {
    let path = crate::json::from_slice::<SnapshotRequest>(&body)
        .map_err(|e| format!("invalid snapshot request: {e}"))
        .and_then(|r| file_url_path(&r.destination_url));
    match path {
        Ok(p) => action(State(state), VmAction::Snapshot(p)).await,
        Err(e) => error_response(ApiError::bad_request(e)),
    }
}

async fn restore(State(state): State<AppState>, body: Bytes) -> Response {
    let path = crate::json::from_slice::<RestoreRequest>(&body)
        .map_err(|e| format!("invalid restore request: {e}"))
        .and_then(|r| file_url_path(&r.source_url));
    match path {
        Ok(p) => action(State(state), VmAction::Restore(p)).await,
        Err(e) => error_response(ApiError::bad_request(e)),
    }
}

async fn send_migration(State(state): State<AppState>, body: Bytes) -> Response {
    match crate::json::from_slice::<SendMigrationRequest>(&body) {
        Ok(r) => action(State(state), VmAction::SendMigration(r)).await,
        Err(e) => error_response(ApiError::bad_request(format!(
            "invalid send-migration request: {e}"
        ))),
    }
}

async fn resize(State(state): State<AppState>, body: Bytes) -> Response {
    match crate::json::from_slice::<ResizeRequest>(&body) {
        Ok(ResizeRequest {
            desired_balloon: Some(b),
            desired_ram: None,
        }) => action(State(state), VmAction::ResizeBalloon(b)).await,
        Ok(ResizeRequest {
            desired_balloon: None,
            desired_ram: Some(r),
        }) => action(State(state), VmAction::ResizeRam(r)).await,
        Ok(_) => error_response(ApiError::bad_request(
            "invalid resize request: give one of desired_balloon and desired_ram",
        )),
        Err(e) => error_response(ApiError::bad_request(format!(
            "invalid resize request: {e}"
        ))),
    }
}

async fn migrate_disk(State(state): State<AppState>, body: Bytes) -> Response {
    match crate::json::from_slice::<MigrateDiskRequest>(&body) {
        Ok(r) => action(State(state), VmAction::MigrateDisk(r)).await,
        Err(e) => error_response(ApiError::bad_request(format!(
            "invalid migrate-disk request: {e}"
        ))),
    }
}

async fn receive_migration(State(state): State<AppState>, body: Bytes) -> Response {
    match crate::json::from_slice::<ReceiveMigrationRequest>(&body) {
        Ok(r) => action(State(state), VmAction::ReceiveMigration(r)).await,
        Err(e) => error_response(ApiError::bad_request(format!(
            "invalid receive-migration request: {e}"
        ))),
    }
}

async fn lease(State(state): State<AppState>, body: Bytes) -> Response {
    match crate::json::from_slice::<WriteLease>(&body) {
        Ok(l) => action(State(state), VmAction::Lease(l)).await,
        Err(e) => error_response(ApiError::bad_request(format!("invalid write lease: {e}"))),
    }
}

/// An empty body is a plain cut.
async fn replica_cut(State(state): State<AppState>, body: Bytes) -> Response {
    if body.iter().all(u8::is_ascii_whitespace) {
        return action(
            State(state),
            VmAction::ReplicaCut(ReplicaCutRequest::default()),
        )
        .await;
    }
    match crate::json::from_slice::<ReplicaCutRequest>(&body) {
        Ok(r) => action(State(state), VmAction::ReplicaCut(r)).await,
        Err(e) => error_response(ApiError::bad_request(format!("invalid replica cut: {e}"))),
    }
}

/// The body is the raw bytes (no JSON).
async fn serial_input(State(state): State<AppState>, body: Bytes) -> Response {
    action(State(state), VmAction::SerialInput(body.to_vec())).await
}

async fn guest_command(State(state): State<AppState>, body: Bytes) -> Response {
    match crate::json::from_slice::<GuestCommandRequest>(&body) {
        Ok(r) => action(State(state), VmAction::GuestCommand(r)).await,
        Err(e) => error_response(ApiError::bad_request(format!("invalid guest command: {e}"))),
    }
}

async fn action(State(state): State<AppState>, action: VmAction) -> Response {
    let (tx, rx) = oneshot::channel::<ApiResponse>();
    let sent = (state.dispatch)(ApiRequest { action, reply: tx });
    if !sent {
        return error_response(ApiError::internal("the VMM is shutting down"));
    }
    match rx.await {
        Ok(Ok(Some(body))) => (StatusCode::OK, Json(body)).into_response(),
        Ok(Ok(None)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => error_response(e),
        Err(_) => error_response(ApiError::internal("the VMM dropped the request")),
    }
}
