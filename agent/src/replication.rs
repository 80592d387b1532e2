//! The primary's replication loop in vireod: for each VM with replication enabled, a
//! task that every `interval` cuts (the VMM's `vm.replica-cut`), ships what the
//! replica lacks and commits the new point ([`crate::replica_primary::Shipper`]). A
//! failed round (a cut link, a replica down, a VM not running) is retried with a
//! backoff that doubles from 1 s up to 60 s; nothing is lost meanwhile: the segments
//! stay in the VM's change log until the replica applied them.
//!
//! Routes (unix socket): `PUT/GET/DELETE /api/v1/vms/{name}/replication`,
//! `POST /api/v1/vms/{name}/replication/pause|resume|reverse`, `GET /api/v1/replication`.
//! Events: `replication-enabled`, `-paused`, `-resumed`, `-disabled`, `-failing`
//! (the first failed round after a good one), `-recovered`.
//!
//! The settings ([`Settings`]: replica, name, interval, paused) are stored in vireod's
//! inventory (table `replications`) when replication is enabled, paused or resumed,
//! and removed when it is disabled or the VM deleted. A vireod that starts restores
//! every stored VM's loop ([`Replications::restore`]); its first round asks the replica
//! what it holds, so it goes on from there: no second initial copy.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::client::{self, Endpoint};
use crate::replica_primary::{DiskSource, Extras, ShipError, Shipper};
use crate::replica_server::ReplicaServer;
use crate::supervisor::Supervisor;
use crate::throttle::Throttle;

/// The old primary's safe return after an unplanned failover elsewhere.
#[path = "replica_return.rs"]
pub mod failed_over;

const MIN_INTERVAL: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
const CUT_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Set by a reverse replication (not part of the REST body).
    #[serde(skip)]
    pub reverse: bool,
}

/// What `GET .../replication` answers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicationStatus {
    pub vm: String,
    pub to: String,
    pub server_name: String,
    pub interval_ms: u64,
    pub paused: bool,
    /// Recovery points the replica keeps.
    pub history: u32,
    /// Seconds at least between kept points other than the latest (0: every point).
    pub history_spacing_s: u64,
    /// "starting", "replicating", "paused", "retrying", or "failed-over-elsewhere"
    /// (the replica host started the VM from a recovery point: no loop runs, the VM
    /// does not start here).
    pub state: String,
    /// The replica host the VM was failed over to (unplanned), by its certificate name.
    pub failed_over_to: Option<String>,
    /// Why replication paused by itself (e.g. "replica full: ..."); None after a
    /// pause asked for, or once resumed.
    pub paused_reason: Option<String>,
    /// The bandwidth limit (Mbit/s), if any.
    pub bandwidth_mbit: Option<f64>,
    /// Every byte this loop wrote to the replica's connections (TLS included): what
    /// the limit counts.
    pub wire_bytes_sent: u64,
    pub last_point: Option<u64>,
    /// When the replica acknowledged the point (committed, verified, synced).
    pub last_point_at_ms: Option<u64>,
    /// When the cut of that point was asked of the VMM: every guest write completed
    /// before it is in the point (None when the point is an older cut than the
    /// round's own, after a torn cut).
    pub last_point_cut_at_ms: Option<u64>,
    pub rounds: u64,
    pub failed_rounds: u64,
    pub base_bytes_sent: u64,
    /// Bytes of the disks the initial copy sent before compression: the blocks that
    /// differed at the replica (a resync by block hashes).
    pub base_differing_bytes: u64,
    pub segment_bytes_sent: u64,
    pub segments_sent: u64,
    /// How long the last cut held the guest's writes (µs), and the longest since
    /// replication started here.
    pub last_cut_held_us: Option<u64>,
    pub max_cut_held_us: u64,
    pub last_error: Option<String>,
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
    /// ([`failed_over`]).
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
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn one() -> u32 {
    1
}

/// The settings' limit in bytes per second (a stored limit out of range: none).
fn limit_of(settings: &Settings) -> Option<u64> {
    settings
        .bandwidth_mbit
        .and_then(|m| crate::throttle::mbit_to_bytes_per_s(m).ok())
}

impl Job {
    /// The status with the live byte count.
    fn snapshot(&self) -> ReplicationStatus {
        let mut st = lock(&self.status).clone();
        st.wire_bytes_sent = self.throttle.written();
        st
    }
}

struct Job {
    settings: Settings,
    status: Arc<Mutex<ReplicationStatus>>,
    throttle: Arc<Throttle>,
    paused: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Every VM's replication on this host.
pub struct Replications {
    sup: Arc<Supervisor>,
    /// This host's replica server (`--replica-dir`), for failovers to this host.
    replica: Option<Arc<ReplicaServer>>,
    jobs: Mutex<BTreeMap<String, Job>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(serde_json::json!({ "error": msg }))).into_response()
}

