//! Definitions: define, redefine (internally, stopped VMs), change (an operator's,
//! also while the VM runs: at its next start) and delete a VM (checked against the
//! storage roots).

use tracing::{info, warn};

use super::{lock, Supervisor, Vm};
use crate::model::{validate_name, VmDefinition, VmState, VmStatus};
use crate::{now_ms, AgentError};

impl Supervisor {
    /// Checks every path `def` names against the storage roots and declares each
    /// disk's format (see [`crate::confinement`]).
    pub(crate) fn confine(&self, name: &str, def: &mut VmDefinition) -> Result<(), AgentError> {
        crate::confinement::confine_definition(&self.roots, &self.vm_dir(name), def)?;
        self.switches.check_definition(name, def)
    }

    pub fn define(&self, name: &str, mut def: VmDefinition) -> Result<VmStatus, AgentError> {
        validate_name(name)?;
        def.normalize()?;
        def.validate()?;
        self.confine(name, &mut def)?;
        let mut vms = lock(&self.vms);
        if vms.contains_key(name) {
            return Err(AgentError::Duplicate(name.to_string()));
        }
        lock(&self.inv).insert(name, &def, now_ms())?;
        self.note_saved_area(name, &def);
        let vm = Vm::new(def);
        let st = self.status_of(name, &vm, true);
        vms.insert(name.to_string(), vm);
        drop(vms);
        self.emit(name, "defined", None);
        Ok(st)
    }

    /// Replaces the definition of VM `name`, which must not be running (checked
    /// against the storage roots like a new one).
    pub fn redefine(&self, name: &str, mut def: VmDefinition) -> Result<VmStatus, AgentError> {
        def.normalize()?;
        def.validate()?;
        self.confine(name, &mut def)?;
        let mut vms = lock(&self.vms);
        let vm = vms
            .get_mut(name)
            .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
        if vm.state.has_process() || vm.state == VmState::Saved {
            return Err(AgentError::WrongState {
                name: name.to_string(),
                state: vm.state.to_string(),
                action: "change its definition (stop it, or discard its saved state, first)",
            });
        }
        lock(&self.inv).update(name, &def)?;
        self.note_saved_area(name, &def);
        vm.def = def;
        let st = self.status_of(name, vm, true);
        drop(vms);
        self.emit(name, "redefined", None);
        Ok(st)
    }

    /// Changes the definition of VM `name` (an operator's `vm set`/`vm edit`), checked
    /// against the storage roots like a new one. A VM without a VMM takes it at once;
    /// a running one keeps what its VMM was started with, and the stored definition
    /// applies at its next start (`definition_pending` says so meanwhile). Refused
    /// while the VM migrates (the definition travels with it).
    pub fn set_definition(
        &self,
        name: &str,
        mut def: VmDefinition,
    ) -> Result<VmStatus, AgentError> {
        def.normalize()?;
        def.validate()?;
        self.confine(name, &mut def)?;
        let mut vms = lock(&self.vms);
        let vm = vms
            .get_mut(name)
            .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
        if vm.state == VmState::Saved {
            return Err(AgentError::WrongState {
                name: name.to_string(),
                state: vm.state.to_string(),
                action: "change its definition (the saved guest resumes with the one it was saved with: discard its saved state first)",
            });
        }
        if vm.migration.is_some() || matches!(vm.state, VmState::Migrating | VmState::Incoming) {
            return Err(AgentError::WrongState {
                name: name.to_string(),
                state: vm.state.to_string(),
                action: "change its definition (its migration carries it; change it after)",
            });
        }
        lock(&self.inv).update(name, &def)?;
        let detail = if !vm.state.has_process() {
            self.note_saved_area(name, &def);
            vm.def = def;
            vm.pending_def = None;
            None
        } else if def == vm.def {
            vm.pending_def = None;
            None
        } else {
            vm.pending_def = Some(def);
            Some("applies at the next start".to_string())
        };
        info!(
            vm = name,
            pending = vm.pending_def.is_some(),
            "definition changed"
        );
        let st = self.status_of(name, vm, true);
        drop(vms);
        self.emit(name, "redefined", detail);
        Ok(st)
    }

    pub fn delete(&self, name: &str) -> Result<(), AgentError> {
        let mut vms = lock(&self.vms);
        let vm = vms
            .get(name)
            .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
        if vm.state.has_process() {
            return Err(AgentError::WrongState {
                name: name.to_string(),
                state: vm.state.to_string(),
                action: "delete it (stop it first)",
            });
        }
        self.give_back_files(name, &vm.def);
        lock(&self.inv).delete(name)?;
        vms.remove(name);
        lock(&self.saved_areas).remove(name);
        lock(&self.memory).remove(name);
        drop(vms);
        self.remove_run_files(name);
        let dir = self.vm_dir(name);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(vm = name, dir = %dir.display(), error = %e, "cannot remove VM directory");
            }
        }
        self.emit(name, "deleted", None);
        Ok(())
    }
}
