//! Each VM's replication loop as a job: enabled (validated, stored, started), paused
//! and resumed, its bandwidth limit set, disabled, and stopped when the VM is deleted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use tokio::sync::watch;
use tracing::{info, warn};

use super::settings::limit_of;
use super::{
    lock, run, EnableRequest, Job, ReplicationStatus, Replications, Settings, MIN_INTERVAL,
};
use crate::replica_primary::Shipper;
use crate::throttle::Throttle;

impl Replications {
    pub fn enable(
        self: &Arc<Self>,
        name: &str,
        req: EnableRequest,
    ) -> Result<ReplicationStatus, (StatusCode, String)> {
        let bad = |m: String| (StatusCode::BAD_REQUEST, m);
        crate::model::validate_name(name).map_err(|e| bad(e.to_string()))?;
        let host = req
            .to
            .rsplit_once(':')
            .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
            .ok_or_else(|| bad(format!("--to {:?}: expected HOST:PORT", req.to)))?;
        let interval = Duration::from_secs_f64(req.interval_s.unwrap_or(30.0).max(0.0));
        if interval < MIN_INTERVAL || interval > Duration::from_secs(24 * 3600) {
            return Err(bad(format!("interval {interval:?}: from 1 s to 24 h")));
        }
        let history = req.history.unwrap_or(1);
        if history == 0 || history > replica::MAX_HISTORY {
            return Err(bad(format!(
                "history {history}: from 1 to {} recovery points",
                replica::MAX_HISTORY
            )));
        }
        let history_spacing_s = req.history_spacing_s.unwrap_or(0);
        if history_spacing_s > replica::MAX_SPACING_S {
            return Err(bad(format!(
                "history_spacing_s {history_spacing_s}: at most {} (a week)",
                replica::MAX_SPACING_S
            )));
        }
        if history_spacing_s > 0 && history == 1 {
            return Err(bad(
                "history_spacing_s thins a history: it needs history above 1".to_string(),
            ));
        }
        let bandwidth_mbit = crate::throttle::parse_limit(&req.bandwidth_mbit).map_err(bad)?;
        let log_budget = super::settings::parse_log_budget(&req.log_budget).map_err(bad)?;
        let settings = Settings {
            to: req.to.clone(),
            server_name: req.server_name.clone().unwrap_or(host),
            interval_ms: interval.as_millis() as u64,
            paused: false,
            history,
            history_spacing_s,
            reverse: req.reverse,
            failed_over_to: None,
            unplanned: false,
            established: false,
            bandwidth_mbit,
            paused_reason: None,
            log_budget,
        };
        let mut jobs = lock(&self.jobs);
        if jobs.contains_key(name) {
            return Err((
                StatusCode::CONFLICT,
                format!("replication of {name:?} is enabled already (disable it first)"),
            ));
        }
        let job = self.start_job(name, settings)?;
        if let Err(e) = self.store(name, Some(&job.settings)) {
            job.task.abort();
            return Err((StatusCode::INTERNAL_SERVER_ERROR, e));
        }
        let st = lock(&job.status).clone();
        jobs.insert(name.to_string(), job);
        self.sup
            .replication_event(name, "replication-enabled", Some(format!("to {}", req.to)));
        Ok(st)
    }

    /// Starts VM `name`'s loop with `settings` (paused if they say so).
    pub(super) fn start_job(
        self: &Arc<Self>,
        name: &str,
        settings: Settings,
    ) -> Result<Job, (StatusCode, String)> {
        let disks = self.sources(name).map_err(|m| (StatusCode::CONFLICT, m))?;
        let to = self
            .endpoint(&settings.to, &settings.server_name)
            .map_err(|m| (StatusCode::BAD_REQUEST, m))?;
        let interval = Duration::from_millis(settings.interval_ms).max(MIN_INTERVAL);
        let status = Arc::new(Mutex::new(ReplicationStatus {
            vm: name.to_string(),
            to: settings.to.clone(),
            server_name: settings.server_name.clone(),
            interval_ms: interval.as_millis() as u64,
            paused: settings.paused,
            paused_reason: settings.paused_reason.clone(),
            bandwidth_mbit: settings.bandwidth_mbit,
            history: settings.history,
            history_spacing_s: settings.history_spacing_s,
            log_budget: settings.log_budget,
            state: if settings.paused {
                "paused"
            } else {
                "starting"
            }
            .into(),
            ..Default::default()
        }));
        let (paused, paused_rx) = watch::channel(settings.paused);
        let throttle = Throttle::new(limit_of(&settings));
        let shipper = Shipper {
            to,
            vm: name.to_string(),
            disks,
            extras: self.extras(name).map_err(|m| (StatusCode::CONFLICT, m))?,
            history: settings.history,
            history_spacing_s: settings.history_spacing_s,
            reverse: settings.reverse,
            throttle: throttle.clone(),
            verified: Default::default(),
        };
        let task = tokio::spawn(run(
            Arc::downgrade(self),
            shipper,
            interval,
            settings.log_budget,
            status.clone(),
            paused_rx,
        ));
        Ok(Job {
            settings,
            status,
            throttle,
            paused,
            task,
        })
    }

    /// Whether VM `name`'s replication had a good round with its replica
    /// ([`Settings::established`]).
    pub(super) fn established(&self, name: &str) -> bool {
        lock(&self.jobs)
            .get(name)
            .is_some_and(|j| j.settings.established)
    }

