//! Starting a VM: the checks before, the runtime config, spawning its VMM and waiting
//! until it reports the VM running, then handing it to its watcher.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::config::OutputConfig;
use tracing::warn;

use super::exits::describe_exit;
use super::{lock, make_private, mkdir, write_private, StartKind, Supervisor, VMM_TIMEOUT};
use crate::client;
use crate::launcher::LaunchSpec;
use crate::model::{ExitRecord, VmDefinition, VmState, VmStatus};
use crate::{error_chain, now_ms, AgentError};

impl Supervisor {
    /// Starts the VM and returns once its VMM reports it running (or failed).
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<VmStatus, AgentError> {
        self.start_as(name, StartKind::User).await
    }

    pub(super) async fn start_as(
        self: &Arc<Self>,
        name: &str,
        kind: StartKind,
    ) -> Result<VmStatus, AgentError> {
        self.no_vmm_answers(name)?;
        self.not_failed_over_elsewhere(name)?;
        let (def, generation, saved) = {
            let mut vms = lock(&self.vms);
            let vm = vms
                .get_mut(name)
                .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
            if vm.state.has_process() {
                return Err(AgentError::WrongState {
                    name: name.to_string(),
                    state: vm.state.to_string(),
                    action: "start it",
                });
            }
            if kind == StartKind::User {
                vm.restarts = 0;
            }
            // A saved VM resumes where it was (its definition cannot have changed).
            let saved = vm.state == VmState::Saved;
            vm.stop_requested = false;
            vm.stop_reason = None;
            vm.adopted = false;
            if let Some(def) = vm.pending_def.take() {
                self.note_saved_area(name, &def);
                vm.def = def;
            }
            vm.generation = self.generation.fetch_add(1, Ordering::Relaxed);
            let detail = match kind {
                StartKind::User => None,
                StartKind::Auto => Some(format!("automatic start, priority {}", vm.def.priority)),
                StartKind::Restart => Some(format!(
                    "restart {} of {}",
                    vm.restarts, vm.def.max_restarts
                )),
            };
            let detail = match (saved, detail) {
                (true, Some(d)) => Some(format!("{d}, from its saved state")),
                (true, None) => Some("from its saved state".into()),
                (false, d) => d,
            };
            self.set_state(name, vm, VmState::Starting, detail);
            (vm.def.clone(), vm.generation, saved)
        };
        match self.launch(name, &def, generation, saved).await {
            Ok(()) => self.get(name),
            Err((err, exit)) => {
                let mut vms = lock(&self.vms);
                if let Some(vm) = vms.get_mut(name) {
                    if vm.generation == generation {
                        vm.handle = None;
                        if let Some(e) = exit {
                            vm.last_exit = Some(e);
                        }
                        // A saved VM that did not resume keeps its saved state.
                        let back = if saved && super::save::is_complete(&self.saved_dir(name)) {
                            VmState::Saved
                        } else {
                            VmState::Stopped
                        };
                        self.set_state(name, vm, back, Some(err.to_string()));
                    }
                }
                drop(vms);
                self.remove_run_files(name);
                Err(err)
            }
        }
    }

