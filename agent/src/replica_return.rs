//! The old primary's safe return after an unplanned failover elsewhere: a VM this
//! host replicated was started on its replica host from a recovery point while this
//! host was down or cut off. Running it here too would be a split brain (two VMs with
//! one identity, the old disks diverging further), so:
//!
//! - the replica host tells: its replica of the VM answers `failed_over: true` to
//!   the status every round asks first (`GET /peer/v1/replica/{vm}`, mutual TLS);
//!   the loop ([`super::run`]) and, at vireod's start before the automatic starts,
//!   [`Replications::learn_failovers`] ask it;
//! - this host records it with the replication settings (`failed_over_to` the
//!   replica's certificate name, `unplanned`), stops the loop (no retry: the replica
//!   refuses every segment), kills the VM if it runs (event
//!   `replication-failed-over-elsewhere`), and refuses to start it
//!   ([`crate::AgentError::FailedOverElsewhere`]);
//! - `GET .../replication` shows state `failed-over-elsewhere`; the record is what
//!   lets that host (and only it) reverse the replication onto this host
//!   ([`crate::replica_reverse::seed_here`]); `replica disable` forgets it (the
//!   operator's call: the VM may start here again).
//!
//! A host that never hears from its replica host cannot know: it runs its VM as
//! before (documented in docs/replica.md).

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::{lock, ReplicationStatus, Replications, Settings};
use crate::client::{self, Endpoint};

/// The state `GET .../replication` shows for a VM failed over elsewhere.
pub const STATE: &str = "failed-over-elsewhere";

/// Whether the replica at `to` holds VM `vm`'s replica failed over (a 404, no replica
/// there: no).
pub async fn replica_failed_over(
    to: &Endpoint,
    vm: &str,
    timeout: Duration,
) -> Result<bool, String> {
    let path = format!("/peer/v1/replica/{vm}");
    let r = client::request_via(to, None, "GET", &path, None, timeout)
        .await
        .map_err(|e| format!("replica {to}: {}", crate::error_chain(&e)))?;
    match r.status {
        200 => Ok(r.json().is_some_and(|v| v["failed_over"] == true)),
        404 => Ok(false),
        s => Err(format!(
            "replica {to} answered {s} to GET {path}: {}",
            r.error_message()
        )),
    }
}

/// Why a VM does not replicate nor run here, for its status and the start refusal.
fn why(vm: &str, to: &str) -> String {
    format!(
        "{vm} was failed over to {to} (unplanned: the VM runs there from a recovery point): replication from here stopped and the VM does not start here; reverse the replication from {to} to bring it back, or `replica disable` to forget the failover"
    )
}

/// The status of VM `name` with settings `s` if it was failed over elsewhere,
/// unplanned.
fn failed_over_status_of(name: &str, s: &Settings) -> Option<ReplicationStatus> {
    let to = s.failed_over_to.clone().filter(|_| s.unplanned)?;
    Some(ReplicationStatus {
        vm: name.to_string(),
        to: s.to.clone(),
        server_name: s.server_name.clone(),
        interval_ms: s.interval_ms,
        paused: false,
        history: s.history,
        state: STATE.into(),
        bandwidth_mbit: s.bandwidth_mbit,
        last_error: Some(why(name, &to)),
        failed_over_to: Some(to),
        ..Default::default()
    })
}

