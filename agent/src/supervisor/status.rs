//! Queries of the per-VM state: status, listings, definitions, exit history, serial
//! output (and input), host information, what metering samples, the inventory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use super::{lock, Supervisor, Vm, VMM_TIMEOUT};

use crate::inventory::Inventory;
use crate::launcher::{self, Launcher};
use crate::model::{ExitRecord, HostInfo, VmDefinition, VmState, VmStatus};
use crate::{client, error_chain, AgentError};

impl Supervisor {
    /// Stores (or with `None` removes) VM `name`'s replication settings.
    pub fn save_replication(&self, name: &str, settings: Option<&str>) -> Result<(), AgentError> {
        lock(&self.inv).save_replication(name, settings)
    }

    /// Every stored replication setting: (VM name, JSON).
    pub fn stored_replications(&self) -> Result<Vec<(String, String)>, AgentError> {
        lock(&self.inv).replications()
    }

    pub(super) fn status_of(&self, name: &str, vm: &Vm, with_definition: bool) -> VmStatus {
        VmStatus {
            name: name.to_string(),
            state: vm.state,
            priority: vm.def.priority,
            restart: vm.def.restart,
            pid: vm.handle.as_ref().map(|h| h.pid),
            socket: vm
                .handle
                .as_ref()
                .map(|_| self.socket_path(name).display().to_string()),
            adopted: vm.adopted,
            started_at_ms: vm.started_at_ms,
            restarts: vm.restarts,
            last_exit: vm.last_exit.clone(),
            migration: vm.migration.clone(),
            definition: with_definition.then(|| vm.pending_def.as_ref().unwrap_or(&vm.def).clone()),
            definition_pending: vm.pending_def.is_some(),
            memory: self.memory_of(name, vm.handle.as_ref().map(|h| h.pid)),
        }
    }

    pub fn list(&self) -> Vec<VmStatus> {
        let vms = lock(&self.vms);
        vms.iter()
            .map(|(n, vm)| self.status_of(n, vm, false))
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<VmStatus, AgentError> {
        let vms = lock(&self.vms);
        let vm = vms
            .get(name)
            .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
        Ok(self.status_of(name, vm, true))
    }

    /// Every definition (the inventory as JSON).
    pub fn export(&self) -> BTreeMap<String, VmDefinition> {
        let vms = lock(&self.vms);
        vms.iter()
            .map(|(n, vm)| {
                (
                    n.clone(),
                    vm.pending_def.as_ref().unwrap_or(&vm.def).clone(),
                )
            })
            .collect()
    }

    pub fn exits(&self, name: &str, limit: usize) -> Result<Vec<ExitRecord>, AgentError> {
        self.require(name)?;
        lock(&self.inv).exits(name, limit)
    }

    fn require(&self, name: &str) -> Result<(), AgentError> {
        if lock(&self.vms).contains_key(name) {
            Ok(())
        } else {
            Err(AgentError::UnknownVm(name.to_string()))
        }
    }

    /// The last `lines` lines of the guest's serial output.
    pub fn serial_tail(&self, name: &str, lines: usize) -> Result<Vec<String>, AgentError> {
        self.require(name)?;
        Ok(launcher::tail_complete_lines(
            &self.serial_path(name),
            lines,
        ))
    }

    /// Gives `bytes` to the guest's serial port, as fast as the guest reads them (the
    /// UART's receive FIFO holds 64); returns how many it took within 10 s.
    /// Refuses `action` unless the VM has a VMM (running, paused or migrating).
    fn running_for(&self, name: &str, action: &'static str) -> Result<(), AgentError> {
        let vms = lock(&self.vms);
        let vm = vms
            .get(name)
            .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
        if matches!(
            vm.state,
            VmState::Running | VmState::Paused | VmState::Migrating
        ) {
            return Ok(());
        }
        Err(AgentError::WrongState {
            name: name.to_string(),
            state: vm.state.to_string(),
            action,
        })
    }

    /// Sends one guest agent command through the VM's VMM (`vm.guest-command`): the
    /// VMM's status and body as they are (the guest's reply; 504 when it did not
    /// answer, 409 without a guest agent channel).
    pub async fn guest_command(
        &self,
        name: &str,
        req: &api::GuestCommandRequest,
    ) -> Result<(u16, serde_json::Value), AgentError> {
        self.running_for(name, "send its guest agent a command")?;
        let body = serde_json::to_vec(req).map_err(|e| AgentError::Vmm {
            name: name.to_string(),
            message: e.to_string(),
        })?;
        // The VMM answers within the command's own timeout (default 5 s, at most 300 s).
        let wait =
            Duration::from_millis(req.timeout_ms.unwrap_or(5_000).min(300_000)) + VMM_TIMEOUT;
        let r = client::request(
            &self.socket_path(name),
            "PUT",
            "/api/v1/vm.guest-command",
            Some(body),
            wait,
        )
        .await
        .map_err(|e| AgentError::Vmm {
            name: name.to_string(),
            message: error_chain(&e),
        })?;
        let reply = r
            .json()
            .unwrap_or_else(|| serde_json::json!({ "error": r.error_message() }));
        Ok((r.status, reply))
    }

    pub async fn serial_input(&self, name: &str, bytes: &[u8]) -> Result<usize, AgentError> {
        self.running_for(name, "send it serial input")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sent = 0;
        while sent < bytes.len() && Instant::now() < deadline {
            let r = self
                .vmm_put(
                    name,
                    "vm.serial-input",
                    Some(bytes[sent..].to_vec()),
                    VMM_TIMEOUT,
                )
                .await?;
            let queued = r
                .json()
                .and_then(|v| v.get("queued").and_then(|q| q.as_u64()))
                .unwrap_or(0) as usize;
            sent += queued;
            if queued == 0 {
                // The FIFO is full: the guest has not read yet.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(sent)
    }

    pub fn host_info(&self) -> HostInfo {
        let (vms, running) = {
            let v = lock(&self.vms);
            (
                v.len(),
                v.values().filter(|vm| vm.state.has_process()).count(),
            )
        };
        HostInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            hostname: crate::procfs::hostname(),
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            state_dir: self.cfg.state_dir.display().to_string(),
            run_dir: self.cfg.run_dir.display().to_string(),
            vireo_bin: self.cfg.vireo_bin.display().to_string(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_total_bytes: crate::procfs::mem_total_bytes(),
            vms,
            vms_running: running,
            launcher: self.cfg.launcher.name().to_string(),
            cpu_cgroup: match &self.cfg.launcher {
                Launcher::Direct(d) => d.cgroups.root().map(|p| p.display().to_string()),
                Launcher::Systemd(_) => Some("vireo.slice".into()),
            },
            max_concurrent_migrations: self.migrations.limit(),
        }
    }

    /// (name, pid, start ticks, socket) of every VM whose VMM runs: what metering samples.
    pub fn running_processes(&self) -> Vec<(String, i32, u64, PathBuf)> {
        let vms = lock(&self.vms);
        vms.iter()
            .filter(|(_, vm)| {
                matches!(
                    vm.state,
                    VmState::Running | VmState::Paused | VmState::Migrating
                )
            })
            .filter_map(|(n, vm)| {
                vm.handle
                    .as_ref()
                    .map(|h| (n.clone(), h.pid, h.start_ticks, self.socket_path(n)))
            })
            .collect()
    }

    pub fn inventory(&self) -> MutexGuard<'_, Inventory> {
        lock(&self.inv)
    }
}
