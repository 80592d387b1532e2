//! Watching each VMM process: recording how it ended and stopping, marking crashed or
//! restarting the VM per its restart policy.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::start::replica_logs;
use super::{lock, StartKind, Supervisor};
use crate::error_chain;
use crate::launcher::{self, Exit, Watch};
use crate::model::{ExitRecord, RestartPolicy, VmDefinition, VmState};
use crate::now_ms;

const SERIAL_TAIL_LINES: usize = 20;
/// A VMM that ran this long resets the count of restarts in a row.
const STABLE_RUN: Duration = Duration::from_secs(60);
const LOG_TAIL_LINES: usize = 10;

impl Supervisor {
    pub(super) fn watch(self: &Arc<Self>, name: String, generation: u64, pid: i32, watch: Watch) {
        let me = self.clone();
        tokio::spawn(async move {
            let exit = watch.wait().await;
            me.on_exit(&name, generation, pid, exit);
        });
    }

    pub(super) fn exit_record(&self, name: &str, pid: i32, exit: Exit, reason: &str) -> ExitRecord {
        let spec = self.spec(name);
        ExitRecord {
            at_ms: now_ms(),
            pid,
            status: exit.status,
            signal: exit.signal,
            reason: reason.to_string(),
            serial_tail: launcher::tail_lines(&self.serial_path(name), SERIAL_TAIL_LINES),
            vmm_log_tail: launcher::tail_lines(&spec.log, LOG_TAIL_LINES),
        }
    }

    /// After VM `name`'s VMM of `generation` ended: its replicated disks' writes made
    /// durable and their change logs' writer marks removed, unless a new VMM of the VM
    /// began meanwhile (see `replica_crash`). On a blocking thread.
    /// A VMM that did not end cleanly (`clean`: exit status 0) left its VHDX disks
    /// unclosed: their logs get the unclean mark instead, so the next start resyncs.
    fn settle_replica_logs(
        self: &Arc<Self>,
        name: &str,
        def: &VmDefinition,
        generation: u64,
        clean: bool,
    ) {
        let unclosed: Vec<bool> = replica_logs(def)
            .iter()
            .map(|(_, _, vhdx)| *vhdx && !clean)
            .collect();
        let logs: Vec<(PathBuf, PathBuf)> = replica_logs(def)
            .into_iter()
            .map(|(l, i, _)| (l.to_path_buf(), i.to_path_buf()))
            .collect();
        if logs.is_empty() {
            return;
        }
        let (me, name) = (self.clone(), name.to_string());
        tokio::task::spawn_blocking(move || {
            let settled = crate::replica_crash::sync_logs(&me.roots, &logs).and_then(|dirs| {
                let vms = lock(&me.vms);
                if vms.get(&name).is_some_and(|vm| vm.generation == generation) {
                    for (d, unclosed) in dirs.iter().zip(&unclosed) {
                        let d = std::os::fd::AsFd::as_fd(d);
                        if *unclosed {
                            crate::replica_crash::mark_unclean(d)?;
                        } else {
                            crate::replica_crash::unmark_writer(d)?;
                        }
                    }
                }
                Ok(())
            });
            if let Err(e) = settled {
                warn!(vm = %name, error = %e, "change logs not settled: a host crash before the next start resyncs the replica");
            }
        });
    }

    /// A VMM ended: record it, then stop, mark crashed, or restart per the policy.
    fn on_exit(self: &Arc<Self>, name: &str, generation: u64, pid: i32, exit: Exit) {
        let mut vms = lock(&self.vms);
        let Some(vm) = vms.get_mut(name) else {
            return;
        };
        if vm.generation != generation {
            return;
        }
        self.settle_replica_logs(name, &vm.def, generation, exit.status == Some(0));
        if vm.migration.is_some() {
            // The migration's task decides what this exit means (handed over, or lost).
            let reason = if vm.stop_requested {
                "requested"
            } else if exit.status == Some(0) {
                "migrated"
            } else {
                "crashed"
            };
            let rec = self.exit_record(name, pid, exit, reason);
            if let Err(e) = lock(&self.inv).record_exit(name, &rec) {
                warn!(vm = name, error = %error_chain(&e), "cannot record exit");
            }
            vm.handle = None;
            vm.last_exit = Some(rec);
            self.remove_run_files(name);
            self.cfg.launcher.ended(&self.spec(name));
            if reason != "migrated" {
                let detail = Some(format!(
                    "{reason} during a migration: {}",
                    describe_exit(exit)
                ));
                self.set_state(name, vm, VmState::Crashed, detail);
            }
            return;
        }
        let reason = if vm.stop_requested {
            vm.stop_reason.take().unwrap_or("requested")
        } else if exit.status == Some(0) {
            "power-off"
        } else if exit.status.is_none() && exit.signal.is_none() {
            "unknown"
        } else {
            "crashed"
        };
        let rec = self.exit_record(name, pid, exit, reason);
        if let Err(e) = lock(&self.inv).record_exit(name, &rec) {
            warn!(vm = name, error = %error_chain(&e), "cannot record exit");
        }
        vm.handle = None;
        vm.last_exit = Some(rec.clone());
        self.remove_run_files(name);
        self.cfg.launcher.ended(&self.spec(name));
        // A VMM that ran for a while before it ended is not part of a crash loop: the
        // restart cap counts restarts in a row.
        if vm
            .started_at_ms
            .is_some_and(|t| rec.at_ms.saturating_sub(t) > STABLE_RUN.as_millis() as u64)
        {
            vm.restarts = 0;
        }
        let restart = !vm.stop_requested
            && match vm.def.restart {
                RestartPolicy::Never => false,
                RestartPolicy::OnFailure => rec.is_failure(),
                RestartPolicy::Always => true,
            };
        let detail = Some(format!("{reason}: {}", describe_exit(exit)));
        let state = if reason == super::SAVED {
            VmState::Saved
        } else if vm.stop_requested || reason == "power-off" {
            VmState::Stopped
        } else {
            VmState::Crashed
        };
        self.set_state(name, vm, state, detail);
        if !restart {
            return;
        }
        if vm.restarts >= vm.def.max_restarts {
            self.emit(
                name,
                "restart-limit",
                Some(format!("{} restarts in a row; not restarting", vm.restarts)),
            );
            return;
        }
        vm.restarts += 1;
        let backoff = Duration::from_millis(100 * u64::from(vm.restarts));
        drop(vms);
        let me = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(backoff).await;
            if let Err(e) = me.start_as(&name, StartKind::Restart).await {
                warn!(vm = %name, error = %error_chain(&e), "restart failed");
            }
        });
    }
}

pub(super) fn describe_exit(e: Exit) -> String {
    match (e.status, e.signal) {
        (Some(s), _) => format!("exit status {s}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "exit status unknown (not vireod's child)".into(),
    }
}
