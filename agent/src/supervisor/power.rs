//! The guest's own shutdown (ACPI power button, then a stop after a timeout) and a
//! hard reset of a running VM.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::stop::TRANSITION_TIMEOUT;
use super::{lock, Supervisor, VMM_TIMEOUT};
use crate::client;
use crate::model::{VmState, VmStatus};
use crate::{error_chain, AgentError};

/// The exit record's reason of a VM whose guest shut down on the power button.
pub const GUEST_SHUTDOWN: &str = "guest-shutdown";

impl Supervisor {
    /// Presses the VM's ACPI power button (the VMM's `vm.power-button`) and waits up
    /// to `timeout` (default `--stop-timeout-s`) for the guest to power off; a guest
    /// that does not is stopped as [`Supervisor::stop`] does. Returns once the VMM is
    /// gone; its exit record's reason is [`GUEST_SHUTDOWN`] when the guest did it,
    /// "requested" when it was stopped. Only a running VM (a paused guest cannot see
    /// the button).
    pub async fn shutdown(
        self: &Arc<Self>,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<VmStatus, AgentError> {
        self.require_state(
            name,
            &[VmState::Running],
            "shut it down (only a running guest sees the power button)",
        )?;
        let handle = self.begin_stop(name, "shut it down")?;
        if let Some(vm) = lock(&self.vms).get_mut(name) {
            vm.stop_reason = Some(GUEST_SHUTDOWN);
        }
        let timeout = timeout.unwrap_or(self.cfg.stop_timeout);
        // The last metering sample, while the VMM still answers.
        crate::metering::sample_one(self, name).await;
        let pressed = client::request(
            &self.socket_path(name),
            "PUT",
            "/api/v1/vm.power-button",
            None,
            VMM_TIMEOUT,
        )
        .await;
        let pressed = match pressed {
            Ok(r) if r.ok() => true,
            Ok(r) => {
                warn!(vm = name, status = r.status, error = %r.error_message(), "the VMM refused the power button; stopping the VM");
                false
            }
            Err(e) => {
                warn!(vm = name, error = %error_chain(&e), "cannot press the power button; stopping the VM");
                false
            }
        };
        if pressed && self.wait_gone(name, &handle, timeout).await {
            info!(vm = name, "the guest shut down");
            return self.get(name);
        }
        if pressed {
            warn!(
                vm = name,
                timeout_s = timeout.as_secs(),
                "the guest did not shut down in time; stopping it"
            );
        }
        if let Some(vm) = lock(&self.vms).get_mut(name) {
            vm.stop_reason = None;
        }
        self.power_off(name, &handle, VMM_TIMEOUT).await;
        self.get(name)
    }

    /// Resets a running or paused VM as the reset button of a machine would (the
    /// VMM's `vm.reboot`: the VM is built again from its configuration and boots);
    /// it runs afterwards, with the same VMM process.
    pub async fn reset(&self, name: &str) -> Result<VmStatus, AgentError> {
        self.require_state(name, &[VmState::Running, VmState::Paused], "reset it")?;
        self.vmm_put(name, "vm.reboot", None, TRANSITION_TIMEOUT)
            .await?;
        let mut vms = lock(&self.vms);
        if let Some(vm) = vms.get_mut(name) {
            if vm.state == VmState::Paused {
                self.set_state(name, vm, VmState::Running, Some("reset".into()));
            }
        }
        drop(vms);
        self.emit(name, "reset", None);
        info!(vm = name, "VM reset");
        self.get(name)
    }

    /// The VM exists and is in one of `states`; else 404 or 409 naming `action`.
    fn require_state(
        &self,
        name: &str,
        states: &[VmState],
        action: &'static str,
    ) -> Result<(), AgentError> {
        let vms = lock(&self.vms);
        let vm = vms
            .get(name)
            .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
        if states.contains(&vm.state) {
            Ok(())
        } else {
            Err(AgentError::WrongState {
                name: name.to_string(),
                state: vm.state.to_string(),
                action,
            })
        }
    }
}
