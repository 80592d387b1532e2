//! Saving clustered VMs on a cluster node (Hyper-V's Save of a clustered role); the
//! records and transactions are `cluster::saved`'s.
//!
//! - A save (`PUT /api/v1/vms/NAME/save` on the VM's owner, or a bulk save's request
//!   to it) goes through the supervisor's save with [`Saves`]: the cluster checks the
//!   owner first, the VMM writes the snapshot to the VM's area on the shared storage
//!   (`supervisor::shared_saved_area`), and the cluster records it saved only if the
//!   VM's ownership, lease, move and save records are still as read. Meanwhile the
//!   node loop neither restarts the VM whose VMM ends nor kills it ([`saving`]).
//! - A node the cluster places a saved VM on resumes it ([`resume_here`]): the record
//!   says so, never a file alone (a stale state is never resumed). Once it runs the
//!   record goes, then the files; a failed resume leaves it saved.
//! - `DELETE /api/v1/cluster/vms/{name}/saved-state` discards cluster-wide.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cluster::saved::{self, SaveError, SaveGuard};
use cluster::store::Revision;
use cluster::{ClusterStore, EtcdStore};
use tracing::{info, warn};

use crate::cluster_moves::{MoveShared, Shared};
use crate::cluster_node::ClusterNode;
use crate::cluster_routes::{error, not_clustered};
use crate::supervisor::{Answer, ClusterSaves, Supervisor};
use crate::{error_chain, AgentError};

impl MoveShared {
    /// Marks `vm` as being saved; false when it is already.
    fn begin_saving(&self, vm: &str) -> bool {
        vireo_util::sync::lock(&self.saving).insert(vm.to_string())
    }

    fn end_saving(&self, vm: &str) {
        vireo_util::sync::lock(&self.saving).remove(vm);
    }

    /// Whether this node is saving `vm`: its VMM ending is the save's, and it is not
    /// killed when its ownership goes (the save ends it).
    pub fn saving(&self, vm: &str) -> bool {
        vireo_util::sync::lock(&self.saving).contains(vm)
    }

    /// Forgets the saves of VMs the node loop no longer runs (saved: the cluster took
    /// them).
    pub fn settle_saving(&self, running: &BTreeMap<String, Revision>) {
        vireo_util::sync::lock(&self.saving).retain(|vm| running.contains_key(vm));
    }
}

/// The supervisor's cluster side of a save on this node.
pub struct Saves {
    pub store: EtcdStore,
    pub node: String,
    pub shared: Shared,
}

fn refused(name: &str, source: SaveError) -> AgentError {
    AgentError::ClusterSave {
        name: name.to_string(),
        source,
    }
}

impl ClusterSaves for Saves {
    fn prepare<'a>(&'a self, name: &'a str) -> Answer<'a, SaveGuard> {
        Box::pin(async move {
            if !self.shared.begin_saving(name) {
                return Err(AgentError::WrongState {
                    name: name.to_string(),
                    state: "being saved".into(),
                    action: "save it again",
                });
            }
            let g = saved::prepare(&self.store, name, &self.node).await;
            if g.is_err() {
                self.shared.end_saving(name);
            }
            g.map_err(|e| refused(name, e))
        })
    }

    fn commit<'a>(&'a self, guard: &'a SaveGuard) -> Answer<'a, ()> {
        Box::pin(async move {
            saved::commit(&self.store, guard)
                .await
                .map(drop)
                .map_err(|e| refused(&guard.vm, e))
        })
    }

    fn abandon(&self, name: &str) {
        self.shared.end_saving(name);
    }
}

/// What a node's start of an owned VM resumes: the revision of its saved record, when
/// the cluster has one (the VM was saved; its state is on the shared storage).
/// A save requested of the VM's earlier owner (it died, or the VM moved, before it
/// saved) is void: it is dropped.
pub async fn saved_record(store: &EtcdStore, vm: &str) -> Result<Option<Revision>, String> {
    let read = |e: cluster::StoreError| format!("{vm}: cannot read its saved record: {e}");
    let kv = store
        .get(&cluster::keys::saved_key(vm))
        .await
        .map_err(read)?;
    let Some(kv) = kv else { return Ok(None) };
    match cluster::keys::decode::<cluster::keys::SavedRecord>(&kv.value) {
        Some(r) if r.state == cluster::keys::SaveState::Saved => Ok(Some(kv.mod_revision)),
        _ => {
            let why = "its owner changed before it was saved";
            saved::drop_request(store, vm, kv.mod_revision, why)
                .await
                .map_err(read)?;
            Ok(None)
        }
    }
}

