//! Failover on the replica server: a VM is defined and started here from a replica's
//! images at its latest recovery point or a kept older one (the images are rolled
//! back to it in place), and the test failover: a copy of a point on throw-away disks
//! started as `<vm>-test` while replication goes on.
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
use std::path::Path;
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

/// Where a test failover's disks are made, beside the replica's images.
pub const TEST_DIR: &str = "test-failover";

/// The name of VM `vm`'s test failover copy.
pub fn test_vm_name(vm: &str) -> String {
    format!("{vm}-test")
}

/// What the replica holds for a failover.
struct Held {
    definition: Vec<u8>,
    initramfs: bool,
    cut_id: u64,
    disks: usize,
}

/// The definition and boot payload the primary stored, checked for a failover.
fn held_extras(r: &ReplicaVm) -> Result<(Vec<u8>, bool), StoreError> {
    let missing = |what: &str| {
        StoreError::Conflict(format!(
            "the primary has not sent the VM's {what} (it does at each start of replication)"
        ))
    };
    let definition = r
        .extra(Extra::Definition)?
        .ok_or_else(|| missing("definition"))?;
    r.extra(Extra::Kernel)?.ok_or_else(|| missing("kernel"))?;
    Ok((definition, r.extra(Extra::Initramfs)?.is_some()))
}