impl Replications {
    pub fn new(sup: Arc<Supervisor>, replica: Option<Arc<ReplicaServer>>) -> Arc<Self> {
        Arc::new(Self {
            sup,
            replica,
            jobs: Mutex::new(BTreeMap::new()),
        })
    }

    /// What a failover on the replica boots: VM `name`'s definition, kernel and
    /// initramfs.
    fn extras(&self, name: &str) -> Result<Extras, String> {
        let defs = self.sup.export();
        let def = defs.get(name).ok_or(format!("no VM named {name:?}"))?;
        Ok(Extras {
            definition: Some(serde_json::to_vec(def).map_err(|e| e.to_string())?),
            kernel: Some(def.config.payload.kernel.clone()),
            initramfs: def.config.payload.initramfs.clone(),
            ..Default::default()
        })
    }

    /// The replicated disks of VM `name` (raw images with `replica_log`).
    fn sources(&self, name: &str) -> Result<Vec<DiskSource>, String> {
        let defs = self.sup.export();
        let def = defs.get(name).ok_or(format!("no VM named {name:?}"))?;
        let mut out = Vec::new();
        for d in &def.config.disks {
            let Some(log) = &d.replica_log else { continue };
            if d.effective_format() != api::config::DiskFormat::Raw {
                return Err(format!(
                    "disk {}: only raw images are replicated yet (the initial copy reads the image)",
                    d.path.display()
                ));
            }
            let size = std::fs::metadata(&d.path)
                .map_err(|e| format!("disk {}: {e}", d.path.display()))?
                .len();
            out.push(DiskSource {
                log_dir: log.clone(),
                image: d.path.clone(),
                size,
            });
        }
        if out.is_empty() {
            return Err(format!(
                "no disk of {name:?} is replicated (give its disks replica_log=DIR)"
            ));
        }
        Ok(out)
    }

    pub(crate) fn supervisor(&self) -> &Arc<Supervisor> {
        &self.sup
    }

    /// This host's replica server, if it is one (`--replica-dir`).
    pub(crate) fn replica_server(&self) -> Option<&Arc<ReplicaServer>> {
        self.replica.as_ref()
    }

