//! Failovers: planned, from here (the loop stops, the VM shuts down, the last cut is
//! shipped and committed, the replica starts the VM); unplanned, on this replica host
//! (the VM starts here from a kept point); and the kept points of a replica here.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tracing::{info, warn};

use super::settings::limit_of;
use super::{error, lock, Replications, Settings};
use crate::replica_primary::Shipper;
use crate::replica_server::ReplicaServer;
use crate::throttle::Throttle;

impl Replications {
    /// Planned failover of VM `name` (replicating from here): its loop stops, the VM
    /// is shut down (killed if it does not stop in time), every disk's log sealed at
    /// one last cut, everything the replica lacks sent and that cut committed; then
    /// the replica starts the VM and replication of it ends here. A step that fails
    /// leaves the settings stored and the loop paused (nothing is lost: the log keeps
    /// what the replica did not apply).
    pub async fn planned_failover(
        self: &Arc<Self>,
        name: &str,
        start: bool,
    ) -> Result<serde_json::Value, (StatusCode, String)> {
        let job = lock(&self.jobs).remove(name).ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!("replication of {name:?} is not enabled"),
            )
        })?;
        job.task.abort();
        let settings = Settings {
            paused: true,
            ..job.settings.clone()
        };
        match self.failover_steps(name, &settings, start).await {
            Ok(v) => {
                // Kept (no loop runs) so the new primary may reverse to this host.
                let marker = Settings {
                    failed_over_to: Some(settings.server_name.to_ascii_lowercase()),
                    ..settings.clone()
                };
                if let Err(e) = self.store(name, Some(&marker)) {
                    warn!(vm = %name, error = %e, "the failover is not recorded: no reverse replication to this host");
                }
                self.sup.replication_event(
                    name,
                    "replication-failed-over",
                    Some(format!("to {}", settings.to)),
                );
                Ok(v)
            }
            Err(e) => {
                warn!(vm = %name, error = %e, "planned failover failed; replication paused");
                self.sup
                    .replication_event(name, "replication-failing", Some(e.clone()));
                if let Ok(job) = self.start_job(name, settings.clone()) {
                    let _ = self.store(name, Some(&settings));
                    lock(&self.jobs).insert(name.to_string(), job);
                }
                Err((
                    StatusCode::CONFLICT,
                    format!("planned failover of {name:?}: {e}"),
                ))
            }
        }
    }

    async fn failover_steps(
        &self,
        name: &str,
        settings: &Settings,
        start: bool,
    ) -> Result<serde_json::Value, String> {
        let shipper = Shipper {
            to: self.endpoint(&settings.to, &settings.server_name)?,
            vm: name.to_string(),
            disks: self.sources(name)?,
            extras: self.extras(name)?,
            history: settings.history,
            history_spacing_s: settings.history_spacing_s,
            reverse: settings.reverse,
            throttle: Throttle::new(limit_of(settings)),
            verified: Default::default(),
        };
        let running = self.sup.get(name).map_err(|e| e.to_string())?;
        if running.pid.is_some() {
            self.sup
                .stop(name, None)
                .await
                .map_err(|e| format!("shutting the VM down: {e}"))?;
        }
        let dirs = shipper
            .disks
            .iter()
            .map(|d| {
                self.sup
                    .roots()
                    .open_dir(&d.log_dir)
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cut = shipper
            .seal_after_stop(dirs)
            .map_err(|e| crate::error_chain(&e))?;
        shipper
            .round(|| async { Ok(cut) })
            .await
            .map_err(|e| crate::error_chain(&e))?;
        let point = shipper
            .status()
            .await
            .map_err(|e| crate::error_chain(&e))?
            .point
            .map(|p| p.cut_id);
        if point != Some(cut) {
            return Err(format!(
                "the replica's point is {point:?}, not the last cut {cut}"
            ));
        }
        let replica = shipper
            .request_failover(start)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        info!(vm = %name, cut, "planned failover: the VM runs on the replica");
        Ok(serde_json::json!({"vm": name, "point": cut, "replica": replica}))
    }

    /// Unplanned failover to this host: `primary`'s VM `vm` starts here from its
    /// replica's latest point or the kept `point` (`primary` may be left out when one
    /// primary holds `vm`).
    pub async fn failover_here(
        &self,
        vm: &str,
        primary: Option<&str>,
        point: Option<u64>,
        start: bool,
    ) -> Result<serde_json::Value, Response> {
        let (server, primary) = self.replica_of(vm, primary).map_err(|r| *r)?;
        crate::replica_failover::fail_over(&self.sup, &server, &primary, vm, point, start)
            .await
            .map_err(IntoResponse::into_response)
    }

    /// This host's replica server and the primary whose replica of `vm` is meant.
    pub(super) fn replica_of(
        &self,
        vm: &str,
        primary: Option<&str>,
    ) -> Result<(Arc<ReplicaServer>, String), Box<Response>> {
        let server = self.replica.as_ref().ok_or_else(|| {
            Box::new(error(
                StatusCode::CONFLICT,
                "this vireod is not a replica server (--replica-dir)".into(),
            ))
        })?;
        let primary = match primary {
            Some(p) => p.to_string(),
            None => {
                let holding = server.primaries_holding(vm);
                match holding.as_slice() {
                    [one] => one.clone(),
                    [] => {
                        return Err(Box::new(error(
                            StatusCode::NOT_FOUND,
                            format!("no replica of a VM named {vm:?} here"),
                        )))
                    }
                    _ => {
                        return Err(Box::new(error(
                            StatusCode::CONFLICT,
                            format!("replicas of {vm:?} from {holding:?}: name the primary"),
                        )))
                    }
                }
            }
        };
        Ok((server.clone(), primary))
    }

    /// The recovery points kept of `vm`'s replica here.
    pub(super) async fn points(
        &self,
        vm: &str,
        primary: Option<&str>,
    ) -> Result<serde_json::Value, Response> {
        let (server, primary) = self.replica_of(vm, primary).map_err(|r| *r)?;
        let name = vm.to_string();
        let st = server
            .on_vm(&primary, vm, move |dir| {
                replica::ReplicaVm::open(std::os::fd::AsFd::as_fd(&dir), &name)?.status()
            })
            .await
            .map_err(|e| {
                let status = match e {
                    replica::StoreError::NotFound => StatusCode::NOT_FOUND,
                    replica::StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                error(
                    status,
                    format!("replica of {vm}: {}", crate::error_chain(&e)),
                )
            })?;
        Ok(serde_json::json!({
            "vm": vm,
            "primary": primary,
            "keep": st.keep,
            "spacing_s": st.spacing_s,
            "failed_over": st.failed_over,
            "points": st.points,
        }))
    }
}