impl Replications {
    /// The stored settings of VM `name`, if any.
    fn stored(&self, name: &str) -> Option<Settings> {
        self.sup
            .stored_replications()
            .ok()?
            .into_iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, json)| serde_json::from_str::<Settings>(&json).ok())
    }

    /// The status of VM `name` when it was failed over elsewhere, unplanned (no loop
    /// runs for it).
    pub(super) fn failed_over_status(&self, name: &str) -> Option<ReplicationStatus> {
        failed_over_status_of(name, &self.stored(name)?)
    }

    /// Every VM failed over elsewhere, unplanned (the settings read once).
    pub(super) fn failed_over_list(&self) -> Vec<ReplicationStatus> {
        self.sup
            .stored_replications()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(n, json)| {
                let s = serde_json::from_str::<Settings>(&json).ok()?;
                failed_over_status_of(&n, &s)
            })
            .collect()
    }

    /// VM `name`'s replica host says the VM was failed over there: its loop stops
    /// (aborted when `abort_loop`; the loop itself returns instead), the failover is
    /// recorded with its settings, and the VM is killed if it runs here. Idempotent.
    pub(crate) async fn failed_over_elsewhere(self: &Arc<Self>, name: &str, abort_loop: bool) {
        let job = lock(&self.jobs).remove(name);
        let settings = match &job {
            Some(j) => j.settings.clone(),
            None => match self.stored(name) {
                Some(s) if s.failed_over_to.is_none() => s,
                _ => return,
            },
        };
        if let Some(j) = &job {
            if abort_loop {
                j.task.abort();
            }
        }
        let to = settings.server_name.to_ascii_lowercase();
        let marker = Settings {
            failed_over_to: Some(to.clone()),
            unplanned: true,
            paused: false,
            paused_reason: None,
            ..settings
        };
        if let Err(e) = self.store(name, Some(&marker)) {
            warn!(vm = %name, error = %e, "the failover elsewhere is not recorded");
        }
        warn!(vm = %name, replica = %to, "the VM was failed over to its replica host: replication stopped, the VM does not run here");
        self.sup.replication_event(
            name,
            "replication-failed-over-elsewhere",
            Some(format!("to {to}")),
        );
        if self.sup.get(name).is_ok_and(|s| s.pid.is_some()) {
            match self.sup.kill(name).await {
                Ok(_) => warn!(vm = %name, replica = %to, "killed: it runs on its replica host"),
                Err(e) => {
                    warn!(vm = %name, error = %crate::error_chain(&e), "the VM failed over elsewhere could not be killed")
                }
            }
        }
    }

    /// `peer` asks to reverse VM `name`'s replication onto this host before this host
    /// learnt the failover: if `peer` is the VM's replica host (by certificate name)
    /// and its replica answers failed over, it is learnt now (as a round would). The
    /// caller checked that the VM does not run here.
    pub(crate) async fn confirm_failover(self: &Arc<Self>, peer: &str, name: &str) {
        let to = {
            let jobs = lock(&self.jobs);
            let Some(j) = jobs.get(name) else { return };
            let s = &j.settings;
            if s.reverse || !s.established || !s.server_name.eq_ignore_ascii_case(peer) {
                return;
            }
            match self.endpoint(&s.to, &s.server_name) {
                Ok(e) => e,
                Err(_) => return,
            }
        };
        let timeout = Duration::from_secs(10);
        match replica_failed_over(&to, name, timeout).await {
            Ok(true) => self.failed_over_elsewhere(name, true).await,
            Ok(false) => {}
            Err(e) => info!(vm = %name, error = %e, "the replica host's failover not confirmed"),
        }
    }

    /// At vireod's start (before the automatic starts): asks the replica host of every
    /// restored replication whether it failed the VM over, each at most `timeout`. A
    /// replica that does not answer in time tells nothing: its loop goes on asking.
    pub async fn learn_failovers(self: &Arc<Self>, timeout: Duration) {
        let asks: Vec<(String, Endpoint)> = lock(&self.jobs)
            .iter()
            .filter(|(_, j)| !j.settings.reverse && j.settings.established)
            .filter_map(|(n, j)| {
                self.endpoint(&j.settings.to, &j.settings.server_name)
                    .ok()
                    .map(|e| (n.clone(), e))
            })
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        for (name, to) in asks {
            tasks.spawn(async move {
                let r = tokio::time::timeout(timeout, replica_failed_over(&to, &name, timeout))
                    .await
                    .unwrap_or_else(|_| Err(format!("replica {to}: no answer in {timeout:?}")));
                (name, r)
            });
        }
        while let Some(done) = tasks.join_next().await {
            let Ok((name, r)) = done else { continue };
            match r {
                Ok(true) => self.failed_over_elsewhere(&name, true).await,
                Ok(false) => {}
                Err(e) => {
                    info!(vm = %name, error = %e, "replica not reached at start: its failover state is not known yet")
                }
            }
        }
    }
}

/// The refusal of a start of VM `name` that was failed over elsewhere (stored
/// settings JSON of it in `stored`).
pub fn start_refusal(name: &str, stored: &str) -> Option<crate::AgentError> {
    let s = serde_json::from_str::<Settings>(stored).ok()?;
    let to = s.failed_over_to?;
    Some(crate::AgentError::FailedOverElsewhere {
        name: name.to_string(),
        to: to.clone(),
        why: if s.unplanned {
            why(name, &to)
        } else {
            format!("{name} was failed over (planned) to {to} and runs there: it does not start here too; fail it back from {to}, or `replica disable` to forget the failover")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_of_an_older_vireod_count_as_established_and_a_failover_record_refuses_starts() {
        let old = r#"{"to":"10.0.0.2:7443","server_name":"host-b","interval_ms":1000}"#;
        let s: Settings = serde_json::from_str(old).unwrap();
        assert!(s.established && !s.unplanned && s.failed_over_to.is_none());
        assert!(start_refusal("vm1", old).is_none());
        let record = Settings {
            failed_over_to: Some("host-b".into()),
            unplanned: true,
            ..s
        };
        let json = serde_json::to_string(&record).unwrap();
        let e = start_refusal("vm1", &json).unwrap();
        assert_eq!(e.status(), 409);
        assert!(e.to_string().contains("failed over to host-b"), "{e}");
        let back: Settings = serde_json::from_str(&json).unwrap();
        assert_eq!(back, record);
    }
}
