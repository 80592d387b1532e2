//! What vireod stores and answers: VM definitions, VM status, exit records, metering.

use std::path::Path;

use api::config::OutputConfig;
use api::VmConfig;
use serde::{Deserialize, Serialize};

use crate::AgentError;

/// Automatic start order at agent start (Hyper-V's automatic start action plus an
/// order): High first, then Medium, then Low; Off VMs are not started automatically.
/// Host shutdown goes the other way (Off and Low first).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Priority {
    High,
    Medium,
    Low,
    #[default]
    Off,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::High,
        Priority::Medium,
        Priority::Low,
        Priority::Off,
    ];
}

/// What happens when a VM's `vireo` process ends without being asked to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// VM names become file names (socket, pid file, state directory): letters, digits,
/// `-`, `_` and `.`, starting with a letter or digit, at most 64 bytes.
pub fn validate_name(name: &str) -> Result<(), AgentError> {
    let bad = |reason| {
        Err(AgentError::BadName {
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
    /// Checks what vireod needs beyond `VmConfig::validate`: absolute paths (vireod's
    /// working directory means nothing to a user) and no terminal (a daemon has none).
    pub fn validate(&self) -> Result<(), AgentError> {
        self.config
            .validate()
            .map_err(|e| AgentError::BadDefinition(e.to_string()))?;
        let abs = |what: &str, p: &Path| {
            if p.is_absolute() {
                Ok(())
            } else {
                Err(AgentError::BadDefinition(format!(
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
            return Err(AgentError::BadDefinition(
                "console cannot be tty under vireod (it has no terminal): use off, null or file"
                    .into(),
            ));
        }
        if let OutputConfig::File(p) = &self.config.console {
            abs("console", p)?;
        }
        Ok(())
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
}

impl VmState {
    /// A VMM process exists (or is being started).
    pub fn has_process(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "Stopped",
            VmState::Starting => "Starting",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Stopping => "Stopping",
            VmState::Crashed => "Crashed",
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
    /// "requested" (stop/kill), "power-off" (status 0), "crashed", "start-failed",
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
    /// Only in `GET /api/v1/vms/{name}`: the stored definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<VmDefinition>,
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
    /// Always 0 until the VMM has network devices.
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_file_names() {
        for ok in ["a", "vm-1", "web_02.prod", "0"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "-a", ".x", "a/b", "../x", "a b", &"x".repeat(65), "é"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn definition_defaults_and_rejects_unknown_fields() {
        let d: VmDefinition =
            serde_json::from_str(r#"{"config":{"payload":{"kernel":"/k"}}}"#).unwrap();
        assert_eq!(d.priority, Priority::Off);
        assert_eq!(d.restart, RestartPolicy::OnFailure);
        assert_eq!(d.max_restarts, 3);
        d.validate().unwrap();
        let d: VmDefinition = serde_json::from_str(
            r#"{"config":{"payload":{"kernel":"/k"}},"priority":"High","restart":"always"}"#,
        )
        .unwrap();
        assert_eq!(
            (d.priority, d.restart),
            (Priority::High, RestartPolicy::Always)
        );
        assert!(serde_json::from_str::<VmDefinition>(
            r#"{"config":{"payload":{"kernel":"/k"}},"prio":"High"}"#
        )
        .is_err());
    }

    #[test]
    fn definitions_need_absolute_paths_and_no_tty_console() {
        let mut d: VmDefinition =
            serde_json::from_str(r#"{"config":{"payload":{"kernel":"k.elf"}}}"#).unwrap();
        assert!(
            matches!(d.validate(), Err(AgentError::BadDefinition(m)) if m.contains("absolute"))
        );
        d.config.payload.kernel = "/k".into();
        d.config.console = OutputConfig::Tty;
        d.config.serial = OutputConfig::Null;
        assert!(d.validate().is_err());
    }

    #[test]
    fn priority_orders_start_first_to_last() {
        let mut v = vec![
            Priority::Low,
            Priority::Off,
            Priority::High,
            Priority::Medium,
        ];
        v.sort();
        assert_eq!(v, Priority::ALL);
    }
}
