//! Reverse replication after a planned failover: the VM now runs on the old replica
//! host (the new primary) and is replicated back to the old primary's host, whose
//! replica starts as a copy of its own, stopped disks of the VM; the initial copy is
//! then a resync by block hashes that sends only the blocks that changed since.
//!
//! New primary (`POST /api/v1/vms/{name}/replication/reverse` `{"to": "HOST:PORT"}`,
//! [`reverse`]): the VM must be a failed-over replica here (its disks are a replica's
//! images of `primary`, marked failed over). First the old primary is asked to make
//! its replica (`PUT /peer/v1/replica/{vm}/reverse`, TLS to its certificate name):
//! a refusal there ends it with nothing changed here. Then each disk gets a change
//! log beside the images (a running VM's VMM is restarted for it: a stop and a start)
//! and replication is enabled like `replica enable`, to the old primary.
//!
//! Old primary ([`seed_here`]): only the host its VM was failed over to may reverse
//! it — planned, or unplanned and learnt from that host (its replica answered failed
//! over: [`crate::replication::failed_over`]; asked again at this request if not
//! learnt yet, only of the VM's configured replica host), recorded in the stored
//! replication settings — and only while that VM is stopped here; the replica of it
//! is made in `<replica-dir>/<that host>/<vm>/` from the VM's disks — or, when that
//! VM runs on this host's failed-over replica of it from `peer` (a second round
//! trip), that replica is reset in place and the stopped VM's definition deleted. A
//! later planned failover back replaces the stopped VM by the one on the replica
//! ([`crate::replica_failover::fail_over`]).

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;

use axum::http::StatusCode;
use replica::{ReplicaVm, StoreError};
use serde::Deserialize;
use tracing::info;

use crate::replica_primary::{DiskSource, ImageFormat, Shipper};
use crate::replica_server::ReplicaServer;
use crate::replication::{EnableRequest, ReplicationStatus, Replications};
use crate::supervisor::Supervisor;

/// `POST /api/v1/vms/{name}/replication/reverse`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReverseRequest {
    /// The old primary's peer listener, `HOST:PORT` (its certificate must carry the
    /// host name the replica was made for).
    pub to: String,
    #[serde(default)]
    pub interval_s: Option<f64>,
    #[serde(default)]
    pub history: Option<u32>,
}

type Refusal = (StatusCode, String);

fn conflict(m: String) -> Refusal {
    (StatusCode::CONFLICT, m)
}

/// The primary whose failed-over replica VM `name` runs on here: every disk of its
/// definition is that replica's `disk-N.img`, in order.
async fn failed_over_replica_of(
    server: &Arc<ReplicaServer>,
    name: &str,
    disks: &[PathBuf],
) -> Result<String, Refusal> {
    for primary in server.primaries_holding(name) {
        let dir = server.vm_path(&primary, name);
        let images: Vec<PathBuf> = (0..disks.len())
            .map(|i| dir.join(format!("disk-{i}.img")))
            .collect();
        if images != disks {
            continue;
        }
        let vm = name.to_string();
        let st = server
            .on_vm(&primary, name, move |d| {
                ReplicaVm::open(d.as_fd(), &vm)?.status()
            })
            .await
            .map_err(|e| conflict(crate::error_chain(&e)))?;
        if st.failed_over && st.disks.len() == disks.len() {
            return Ok(primary);
        }
    }
    Err(conflict(format!(
        "{name:?} is not a failed-over replica on this host (its disks are not a replica's images failed over here): nothing to reverse"
    )))
}

