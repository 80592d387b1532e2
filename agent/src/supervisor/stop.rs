//! Stop, kill, pause and resume a running VM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use super::{lock, Supervisor, VMM_TIMEOUT};
use crate::client;
use crate::launcher::Handle;
use crate::model::{VmState, VmStatus};
use crate::{error_chain, AgentError};

/// A pause answers once every vCPU has left the guest; on an overcommitted host that
/// takes a scheduling round of every busy vCPU (seconds with hundreds of them).
pub(super) const TRANSITION_TIMEOUT: Duration = Duration::from_secs(30);

impl Supervisor {
    /// `PUT /api/v1/{route}` to VM `name`'s VMM: its answer when it succeeded, else an
    /// [`AgentError::Vmm`] naming the route and what the VMM said.
    pub(super) async fn vmm_put(
        &self,
        name: &str,
        route: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<client::Response, AgentError> {
        let path = format!("/api/v1/{route}");
        let r = client::request(&self.socket_path(name), "PUT", &path, body, timeout)
            .await
            .map_err(|e| AgentError::Vmm {
                name: name.to_string(),
                message: error_chain(&e),
            })?;
        if !r.ok() {
            return Err(AgentError::Vmm {
                name: name.to_string(),
                message: format!("{route}: {} {}", r.status, r.error_message()),
            });
        }
        Ok(r)
    }

    /// Asks the VMM to shut the VM down; kills it after `timeout`. Returns once the
    /// process is gone.
    pub async fn stop(
        self: &Arc<Self>,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<VmStatus, AgentError> {
        let handle = self.begin_stop(name, "stop it")?;
        self.power_off(name, &handle, timeout.unwrap_or(self.cfg.stop_timeout))
            .await;
        self.get(name)
    }

    /// `vm.shutdown` to the VMM of a VM [`Self::begin_stop`] was called for; SIGKILL
    /// after `timeout`, or at once when the VMM refuses. Returns once it is gone.
    pub(super) async fn power_off(
        self: &Arc<Self>,
        name: &str,
        handle: &Handle,
        timeout: Duration,
    ) {
        crate::metering::sample_one(self, name).await;
        let sock = self.socket_path(name);
        // The VMM answers once its vCPUs have stopped: let them run at the VMMs' share
        // meanwhile (they are gone with the process).
        self.cfg.launcher.boost(&self.spec(name), handle.pid);
        let asked = client::request(
            &sock,
            "PUT",
            "/api/v1/vm.shutdown",
            None,
            timeout.max(VMM_TIMEOUT),
        )
        .await;
        // A VMM that refuses (or cannot be reached) is killed at once.
        let asked = matches!(&asked, Ok(r) if r.ok());
        let gone = asked && self.wait_gone(name, handle, timeout).await;
        if !gone {
            warn!(vm = name, "VMM did not stop in time; killing it");
            let _ = handle.signal(libc::SIGKILL);
            self.wait_gone(name, handle, Duration::from_secs(10)).await;
        }
    }

    /// SIGKILL to the VMM; returns once it is gone.
    pub async fn kill(self: &Arc<Self>, name: &str) -> Result<VmStatus, AgentError> {
        let handle = self.begin_stop(name, "kill it")?;
        // A killed VM that was migrating stays here (the migration fails before its
        // commit); one that was arriving is discarded by its migration.
        handle
            .signal(libc::SIGKILL)
            .map_err(|e| AgentError::io("cannot kill VMM", &self.cfg.vireo_bin, e))?;
        self.wait_gone(name, &handle, Duration::from_secs(10)).await;
        self.get(name)
    }

    pub(super) fn begin_stop(
        &self,
        name: &str,
        action: &'static str,
    ) -> Result<Handle, AgentError> {
        let mut vms = lock(&self.vms);
        let vm = vms
            .get_mut(name)
            .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
        // A migrating VM cannot be shut down (a clean exit would look like the hand-over),
        // only killed.
        let killable =
            action == "kill it" && matches!(vm.state, VmState::Migrating | VmState::Incoming);
        let handle = match (&vm.handle, vm.state) {
            (
                Some(h),
                VmState::Running | VmState::Paused | VmState::Starting | VmState::Stopping,
            ) => h.clone(),
            (Some(h), _) if killable => h.clone(),
            _ => {
                return Err(AgentError::WrongState {
                    name: name.to_string(),
                    state: vm.state.to_string(),
                    action,
                })
            }
        };
        vm.stop_requested = true;
        if !killable {
            self.set_state(name, vm, VmState::Stopping, None);
        }
        Ok(handle)
    }

    /// Waits until the watcher has seen the process end (true) or `timeout` (false).
    pub(super) async fn wait_gone(&self, name: &str, handle: &Handle, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let still = {
                let vms = lock(&self.vms);
                vms.get(name)
                    .and_then(|vm| vm.handle.as_ref())
                    .is_some_and(|h| h.pid == handle.pid && h.start_ticks == handle.start_ticks)
            };
            if !still {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn pause(&self, name: &str) -> Result<VmStatus, AgentError> {
        self.vmm_transition(
            name,
            VmState::Running,
            VmState::Paused,
            "vm.pause",
            "pause it",
        )
        .await
    }

    pub async fn resume(&self, name: &str) -> Result<VmStatus, AgentError> {
        self.vmm_transition(
            name,
            VmState::Paused,
            VmState::Running,
            "vm.resume",
            "resume it",
        )
        .await
    }

    async fn vmm_transition(
        &self,
        name: &str,
        from: VmState,
        to: VmState,
        route: &str,
        action: &'static str,
    ) -> Result<VmStatus, AgentError> {
        {
            let vms = lock(&self.vms);
            let vm = vms
                .get(name)
                .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
            if vm.state != from {
                return Err(AgentError::WrongState {
                    name: name.to_string(),
                    state: vm.state.to_string(),
                    action,
                });
            }
        }
        // A pause waits for every vCPU to leave the guest: they get the VMMs' share
        // for that moment, then go back to the VM's own (parked, they use none).
        let pid = lock(&self.vms)
            .get(name)
            .and_then(|vm| vm.handle.as_ref().map(|h| h.pid));
        let boost = (to == VmState::Paused).then_some(pid).flatten();
        if let Some(pid) = boost {
            self.cfg.launcher.boost(&self.spec(name), pid);
        }
        let r = self.vmm_put(name, route, None, TRANSITION_TIMEOUT).await;
        if let Some(pid) = boost {
            self.cfg.launcher.unboost(&self.spec(name), pid);
        }
        r?;
        let mut vms = lock(&self.vms);
        if let Some(vm) = vms.get_mut(name) {
            if vm.state == from {
                self.set_state(name, vm, to, None);
            }
        }
        drop(vms);
        self.get(name)
    }
}