    /// Records that VM `name`'s replication had a good round (once).
    pub(super) fn set_established(&self, name: &str) {
        let mut jobs = lock(&self.jobs);
        let Some(job) = jobs.get_mut(name).filter(|j| !j.settings.established) else {
            return;
        };
        job.settings.established = true;
        if let Err(e) = self.store(name, Some(&job.settings)) {
            warn!(vm = %name, error = %e, "the replication's first good round is not recorded");
        }
    }

    /// Whether a loop runs for VM `name`.
    pub(super) fn running(&self, name: &str) -> bool {
        lock(&self.jobs).contains_key(name)
    }

    /// Sets VM `name`'s bandwidth limit (None: none); its sender obeys it from its
    /// next write, a request in flight included. Stored with the settings.
    pub(super) fn set_bandwidth(&self, name: &str, mbit: Option<f64>) -> Option<ReplicationStatus> {
        let mut jobs = lock(&self.jobs);
        let job = jobs.get_mut(name)?;
        job.settings.bandwidth_mbit = mbit;
        if let Err(e) = self.store(name, Some(&job.settings)) {
            warn!(vm = %name, error = %e, "the bandwidth limit is not stored");
        }
        job.throttle.set(limit_of(&job.settings));
        lock(&job.status).bandwidth_mbit = mbit;
        let detail = match mbit {
            Some(m) => format!("{m} Mbit/s"),
            None => "off".to_string(),
        };
        info!(vm = %name, bandwidth = %detail, "replication bandwidth limit set");
        self.sup
            .replication_event(name, "replication-bandwidth", Some(detail));
        Some(job.snapshot())
    }

    /// The loop of VM `name` met a full replica: replication pauses (stored, so a
    /// restart keeps it paused) with the reason and event `replica-paused`; the change
    /// log keeps everything until `replica resume`.
    pub(super) fn pause_for(&self, name: &str, reason: String) {
        let mut jobs = lock(&self.jobs);
        let Some(job) = jobs.get_mut(name) else {
            return;
        };
        job.settings.paused = true;
        job.settings.paused_reason = Some(reason.clone());
        if let Err(e) = self.store(name, Some(&job.settings)) {
            warn!(vm = %name, error = %e, "the paused state is not stored");
        }
        job.paused.send_replace(true);
        {
            let mut st = lock(&job.status);
            st.paused = true;
            st.paused_reason = Some(reason.clone());
            st.state = "paused".into();
        }
        warn!(vm = %name, %reason, "replication paused");
        self.sup
            .replication_event(name, "replica-paused", Some(reason));
    }

    /// Pauses or resumes VM `name`'s replication (an operator's word, or `detail`
    /// when the loop resumes itself: its event says why).
    pub(super) fn set_paused(
        &self,
        name: &str,
        paused: bool,
        detail: Option<String>,
    ) -> Option<ReplicationStatus> {
        let mut jobs = lock(&self.jobs);
        let job = jobs.get_mut(name)?;
        job.settings.paused = paused;
        job.settings.paused_reason = None;
        if let Err(e) = self.store(name, Some(&job.settings)) {
            warn!(vm = %name, error = %e, "the paused state is not stored");
        }
        job.paused.send_replace(paused);
        let mut st = lock(&job.status);
        st.paused = paused;
        st.paused_reason = None;
        st.wire_bytes_sent = job.throttle.written();
        if paused {
            st.state = "paused".into();
        }
        let event = if paused {
            "replication-paused"
        } else {
            "replication-resumed"
        };
        self.sup.replication_event(name, event, detail);
        Some(st.clone())
    }

    pub(super) fn disable(&self, name: &str) -> Option<ReplicationStatus> {
        let Some(job) = lock(&self.jobs).remove(name) else {
            // Failed over elsewhere: the record goes, the VM may start here again.
            let st = self.failed_over_status(name)?;
            if let Err(e) = self.store(name, None) {
                warn!(vm = %name, error = %e, "the failover record stays stored");
                return None;
            }
            info!(vm = %name, "the record of the failover elsewhere forgotten: the VM may start here");
            self.sup.replication_event(
                name,
                "replication-disabled",
                Some("the failover elsewhere forgotten".into()),
            );
            return Some(st);
        };
        job.task.abort();
        if let Err(e) = self.store(name, None) {
            warn!(vm = %name, error = %e, "the disabled replication stays stored");
        }
        self.sup
            .replication_event(name, "replication-disabled", None);
        let st = lock(&job.status).clone();
        Some(st)
    }

    /// Deletes VM `name`'s replication when the VM is deleted (its stored settings
    /// went with the VM's inventory rows): the loop stops, nothing of it stays.
    pub fn forget_deleted(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let mut events = self.sup.subscribe();
        tokio::spawn(async move {
            loop {
                let gone: Vec<String> = match events.recv().await {
                    Ok(e) if e.event == "deleted" => vec![e.vm],
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Events were missed: look at every job.
                        let Some(r) = me.upgrade() else { return };
                        let names: Vec<String> = lock(&r.jobs).keys().cloned().collect();
                        names
                            .into_iter()
                            .filter(|n| r.sup.get(n).is_err())
                            .collect()
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let Some(r) = me.upgrade() else { return };
                for name in gone {
                    if r.sup.get(&name).is_ok() {
                        continue; // deleted and defined again meanwhile
                    }
                    if let Some(job) = lock(&r.jobs).remove(&name) {
                        job.task.abort();
                        if let Err(e) = r.store(&name, None) {
                            warn!(vm = %name, error = %e, "the deleted VM's replication stays stored");
                        }
                        info!(vm = %name, "replication of a deleted VM stopped");
                        r.sup.replication_event(
                            &name,
                            "replication-disabled",
                            Some("the VM was deleted".into()),
                        );
                    }
                }
            }
        });
    }
}
