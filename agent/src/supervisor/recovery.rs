//! Re-adopting the VMMs a previous vireod started (after a vireod restart), and
//! recording those that ended while it was away.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::{lock, mkdir, Supervisor, VMM_TIMEOUT};
use crate::client;
use crate::launcher::{Exit, LaunchSpec, NotAdopted};
use crate::model::VmState;
use crate::now_ms;

impl Supervisor {
    /// Re-adopts the VMMs that a previous vireod started (pid file, /proc, socket);
    /// records those that died meanwhile and cleans their stale files.
    pub async fn recover(self: &Arc<Self>) {
        let names: Vec<String> = lock(&self.vms).keys().cloned().collect();
        // Each adoption asks the VMM for its state: many at once (a busy host answers
        // slowly, one by one it would add up).
        let sem = Arc::new(Semaphore::new(64));
        let mut tasks = tokio::task::JoinSet::new();
        for name in names.clone() {
            let me = self.clone();
            let sem = sem.clone();
            tasks.spawn(async move {
                let Ok(_permit) = sem.acquire().await else {
                    return;
                };
                me.recover_one(&name).await;
            });
        }
        while tasks.join_next().await.is_some() {}
        self.resume_incoming().await;
        // Sockets, pid files and configs of VMs that are no longer defined.
        if let Ok(dir) = std::fs::read_dir(self.cfg.run_dir.join("vms")) {
            for entry in dir.flatten() {
                let p = entry.path();
                if p.is_dir() {
                    // A VM's own run directory.
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !names.contains(&name) {
                        let _ = std::fs::remove_dir_all(&p);
                    }
                    continue;
                }
                let stem = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if !names.contains(&stem) {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    }

    /// A VMM started by a vireod before VMs had run directories serves
    /// `<run-dir>/vms/NAME.sock`: give it `vms/NAME/api.sock` as a link to that socket,
    /// so that it is re-adopted and reached where every VMM is now (it keeps running as
    /// it was started, unjailed, until its next start). Returns the launch to adopt it
    /// with (the socket its command line names).
    fn legacy_spec(&self, name: &str) -> Option<LaunchSpec> {
        let legacy = self.cfg.run_dir.join("vms").join(format!("{name}.sock"));
        let socket = self.socket_path(name);
        if socket.exists() || !legacy.exists() {
            return None;
        }
        mkdir(&self.vm_run_dir(name), 0o700).ok()?;
        std::os::unix::fs::symlink(&legacy, &socket).ok()?;
        info!(vm = %name, socket = %legacy.display(), "a VMM of the old layout: reached through {}", socket.display());
        Some(LaunchSpec {
            socket: legacy,
            ..self.spec(name)
        })
    }

    /// Re-adopts one VM's VMM, or records that it ended while vireod was away.
    async fn recover_one(self: &Arc<Self>, name: &str) {
        let spec = self.legacy_spec(name).unwrap_or_else(|| self.spec(name));
        match self.cfg.launcher.adopt(&spec) {
            Ok((handle, watch)) => {
                self.private_socket(name, &spec.socket);
                let state = match client::request(
                    &spec.socket,
                    "GET",
                    "/api/v1/vm.info",
                    None,
                    VMM_TIMEOUT,
                )
                .await
                {
                    Ok(r) if r.ok() => r
                        .json()
                        .and_then(|v| v.get("state").and_then(|s| s.as_str()).map(str::to_string)),
                    _ => None,
                };
                let receiving = state.is_none() && self.vmm_is_receiving(&spec.socket).await;
                let state = match state.as_deref() {
                    Some("Paused") => VmState::Paused,
                    Some("Running") => VmState::Running,
                    // A receiver whose VM has not arrived: vireod's restart cut its
                    // migration short (the record says so); it is stopped below.
                    None if receiving => VmState::Incoming,
                    other => {
                        // Alive but not answering as a running VM: leave it be, but
                        // supervise it so that its end is seen.
                        warn!(vm = %name, pid = handle.pid, state = ?other, "adopted VMM does not report a running VM");
                        VmState::Running
                    }
                };
                let generation = self.generation.fetch_add(1, Ordering::Relaxed);
                {
                    let mut vms = lock(&self.vms);
                    let Some(vm) = vms.get_mut(name) else {
                        return;
                    };
                    vm.generation = generation;
                    vm.handle = Some(handle.clone());
                    vm.adopted = true;
                    if state == VmState::Incoming {
                        // resume_incoming follows its migration again.
                        vm.migration = self
                            .migrations
                            .active_for(name, crate::model::MigrationDirection::Incoming);
                    }
                    vm.started_at_ms =
                        Some(now_ms().saturating_sub(crate::procfs::age_ms(handle.start_ticks)));
                    self.set_state(
                        name,
                        vm,
                        state,
                        Some(format!("re-adopted pid {}", handle.pid)),
                    );
                }
                info!(vm = %name, pid = handle.pid, "re-adopted running VMM");
                if state == VmState::Incoming {
                    self.cfg.launcher.booting(handle.pid);
                } else {
                    self.reattach_ports(name).await;
                    let (weight, vcpus) = lock(&self.vms)
                        .get(name)
                        .map(|vm| (vm.def.weight(), usize::from(vm.def.config.cpus.boot)))
                        .unwrap_or((crate::cgroup::DEFAULT_WEIGHT, 1));
                    self.cfg
                        .launcher
                        .running(&spec, handle.pid, weight, vcpus)
                        .await;
                }
                self.watch(name.to_string(), generation, handle.pid, watch);
            }
            Err(NotAdopted::NoPidFile) => self.remove_run_files(name),
            Err(why) => {
                // It ran when the previous vireod stopped, and is gone now.
                let pid = std::fs::read_to_string(&spec.pid_file)
                    .ok()
                    .and_then(|t| t.split_whitespace().next().and_then(|p| p.parse().ok()))
                    .unwrap_or(0);
                warn!(vm = %name, pid, why = ?why, "VMM ended while vireod was not running");
                let rec = self.exit_record(
                    name,
                    pid,
                    Exit {
                        status: None,
                        signal: None,
                    },
                    "ended while vireod was not running",
                );
                let _ = lock(&self.inv).record_exit(name, &rec);
                if let Some(vm) = lock(&self.vms).get_mut(name) {
                    vm.last_exit = Some(rec);
                    self.set_state(name, vm, VmState::Crashed, None);
                }
                self.remove_run_files(name);
            }
        }
    }

    /// Whether the VMM at `socket` waits for an incoming migration.
    async fn vmm_is_receiving(&self, socket: &Path) -> bool {
        match client::request(
            socket,
            "GET",
            "/api/v1/vm.migration-info",
            None,
            VMM_TIMEOUT,
        )
        .await
        {
            Ok(r) if r.ok() => r
                .json()
                .is_some_and(|v| v.get("status").and_then(|s| s.as_str()) == Some("receiving")),
            _ => false,
        }
    }
}
