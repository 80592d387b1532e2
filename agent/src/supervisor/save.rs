//! Saving a VM (Hyper-V's Save): its memory and device state go to disk and its VMM
//! ends; the VM is then [`VmState::Saved`], and a start resumes the guest where it
//! was. Discarding the saved state makes it a Stopped VM that boots afresh.
//!
//! The state is a snapshot directory (`migration::snapshot`) at
//! `<state-dir>/vms/NAME/saved/state`. Every VMM vireod starts gets `saved/` as one of
//! its storage roots (and, jailed, as a bind): the VMM's file thread writes the
//! snapshot there and a restoring VMM reads it from there, and nowhere else of the
//! state directory is reachable. A snapshot is complete once its `snapshot.json` is
//! written (last): a save cut short leaves no saved state (the VM goes on), only a
//! partial directory that the next save removes.
//!
//! A clustered VM's area is on the cluster's shared storage instead
//! ([`shared_saved_area`]: `.vireo-saved/NAME` beside its first writable disk, so
//! beneath the storage root that disk is confined to, and the same path on every
//! node): it is saved only by its owner and only while the cluster agrees
//! ([`ClusterSaves`]: the owner's fencing token, no move), its local definition goes
//! once saved, and whichever node the cluster places it on next resumes it
//! (`cluster_node`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::{lock, Supervisor, VMM_TIMEOUT};
use crate::model::{VmState, VmStatus};
use crate::{error_chain, AgentError};

/// The exit record's reason of a VM whose VMM ended after its state was saved.
pub const SAVED: &str = "saved";

/// How long a VMM may take to write the snapshot: a large guest's touched memory at
/// disk speed.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// The saved-state area of clustered VM `name` (one whose disks carry a fencing
/// token) on the cluster's shared storage: `.vireo-saved/NAME` in the directory of its
/// first writable disk (of its first disk when all are read-only). Derived from a
/// definition whose disk paths are confined to the storage roots, never taken from a
/// client or a peer. None: not clustered, or no disk.
pub fn shared_saved_area(name: &str, def: &crate::model::VmDefinition) -> Option<PathBuf> {
    if !def.config.disks.iter().any(|d| d.fencing_token.is_some()) {
        return None;
    }
    area_beside_disks(name, def)
}

/// `.vireo-saved/NAME` in the directory of the definition's first writable disk (of
/// its first disk when all are read-only): where a clustered VM's saved state is.
pub fn area_beside_disks(name: &str, def: &crate::model::VmDefinition) -> Option<PathBuf> {
    let disks = &def.config.disks;
    let disk = disks.iter().find(|d| !d.readonly).or(disks.first())?;
    Some(disk.path.parent()?.join(".vireo-saved").join(name))
}

/// A pinned future of the cluster's answers.
pub type Answer<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, AgentError>> + Send + 'a>>;

/// What a cluster node does for the save of one of its clustered VMs.
pub trait ClusterSaves: Send + Sync {
    /// Before the VM is paused: this node owns it and nothing moves it (the revisions
    /// the commit compares). From now on this node does not restart it when its VMM
    /// ends, until [`ClusterSaves::abandon`] (or the cluster took it away).
    fn prepare<'a>(&'a self, name: &'a str) -> Answer<'a, cluster::saved::SaveGuard>;
    /// Once the snapshot is complete: the cluster records the VM saved, or refuses
    /// (then nothing changed in the cluster, and the caller throws the snapshot away).
    fn commit<'a>(&'a self, guard: &'a cluster::saved::SaveGuard) -> Answer<'a, ()>;
    /// The save did not happen: the VM goes on, supervised as before.
    fn abandon(&self, name: &str);
}

/// `dir/state` holds a complete snapshot.
pub(super) fn is_complete(saved_dir: &Path) -> bool {
    saved_dir.join("state").join("snapshot.json").is_file()
}