/// Starts `vm` (defined here with fencing token `token`) from its saved state, whose
/// record is at `record`. Once it runs the record goes, then the files; when it
/// cannot resume, the cluster has it saved again (its state stays) and its local
/// definition goes.
pub async fn resume_here(
    node: &ClusterNode,
    vm: &str,
    token: i64,
    record: Revision,
) -> Result<(), String> {
    let started = match node.sup.resume_next_start(vm) {
        Ok(()) => node.sup.start(vm).await.map(drop),
        Err(e) => Err(e),
    };
    match started {
        Ok(()) => {
            match saved::spent(&node.store, vm, token, record).await {
                Ok(true) => node.sup.spend_saved_state(vm),
                Ok(false) => warn!(
                    vm,
                    "the saved record changed while the VM resumed: its files stay"
                ),
                Err(e) => {
                    warn!(vm, error = %e, "cannot remove the spent saved record: its files stay")
                }
            }
            info!(vm, token, "clustered VM resumed from its saved state");
            Ok(())
        }
        Err(e) => {
            let why = error_chain(&e);
            if let Err(s) = saved::resume_failed(&node.store, vm, token, &node.node).await {
                warn!(vm, error = %s, "cannot record the failed resume");
            }
            let _ = node.sup.kill(vm).await;
            if let Err(d) = node.sup.delete(vm) {
                warn!(vm, error = %error_chain(&d), "cannot remove the local definition after a failed resume");
            }
            Err(format!("{vm}: cannot resume from its saved state: {why}"))
        }
    }
}

/// Carries out the saves bulk requests asked of this node: each VM it runs is saved
/// (in a task of its own); a request for a VM it does not run is dropped. `spawned`:
/// the requests already started (their record's revision), kept across turns.
pub async fn run_requests(
    node: &ClusterNode,
    running: &BTreeMap<String, Revision>,
    spawned: &mut HashMap<String, Revision>,
) {
    let requests = match saved::requested_of(&node.store, &node.node).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot read the requested saves");
            return;
        }
    };
    spawned.retain(|vm, rev| requests.iter().any(|(r, x)| r.vm == *vm && x == rev));
    for (rec, rev) in requests {
        if spawned.get(&rec.vm) == Some(&rev) {
            continue;
        }
        spawned.insert(rec.vm.clone(), rev);
        let (store, sup, vm) = (node.store.clone(), node.sup.clone(), rec.vm.clone());
        if !running.contains_key(&vm) {
            tokio::spawn(async move {
                let _ = saved::drop_request(&store, &vm, rev, "its node does not run it").await;
            });
            continue;
        }
        tokio::spawn(save_requested(store, sup, vm, rev));
    }
}

async fn save_requested(store: EtcdStore, sup: Arc<Supervisor>, vm: String, rev: Revision) {
    match sup.save(&vm).await {
        Ok(_) => info!(vm, "requested save done"),
        Err(e) => {
            let why = error_chain(&e);
            warn!(vm, error = %why, "requested save failed");
            if let Err(e) = saved::drop_request(&store, &vm, rev, &why).await {
                warn!(vm, error = %e, "cannot drop the failed save request");
            }
        }
    }
}

/// `DELETE /api/v1/cluster/vms/{name}/saved-state`: a saved clustered VM's saved state
/// is discarded cluster-wide (the VM is off; its files on the shared storage go).
pub async fn discard(
    State(node): State<Option<Arc<ClusterNode>>>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    let Some(node) = node else {
        return not_clustered();
    };
    if let Err(e) = crate::model::validate_name(&name) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    // Where its files are: from the cluster's definition, checked against this
    // node's storage roots (nothing a client sends names a path).
    let area = match node.store.get(&cluster::keys::vm_key(&name)).await {
        Ok(Some(kv)) => cluster::keys::decode::<cluster::keys::VmDefinition>(&kv.value)
            .and_then(|d| serde_json::from_value::<crate::model::VmDefinition>(d.config).ok())
            .and_then(|d| crate::supervisor::area_beside_disks(&name, &d))
            .filter(|a| node.sup.roots().check(a).is_ok()),
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no clustered VM named {name}"),
            )
        }
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    match saved::discard(&node.store, &name).await {
        Ok(rec) => {
            let removed = match &area {
                Some(a) => match std::fs::remove_dir_all(a) {
                    Ok(()) => true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                    Err(e) => {
                        warn!(vm = %name, area = %a.display(), error = %e, "cannot remove the discarded saved state (the cluster no longer resumes from it)");
                        false
                    }
                },
                None => false,
            };
            Json(serde_json::json!({
                "name": name,
                "state": "off",
                "saved_on": rec.node,
                "files_removed": removed,
            }))
            .into_response()
        }
        Err(e) => {
            let status = match &e {
                SaveError::UnknownVm(_) => StatusCode::NOT_FOUND,
                SaveError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::CONFLICT,
            };
            error(status, e.to_string())
        }
    }
}
