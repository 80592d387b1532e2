//! Event publication: the event stream, state changes (each one an event) and the
//! events VMMs report (a disk that stopped its VM).

use std::sync::atomic::Ordering;

use tokio::sync::broadcast;
use tracing::{info, warn};

use super::{lock, Supervisor, Vm};
use crate::model::{Event, VmState};
use crate::now_ms;

impl Supervisor {
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// An event of a VM's replication (`replication-*`, see [`crate::replication`]).
    pub fn replication_event(&self, vm: &str, event: &str, detail: Option<String>) {
        self.emit(vm, event, detail);
    }

    pub(super) fn emit(&self, vm: &str, event: &str, detail: Option<String>) {
        let e = Event {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            at_ms: now_ms(),
            vm: vm.to_string(),
            event: event.to_string(),
            detail,
        };
        info!(vm = %e.vm, event = %e.event, detail = e.detail.as_deref().unwrap_or(""), "event");
        let _ = self.events.send(e);
    }

    pub(super) fn set_state(
        &self,
        name: &str,
        vm: &mut Vm,
        state: VmState,
        detail: Option<String>,
    ) {
        if vm.state != state {
            vm.state = state;
            self.emit(name, state.as_str(), detail);
        }
    }

    /// The events of `list` (VM `name`'s VMM, process `pid`) not seen before.
    pub fn new_vmm_events(
        &self,
        name: &str,
        pid: i32,
        list: Vec<crate::vmm_events::VmmEvent>,
    ) -> Vec<crate::vmm_events::VmmEvent> {
        let mut seen = lock(&self.vmm_events_seen);
        let last = match seen.get(name) {
            Some(&(p, s)) if p == pid => s,
            _ => 0,
        };
        let new: Vec<_> = list.into_iter().filter(|e| e.seq > last).collect();
        let top = new.iter().map(|e| e.seq).max().unwrap_or(last);
        seen.insert(name.to_string(), (pid, top));
        new
    }

    /// A disk stopped VM `name` (its VMM paused it): a `disk-stopped` event and, if
    /// vireod had it running, the state `Paused` with the reason.
    pub fn disk_stopped(&self, name: &str, e: &crate::vmm_events::VmmEvent) {
        warn!(vm = %name, disk = %e.disk, op = %e.op, errno = e.errno, error = %e.error, "a disk stopped the VM (on_error=stop): paused until resumed");
        self.emit(name, "disk-stopped", Some(e.detail()));
        if let Some(vm) = lock(&self.vms).get_mut(name) {
            if vm.state == VmState::Running {
                let reason = format!(
                    "disk {}: {} failed on the host: {} (errno {})",
                    e.disk, e.op, e.error, e.errno
                );
                self.set_state(name, vm, VmState::Paused, Some(reason));
            }
        }
    }

    /// Sets the state of `name` (if it is still defined).
    pub(super) fn set_state_of(&self, name: &str, state: VmState, detail: Option<String>) {
        if let Some(vm) = lock(&self.vms).get_mut(name) {
            self.set_state(name, vm, state, detail);
        }
    }
}
