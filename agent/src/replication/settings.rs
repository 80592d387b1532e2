//! What replication of a VM is asked with ([`EnableRequest`]) and what is stored of
//! it ([`Settings`], inventory table `replications`): storing and removing them, and
//! restoring every stored VM's loop at vireod's start.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{lock, Replications};
use crate::supervisor::Supervisor;

/// `PUT /api/v1/vms/{name}/replication`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnableRequest {
    /// The replica server's peer listener, `HOST:PORT`.
    pub to: String,
    /// The host name its certificate must carry (default: HOST).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Seconds between cuts (default 30, at least 1).
    #[serde(default)]
    pub interval_s: Option<f64>,
    /// How many recovery points the replica keeps (default 1: the latest only).
    #[serde(default)]
    pub history: Option<u32>,
    /// Thinning of the history: seconds at least between two kept points other than
    /// the latest (3600: Hyper-V's hourly points; default 0: every point is kept).
    #[serde(default)]
    pub history_spacing_s: Option<u64>,
    /// A bandwidth limit in Mbit/s (a number, a string of one, or "off"/null: none).
    #[serde(default)]
    pub bandwidth_mbit: serde_json::Value,
    /// Bytes of segments each disk's change log may hold (a number, or a string
    /// like "2G", "512M"; default 2 GiB): over it the log keeps a region bitmap and
    /// replication catches up from it.
    #[serde(default)]
    pub log_budget: serde_json::Value,
    /// Set by a reverse replication (not part of the REST body).
    #[serde(skip)]
    pub reverse: bool,
}

/// What is stored per VM (inventory table `replications`, JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub to: String,
    pub server_name: String,
    pub interval_ms: u64,
    #[serde(default)]
    pub paused: bool,
    #[serde(default = "one")]
    pub history: u32,
    /// Seconds at least between kept points other than the latest (0: every point).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub history_spacing_s: u64,
    /// A reverse replication (after a planned failover to this host): the replica is
    /// seeded from the old primary's own disks (`PUT /peer/v1/replica/{vm}/reverse`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reverse: bool,
    /// Not replicating any more: the VM was failed over (planned) to this host, by
    /// its certificate name. Kept so that host may reverse the replication back here
    /// and fail the VM back; no loop runs for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_over_to: Option<String>,
    /// With `failed_over_to`: the failover was unplanned, made on the replica host
    /// while this host was down or cut off, and learnt from it afterwards
    /// ([`failed_over`](super::failed_over)).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unplanned: bool,
    /// A round succeeded against this replica since replication was enabled: a
    /// failed-over replica seen afterwards was failed over while this host
    /// replicated to it (settings stored before the field existed: yes). A replica
    /// found failed over before that is an older one (refused, not learnt from).
    #[serde(default = "yes")]
    pub established: bool,
    /// The bandwidth limit in Mbit/s (None: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mbit: Option<f64>,
    /// Why replication paused by itself (a full replica), kept across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_reason: Option<String>,
    /// Bytes of segments each disk's change log may hold (the VMM is told with each
    /// cut and keeps it beside the log).
    #[serde(default = "default_log_budget")]
    pub log_budget: u64,
}

/// A change log's budget when none is given: 2 GiB.
pub const DEFAULT_LOG_BUDGET: u64 = 2 << 30;
/// The smallest budget taken (a budget below a few segments degrades at once).
pub const MIN_LOG_BUDGET: u64 = 1 << 20;

fn default_log_budget() -> u64 {
    DEFAULT_LOG_BUDGET
}

/// A budget from the REST body: a number of bytes or a string with an optional K, M,
/// G or T suffix (powers of 1024); null: the default. Below 1 MiB or unreadable: an
/// error in one line.
pub fn parse_log_budget(v: &serde_json::Value) -> Result<u64, String> {
    let bytes = match v {
        serde_json::Value::Null => return Ok(DEFAULT_LOG_BUDGET),
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => {
            let t = s.trim();
            let (num, shift) = match t.char_indices().last() {
                Some((i, c)) if c.is_ascii_alphabetic() => {
                    let shift = match c.to_ascii_uppercase() {
                        'K' => 10,
                        'M' => 20,
                        'G' => 30,
                        'T' => 40,
                        _ => 64,
                    };
                    (&t[..i], shift)
                }
                _ => (t, 0),
            };
            num.trim()
                .parse::<u64>()
                .ok()
                .filter(|_| shift < 64)
                .and_then(|n| n.checked_mul(1u64 << shift))
        }
        _ => None,
    };
    match bytes {
        Some(b) if b >= MIN_LOG_BUDGET => Ok(b),
        Some(b) => Err(format!(
            "log_budget {b} bytes: at least {MIN_LOG_BUDGET} (1M)"
        )),
        None => Err(format!(
            "log_budget {v}: expected bytes, or a number with K, M, G or T (e.g. 2G)"
        )),
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn one() -> u32 {
    1
}

pub(super) fn yes() -> bool {
    true
}

/// The settings' limit in bytes per second (a stored limit out of range: none).
pub(super) fn limit_of(settings: &Settings) -> Option<u64> {
    settings
        .bandwidth_mbit
        .and_then(|m| crate::throttle::mbit_to_bytes_per_s(m).ok())
}

impl Replications {
    /// Stores (or removes) VM `name`'s settings in the inventory.
    pub(super) fn store(&self, name: &str, settings: Option<&Settings>) -> Result<(), String> {
        let json = settings
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| e.to_string())?;
        self.sup
            .save_replication(name, json.as_deref())
            .map_err(|e| format!("cannot store the replication settings: {e}"))
    }

    /// Starts the loop of every VM whose replication settings are stored (at vireod's
    /// start). A VM whose settings cannot be used any more (its disks changed, no host
    /// identity) is logged and left stored: enable or disable it again.
    pub fn restore(self: &Arc<Self>) {
        let stored = match self.sup.stored_replications() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "replication settings cannot be read; no replication restored");
                return;
            }
        };
        let mut jobs = lock(&self.jobs);
        for (name, json) in stored {
            let settings = match serde_json::from_str::<Settings>(&json) {
                Ok(s) => s,
                Err(e) => {
                    warn!(vm = %name, error = %e, "unreadable replication settings; not restored");
                    continue;
                }
            };
            if let Some(to) = &settings.failed_over_to {
                info!(vm = %name, to = %to, unplanned = settings.unplanned, "failed over; no replication to restore");
                continue;
            }
            match self.start_job(&name, settings) {
                Ok(job) => {
                    info!(vm = %name, to = %job.settings.to, paused = job.settings.paused, "replication restored");
                    jobs.insert(name, job);
                }
                Err((_, e)) => {
                    warn!(vm = %name, error = %e, "replication not restored");
                    self.sup
                        .replication_event(&name, "replication-failing", Some(e));
                }
            }
        }
    }

    /// The host VM `name` was failed over to (planned) from here, if it was.
    pub fn failed_over_to(sup: &Supervisor, name: &str) -> Option<String> {
        sup.stored_replications()
            .ok()?
            .into_iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, json)| serde_json::from_str::<Settings>(&json).ok())
            .and_then(|s| s.failed_over_to)
    }
}
