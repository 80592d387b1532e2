//! Failover on the replica server: a VM is defined and started here from a replica's
//! images at its latest recovery point.
//!
//! Two ways in: the primary's planned failover (`POST /peer/v1/replica/{vm}/failover`,
//! after it shut its VM down and sent the last changes) and an operator's unplanned
//! one here (`POST /api/v1/replicas/{vm}/failover`, the primary gone).
//!
//! The replica is marked failed over first (recorded in its state file): from then
//! on it takes nothing of the primary, so a primary that comes back cannot change
//! the disks under the running VM. The VM is built from what the primary stored
//! beside the replica, never from paths it named: the kernel and initramfs are the
//! copies it sent (`extras/kernel`, `extras/initramfs`), the disks are the replica's
//! images; of its definition only the command line, vCPUs, memory, RNG and each
//! replicated disk's own options are taken. Network devices are not carried over
//! (this host's networks are not mapped yet), nor a disk that is not replicated
//! (refused: a failover cannot reach a file of this host the primary names).

use std::os::fd::AsFd;
use std::sync::Arc;

use api::config::{DiskFormat, OutputConfig, PayloadConfig};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use replica::{Extra, ReplicaVm, StoreError};
use serde_json::{json, Value};
use tracing::info;

use crate::model::VmDefinition;
use crate::replica_server::ReplicaServer;
use crate::supervisor::Supervisor;

#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error("failover of {vm}: {source}")]
    Store {
        vm: String,
        #[source]
        source: StoreError,
    },
    #[error("failover of {vm}: {why}")]
    Refused { vm: String, why: String },
    #[error("failover of {vm}: {source}")]
    Start {
        vm: String,
        #[source]
        source: crate::AgentError,
    },
}

impl IntoResponse for FailoverError {
    fn into_response(self) -> Response {
        let status = match &self {
            FailoverError::Store {
                source: StoreError::NotFound,
                ..
            } => StatusCode::NOT_FOUND,
            FailoverError::Store {
                source: StoreError::Invalid(_),
                ..
            } => StatusCode::BAD_REQUEST,
            FailoverError::Store { .. } | FailoverError::Refused { .. } => StatusCode::CONFLICT,
            FailoverError::Start { source, .. } => {
                StatusCode::from_u16(source.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
        };
        let msg = crate::error_chain(&self);
        tracing::warn!(error = %msg, "replica failover refused");
        (status, Json(json!({ "error": msg }))).into_response()
    }
}

/// What the replica holds for a failover.
struct Held {
    definition: Vec<u8>,
    initramfs: bool,
    cut_id: u64,
    disks: usize,
}

/// Fails `primary`'s VM `vm` over to this host: marks the replica failed over,
/// defines the VM `vm` on its images and (with `start`, as Hyper-V's "start the
/// Replica virtual machine after failover") starts it. Retrying after a failed define
/// or start is harmless (the replica stays failed over at the same point).
pub async fn fail_over(
    sup: &Arc<Supervisor>,
    server: &Arc<ReplicaServer>,
    primary: &str,
    vm: &str,
    start: bool,
) -> Result<Value, FailoverError> {
    let refused = |why: String| FailoverError::Refused {
        vm: vm.to_string(),
        why,
    };
    if sup.get(vm).is_ok() {
        return Err(refused(format!(
            "a VM named {vm:?} exists on this host already"
        )));
    }
    let name = vm.to_string();
    let held = server
        .on_vm(primary, vm, move |dir| {
            let mut r = ReplicaVm::open(dir.as_fd(), &name)?;
            let missing = |what: &str| {
                StoreError::Conflict(format!(
                    "the primary has not sent the VM's {what} (it does at each start of replication)"
                ))
            };
            let definition = r
                .extra(Extra::Definition)?
                .ok_or_else(|| missing("definition"))?;
            r.extra(Extra::Kernel)?.ok_or_else(|| missing("kernel"))?;
            let initramfs = r.extra(Extra::Initramfs)?.is_some();
            let point = r.fail_over()?;
            Ok(Held {
                definition,
                initramfs,
                cut_id: point.cut_id,
                disks: r.disk_sizes().len(),
            })
        })
        .await
        .map_err(|source| FailoverError::Store {
            vm: vm.to_string(),
            source,
        })?;
    let def = failover_definition(server, primary, vm, &held).map_err(refused)?;
    sup.replication_event(
        vm,
        "replica-failed-over",
        Some(format!("from {primary}, recovery point {}", held.cut_id)),
    );
    let start_err = |source| FailoverError::Start {
        vm: vm.to_string(),
        source,
    };
    let mut status = sup.define(vm, def).map_err(start_err)?;
    if start {
        status = sup.start(vm).await.map_err(start_err)?;
    }
    info!(%primary, vm, cut_id = held.cut_id, "replica: failed over, the VM runs here");
    Ok(json!({
        "vm": vm,
        "primary": primary,
        "point": held.cut_id,
        "status": status,
    }))
}

/// The VM this host runs: the primary's command line, vCPUs, memory and RNG, its
/// stored kernel and initramfs, and the replica's images in place of its replicated
/// disks (their order is the replica's disk order).
fn failover_definition(
    server: &ReplicaServer,
    primary: &str,
    vm: &str,
    held: &Held,
) -> Result<VmDefinition, String> {
    let theirs: VmDefinition = serde_json::from_slice(&held.definition)
        .map_err(|e| format!("the stored definition does not read: {e}"))?;
    let dir = server.vm_path(primary, vm);
    let mut disks = Vec::new();
    for d in &theirs.config.disks {
        if d.replica_log.is_none() {
            return Err(format!(
                "disk {} of the primary is not replicated: a failover starts only from replicated disks",
                d.path.display()
            ));
        }
        let mut mine = d.clone();
        mine.path = dir.join(format!("disk-{}.img", disks.len()));
        mine.format = Some(DiskFormat::Raw);
        mine.replica_log = None;
        mine.fencing_token = None;
        disks.push(mine);
    }
    if disks.len() != held.disks {
        return Err(format!(
            "the definition names {} replicated disks, the replica holds {}",
            disks.len(),
            held.disks
        ));
    }
    let mut config = theirs.config.clone();
    config.payload = PayloadConfig {
        kernel: dir.join(Extra::Kernel.file_name()),
        initramfs: held
            .initramfs
            .then(|| dir.join(Extra::Initramfs.file_name())),
        cmdline: theirs.config.payload.cmdline.clone(),
    };
    config.disks = disks;
    config.console = OutputConfig::Off;
    config.nets = Vec::new();
    Ok(VmDefinition {
        config,
        priority: theirs.priority,
        restart: theirs.restart,
        max_restarts: theirs.max_restarts,
        cpu_weight: None,
    })
}