/// Fails `primary`'s VM `vm` over to this host: marks the replica failed over (at
/// its latest point, or at the kept `point`: the images are rolled back to it),
/// defines the VM `vm` on its images and (with `start`, as Hyper-V's "start the
/// Replica virtual machine after failover") starts it. Retrying after a failed define
/// or start is harmless (the replica stays failed over at the same point).
pub async fn fail_over(
    sup: &Arc<Supervisor>,
    server: &Arc<ReplicaServer>,
    primary: &str,
    vm: &str,
    point: Option<u64>,
    start: bool,
) -> Result<Value, FailoverError> {
    let refused = |why: String| FailoverError::Refused {
        vm: vm.to_string(),
        why,
    };
    // A VM of that name here is replaced only when it is the stopped one this host
    // failed over to `primary` (the replica is then its reverse replication).
    let replaces_old = match sup.get(vm) {
        Err(_) => false,
        Ok(st)
            if st.pid.is_none()
                && crate::replication::Replications::failed_over_to(sup, vm).as_deref()
                    == Some(primary) =>
        {
            true
        }
        Ok(_) => {
            return Err(refused(format!(
                "a VM named {vm:?} exists on this host already"
            )))
        }
    };
    let name = vm.to_string();
    let held = server
        .on_vm(primary, vm, move |dir| {
            let mut r = ReplicaVm::open(dir.as_fd(), &name)?;
            let (definition, initramfs) = held_extras(&r)?;
            let point = r.fail_over(point)?;
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
    let vm_dir = server.vm_path(primary, vm);
    let def = failover_definition(&vm_dir, &vm_dir, &held).map_err(refused)?;
    sup.replication_event(
        vm,
        "replica-failed-over",
        Some(format!("from {primary}, recovery point {}", held.cut_id)),
    );
    let start_err = |source| FailoverError::Start {
        vm: vm.to_string(),
        source,
    };
    if replaces_old {
        // Its disks stay where they are; the VM runs on the replica's images now.
        sup.delete(vm).map_err(start_err)?;
        info!(%primary, vm, "replica: failed back; the VM's old definition replaced");
    }
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
/// `dir` holds the boot payload, `disk_dir` the images (`disk-N.img`).
fn failover_definition(dir: &Path, disk_dir: &Path, held: &Held) -> Result<VmDefinition, String> {
    let theirs: VmDefinition = serde_json::from_slice(&held.definition)
        .map_err(|e| format!("the stored definition does not read: {e}"))?;
    let mut disks = Vec::new();
    for d in &theirs.config.disks {
        if d.replica_log.is_none() {
            return Err(format!(
                "disk {} of the primary is not replicated: a failover starts only from replicated disks",
                d.path.display()
            ));
        }
        let mut mine = d.clone();
        mine.path = disk_dir.join(format!("disk-{}.img", disks.len()));
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
        stop_action: theirs.stop_action,
        dynamic_memory: theirs.dynamic_memory.clone(),
    })
}

/// Test failover ("Test Failover"): kept point `point` (default the latest) of
/// `primary`'s VM `vm` is copied to throw-away disks in the replica's `test-failover`
/// directory and a VM `<vm>-test` is defined on them (and started with `start`).
/// The replica is not marked failed over and keeps taking segments and points: the
/// copy was made under the VM's lock and shares nothing with the images.
pub async fn test_fail_over(
    sup: &Arc<Supervisor>,
    server: &Arc<ReplicaServer>,
    primary: &str,
    vm: &str,
    point: Option<u64>,
    start: bool,
) -> Result<Value, FailoverError> {
    let refused = |why: String| FailoverError::Refused {
        vm: vm.to_string(),
        why,
    };
    let test_vm = test_vm_name(vm);
    if sup.get(&test_vm).is_ok() {
        return Err(refused(format!(
            "a VM named {test_vm:?} exists on this host already (a test failover runs: stop it first)"
        )));
    }
    let name = vm.to_string();
    let held = server
        .on_vm(primary, vm, move |dir| {
            let r = ReplicaVm::open(dir.as_fd(), &name)?;
            if r.failed_over() {
                return Err(StoreError::Conflict(
                    "the replica was failed over: a test failover needs a replica that replicates"
                        .into(),
                ));
            }
            let (definition, initramfs) = held_extras(&r)?;
            let cut_id = match point {
                Some(c) => c,
                None => {
                    r.point()
                        .ok_or_else(|| {
                            StoreError::Conflict("no recovery point yet: nothing to test".into())
                        })?
                        .cut_id
                }
            };
            let vm_dir = confine::open_dir_at(dir.as_fd(), name.as_ref()).map_err(|source| {
                StoreError::Io {
                    what: format!("directory {name}"),
                    source,
                }
            })?;
            remove_test_dir(&vm_dir)?;
            let test_dir =
                confine::mkdir_private(vm_dir.as_fd(), TEST_DIR.as_ref()).map_err(|source| {
                    StoreError::Io {
                        what: format!("creating {TEST_DIR}"),
                        source,
                    }
                })?;
            if let Err(e) = r.export_point(cut_id, test_dir.as_fd(), |i| format!("disk-{i}.img")) {
                remove_test_dir(&vm_dir).ok();
                return Err(e);
            }
            Ok(Held {
                definition,
                initramfs,
                cut_id,
                disks: r.disk_sizes().len(),
            })
        })
        .await
        .map_err(|source| FailoverError::Store {
            vm: vm.to_string(),
            source,
        })?;
    let vm_dir = server.vm_path(primary, vm);
    let def = failover_definition(&vm_dir, &vm_dir.join(TEST_DIR), &held).map_err(refused)?;
    let start_err = |source| FailoverError::Start {
        vm: vm.to_string(),
        source,
    };
    let mut status = sup.define(&test_vm, def).map_err(start_err)?;
    sup.replication_event(
        vm,
        "replica-test-failover",
        Some(format!(
            "{test_vm} from {primary}'s recovery point {}",
            held.cut_id
        )),
    );
    if start {
        status = sup.start(&test_vm).await.map_err(start_err)?;
    }
    info!(%primary, vm, test_vm, cut_id = held.cut_id, "replica: test failover");
    Ok(json!({
        "vm": test_vm,
        "of": vm,
        "primary": primary,
        "point": held.cut_id,
        "status": status,
    }))
}

/// Ends VM `vm`'s test failover: `<vm>-test` is killed and deleted (only if its
/// disks are the test failover's), and its disks removed. Idempotent.
pub async fn stop_test_failover(
    sup: &Arc<Supervisor>,
    server: &Arc<ReplicaServer>,
    primary: &str,
    vm: &str,
) -> Result<Value, FailoverError> {
    let refused = |why: String| FailoverError::Refused {
        vm: vm.to_string(),
        why,
    };
    let test_vm = test_vm_name(vm);
    let test_dir = server.vm_path(primary, vm).join(TEST_DIR);
    if let Some(def) = sup.export().get(&test_vm) {
        if !def
            .config
            .disks
            .iter()
            .all(|d| d.path.starts_with(&test_dir))
        {
            return Err(refused(format!(
                "{test_vm:?} is not a test failover of {vm} (its disks are elsewhere): left alone"
            )));
        }
        if sup.get(&test_vm).is_ok_and(|s| s.pid.is_some()) {
            let start_err = |source| FailoverError::Start {
                vm: vm.to_string(),
                source,
            };
            sup.kill(&test_vm).await.map_err(start_err)?;
        }
        sup.delete(&test_vm)
            .map_err(|source| FailoverError::Start {
                vm: vm.to_string(),
                source,
            })?;
    }
    let name = vm.to_string();
    server
        .on_vm(primary, vm, move |dir| {
            let vm_dir = confine::open_dir_at(dir.as_fd(), name.as_ref()).map_err(|source| {
                StoreError::Io {
                    what: format!("directory {name}"),
                    source,
                }
            })?;
            remove_test_dir(&vm_dir)
        })
        .await
        .map_err(|source| FailoverError::Store {
            vm: vm.to_string(),
            source,
        })?;
    sup.replication_event(vm, "replica-test-failover-stopped", Some(test_vm.clone()));
    info!(%primary, vm, test_vm, "replica: test failover stopped, its disks removed");
    Ok(json!({"vm": test_vm, "of": vm, "primary": primary, "stopped": true}))
}

/// Removes the `test-failover` directory beneath a replica's directory (its disk
/// files only: nothing else is made there).
fn remove_test_dir(vm_dir: &std::os::fd::OwnedFd) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        what: format!("removing {TEST_DIR}"),
        source,
    };
    let dir = match confine::open_dir_at(vm_dir.as_fd(), TEST_DIR.as_ref()) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    let path = confine::fd_path(dir.as_fd(), ".".as_ref());
    for e in std::fs::read_dir(&path).map_err(io)? {
        let name = e.map_err(io)?.file_name();
        confine::unlink_at(dir.as_fd(), &name).map_err(io)?;
    }
    drop(dir);
    std::fs::remove_dir(confine::fd_path(vm_dir.as_fd(), TEST_DIR.as_ref())).map_err(io)
}
