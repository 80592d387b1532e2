//! Running VMs' memory: the Dynamic Memory VMs the balancer ([`crate::balancer`])
//! looks after, an operator's resize (`PUT /api/v1/vms/{name}/memory`), and the
//! memory status `GET /api/v1/vms/{name}` shows.
//!
//! Nothing here is stored: the balancer re-derives every VM's state from its VMM each
//! round, so a vireod restart loses nothing (re-adopted VMMs are read again).

use std::path::PathBuf;
use std::time::Duration;

use tracing::info;

use super::{lock, Supervisor, VMM_TIMEOUT};
use crate::balancer::policy::{Devices, Plan};
use crate::model::{DynamicMemory, MemoryStatus, VmDefinition, VmState, VmStatus};
use crate::{now_ms, AgentError};

/// A running Dynamic Memory VM, as the balancer needs it.
#[derive(Clone, Debug)]
pub struct DynamicVm {
    pub name: String,
    /// Its settings: a changed definition's minimum, buffer and weight apply at once;
    /// its maximum only up to what the running VMM can reach.
    pub settings: DynamicMemory,
    pub devices: Devices,
    pub socket: PathBuf,
    pub pid: i32,
}

/// The VMM's memory devices of a definition.
pub fn devices_of(def: &VmDefinition) -> Devices {
    Devices {
        boot: def.config.memory.size,
        hotplug: def.config.memory.hotplug_size,
        balloon: def.config.balloon.is_some(),
    }
}

/// What a VMM reports of its memory devices now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Current {
    /// Boot memory + the hotplug bytes the host asks for (`vm.info`).
    pub desired_ram: Option<u64>,
    /// The balloon's target (`vm.counters`).
    pub desired_balloon: Option<u64>,
}

impl Supervisor {
    /// The running Dynamic Memory VMs (Running only: a paused, migrating or stopping
    /// VM is left as it is).
    pub fn dynamic_vms(&self) -> Vec<DynamicVm> {
        let vms = lock(&self.vms);
        vms.iter()
            .filter(|(_, vm)| vm.state == VmState::Running && vm.migration.is_none())
            .filter_map(|(name, vm)| {
                let running = vm.def.dynamic_memory.as_ref()?;
                let h = vm.handle.as_ref()?;
                let devices = devices_of(&vm.def);
                let (_, reach) = devices.range();
                let mut settings = vm
                    .pending_def
                    .as_ref()
                    .and_then(|d| d.dynamic_memory.clone())
                    .unwrap_or_else(|| running.clone());
                settings.maximum = settings.maximum.min(reach);
                settings.minimum = settings.minimum.min(settings.maximum);
                Some(DynamicVm {
                    name: name.clone(),
                    settings,
                    devices,
                    socket: self.socket_path(name),
                    pid: h.pid,
                })
            })
            .collect()
    }

    /// Records what was seen of VM `name`'s memory (its VMM `pid`).
    pub fn note_memory(&self, name: &str, pid: i32, status: MemoryStatus) {
        lock(&self.memory).insert(name.to_string(), (pid, status));
    }

    /// The last memory status of VM `name` if it is of its running VMM `pid`.
    pub fn memory_of(&self, name: &str, pid: Option<i32>) -> Option<MemoryStatus> {
        let pid = pid?;
        lock(&self.memory)
            .get(name)
            .filter(|(p, _)| *p == pid)
            .map(|(_, s)| s.clone())
    }

    /// Publishes a memory change of VM `name` (the `memory` event).
    pub fn memory_event(&self, name: &str, detail: String) {
        self.emit(name, "memory", Some(detail));
    }

    /// Asks VM `name`'s VMM for `plan`, skipping what it has already been asked for.
    pub async fn apply_memory_plan(
        &self,
        name: &str,
        plan: Plan,
        current: Current,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let calls = [
            (
                "desired_balloon",
                plan.desired_balloon,
                current.desired_balloon,
            ),
            ("desired_ram", plan.desired_ram, current.desired_ram),
        ];
        // Growing: the balloon lets go first; shrinking: unplug first.
        let growing = plan.desired_balloon.unwrap_or(0) < current.desired_balloon.unwrap_or(0);
        let order: Vec<_> = if growing {
            calls.into_iter().collect()
        } else {
            calls.into_iter().rev().collect()
        };
        for (field, want, now) in order {
            let Some(want) = want else { continue };
            if now == Some(want) {
                continue;
            }
            let body = serde_json::json!({ field: want }).to_string().into_bytes();
            self.vmm_put(name, "vm.resize", Some(body), timeout).await?;
        }
        Ok(())
    }

    /// `PUT /api/v1/vms/{name}/memory`: makes the running VM's memory `bytes` now,
    /// through the devices it has (virtio-mem above boot memory, the balloon below).
    /// A Dynamic Memory VM is held to its minimum and maximum (the balancer moves it
    /// again from its next round); a static one to what its devices reach.
    pub async fn resize_memory(&self, name: &str, bytes: u64) -> Result<VmStatus, AgentError> {
        let (def, pid) = {
            let vms = lock(&self.vms);
            let vm = vms
                .get(name)
                .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
            match (&vm.handle, vm.state) {
                (Some(h), VmState::Running | VmState::Paused) if vm.migration.is_none() => {
                    (vm.def.clone(), h.pid)
                }
                _ => {
                    return Err(AgentError::WrongState {
                        name: name.to_string(),
                        state: vm.state.to_string(),
                        action: "resize its memory (it must run)",
                    })
                }
            }
        };
        let refuse = |reason: String| AgentError::Resize {
            name: name.to_string(),
            reason,
        };
        if let Some(dm) = &def.dynamic_memory {
            if bytes > dm.maximum || bytes < dm.minimum {
                return Err(refuse(format!(
                    "{} MiB is outside its dynamic memory range {}..={} MiB",
                    bytes >> 20,
                    dm.minimum >> 20,
                    dm.maximum >> 20
                )));
            }
        }
        let plan = devices_of(&def)
            .plan(bytes)
            .map_err(|e| refuse(e.to_string()))?;
        self.apply_memory_plan(name, plan, Current::default(), VMM_TIMEOUT)
            .await?;
        let mut st = self.memory_of(name, Some(pid)).unwrap_or_default();
        if let Ok(r) = crate::balancer::read(&self.socket_path(name), VMM_TIMEOUT).await {
            st.assigned_bytes = r.assigned;
            st.used_bytes = r.used;
        }
        st.target_bytes = Some(bytes);
        st.at_ms = now_ms();
        self.note_memory(name, pid, st);
        info!(vm = name, mib = bytes >> 20, "memory resize asked for");
        self.memory_event(name, format!("resize to {} MiB", bytes >> 20));
        self.get(name)
    }
}
