//! What crosses the API: requests to the control loop and their answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::{VmConfig, VmState};

/// Per-device counters: device id → counter name → value.
pub type Counters = BTreeMap<String, BTreeMap<String, u64>>;

/// `vm.info`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmInfo {
    pub state: VmState,
    pub config: VmConfig,
    pub memory_actual_size: u64,
    pub uptime_ms: u64,
}

/// `vm.snapshot`'s body (Cloud Hypervisor's): where to write, as a `file://` URL.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub destination_url: String,
}

/// `vm.restore`'s body (Cloud Hypervisor's): the snapshot, as a `file://` URL.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub source_url: String,
}

/// The directory of a `file://` URL (the only scheme snapshots use).
pub fn file_url_path(url: &str) -> Result<std::path::PathBuf, String> {
    match url.strip_prefix("file://") {
        Some(p) if p.starts_with('/') => Ok(p.into()),
        Some(_) => Err(format!("{url}: the path of a file:// URL must be absolute")),
        None => Err(format!("{url}: only file:// URLs are supported")),
    }
}

/// What the API asks of the control loop.
#[derive(Debug)]
pub enum VmAction {
    Ping,
    Create(Box<VmConfig>),
    Boot,
    Pause,
    Resume,
    Shutdown,
    Reboot,
    /// Presses the ACPI power button (the guest decides what to do).
    PowerButton,
    Info,
    Counters,
    /// Writes a snapshot of the paused VM into this directory.
    Snapshot(std::path::PathBuf),
    /// Builds the VM from the snapshot in this directory (no VM may exist yet).
    Restore(std::path::PathBuf),
    /// Ends the VMM process (after shutting the VM down).
    VmmShutdown,
}

/// An error as the client sees it: an HTTP status and a one-line message.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: m.into(),
        }
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self {
            status: 404,
            message: m.into(),
        }
    }
    /// The request is valid but not in the VM's current state.
    pub fn conflict(m: impl Into<String>) -> Self {
        Self {
            status: 409,
            message: m.into(),
        }
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: m.into(),
        }
    }
}

pub type ApiResponse = Result<Option<serde_json::Value>, ApiError>;

/// One request and where to send its answer.
pub struct ApiRequest {
    pub action: VmAction,
    pub reply: oneshot::Sender<ApiResponse>,
}

impl ApiRequest {
    /// Answers the request (a client that went away is not an error).
    pub fn respond(self, r: ApiResponse) {
        let _ = self.reply.send(r);
    }
}
