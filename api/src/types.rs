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
    /// Bytes of the hotplug region the guest plugged (virtio-mem); absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_plugged_size: Option<u64>,
    /// Bytes of the hotplug region the host asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_requested_size: Option<u64>,
    pub uptime_ms: u64,
    /// Why the VMM paused the VM by itself (a disk stopped on a host I/O error);
    /// cleared by resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
    /// The CPU features the vCPUs are given, as a fingerprint (`1.0:...,7.0:...`,
    /// `vireo_util::cpu_features`): the host's, masked to `cpus.features` if set. What
    /// a live migration's destination must give too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_features: Option<String>,
    /// Devices that failed while the VM runs (a vfio-user server that went away).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_errors: Vec<DeviceFault>,
}

/// One failed device in [`VmInfo`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceFault {
    pub id: String,
    pub error: String,
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

/// `vm.guest-command`'s body: one qemu-guest-agent command (`execute`, `arguments` as
/// the guest agent takes them) and how long to wait for the guest's reply.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GuestCommandRequest {
    pub execute: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<serde_json::Value>,
    /// Milliseconds to wait for the guest (default 5,000; at most 300,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `vm.send-migration`'s body: where the destination listens (`unix:/path` or
/// `tcp:host:port`) and the longest pause the guest should see.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationRequest {
    pub destination_url: String,
    /// Downtime target in milliseconds (default 50).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Compress memory pages with zstd (worth it on slow links).
    #[serde(default)]
    pub compress: bool,
    /// Bandwidth limit in MiB/s (default: none).
    #[serde(default)]
    pub bandwidth_mib_s: Option<u64>,
    /// Shared-nothing: copy the disks over the connection too (the destination cannot
    /// see the source's storage).
    #[serde(default)]
    pub copy_storage: bool,
    /// Mutual TLS on the connection(s) (default: none).
    #[serde(default)]
    pub tls: Option<SendMigrationTls>,
    /// Connections that carry memory pages, 1..=16 (default 1: one connection carries
    /// everything). With N > 1 the pages of every round are split across N more
    /// connections beside the one that carries the protocol (docs/migration.md).
    #[serde(default)]
    pub connections: Option<u32>,
    /// The migration's one-time secret (64 hex digits, 32 random bytes), the same the
    /// destination was given: every connection proves it knows it. Required for TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Allow TCP without mutual TLS (the memory then crosses the network in clear).
    #[serde(default)]
    pub insecure: bool,
}

/// The source's TLS settings (PEM files on the source host).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationTls {
    /// The CA that the destination's certificate must chain to.
    pub ca: std::path::PathBuf,
    /// The source's own certificate chain and its key (a Vireo destination requires a
    /// client certificate); both or neither.
    #[serde(default)]
    pub cert: Option<std::path::PathBuf>,
    #[serde(default)]
    pub key: Option<std::path::PathBuf>,
    /// The name the destination's certificate must carry (default: the host of a
    /// `tcp:` URL; required for `unix:`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// The CA's revocation list (PEM, as `vireoctl pki revoke` writes it): a
    /// destination certificate it revokes fails the handshake (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<std::path::PathBuf>,
}

/// The destination's TLS settings (PEM files on the destination host): it presents
/// `cert` and requires every source to present a certificate that chains to `ca`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationTls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca: std::path::PathBuf,
    /// The sources let in: a client certificate must name one of these (its subject
    /// CN or a DNS name), else the handshake fails. Required, not empty.
    #[serde(default)]
    pub allowed_peers: Vec<String>,
    /// The CA's revocation list (PEM): a source certificate it revokes fails the
    /// handshake (default: none). Read when the migration is requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<std::path::PathBuf>,
}

/// A clustered VM's write lease (`vm.create`'s `write_lease`, `PUT vm.lease`): the
/// VMM writes its disks only before this deadline, on the host's `CLOCK_MONOTONIC`
/// (the clock its vireod counts its own self-fencing deadline on). It only moves
/// forward, and once passed the VMM refuses every write and pauses the VM for good.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WriteLease {
    pub deadline_monotonic_ns: u64,
}

/// `vm.receive-migration`'s body: where to listen for the source.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationRequest {
    pub receiver_url: String,
    /// The VM to run here, as `vm.create` takes it: its disks, kernel, console,
    /// serial and taps are this host's. The source's configuration is only compared
    /// with it (memory, vCPUs, devices, MACs: what the guest sees); it is never used.
    /// Required.
    #[serde(default)]
    pub config: Option<Box<VmConfig>>,
    /// Where the disks of a shared-nothing migration are written (required for one).
    #[serde(default)]
    pub storage_dir: Option<std::path::PathBuf>,
    /// Mutual TLS: only sources with a certificate from `ca` that names one of
    /// `allowed_peers` get in (default: none).
    #[serde(default)]
    pub tls: Option<ReceiveMigrationTls>,
    /// The migration's one-time secret (64 hex digits), given to the source too: a
    /// connection that cannot prove it is refused. Required for TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Allow TCP without mutual TLS.
    #[serde(default)]
    pub insecure: bool,
    /// How long to wait for the source to join with every stream, in seconds
    /// (default 300). Connections that fail to join meanwhile are refused and counted.
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// Where a migration stands (`vm.migration-info`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MigrationStatus {
    #[default]
    None,
    Sending,
    Receiving,
    Completed,
    Failed,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MigrationInfo {
    pub status: MigrationStatus,
    /// Pre-copy rounds done (round 0 copies all of memory).
    pub rounds: u32,
    pub pages_sent: u64,
    pub bytes_sent: u64,
    /// Dirty pages left at the last round.
    pub remaining_pages: u64,
    /// Measured link bandwidth and guest dirty rate, last round.
    pub bandwidth_mib_s: f64,
    pub dirty_pages_per_s: f64,
    /// vCPU throttle (auto-converge) in percent, at the last round.
    pub throttle_percent: u64,
    /// From pausing the VM to sending Go (source side).
    pub downtime_ms: f64,
    pub total_ms: f64,
    pub error: Option<String>,
    /// Destination: connections refused while waiting for the source (a failed TLS
    /// handshake, a wrong proof of the secret, a stream of no migration here).
    #[serde(default)]
    pub refused_connections: u32,
    /// Why the last of them was refused.
    #[serde(default)]
    pub last_refusal: Option<String>,
}

