//! Host start and shutdown: automatic start in priority order, and stopping every
//! VM lowest priority first.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tracing::warn;

use super::{lock, StartKind, Supervisor};
use crate::error_chain;
use crate::model::{Priority, StopAction};

impl Supervisor {
    /// The VMs defined now: what the host's automatic start considers (taken before
    /// the API serves, so that a VM a client defines meanwhile is the client's to
    /// start, not raced by the automatic start).
    pub fn defined_now(&self) -> std::collections::HashSet<String> {
        lock(&self.vms).keys().cloned().collect()
    }

    /// Starts every VM of `defined` (see [`Self::defined_now`]) whose priority is not
    /// Off and that is not running: all High ones first, then Medium, then Low; at most
    /// `max_concurrent_starts` at a time.
    pub async fn autostart(self: &Arc<Self>, defined: &std::collections::HashSet<String>) {
        let sem = Arc::new(Semaphore::new(self.cfg.max_concurrent_starts.max(1)));
        for prio in [Priority::High, Priority::Medium, Priority::Low] {
            let names: Vec<String> = lock(&self.vms)
                .iter()
                .filter(|(n, vm)| {
                    defined.contains(*n) && vm.def.priority == prio && !vm.state.has_process()
                })
                .map(|(n, _)| n.clone())
                .collect();
            let mut tasks = tokio::task::JoinSet::new();
            for name in names {
                let me = self.clone();
                let sem = sem.clone();
                tasks.spawn(async move {
                    let Ok(_permit) = sem.acquire().await else {
                        return;
                    };
                    if let Err(e) = me.start_as(&name, StartKind::Auto).await {
                        warn!(vm = %name, error = %error_chain(&e), "automatic start failed");
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        }
    }

    /// Host shutdown: stops every running VM, lowest priority first (Off, Low,
    /// Medium, High), each group within the stop timeout, each VM by its stop
    /// action (turned off, shut down the guest's way, or saved).
    pub async fn shutdown_all(self: &Arc<Self>) {
        for prio in Priority::ALL.iter().rev() {
            let names: Vec<String> = lock(&self.vms)
                .iter()
                .filter(|(_, vm)| vm.def.priority == *prio && vm.handle.is_some())
                .map(|(n, _)| n.clone())
                .collect();
            let mut tasks = tokio::task::JoinSet::new();
            for name in names {
                let me = self.clone();
                tasks.spawn(async move { me.take_down(&name).await });
            }
            while tasks.join_next().await.is_some() {}
        }
    }

    /// One VM at vireod's stop, by its stop action; a save or guest shutdown that
    /// cannot be done turns the VM off instead.
    async fn take_down(self: &Arc<Self>, name: &str) {
        let action = lock(&self.vms).get(name).map(|vm| vm.def.stop_action);
        let done = match action {
            Some(StopAction::Save) => self.save(name).await.map(drop),
            Some(StopAction::Shutdown) => self.shutdown(name, None).await.map(drop),
            _ => self.stop(name, None).await.map(drop),
        };
        let Err(e) = done else {
            return;
        };
        warn!(vm = %name, action = ?action, error = %error_chain(&e), "stop action at shutdown failed; turning the VM off");
        let still = lock(&self.vms)
            .get(name)
            .is_some_and(|vm| vm.handle.is_some());
        if still {
            if let Err(e) = self.stop(name, None).await {
                warn!(vm = %name, error = %error_chain(&e), "stop at shutdown failed");
            }
        }
    }
}
