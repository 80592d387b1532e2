//! vireod's REST types (the host API, `agent::model` re-exports them): VM definitions,
//! VM status, exit records, metering, migration requests. Here rather than in `agent`
//! so that what parses a client's body can be checked (and fuzzed) without the host
//! agent's runtime.

use std::path::{Path, PathBuf};

use crate::config::OutputConfig;
pub use crate::dynamic_memory::{DynamicMemory, MemoryResize, MemoryStatus};
use crate::VmConfig;
use serde::{Deserialize, Serialize};

/// A body that does not make a valid definition, name or migration request.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid VM name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("invalid VM definition: {0}")]
    BadDefinition(String),
    #[error("invalid migration request: {0}")]
    BadMigration(String),
}

/// The default relative CPU weight of a VM (as Hyper-V's).
pub const DEFAULT_CPU_WEIGHT: u32 = 100;
/// The allowed range of a VM's relative CPU weight.
pub const CPU_WEIGHTS: std::ops::RangeInclusive<u32> = 1..=10_000;

/// Automatic start order at agent start (Hyper-V's automatic start action plus an
/// order): High first, then Medium, then Low; Off VMs are not started automatically.
/// Host shutdown goes the other way (Off and Low first).
///
/// Written in lower case (`high`), as every enum of the host API (`on-failure`); the
/// capitalized names of older definitions (`High`) are read too.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Medium,
    Low,
    #[default]
    Off,
}

impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(&text))
            .ok_or_else(|| {
                serde::de::Error::unknown_variant(&text, &["high", "medium", "low", "off"])
            })
    }
}

impl Priority {
    /// The name the API reads and writes (`high`).
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
            Priority::Off => "off",
        }
    }

    pub const ALL: [Priority; 4] = [
        Priority::High,
        Priority::Medium,
        Priority::Low,
        Priority::Off,
    ];
}

/// What happens when a VM's `vireo` process ends without being asked to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart.
    Never,
    /// Restart after a crash (non-zero exit, signal, or an unknown exit status), up to
    /// `max_restarts` times in a row; a clean guest power-off (status 0) stays off.
    #[default]
    OnFailure,
    /// Restart after any exit that vireod did not ask for, up to `max_restarts`.
    Always,
}

impl RestartPolicy {
    /// The name the API reads and writes (`on-failure`).
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Never => "never",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_max_restarts() -> u32 {
    3
}

/// A VM as defined in the inventory: the VMM configuration (the same serde type that
/// `vireo --config` takes) plus what vireod does with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDefinition {
    pub config: VmConfig,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// Relative CPU weight against the host's other VMs (Hyper-V's "relative weight"),
    /// 1..=10000; default 100. See the agent's `cgroup` module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// What vireod does with the VM when it stops and takes its VMs down (Hyper-V's
    /// automatic stop action); default `turn-off`.
    #[serde(default, skip_serializing_if = "StopAction::is_default")]
    pub stop_action: StopAction,
    /// Hyper-V's Dynamic Memory: vireod's balancer moves the VM's memory between
    /// `minimum` and `maximum` by what the guest uses (see [`DynamicMemory`]); none: the
    /// memory stays as the config says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_memory: Option<DynamicMemory>,
}

/// What happens to a running VM when vireod stops its VMs (its own stop, a host
/// shutdown): Hyper-V's automatic stop action.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StopAction {
    /// The VMM ends the VM at once (`vireoctl vm stop`), killed after the stop timeout.
    #[default]
    TurnOff,
    /// The guest is asked to shut down (ACPI power button, `vireoctl vm shutdown`) and
    /// turned off if it has not within the stop timeout.
    Shutdown,
    /// The VM is saved (`vireoctl vm save`): the next start resumes it where it was. A
    /// VM that cannot be saved is turned off.
    Save,
}

impl StopAction {
    pub fn as_str(self) -> &'static str {
        match self {
            StopAction::TurnOff => "turn-off",
            StopAction::Shutdown => "shutdown",
            StopAction::Save => "save",
        }
    }

    fn is_default(&self) -> bool {
        *self == StopAction::TurnOff
    }
}

