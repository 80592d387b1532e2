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
//!
//! The modules: `settings` (the request and the stored settings, persistence and
//! restore), `jobs` (each VM's loop started, paused, limited, stopped), `round_loop`
//! (the loop itself), `status`, `failover` (planned failover from here, unplanned
//! failover and recovery points on a replica host) and `routes` (the HTTP API).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::sync::watch;

use crate::client::Endpoint;
use crate::replica_primary::{DiskSource, Extras, ImageFormat};
use crate::replica_server::ReplicaServer;
use crate::supervisor::Supervisor;
use crate::throttle::Throttle;

/// The old primary's safe return after an unplanned failover elsewhere.
#[path = "../replica_return.rs"]
pub mod failed_over;

mod failover;
mod jobs;
mod round_loop;
mod routes;
mod settings;
mod status;

pub use routes::router;
pub use settings::{EnableRequest, Settings};
pub use status::ReplicationStatus;

use round_loop::run;

const MIN_INTERVAL: Duration = Duration::from_secs(1);

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

/// Replicated disk `d` (change log `log`): a raw image, or a VHDX whose parents (of a
/// differencing disk) are opened under the storage roots' rules, as the VMM's are.
pub(crate) fn disk_source(
    roots: &Arc<confine::Roots>,
    d: &api::config::DiskConfig,
    log: &std::path::Path,
) -> Result<DiskSource, String> {
    let format = match d.effective_format() {
        api::config::DiskFormat::Raw => ImageFormat::Raw,
        api::config::DiskFormat::Vhdx => ImageFormat::Vhdx {
            parents: Some(crate::confinement::parent_opener(roots.clone())),
        },
    };
    DiskSource::new(log.to_path_buf(), d.path.clone(), format).map_err(|e| match e {
        crate::replica_primary::ShipError::Image(e) => e.to_string(),
        e => format!("disk {}: {}", d.path.display(), crate::error_chain(&e)),
    })
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

    /// The replicated disks of VM `name` (its disks with `replica_log`, raw or VHDX:
    /// a VHDX that cannot be opened or is damaged is refused here, before anything
    /// is stored or sent).
    fn sources(&self, name: &str) -> Result<Vec<DiskSource>, String> {
        let defs = self.sup.export();
        let def = defs.get(name).ok_or(format!("no VM named {name:?}"))?;
        let mut out = Vec::new();
        for d in &def.config.disks {
            let Some(log) = &d.replica_log else { continue };
            out.push(disk_source(self.sup.roots(), d, log)?);
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
}