/// Reverses the replication of VM `name` (a failed-over replica here) to its old
/// primary at `req.to`. Nothing changes here if the old primary refuses.
pub async fn reverse(
    r: &Arc<Replications>,
    name: &str,
    req: ReverseRequest,
) -> Result<ReplicationStatus, Refusal> {
    let sup = r.supervisor();
    let server = r.replica_server().ok_or_else(|| {
        conflict(
            "this vireod is not a replica server (--replica-dir): no VM here was failed over to it"
                .into(),
        )
    })?;
    if r.status(name).is_some() {
        return Err(conflict(format!(
            "replication of {name:?} is enabled already"
        )));
    }
    let mut def = sup
        .export()
        .remove(name)
        .ok_or_else(|| (StatusCode::NOT_FOUND, format!("no VM named {name:?}")))?;
    let paths: Vec<PathBuf> = def.config.disks.iter().map(|d| d.path.clone()).collect();
    let primary = failed_over_replica_of(server, name, &paths).await?;
    let vm_dir = server.vm_path(&primary, name);
    let mut disks = Vec::new();
    for (i, d) in def.config.disks.iter_mut().enumerate() {
        let log = d
            .replica_log
            .get_or_insert_with(|| vm_dir.join(format!("disk-{i}.rlog")))
            .clone();
        let size = std::fs::metadata(&d.path)
            .map_err(|e| conflict(format!("disk {}: {e}", d.path.display())))?
            .len();
        disks.push(DiskSource {
            log_dir: log,
            image: d.path.clone(),
            size,
            // A failed-over replica's images: raw.
            format: ImageFormat::Raw,
        });
    }
    let history = req.history.unwrap_or(1);
    // The old primary makes its replica from its own disks, or refuses: nothing
    // has changed here yet.
    let probe = Shipper {
        to: r
            .endpoint(&req.to, &primary)
            .map_err(|m| (StatusCode::BAD_REQUEST, m))?,
        vm: name.to_string(),
        disks,
        extras: Default::default(),
        history,
        history_spacing_s: 0,
        reverse: true,
        throttle: crate::throttle::Throttle::new(None),
        verified: Default::default(),
    };
    let held = probe.status().await.map_err(|e| {
        conflict(format!(
            "the old primary {primary} refused the reverse replication: {}",
            crate::error_chain(&e)
        ))
    })?;
    if held.failed_over {
        return Err(conflict(format!(
            "the old primary {primary} holds a failed-over replica of {name:?}: not done"
        )));
    }
    // A change log on every disk: the VMM opens it at its start.
    let running = sup.get(name).is_ok_and(|s| s.pid.is_some());
    if running {
        sup.stop(name, None)
            .await
            .map_err(|e| conflict(format!("stopping {name:?} to add its change logs: {e}")))?;
    }
    sup.redefine(name, def)
        .map_err(|e| conflict(format!("adding the change logs: {e}")))?;
    if running {
        sup.start(name)
            .await
            .map_err(|e| conflict(format!("restarting {name:?} with change logs: {e}")))?;
    }
    let st = r.enable(
        name,
        EnableRequest {
            to: req.to.clone(),
            server_name: Some(primary.clone()),
            interval_s: req.interval_s,
            history: req.history,
            history_spacing_s: None,
            bandwidth_mbit: serde_json::Value::Null,
            log_budget: serde_json::Value::Null,
            reverse: true,
        },
    )?;
    sup.replication_event(
        name,
        "replication-reversed",
        Some(format!("to {primary} at {}", req.to)),
    );
    info!(vm = name, %primary, to = %req.to, restarted = running, "replication reversed to the old primary");
    Ok(st)
}