/// VM names become file names (socket, pid file, state directory): letters, digits,
/// `-`, `_` and `.`, starting with a letter or digit, at most 64 bytes.
pub fn validate_name(name: &str) -> Result<(), ModelError> {
    let bad = |reason| {
        Err(ModelError::BadName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 64 {
        return bad("must be 1 to 64 characters");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or a digit");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return bad("may only contain letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

impl VmDefinition {
    /// Derives what the definition's other settings imply: the VMM's memory devices
    /// of a Dynamic Memory VM ([`DynamicMemory::apply`]). vireod calls it on every
    /// definition it is given, before [`Self::validate`].
    pub fn normalize(&mut self) -> Result<(), ModelError> {
        if let Some(dm) = self.dynamic_memory.as_mut() {
            dm.apply(&mut self.config)?;
        }
        Ok(())
    }

    /// Checks what vireod needs beyond `VmConfig::validate`: absolute paths (vireod's
    /// working directory means nothing to a user) and no terminal (a daemon has none).
    pub fn validate(&self) -> Result<(), ModelError> {
        self.config
            .validate()
            .map_err(|e| ModelError::BadDefinition(e.to_string()))?;
        let abs = |what: &str, p: &Path| {
            if p.is_absolute() {
                Ok(())
            } else {
                Err(ModelError::BadDefinition(format!(
                    "{what} path {} must be absolute",
                    p.display()
                )))
            }
        };
        abs("payload.kernel", &self.config.payload.kernel)?;
        if let Some(i) = &self.config.payload.initramfs {
            abs("payload.initramfs", i)?;
        }
        for d in &self.config.disks {
            abs("disk", &d.path)?;
        }
        if self.config.console == OutputConfig::Tty {
            return Err(ModelError::BadDefinition(
                "console cannot be tty under vireod (it has no terminal): use off, null or file"
                    .into(),
            ));
        }
        if let OutputConfig::File(p) = &self.config.console {
            abs("console", p)?;
        }
        if let Some(dm) = &self.dynamic_memory {
            dm.check_config(&self.config)?;
        }
        if let Some(w) = self.cpu_weight {
            if !CPU_WEIGHTS.contains(&w) {
                return Err(ModelError::BadDefinition(format!(
                    "cpu_weight {w} is outside 1..=10000"
                )));
            }
        }
        Ok(())
    }

    /// The relative CPU weight (default 100).
    pub fn weight(&self) -> u32 {
        self.cpu_weight.unwrap_or(DEFAULT_CPU_WEIGHT)
    }
}

/// Where a VM is in vireod's eyes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Defined, no VMM process.
    Stopped,
    /// The VMM process is starting; not yet reported running.
    Starting,
    Running,
    Paused,
    /// vireod asked the VMM to stop and waits for it to exit.
    Stopping,
    /// The VMM ended without being asked to and is not being restarted.
    Crashed,
    /// The VM is being live-migrated to another host (it runs meanwhile).
    Migrating,
    /// A VMM waits for this VM to arrive from another host by live migration.
    Incoming,
    /// No VMM process: the VM's memory and device state are on disk (`save`); a start
    /// resumes the guest where it was (Hyper-V's Saved state).
    Saved,
}

impl VmState {
    /// A VMM process exists (or is being started).
    pub fn has_process(self) -> bool {
        matches!(
            self,
            VmState::Starting
                | VmState::Running
                | VmState::Paused
                | VmState::Stopping
                | VmState::Migrating
                | VmState::Incoming
        )
    }

    pub const ALL: [VmState; 9] = [
        VmState::Stopped,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Stopping,
        VmState::Crashed,
        VmState::Migrating,
        VmState::Incoming,
        VmState::Saved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "Stopped",
            VmState::Starting => "Starting",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Stopping => "Stopping",
            VmState::Crashed => "Crashed",
            VmState::Migrating => "Migrating",
            VmState::Incoming => "Incoming",
            VmState::Saved => "Saved",
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a VMM process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub at_ms: u64,
    pub pid: i32,
    /// Exit status, when known (vireod's own children; not re-adopted processes).
    pub status: Option<i32>,
    /// The signal that ended it, when known.
    pub signal: Option<i32>,
    /// "requested" (stop/kill), "guest-shutdown" (a shutdown the guest carried out on
    /// the ACPI power button), "power-off" (status 0), "crashed", "start-failed",
    /// or "unknown" (a re-adopted process whose status vireod cannot see).
    pub reason: String,
    /// The last lines of the guest's serial output.
    pub serial_tail: Vec<String>,
    /// The last lines the VMM wrote to stderr.
    pub vmm_log_tail: Vec<String>,
}

impl ExitRecord {
    /// A crash as the restart policy sees it.
    pub fn is_failure(&self) -> bool {
        self.status != Some(0)
    }
}

/// `GET /api/v1/vms` entries and `GET /api/v1/vms/{name}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub state: VmState,
    pub priority: Priority,
    pub restart: RestartPolicy,
    pub pid: Option<i32>,
    /// The VMM's own REST socket (while it runs).
    pub socket: Option<String>,
    /// Set when vireod re-adopted a running VMM after its own restart.
    pub adopted: bool,
    pub started_at_ms: Option<u64>,
    /// Restarts since the last start by a user.
    pub restarts: u32,
    pub last_exit: Option<ExitRecord>,
    /// The live migration (its id) that owns the VM right now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    /// Only in `GET /api/v1/vms/{name}`: the stored definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<VmDefinition>,
    /// The stored definition changed while the VM ran: its VMM still runs the one it
    /// started with, and the stored one applies at its next start.
    #[serde(default, skip_serializing_if = "is_false")]
    pub definition_pending: bool,
    /// A running VM's memory: assigned, used, demand, target (see [`MemoryStatus`]);
    /// present for Dynamic Memory VMs and VMs resized by `resize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStatus>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Resource metering of one VM since `since_ms` (Hyper-V's `Measure-VM`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MeteringReport {
    pub name: String,
    pub since_ms: u64,
    /// When the numbers were last sampled.
    pub sampled_at_ms: u64,
    /// Running time of the VMM processes counted in this report.
    pub running_ms: u64,
    /// CPU time of the VMM processes (all threads: vCPUs, devices, API).
    pub cpu_ns: u64,
    /// Average CPU over the running time, in percent of one host CPU.
    pub avg_cpu_percent: f64,
    /// Resident memory of the VMM process (guest RAM it touched plus its own).
    pub avg_memory_bytes: u64,
    pub min_memory_bytes: u64,
    pub max_memory_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub disk_read_ops: u64,
    pub disk_write_ops: u64,
    /// Bytes the guest received (in) and sent (out) on its network devices (Ethernet
    /// frames, from the VMM's virtio-net counters).
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub samples: u64,
}

/// One state change on the events stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: u64,
    pub vm: String,
    /// "defined", "deleted", or the new state's name.
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `PUT /api/v1/vms/{name}/migrate`: where to, and how. Exactly one of
/// `destination_agent` and `destination_url`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination host's vireod: its peer listener `https://HOST:PORT` (mutual
    /// TLS with this host's identity; the VMMs' stream is TLS too) or, on the same
    /// host, its API socket (an absolute path). It defines the VM and starts a
    /// receiving VMM; after the commit the VM belongs to it.
    #[serde(default)]
    pub destination_agent: Option<String>,
    /// With an `https://` destination_agent: the host name its certificate must carry
    /// (default: the URL's HOST).
    #[serde(default)]
    pub destination_name: Option<String>,
    /// Or a `vireo` already listening (`unix:/path` or `tcp:host:port`) that no vireod
    /// here knows: the VM is sent there and forgotten here.
    #[serde(default)]
    pub destination_url: Option<String>,
    /// With `destination_agent`: where the destination's VMM listens (default a unix
    /// socket in the destination's run directory).
    #[serde(default)]
    pub receiver_url: Option<String>,
    /// Downtime target in milliseconds (the VMM's default: 50).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    #[serde(default)]
    pub compress: bool,
    #[serde(default)]
    pub bandwidth_mib_s: Option<u64>,
    /// Shared-nothing: the disks travel too (the destination needs `storage_dir`).
    #[serde(default)]
    pub copy_storage: bool,
    /// With `destination_agent` and `copy_storage`: where the destination writes them.
    #[serde(default)]
    pub storage_dir: Option<PathBuf>,
    /// With `destination_url`: the one-time secret that `vireo` was given (required
    /// over TCP). With `destination_agent` vireod makes one and hands it to both sides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Allow TCP without mutual TLS (vireod has no migration TLS material yet).
    #[serde(default)]
    pub insecure: bool,
    /// Streams that carry memory pages, 1..=16 (default 1: one stream carries
    /// everything). With N > 1 the VMM sends each round's pages over N more streams
    /// beside the protocol's; between vireods each is its own mutual TLS connection
    /// of the gateways, so encryption spreads over vireod's threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
}

impl MigrateRequest {
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: &str| Err(ModelError::BadMigration(m.to_string()));
        match (&self.destination_agent, &self.destination_url) {
            (Some(_), Some(_)) => {
                return bad("give destination_agent or destination_url, not both")
            }
            (None, None) => {
                return bad("give destination_agent (a vireod socket) or destination_url")
            }
            _ => {}
        }
        let agent = self.agent_address()?;
        if self.destination_name.is_some() && !matches!(agent, Some(AgentAddress::Https { .. })) {
            return bad("destination_name is for an https:// destination_agent");
        }
        for url in [&self.destination_url, &self.receiver_url]
            .into_iter()
            .flatten()
        {
            if !(url.starts_with("unix:") || url.starts_with("tcp:")) {
                return Err(ModelError::BadMigration(format!(
                    "{url:?}: expected unix:/path or tcp:host:port"
                )));
            }
        }
        if self.destination_url.is_some()
            && (self.receiver_url.is_some() || self.storage_dir.is_some())
        {
            return bad("receiver_url and storage_dir need destination_agent");
        }
        if self.storage_dir.is_some() && !self.copy_storage {
            return bad("storage_dir is for copy_storage");
        }
        if self.destination_agent.is_some() && self.secret.is_some() {
            return bad("secret is for destination_url (vireod makes one for a destination_agent)");
        }
        if let Some(n) = self.connections {
            if !(1..=migration::protocol::MAX_CONNECTIONS).contains(&n) {
                return Err(ModelError::BadMigration(format!(
                    "connections {n}: expected 1..={}",
                    migration::protocol::MAX_CONNECTIONS
                )));
            }
        }
        Ok(())
    }

    /// The destination vireod, parsed (None with `destination_url`).
    pub fn agent_address(&self) -> Result<Option<AgentAddress>, ModelError> {
        self.destination_agent
            .as_deref()
            .map(|a| AgentAddress::parse(a, self.destination_name.as_deref()))
            .transpose()
    }

    /// The peer, as the records show it.
    pub fn peer(&self) -> String {
        match (&self.destination_agent, &self.destination_url) {
            (Some(a), _) if a.starts_with("https://") => a.clone(),
            (Some(p), _) => format!("agent:{p}"),
            (None, Some(u)) => u.clone(),
            (None, None) => String::new(),
        }
    }
}

/// Where the destination's vireod is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentAddress {
    /// Its API socket on this host.
    Unix(PathBuf),
    /// Its peer listener on another host; its certificate must name `name`.
    Https { authority: String, name: String },
}