/// `vm.resize`'s body (Cloud Hypervisor's field names): the balloon's new size, or the
/// guest's new memory size (boot RAM + virtio-mem blocks), in bytes; one of them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_balloon: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_ram: Option<u64>,
}

/// `vm.migrate-disk`'s body: move disk `id` to a new image while the VM runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigrateDiskRequest {
    pub id: String,
    /// The new image (created; must not exist).
    pub destination: std::path::PathBuf,
    /// `raw` or `vhdx` (default: the format of the current image).
    #[serde(default)]
    pub format: Option<String>,
    /// Delete the old image once the VM runs on the new one.
    #[serde(default)]
    pub delete_source: bool,
}

/// Where a storage migration stands (`vm.migrate-disk-info`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DiskMigrationInfo {
    pub status: MigrationStatus,
    pub id: Option<String>,
    pub destination: Option<std::path::PathBuf>,
    pub copied_bytes: u64,
    pub total_bytes: u64,
    pub total_ms: f64,
    pub error: Option<String>,
}

/// One disk's segment a cut sealed (`vm.replica-cut`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaSegmentInfo {
    /// The disk's id.
    pub disk: String,
    /// The segment's sequence number in the disk's change log.
    pub seq: u64,
    pub records: u64,
    /// Bytes of data the segment carries.
    pub data_bytes: u64,
    /// Bytes of the disk it changes (data and zeroed ranges).
    pub covered_bytes: u64,
    /// The segment's file (in the disk's `replica_log` directory).
    pub file: std::path::PathBuf,
}

/// `vm.replica-cut`'s answer: one crash-consistent point across all replicated disks.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaCutInfo {
    pub cut_id: u64,
    pub segments: Vec<ReplicaSegmentInfo>,
    /// How long the cut held the guest's writes to the replicated disks (µs): from
    /// holding the last of them to releasing them all; the sealed files are synced after.
    #[serde(default)]
    pub held_us: u64,
    /// A catch-up's answer (`catch_up` asked): each disk's log restarted beside the
    /// frozen region map the primary sends from (no segment was sealed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub catch_up: Vec<ReplicaCatchUpInfo>,
}

/// `vm.replica-cut`'s request (an empty body: a plain cut).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicaCutRequest {
    /// Each disk's change log holds at most this many bytes of segments; over it the
    /// log degrades to a region bitmap (stored in the log's directory; 0: no bound).
    pub log_budget: Option<u64>,
    /// Instead of a cut: every disk's log (degraded or not) is frozen into a region map
    /// and starts again at segment 1, for a catch-up from the map.
    pub catch_up: bool,
}

/// One disk's log restarted for a catch-up.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaCatchUpInfo {
    pub disk: String,
    /// Regions (64 KiB) the frozen map marks.
    pub regions: u64,
    /// Bytes of the disk they cover.
    pub dirty_bytes: u64,
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
    /// What happened unasked (a disk that stopped the VM).
    Events,
    /// Writes a snapshot of the paused VM into this directory.
    Snapshot(std::path::PathBuf),
    /// Builds the VM from the snapshot in this directory (no VM may exist yet).
    Restore(std::path::PathBuf),
    SendMigration(SendMigrationRequest),
    MigrateDisk(MigrateDiskRequest),
    MigrateDiskCancel,
    MigrateDiskInfo,
    ReceiveMigration(ReceiveMigrationRequest),
    MigrationInfo,
    /// Seals every replicated disk's change log at one crash-consistent point.
    ReplicaCut(ReplicaCutRequest),
    /// Moves the write lease's deadline forward (refused once it passed).
    Lease(WriteLease),
    /// Ends the VMM process (after shutting the VM down).
    VmmShutdown,
    /// Asks the guest's balloon for this many bytes (`vm.resize`'s `desired_balloon`).
    ResizeBalloon(u64),
    /// Asks the guest for this much memory in all (`vm.resize`'s `desired_ram`): boot
    /// RAM plus the virtio-mem blocks it should have plugged.
    ResizeRam(u64),
    /// Bytes for the guest to read from its serial port (COM1's receive FIFO, 64
    /// bytes: the answer says how many were taken; the caller sends the rest later).
    SerialInput(Vec<u8>),
    /// One command to the guest agent (`vm.guest-command`); answered from a thread of
    /// its own, so a guest that does not answer holds nothing but the request.
    GuestCommand(GuestCommandRequest),
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
    /// The guest (behind the VMM) answered with something that is not a reply.
    pub fn bad_gateway(m: impl Into<String>) -> Self {
        Self {
            status: 502,
            message: m.into(),
        }
    }
    /// The guest (behind the VMM) did not answer in time.
    pub fn gateway_timeout(m: impl Into<String>) -> Self {
        Self {
            status: 504,
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
    /// A request for `action` and where its answer arrives.
    pub fn new(action: VmAction) -> (Self, oneshot::Receiver<ApiResponse>) {
        let (reply, rx) = oneshot::channel();
        (ApiRequest { action, reply }, rx)
    }

    /// Answers the request (a client that went away is not an error).
    pub fn respond(self, r: ApiResponse) {
        let _ = self.reply.send(r);
    }
}