/// On the old primary: `peer` (the host VM `vm` was failed over to) asks for the
/// reverse replica; it is made from the stopped VM's own disks (idempotent: an
/// existing replica that is not failed over is answered as it is).
pub async fn seed_here(
    sup: &Arc<Supervisor>,
    server: &Arc<ReplicaServer>,
    peer: &str,
    vm: &str,
    disk_sizes: Vec<u64>,
    history: Option<u32>,
) -> Result<replica::VmStatus, Refusal> {
    let peer_lc = peer.to_ascii_lowercase();
    let mut to = Replications::failed_over_to(sup, vm);
    if to.as_deref() != Some(&peer_lc) && sup.get(vm).is_ok_and(|s| s.pid.is_none()) {
        // Asked before this host learnt an unplanned failover: learnt now if `peer`
        // is the VM's replica host and says so.
        if let Some(r) = server.replications() {
            r.confirm_failover(peer, vm).await;
            to = Replications::failed_over_to(sup, vm);
        }
    }
    if to.as_deref() != Some(&peer_lc) {
        return Err(conflict(format!(
            "VM {vm:?} was not failed over from here to {peer}: no reverse replication of it"
        )));
    }
    let st = sup
        .get(vm)
        .map_err(|e| conflict(format!("VM {vm:?}: {e}")))?;
    if st.pid.is_some() {
        return Err(conflict(format!(
            "VM {vm:?} runs here: no reverse replication onto its disks"
        )));
    }
    let def = sup
        .export()
        .remove(vm)
        .ok_or_else(|| conflict(format!("no VM named {vm:?}")))?;
    let vm_dir = server.vm_path(peer, vm);
    let on_replica = !def.config.disks.is_empty()
        && def
            .config
            .disks
            .iter()
            .enumerate()
            .all(|(i, d)| d.path == vm_dir.join(format!("disk-{i}.img")));
    if on_replica {
        return reset_here(sup, server, peer, vm, disk_sizes, history).await;
    }
    let mut seed = Vec::new();
    let mut sizes = Vec::new();
    for d in &def.config.disks {
        let Some(log) = &d.replica_log else { continue };
        // Raw or VHDX: the replica's raw image starts as the disk's virtual content.
        let source = crate::replication::disk_source(sup.roots(), d, log).map_err(conflict)?;
        let image = source
            .open()
            .map_err(|e| conflict(crate::error_chain(&e)))?;
        sizes.push(source.size);
        seed.push(image);
    }
    if sizes != disk_sizes {
        return Err(conflict(format!(
            "VM {vm:?} here has replicated disks of {sizes:?} bytes, not {disk_sizes:?}"
        )));
    }
    let name = vm.to_string();
    let st = server
        .on_vm(peer, vm, move |dir| {
            let mut r =
                ReplicaVm::create_or_open_seeded(dir.as_fd(), &name, &disk_sizes, Some(&seed))?;
            if r.failed_over() {
                return Err(StoreError::Conflict(
                    "the replica here was failed over (a VM ran on it): a reverse onto it is not done".into(),
                ));
            }
            if let Some(keep) = history {
                r.set_keep(keep)?;
            }
            r.status()
        })
        .await
        .map_err(|e| conflict(crate::error_chain(&e)))?;
    info!(%peer, vm, "reverse replication: the replica starts from this host's disks");
    Ok(st)
}

/// [`seed_here`] when the stopped VM here runs on `peer`'s failed-over replica of it
/// (it was failed over here from `peer` before): that replica is reset in place and
/// its images are the base; the stopped VM's definition is deleted (its disks are the
/// replica's again; a failback defines it anew).
async fn reset_here(
    sup: &Arc<Supervisor>,
    server: &Arc<ReplicaServer>,
    peer: &str,
    vm: &str,
    disk_sizes: Vec<u64>,
    history: Option<u32>,
) -> Result<replica::VmStatus, Refusal> {
    let name = vm.to_string();
    let st = server
        .on_vm(peer, vm, move |dir| {
            let mut r = ReplicaVm::open(dir.as_fd(), &name)?;
            if r.disk_sizes() != disk_sizes {
                return Err(StoreError::Conflict(format!(
                    "the replica here has disks of {:?} bytes, not {disk_sizes:?}",
                    r.disk_sizes()
                )));
            }
            if r.failed_over() {
                r = r.reset_for_resync()?;
            }
            if let Some(keep) = history {
                r.set_keep(keep)?;
            }
            r.status()
        })
        .await
        .map_err(|e| conflict(crate::error_chain(&e)))?;
    sup.delete(vm).map_err(|e| {
        conflict(format!(
            "deleting the stopped {vm:?} on the replica's images: {e}"
        ))
    })?;
    info!(%peer, vm, "reverse replication: the failed-over replica here is its base again");
    Ok(st)
}
