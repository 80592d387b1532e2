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

/// `dir/state` holds a complete snapshot.
pub(super) fn is_complete(saved_dir: &Path) -> bool {
    saved_dir.join("state").join("snapshot.json").is_file()
}

impl Supervisor {
    /// The VM's saved-state area (a storage root of each of its VMMs).
    pub(super) fn saved_dir(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("saved")
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
        super::mkdir(&area, 0o700)?;
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
            if vm
                .def
                .config
                .disks
                .iter()
                .any(|d| d.fencing_token.is_some())
            {
                return Err(AgentError::NotSavable {
                    name: name.to_string(),
                    why: "it is clustered: its node starts it again whenever its VMM ends; stop or migrate it through the cluster",
                });
            }
            vm.state == VmState::Running
        };
        let dest = self.saved_state(name);
        clear_spent(&dest)?;
        if was_running {
            self.pause(name).await?;
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
        if let Err(e) = snapshot {
            warn!(vm = name, error = %error_chain(&e), "save failed; the VM goes on");
            let _ = clear_spent(&dest);
            if was_running {
                if let Err(r) = self.resume(name).await {
                    warn!(vm = name, error = %error_chain(&r), "cannot resume the VM after a failed save");
                }
            }
            return Err(e);
        }
        let handle = self.begin_stop(name, "save it")?;
        if let Some(vm) = lock(&self.vms).get_mut(name) {
            vm.stop_reason = Some(SAVED);
        }
        // The guest is paused and its state is on disk: the VMM only has to go.
        self.power_off(name, &handle, VMM_TIMEOUT).await;
        info!(vm = name, state = %dest.display(), "VM saved");
        self.get(name)
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
    pub(super) fn spend_saved_state(&self, name: &str) {
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