impl Supervisor {
    /// The VM's saved-state area (a storage root of each of its VMMs).
    pub(super) fn saved_dir(&self, name: &str) -> PathBuf {
        lock(&self.saved_areas)
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.vm_dir(name).join("saved"))
    }

    /// Whether the VM's saved-state area is on the cluster's shared storage.
    pub fn has_shared_saved_area(&self, name: &str) -> bool {
        lock(&self.saved_areas).contains_key(name)
    }

    /// Gives a saved state (the directory and its files, no link followed) to the
    /// jail uid of the VMM that resumes it: saved on another node, it is the uid its
    /// VM had there.
    pub(super) fn hand_saved_state(&self, name: &str, uid: u32) -> Result<(), AgentError> {
        let state = self.saved_state(name);
        let give = |p: &Path| {
            std::os::unix::fs::lchown(p, Some(uid), Some(uid))
                .map_err(|e| AgentError::io("cannot hand over the saved state", p, e))
        };
        give(&state)?;
        let entries = std::fs::read_dir(&state)
            .map_err(|e| AgentError::io("cannot read the saved state", &state, e))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| AgentError::io("cannot read the saved state", &state, e))?;
            give(&entry.path())?;
        }
        Ok(())
    }

    /// Before a clustered VM resumes from its saved state: the state's configuration
    /// takes the fencing token of each disk and the write lease this start runs under
    /// (`def`'s; the snapshot has those it was saved under, on its node then), and
    /// this node's serial file of the VM. Written
    /// beside and renamed over, readable as the VMM reads it (0644).
    pub(super) fn renew_saved_config(
        &self,
        name: &str,
        def: &crate::model::VmDefinition,
    ) -> Result<(), AgentError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.saved_state(name).join("config.json");
        let bad = |why: String| AgentError::StartFailed {
            name: name.to_string(),
            reason: format!("saved configuration {}: {why}", path.display()),
        };
        let text = std::fs::read(&path).map_err(|e| AgentError::io("cannot read", &path, e))?;
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let mine = serde_json::to_value(&def.config).map_err(|e| bad(e.to_string()))?;
        let (Some(obj), Some(disks)) = (
            cfg.as_object_mut(),
            mine.get("disks").and_then(|d| d.as_array()),
        ) else {
            return Err(bad("not a VM configuration".into()));
        };
        match mine.get("write_lease") {
            Some(l) => obj.insert("write_lease".into(), l.clone()),
            None => obj.remove("write_lease"),
        };
        // Its serial output goes to this node's file of it (as a boot's does).
        let serial = api::config::OutputConfig::File(self.serial_path(name));
        obj.insert(
            "serial".into(),
            serde_json::to_value(serial).map_err(|e| bad(e.to_string()))?,
        );
        let saved = obj
            .get_mut("disks")
            .and_then(|d| d.as_array_mut())
            .filter(|d| d.len() == disks.len())
            .ok_or_else(|| bad("its disks are not the VM's".into()))?;
        for (d, m) in saved.iter_mut().zip(disks) {
            let (Some(d), Some(t)) = (d.as_object_mut(), m.get("fencing_token")) else {
                continue;
            };
            d.insert("fencing_token".into(), t.clone());
        }
        let bytes = serde_json::to_vec_pretty(&cfg).map_err(|e| bad(e.to_string()))?;
        let tmp = path.with_file_name("config.json.new");
        let _ = std::fs::remove_file(&tmp);
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            // New, never through a link planted at its name.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o644)
                .open(&tmp)
                .map_err(|e| AgentError::io("cannot create", &tmp, e))?;
            f.write_all(&bytes)
                .map_err(|e| AgentError::io("cannot write", &tmp, e))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| AgentError::io("cannot set permissions of", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| AgentError::io("cannot replace", &path, e))
    }

    /// A clustered VM the cluster resumes here (its saved state is on the shared
    /// storage): its next start resumes it. Refused when no complete state is there.
    pub fn resume_next_start(&self, name: &str) -> Result<(), AgentError> {
        let mut vms = lock(&self.vms);
        let vm = vms
            .get_mut(name)
            .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
        let area = self.saved_dir(name);
        if vm.state.has_process() || !is_complete(&area) {
            return Err(AgentError::StartFailed {
                name: name.to_string(),
                reason: format!("no complete saved state at {}", area.display()),
            });
        }
        self.set_state(
            name,
            vm,
            VmState::Saved,
            Some("saved state on the cluster's shared storage".into()),
        );
        Ok(())
    }

    /// Makes the VM's saved-state area ready for a VMM launch: vireod's own (0700)
    /// again, as its last VMM's jail had handed it to the VM's uid. A VMM starts as
    /// root without CAP_DAC_OVERRIDE under systemd: it opens its storage roots, and
    /// reads a saved state's configuration, before its jail hands them over; so a
    /// saved state stays traversable (0711) and its `config.json` readable (0644)
    /// beneath the area no one else may enter.
    pub(super) fn prepare_saved_area(&self, name: &str) -> Result<(), AgentError> {
        use std::os::unix::fs::PermissionsExt;
        let area = self.saved_dir(name);
        if self.has_shared_saved_area(name) {
            // On the shared storage: made beneath the disk's storage root, through no
            // symlink.
            for dir in area.parent().into_iter().chain([area.as_path()]) {
                self.roots.create_dir_private(dir).map_err(|e| {
                    AgentError::BadDefinition(format!(
                        "the saved-state area on the cluster's shared storage: {e}"
                    ))
                })?;
            }
        } else {
            super::mkdir(&area, 0o700)?;
        }
        // SAFETY: geteuid/getegid have no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        std::os::unix::fs::chown(&area, Some(uid), Some(gid))
            .map_err(|e| AgentError::io("cannot take back the saved-state area", &area, e))?;
        let state = self.saved_state(name);
        if is_complete(&area) {
            let set = |p: &Path, mode: u32| {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| AgentError::io("cannot set permissions of", p, e))
            };
            set(&state, 0o711)?;
            set(&state.join("config.json"), 0o644)?;
        }
        Ok(())
    }

    /// The saved state itself (a snapshot directory).
    pub(super) fn saved_state(&self, name: &str) -> PathBuf {
        self.saved_dir(name).join("state")
    }

    /// Saves a Running or Paused VM: pauses it, has its VMM write the snapshot, then
    /// ends the VMM. On any failure before the snapshot is complete the VM goes on
    /// as it was (resumed if this paused it) and nothing is left on disk.
    pub async fn save(self: &Arc<Self>, name: &str) -> Result<VmStatus, AgentError> {
        let was_running = {
            let vms = lock(&self.vms);
            let vm = vms
                .get(name)
                .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
            if !matches!(vm.state, VmState::Running | VmState::Paused) || vm.migration.is_some() {
                return Err(AgentError::WrongState {
                    name: name.to_string(),
                    state: vm.state.to_string(),
                    action: "save it (it must be Running or Paused)",
                });
            }
            let clustered = vm
                .def
                .config
                .disks
                .iter()
                .any(|d| d.fencing_token.is_some());
            if clustered && !self.has_shared_saved_area(name) {
                return Err(AgentError::NotSavable {
                    name: name.to_string(),
                    why: "it is clustered and has no disk: its saved state would have no place on the cluster's shared storage",
                });
            }
            (vm.state == VmState::Running, clustered)
        };
        let (was_running, clustered) = was_running;
        let cluster = if clustered {
            match self.cluster_saves.get() {
                Some(c) => Some(c.clone()),
                None => {
                    return Err(AgentError::NotSavable {
                        name: name.to_string(),
                        why: "it is clustered and this vireod is not a node of its cluster",
                    })
                }
            }
        } else {
            None
        };
        let guard = match &cluster {
            Some(c) => Some(c.prepare(name).await?),
            None => None,
        };
        let abandon = || {
            if let Some(c) = &cluster {
                c.abandon(name);
            }
        };
        let dest = self.saved_state(name);
        if let Err(e) = clear_spent(&dest) {
            abandon();
            return Err(e);
        }
        if was_running {
            if let Err(e) = self.pause(name).await {
                abandon();
                return Err(e);
            }
        }
        let body = serde_json::json!({ "destination_url": format!("file://{}", dest.display()) });
        let snapshot = self
            .vmm_put(
                name,
                "vm.snapshot",
                Some(body.to_string().into_bytes()),
                SNAPSHOT_TIMEOUT,
            )
            .await;
        let recorded = match (snapshot, &cluster, &guard) {
            (Ok(_), Some(c), Some(g)) => c.commit(g).await,
            (r, _, _) => r.map(drop),
        };
        if let Err(e) = recorded {
            warn!(vm = name, error = %error_chain(&e), "save failed; the VM goes on");
            let _ = clear_spent(&dest);
            if was_running {
                if let Err(r) = self.resume(name).await {
                    warn!(vm = name, error = %error_chain(&r), "cannot resume the VM after a failed save");
                }
            }
            abandon();
            return Err(e);
        }
        let handle = match self.begin_stop(name, "save it") {
            Ok(h) => Some(h),
            // Clustered and saved: its node may have ended the VMM it no longer owns.
            Err(_) if clustered => None,
            Err(e) => return Err(e),
        };
        if let Some(vm) = lock(&self.vms).get_mut(name) {
            vm.stop_reason = Some(SAVED);
        }
        // The guest is paused and its state is on disk: the VMM only has to go.
        if let Some(handle) = handle {
            self.power_off(name, &handle, VMM_TIMEOUT).await;
        }
        info!(vm = name, state = %dest.display(), "VM saved");
        let mut st = self.get(name)?;
        if clustered {
            // The cluster has it now: whichever node it is placed on resumes it.
            st.state = VmState::Saved;
            if let Err(e) = self.delete(name) {
                warn!(vm = name, error = %error_chain(&e), "cannot remove the saved clustered VM's local definition");
            }
        }
        Ok(st)
    }

    /// Deletes a Saved VM's saved state: it becomes Stopped and its next start boots.
    pub fn discard_saved_state(&self, name: &str) -> Result<VmStatus, AgentError> {
        let mut vms = lock(&self.vms);
        let vm = vms
            .get_mut(name)
            .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
        if vm.state != VmState::Saved {
            return Err(AgentError::WrongState {
                name: name.to_string(),
                state: vm.state.to_string(),
                action: "discard its saved state (it has none)",
            });
        }
        if self.has_shared_saved_area(name) {
            return Err(AgentError::WrongState {
                name: name.to_string(),
                state: "clustered".into(),
                action: "discard its saved state here (the cluster's is discarded through the cluster: vireoctl vm discard-saved-state --cluster)",
            });
        }
        let dir = self.saved_state(name);
        std::fs::remove_dir_all(&dir)
            .map_err(|e| AgentError::io("cannot remove the saved state", &dir, e))?;
        self.set_state(
            name,
            vm,
            VmState::Stopped,
            Some("saved state discarded".into()),
        );
        let st = self.status_of(name, vm, true);
        drop(vms);
        info!(vm = name, "saved state discarded");
        Ok(st)
    }

    /// After a VM resumed from its saved state: the state is spent (a later crash
    /// must not bring the guest back to that moment).
    pub fn spend_saved_state(&self, name: &str) {
        let dir = self.saved_state(name);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(vm = name, dir = %dir.display(), error = %e, "cannot remove the spent saved state");
            }
        }
    }
}

/// Removes what is at `dest` before a save: a snapshot cut short, or the spent state
/// of an earlier save whose removal failed (the VM ran on from it, so it is stale).
fn clear_spent(dest: &Path) -> Result<(), AgentError> {
    match std::fs::remove_dir_all(dest) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(AgentError::io("cannot remove an old saved state", dest, e))
        }
        _ => Ok(()),
    }
}