    pub(crate) fn endpoint(&self, to: &str, server_name: &str) -> Result<Endpoint, String> {
        let id = self.sup.cfg.identity.as_ref().ok_or(
            "replication needs this vireod's host identity (--tls-cert, --tls-key, --tls-ca)",
        )?;
        let tls = id.client_config().map_err(|e| crate::error_chain(&e))?;
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("replica name {server_name:?}: {e}"))?;
        Ok(Endpoint::Https {
            authority: to.to_string(),
            server_name,
            tls,
        })
    }

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
    fn start_job(
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

    /// Stores (or removes) VM `name`'s settings in the inventory.
    fn store(&self, name: &str, settings: Option<&Settings>) -> Result<(), String> {
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

    /// VM `name`'s replication: its loop's status, or that it was failed over
    /// elsewhere (unplanned).
    pub fn status(&self, name: &str) -> Option<ReplicationStatus> {
        let job = lock(&self.jobs).get(name).map(Job::snapshot);
        job.or_else(|| self.failed_over_status(name))
    }

    /// Whether VM `name`'s replication had a good round with its replica
    /// ([`Settings::established`]).
    fn established(&self, name: &str) -> bool {
        lock(&self.jobs)
            .get(name)
            .is_some_and(|j| j.settings.established)
    }

    /// Records that VM `name`'s replication had a good round (once).
    fn set_established(&self, name: &str) {
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
    fn running(&self, name: &str) -> bool {
        lock(&self.jobs).contains_key(name)
    }

    pub fn list(&self) -> Vec<ReplicationStatus> {
        let mut all: Vec<ReplicationStatus> =
            lock(&self.jobs).values().map(Job::snapshot).collect();
        all.extend(self.failed_over_list());
        all.sort_by(|a, b| a.vm.cmp(&b.vm));
        all
    }

    /// Sets VM `name`'s bandwidth limit (None: none); its sender obeys it from its
    /// next write, a request in flight included. Stored with the settings.
    fn set_bandwidth(&self, name: &str, mbit: Option<f64>) -> Option<ReplicationStatus> {
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
    fn pause_for(&self, name: &str, reason: String) {
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

    fn set_paused(&self, name: &str, paused: bool) -> Option<ReplicationStatus> {
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
        self.sup.replication_event(name, event, None);
        Some(st.clone())
    }

    fn disable(&self, name: &str) -> Option<ReplicationStatus> {
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
}

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
    fn replica_of(
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
    async fn points(&self, vm: &str, primary: Option<&str>) -> Result<serde_json::Value, Response> {
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

/// One VM's loop.
async fn run(
    owner: std::sync::Weak<Replications>,
    shipper: Shipper,
    interval: Duration,
    status: Arc<Mutex<ReplicationStatus>>,
    mut paused: watch::Receiver<bool>,
) {
    let Some(sup) = owner.upgrade().map(|r| r.sup.clone()) else {
        return;
    };
    let name = shipper.vm.clone();
    let mut backoff = Duration::from_secs(1);
    let mut failing = false;
    loop {
        while *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                return;
            }
        }
        let socket = sup.socket_path(&name);
        let cut_at = std::sync::atomic::AtomicU64::new(0);
        let cut_id = std::sync::atomic::AtomicU64::new(0);
        let cut_held_us = std::sync::atomic::AtomicU64::new(u64::MAX);
        let cut = || async {
            cut_at.store(crate::now_ms(), std::sync::atomic::Ordering::Relaxed);
            let r = client::request(&socket, "PUT", "/api/v1/vm.replica-cut", None, CUT_TIMEOUT)
                .await
                .map_err(|e| format!("VM {name:?} (is it running?): {}", crate::error_chain(&e)))?;
            if !r.ok() {
                return Err(format!("vm.replica-cut: {}", r.error_message()));
            }
            let answer = r.json();
            let id = answer
                .as_ref()
                .and_then(|v| v["cut_id"].as_u64())
                .unwrap_or(0);
            cut_id.store(id, std::sync::atomic::Ordering::Relaxed);
            if let Some(held) = answer.as_ref().and_then(|v| v["held_us"].as_u64()) {
                cut_held_us.store(held, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(id)
        };
        let began = std::time::Instant::now();
        let result = shipper.round(cut).await;
        if let Err(ShipError::FailedOverElsewhere { .. }) = &result {
            // Retrying would be refused for good, and the VM must not run here —
            // unless the replica was failed over before this replication reached it
            // (a stale replica: an error like any other, for the operator).
            let Some(r) = owner.upgrade() else { return };
            if r.established(&name) {
                r.failed_over_elsewhere(&name, false).await;
                return;
            }
        }
        if result.is_ok() {
            if let Some(r) = owner.upgrade() {
                r.set_established(&name);
            }
        }
        let full = match &result {
            Err(e @ ShipError::ReplicaFull { .. }) => Some(format!("replica full: {e}")),
            _ => None,
        };
        let wait = {
            let mut st = lock(&status);
            st.rounds += 1;
            let held = cut_held_us.load(std::sync::atomic::Ordering::Relaxed);
            if held != u64::MAX {
                st.last_cut_held_us = Some(held);
                st.max_cut_held_us = st.max_cut_held_us.max(held);
            }
            match result {
                Ok(s) => {
                    st.base_bytes_sent += s.base_bytes;
                    st.base_differing_bytes += s.base_differing_bytes;
                    st.segment_bytes_sent += s.segment_bytes;
                    st.segments_sent += s.segments_sent;
                    if let Some(p) = s.point {
                        st.last_point = Some(p);
                        st.last_point_at_ms = Some(crate::now_ms());
                        st.last_point_cut_at_ms = (p
                            == cut_id.load(std::sync::atomic::Ordering::Relaxed))
                        .then(|| cut_at.load(std::sync::atomic::Ordering::Relaxed));
                    }
                    st.last_error = None;
                    if !st.paused {
                        st.state = "replicating".into();
                    }
                    backoff = Duration::from_secs(1);
                    if failing {
                        failing = false;
                        sup.replication_event(&name, "replication-recovered", None);
                    }
                    // The interval is from cut to cut: a round that took longer is
                    // followed by the next at once.
                    interval.saturating_sub(began.elapsed())
                }
                Err(e) => {
                    let msg = crate::error_chain(&e);
                    warn!(vm = %name, error = %msg, retry_in = ?backoff, "replication round failed");
                    st.failed_rounds += 1;
                    st.last_error = Some(msg.clone());
                    if !st.paused {
                        st.state = "retrying".into();
                    }
                    // A full replica pauses (below) with its own event.
                    if !failing && full.is_none() {
                        failing = true;
                        sup.replication_event(&name, "replication-failing", Some(msg));
                    }
                    let w = backoff.min(interval.max(MIN_INTERVAL) * 4).min(MAX_BACKOFF);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    w
                }
            }
        };
        if let Some(reason) = full {
            // Retrying would fail the same way: wait for `replica resume`.
            let Some(r) = owner.upgrade() else { return };
            r.pause_for(&name, reason);
            failing = false;
            backoff = Duration::from_secs(1);
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            r = paused.changed() => if r.is_err() { return },
        }
    }
}

type R = State<Arc<Replications>>;

/// The replication routes (unix socket).
pub fn router(r: Arc<Replications>) -> Router {
    Router::new()
        .route("/api/v1/replication", get(list))
        .route("/api/v1/vms/{name}/replication", get(status))
        .route("/api/v1/vms/{name}/replication", put(enable))
        .route("/api/v1/vms/{name}/replication", delete(disable))
        .route("/api/v1/vms/{name}/replication/pause", post(pause))
        .route("/api/v1/vms/{name}/replication/resume", post(resume))
        .route("/api/v1/vms/{name}/replication/bandwidth", put(bandwidth))
        .route("/api/v1/vms/{name}/replication/failover", post(failover))
        .route("/api/v1/vms/{name}/replication/reverse", post(reverse))
        .route("/api/v1/replicas/{vm}/failover", post(failover_here))
        .route("/api/v1/replicas/{vm}/points", get(points))
        .route("/api/v1/replicas/{vm}/test-failover", post(test_failover))
        .route("/api/v1/replicas/{vm}/test-failover", delete(end_test))
        .with_state(r)
}

/// 404: no such VM, or its replication is not enabled.
fn not_enabled(r: &Replications, name: &str) -> Response {
    if let Some(st) = r.failed_over_status(name) {
        // 409: no loop runs, the VM was failed over elsewhere.
        return error(StatusCode::CONFLICT, st.last_error.unwrap_or_default());
    }
    let msg = match r.sup.get(name) {
        Err(e) => e.to_string(),
        Ok(_) => format!("replication of {name:?} is not enabled"),
    };
    error(StatusCode::NOT_FOUND, msg)
}

async fn list(State(r): R) -> Response {
    Json(r.list()).into_response()
}

async fn status(State(r): R, UrlPath(name): UrlPath<String>) -> Response {
    match r.status(&name) {
        Some(s) => Json(s).into_response(),
        None => not_enabled(&r, &name),
    }
}

async fn enable(State(r): R, UrlPath(name): UrlPath<String>, body: axum::body::Bytes) -> Response {
    if r.sup.get(&name).is_err() {
        return not_enabled(&r, &name);
    }
    let req: EnableRequest = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("replication: {e}")),
    };
    match r.enable(&name, req) {
        Ok(s) => {
            info!(vm = %name, to = %s.to, "replication enabled");
            (StatusCode::OK, Json(s)).into_response()
        }
        Err((status, m)) => error(status, m),
    }
}

async fn disable(State(r): R, UrlPath(name): UrlPath<String>) -> Response {
    match r.disable(&name) {
        Some(s) => Json(s).into_response(),
        None => not_enabled(&r, &name),
    }
}

async fn pause(State(r): R, UrlPath(name): UrlPath<String>) -> Response {
    match r.set_paused(&name, true) {
        Some(s) => Json(s).into_response(),
        None => not_enabled(&r, &name),
    }
}

/// `PUT /api/v1/vms/{name}/replication/bandwidth` `{"mbit": N | "off" | null}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BandwidthRequest {
    mbit: serde_json::Value,
}

async fn bandwidth(
    State(r): R,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    if !r.running(&name) {
        return not_enabled(&r, &name);
    }
    let req: BandwidthRequest = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bandwidth: {e}")),
    };
    let mbit = match crate::throttle::parse_limit(&req.mbit) {
        Ok(m) => m,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    match r.set_bandwidth(&name, mbit) {
        Some(s) => Json(s).into_response(),
        None => not_enabled(&r, &name),
    }
}

async fn resume(State(r): R, UrlPath(name): UrlPath<String>) -> Response {
    match r.set_paused(&name, false) {
        Some(s) => Json(s).into_response(),
        None => not_enabled(&r, &name),
    }
}

fn yes() -> bool {
    true
}

/// `POST /api/v1/vms/{name}/replication/failover` `{"planned": true, "start": bool}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverRequest {
    planned: bool,
    /// Start the VM on the replica host (default true).
    #[serde(default = "yes")]
    start: bool,
}

async fn failover(
    State(r): R,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    if !r.running(&name) {
        return not_enabled(&r, &name);
    }
    let start = match serde_json::from_slice::<FailoverRequest>(&body) {
        Ok(FailoverRequest {
            planned: true,
            start,
        }) => start,
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "here only a planned failover ({\"planned\": true}); an unplanned one is asked of the replica's vireod (POST /api/v1/replicas/{vm}/failover)".into(),
            )
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("failover: {e}")),
    };
    match r.planned_failover(&name, start).await {
        Ok(v) => Json(v).into_response(),
        Err((status, m)) => error(status, m),
    }
}

/// `POST /api/v1/vms/{name}/replication/reverse` `{"to": "HOST:PORT", ...}`: a VM
/// failed over to this host is replicated back to its old primary
/// ([`crate::replica_reverse`]).
async fn reverse(State(r): R, UrlPath(name): UrlPath<String>, body: axum::body::Bytes) -> Response {
    if r.sup.get(&name).is_err() {
        return not_enabled(&r, &name);
    }
    let req: crate::replica_reverse::ReverseRequest = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("reverse: {e}")),
    };
    match crate::replica_reverse::reverse(&r, &name, req).await {
        Ok(s) => (StatusCode::OK, Json(s)).into_response(),
        Err((status, m)) => {
            warn!(vm = %name, error = %m, "reverse replication refused");
            error(status, m)
        }
    }
}