impl AgentAddress {
    /// `https://HOST:PORT` (the expected peer name: `name`, else HOST) or an absolute
    /// socket path.
    pub fn parse(s: &str, name: Option<&str>) -> Result<Self, ModelError> {
        let bad = |m: String| Err(ModelError::BadMigration(m));
        let Some(rest) = s.strip_prefix("https://") else {
            if s.contains("://") {
                return bad(format!(
                    "destination_agent {s:?}: expected https://HOST:PORT or an absolute socket path"
                ));
            }
            let p = PathBuf::from(s);
            if !p.is_absolute() {
                return bad("destination_agent must be an absolute path".into());
            }
            return Ok(AgentAddress::Unix(p));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => h,
            _ => {
                return bad(format!(
                    "destination_agent {s:?}: expected https://HOST:PORT (a port is required)"
                ))
            }
        };
        if authority.contains(['/', '@', '?', '#']) {
            return bad(format!(
                "destination_agent {s:?}: expected https://HOST:PORT, nothing else"
            ));
        }
        let bare_host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let name = name.unwrap_or(bare_host).to_ascii_lowercase();
        if rustls_pki_types::ServerName::try_from(name.clone()).is_err() {
            return bad(format!(
                "destination name {name:?} is not a host name or an address"
            ));
        }
        Ok(AgentAddress::Https {
            authority: authority.to_string(),
            name,
        })
    }
}

