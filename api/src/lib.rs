//! Vireo's REST API: the types (VM configuration, state, info, counters) and the
//! per-VM server that `vireo` runs on a unix socket.
//!
//! The server never touches VM internals: each HTTP request becomes an [`ApiRequest`]
//! sent to the VMM's control loop, which answers on a one-shot channel.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod dynamic_memory;
pub mod host;
pub mod json;
pub mod lifecycle;
pub mod numa;
mod server;
mod types;

pub use config::VmConfig;
pub use lifecycle::{Action, InvalidTransition, VmState};
pub use server::{serve, Dispatch, ServerError, ServerHandle};
pub use types::{
    file_url_path, ApiError, ApiRequest, ApiResponse, Counters, DeviceFault, DiskMigrationInfo,
    GuestCommandRequest, MigrateDiskRequest, MigrationInfo, MigrationStatus,
    ReceiveMigrationRequest, ReceiveMigrationTls, ReplicaCatchUpInfo, ReplicaCutInfo,
    ReplicaCutRequest, ReplicaSegmentInfo, ResizeRequest, RestoreRequest, SendMigrationRequest,
    SendMigrationTls, SnapshotRequest, VmAction, VmInfo, WriteLease,
};

/// The OpenAPI document of the per-VM API.
/// The line a VMM that handed its VM over writes to stderr as it exits, followed by its
/// final [`MigrationInfo`] as JSON: the figures it exits too soon for a poll to read.
pub const MIGRATION_RESULT_PREFIX: &str = "vireo: migration result: ";

pub const OPENAPI_YAML: &str = include_str!("../openapi/vireo.yaml");

/// "outer: inner: innermost" on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let msg = inner.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        src = inner.source();
    }
    s
}