/// `latest` (None) or a kept point's id (a number, or a string of digits).
fn point_id(v: &serde_json::Value) -> Result<Option<u64>, String> {
    match v {
        serde_json::Value::String(s) if s == "latest" => Ok(None),
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => s
            .parse()
            .map(Some)
            .map_err(|_| format!("point {s:?}: \"latest\" or a recovery point's id")),
        serde_json::Value::Number(n) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("point {n}: not a recovery point's id")),
        other => Err(format!(
            "point {other}: \"latest\" or a recovery point's id"
        )),
    }
}

/// `POST /api/v1/replicas/{vm}/failover` `{"point": "latest"|ID, "primary": NAME?}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverHereRequest {
    point: serde_json::Value,
    #[serde(default)]
    primary: Option<String>,
    /// Start the VM (default true).
    #[serde(default = "yes")]
    start: bool,
}

async fn failover_here(
    State(r): R,
    UrlPath(vm): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let req: FailoverHereRequest = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("failover: {e}")),
    };
    if req.point.is_null() {
        return error(
            StatusCode::BAD_REQUEST,
            "failover: name the point (\"latest\" or an id)".into(),
        );
    }
    let point = match point_id(&req.point) {
        Ok(p) => p,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    match r
        .failover_here(&vm, req.primary.as_deref(), point, req.start)
        .await
    {
        Ok(v) => Json(v).into_response(),
        Err(resp) => resp,
    }
}