/// `POST /api/v1/migrations/incoming` (sent by the source's vireod): define this VM
/// here and start a VMM that waits for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    pub name: String,
    pub definition: VmDefinition,
    /// Where the receiving VMM listens (default `unix:<run-dir>/vms/NAME.migrate.sock`).
    #[serde(default)]
    pub receiver_url: Option<String>,
    /// Shared-nothing: where the copied disks are written.
    #[serde(default)]
    pub storage_dir: Option<PathBuf>,
    /// Who sends it (shown in the record).
    #[serde(default)]
    pub source: Option<String>,
    /// The migration's one-time secret (64 hex digits) the source's VMM proves on
    /// every connection; made by the source's vireod for this migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Allow a TCP `receiver_url` without mutual TLS.
    #[serde(default)]
    pub insecure: bool,
}

/// Where a migration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationState {
    /// Waiting for one of the host's migration slots.
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl MigrationState {
    pub fn finished(self) -> bool {
        matches!(
            self,
            MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationDirection {
    /// This host sends the VM.
    Outgoing,
    /// This host receives it.
    Incoming,
}

/// One migration, as `GET /api/v1/migrations` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: String,
    pub vm: String,
    pub direction: MigrationDirection,
    /// Outgoing: `agent:<socket>`, the `https://` agent or the destination URL;
    /// incoming: the source (the host name its certificate proved, over TLS).
    pub peer: String,
    /// The peer host's name as its certificate proved it (migrations between vireods
    /// over mutual TLS); only that peer may read or cancel an incoming record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_host: Option<String>,
    pub state: MigrationState,
    pub queued_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// Where the receiving VMM listens.
    pub receiver_url: Option<String>,
    /// The other vireod's id of the same migration.
    pub peer_id: Option<String>,
    /// The sending (or receiving) VMM's `vm.migration-info`, last read.
    pub progress: Option<crate::MigrationInfo>,
    /// Pages sent over pages sent plus pages left, 0..=100 (100 once completed).
    pub percent: f64,
    pub error: Option<String>,
    /// Streams vireod's migration gateway carried for this migration (between
    /// vireods: the protocol's stream plus one per page stream, each its own TLS
    /// connection; 0 when the VMMs spoke directly).
    #[serde(default)]
    pub streams: u32,
}

/// `GET /api/v1/host.info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub version: String,
    pub hostname: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub state_dir: String,
    pub run_dir: String,
    pub vireo_bin: String,
    pub cpus: usize,
    pub memory_total_bytes: u64,
    pub vms: usize,
    pub vms_running: usize,
    /// `direct` or `systemd`.
    pub launcher: String,
    /// The CPU cgroup root VMMs are placed under (None: no placement).
    pub cpu_cgroup: Option<String>,
    pub max_concurrent_migrations: usize,
}

#[cfg(test)]
#[path = "host_tests.rs"]
mod tests;