    /// A VM failed over to its replica host (planned, or unplanned and learnt from
    /// that host) runs there: it does not start here too
    /// ([`crate::replication::failed_over`]).
    fn not_failed_over_elsewhere(&self, name: &str) -> Result<(), AgentError> {
        let stored = self.stored_replications()?;
        match stored.iter().find(|(n, _)| n == name) {
            Some((_, json)) => match crate::replication::failed_over::start_refusal(name, json) {
                Some(e) => {
                    warn!(vm = name, error = %e, "start refused: the VM was failed over elsewhere");
                    Err(e)
                }
                None => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Refuses a start while some VMM still answers on the VM's socket (one this
    /// vireod does not know of, e.g. left by another incarnation): a second VMM would
    /// truncate the running one's serial file and replace its socket and config, and
    /// the failed start would remove them.
    fn no_vmm_answers(&self, name: &str) -> Result<(), AgentError> {
        let socket = self.socket_path(name);
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            warn!(vm = name, socket = %socket.display(), "a VMM still answers on the VM's socket: start refused");
            return Err(AgentError::VmmStillRuns {
                name: name.to_string(),
                socket,
            });
        }
        Ok(())
    }

    /// Writes the runtime config, spawns the VMM (booting the VM, or resuming it from
    /// its saved state when `saved`) and waits until it reports the VM running; then
    /// hands the process to a watcher task.
    async fn launch(
        self: &Arc<Self>,
        name: &str,
        def: &VmDefinition,
        generation: u64,
        saved: bool,
    ) -> Result<(), (AgentError, Option<ExitRecord>)> {
        let base = if saved {
            self.restore_spec(name)
        } else {
            self.spec(name)
        };
        let mut spec = LaunchSpec {
            memory: Some(def.config.memory.size),
            ..base
        };
        mkdir(&self.vm_dir(name), 0o750).map_err(|e| (e, None))?;
        mkdir(&self.vm_run_dir(name), 0o700).map_err(|e| (e, None))?;
        self.prepare_saved_area(name).map_err(|e| (e, None))?;
        spec.jail = self
            .jail_spec(name, Vec::new(), Vec::new())
            .map_err(|e| (e, None))?;
        if saved && self.has_shared_saved_area(name) {
            self.renew_saved_config(name, def).map_err(|e| (e, None))?;
        }
        if let (true, Some(jail)) = (saved, &spec.jail) {
            // Saved on another node, its state may be another jail uid's.
            self.hand_saved_state(name, jail.uid)
                .map_err(|e| (e, None))?;
        }
        // Each replicated disk's change log: made beneath its root, the jail's uid's.
        let uid = spec.jail.as_ref().map(|j| j.uid);
        for d in def.config.disks.iter().filter(|d| !d.readonly) {
            if let Some(log) = &d.replica_log {
                crate::jailing::hand_over_log_dir(&self.roots, log, uid).map_err(|e| (e, None))?;
            }
        }
        // Written across a host crash, the logs start again and the replica is
        // resynchronised (see `replica_crash`); each gets this boot's writer mark.
        let logs = replica_logs(def);
        if !logs.is_empty() {
            let logs: Vec<(&Path, bool)> = logs.iter().map(|(l, _, v)| (*l, *v)).collect();
            let restarted =
                crate::replica_crash::prepare_logs(&self.roots, name, &logs).map_err(|e| {
                    (
                        AgentError::io("cannot mark the change logs", logs[0].0, e),
                        None,
                    )
                })?;
            if restarted {
                self.replication_event(
                    name,
                    "replication-resync-required",
                    Some(
                        "the host went down (or a VMM with VHDX disks ended without closing them) while the VM wrote: the change logs start again".into(),
                    ),
                );
            }
        }
        let mut cfg = def.config.clone();
        // vireod owns the serial port: it goes to a file it can show and tail.
        cfg.serial = OutputConfig::File(self.serial_path(name));
        let ports = self
            .switch_ports(name, def, &mut spec, &mut cfg)
            .map_err(|e| (e, None))?;
        let json = serde_json::to_vec_pretty(&cfg)
            .map_err(|e| (AgentError::BadDefinition(e.to_string()), None))?;
        let config = self.config_path(name);
        write_private(&config, &json).map_err(|e| {
            (
                AgentError::io("cannot write runtime config", &config, e),
                None,
            )
        })?;
        // The ports first: the VMM connects to their sockets as it starts.
        self.attach_ports(name, ports)
            .await
            .map_err(|e| (e, None))?;
        let (handle, mut watch) = self
            .cfg
            .launcher
            .spawn(&spec)
            .await
            .map_err(|e| (e, None))?;
        {
            let mut vms = lock(&self.vms);
            match vms.get_mut(name) {
                Some(vm) if vm.generation == generation => {
                    vm.handle = Some(handle.clone());
                    vm.started_at_ms = Some(now_ms());
                }
                _ => {
                    let _ = handle.signal(libc::SIGKILL);
                    return Err((AgentError::UnknownVm(name.to_string()), None));
                }
            }
        }
        let deadline = Instant::now() + self.cfg.start_timeout;
        let failed = |reason: String, exit: Option<ExitRecord>| {
            (
                AgentError::StartFailed {
                    name: name.to_string(),
                    reason,
                },
                exit,
            )
        };
        loop {
            if let Some(exit) = watch.try_exit() {
                let rec = self.exit_record(name, handle.pid, exit, "start-failed");
                let why = rec
                    .vmm_log_tail
                    .iter()
                    .rev()
                    .find(|l| l.contains("error"))
                    .or(rec.vmm_log_tail.last())
                    .cloned()
                    .unwrap_or_else(|| "no output".into());
                let _ = lock(&self.inv).record_exit(name, &rec);
                let msg = format!("{} ({})", why, describe_exit(exit));
                return Err(failed(msg, Some(rec)));
            }
            if spec.socket.exists() {
                if let Ok(r) =
                    client::request(&spec.socket, "GET", "/api/v1/vm.info", None, VMM_TIMEOUT).await
                {
                    let state = r
                        .json()
                        .and_then(|v| v.get("state").and_then(|s| s.as_str()).map(str::to_string));
                    match state.as_deref() {
                        Some("Running") | Some("Paused") => break,
                        _ => {}
                    }
                }
            }
            if Instant::now() > deadline {
                let _ = handle.signal(libc::SIGKILL);
                let exit = watch.wait().await;
                let rec = self.exit_record(name, handle.pid, exit, "start-failed");
                let _ = lock(&self.inv).record_exit(name, &rec);
                return Err(failed(
                    format!("not running after {:?}; killed", self.cfg.start_timeout),
                    Some(rec),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        {
            let mut vms = lock(&self.vms);
            if let Some(vm) = vms.get_mut(name) {
                if vm.generation == generation && vm.state == VmState::Starting {
                    self.set_state(
                        name,
                        vm,
                        VmState::Running,
                        Some(format!("pid {}", handle.pid)),
                    );
                }
            }
        }
        // A clustered VM's state is spent once the cluster's record of it is gone
        // (`cluster_node`): the record first, then the files.
        if saved && !self.has_shared_saved_area(name) {
            self.spend_saved_state(name);
        }
        self.private_socket(name, &spec.socket);
        self.cfg
            .launcher
            .running(
                &spec,
                handle.pid,
                def.weight(),
                usize::from(def.config.cpus.boot),
            )
            .await;
        self.watch(name.to_string(), generation, handle.pid, watch);
        Ok(())
    }

    /// The VMM creates its socket 0600; this makes sure of it (also for a socket an
    /// older vireod had shared with a group), owner vireod's user.
    pub(super) fn private_socket(&self, name: &str, socket: &Path) {
        if let Err(e) = make_private(socket) {
            warn!(vm = name, error = %error_chain(&e), "cannot make the VM's socket private");
        }
    }
}

/// A VM's writable replicated disks: (change-log directory, image, whether a VHDX).
pub(super) fn replica_logs(def: &VmDefinition) -> Vec<(&Path, &Path, bool)> {
    def.config
        .disks
        .iter()
        .filter(|d| !d.readonly)
        .filter_map(|d| {
            let vhdx = d.effective_format() == api::config::DiskFormat::Vhdx;
            d.replica_log
                .as_deref()
                .map(|l| (l, d.path.as_path(), vhdx))
        })
        .collect()
}