#[derive(Debug, Default, Deserialize)]
struct PrimaryQuery {
    primary: Option<String>,
}

/// `GET /api/v1/replicas/{vm}/points[?primary=NAME]`: the kept recovery points.
async fn points(
    State(r): R,
    UrlPath(vm): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<PrimaryQuery>,
) -> Response {
    match r.points(&vm, q.primary.as_deref()).await {
        Ok(v) => Json(v).into_response(),
        Err(resp) => resp,
    }
}

/// `POST /api/v1/replicas/{vm}/test-failover` `{"point": "latest"|ID?, "primary"?, "start"?}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFailoverRequest {
    #[serde(default)]
    point: serde_json::Value,
    #[serde(default)]
    primary: Option<String>,
    #[serde(default = "yes")]
    start: bool,
}

async fn test_failover(
    State(r): R,
    UrlPath(vm): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let req: TestFailoverRequest = if body.is_empty() {
        TestFailoverRequest {
            point: serde_json::Value::Null,
            primary: None,
            start: true,
        }
    } else {
        match serde_json::from_slice(&body) {
            Ok(q) => q,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("test failover: {e}")),
        }
    };
    let point = match point_id(&req.point) {
        Ok(p) => p,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let (server, primary) = match r.replica_of(&vm, req.primary.as_deref()) {
        Ok(x) => x,
        Err(resp) => return *resp,
    };
    match crate::replica_failover::test_fail_over(&r.sup, &server, &primary, &vm, point, req.start)
        .await
    {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `DELETE /api/v1/replicas/{vm}/test-failover[?primary=NAME]`: the test VM and its
/// disks are removed.
async fn end_test(
    State(r): R,
    UrlPath(vm): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<PrimaryQuery>,
) -> Response {
    let (server, primary) = match r.replica_of(&vm, q.primary.as_deref()) {
        Ok(x) => x,
        Err(resp) => return *resp,
    };
    match crate::replica_failover::stop_test_failover(&r.sup, &server, &primary, &vm).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
