//! The control loop: the only place that changes the VM. vCPU threads, devices and the
//! API thread send it events; it applies lifecycle transitions and answers.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use vireo_util::sync;

use api::{ApiError, ApiRequest, ApiResponse, MigrationInfo, VmAction, VmConfig, VmState};
use devices::legacy::PowerEvent;

use crate::control::{ControlEvent, VmmExit};
use crate::vcpu::VcpuEvent;
use crate::vm::{Vm, VmError};

mod orchestration;
use orchestration::RECEIVING;

pub struct Vmm {
    vm: Option<Vm>,
    seccomp: crate::seccomp::Filters,
    events_tx: Sender<ControlEvent>,
    events_rx: Receiver<ControlEvent>,
    /// The current (or last) migration, shared with its thread.
    migration: Arc<Mutex<MigrationInfo>>,
    /// Source side: whether the VM ran before the switch-over (resumed if it fails).
    resume_if_migration_fails: bool,
    /// Destination: the VM ran on the source, so it runs here once the source commits.
    run_incoming_on_go: bool,
    /// This process's own `--serial`, which replaces the serial output of a VM that
    /// arrives by restore or migration (its configuration names the old host's file).
    serial_override: Option<api::config::OutputConfig>,
    /// A live storage migration in progress, and the last one's progress.
    disk_migration: Option<crate::live::disk::DiskMigration>,
    /// Shared-nothing send: the disks' mirrors (undone if the migration fails).
    remote_mirrors: Vec<(String, Arc<devices::block::Mirror>)>,
    /// The outgoing migration copies storage (so the disks are not handed over).
    copying_storage: bool,
    disk_info: Arc<Mutex<api::DiskMigrationInfo>>,
    /// systemd's watchdog, pinged from this loop (None: not asked for).
    watchdog: Option<crate::watchdog::Watchdog>,
    /// What happened unasked (`vm.events`).
    events: crate::events::EventLog,
    /// An arriving clustered VM's write lease, renewed by `vm.lease` until the VM is
    /// built (then the VM's own lease takes the renewals).
    incoming_lease: Option<Arc<devices::block::WriteLease>>,
    /// The lease in force, renewed by the API thread itself (see `lease_slot`).
    lease_slot: crate::lease_slot::LeaseSlot,
    /// `vm.guest-command`s, one at a time on their own thread.
    guest_commands: crate::guest_agent::GuestCommands,
}

impl Vmm {
    pub fn new(seccomp: crate::seccomp::Filters) -> Self {
        let (events_tx, events_rx) = channel();
        Self {
            vm: None,
            seccomp,
            events_tx,
            events_rx,
            migration: Arc::new(Mutex::new(MigrationInfo::default())),
            resume_if_migration_fails: false,
            run_incoming_on_go: true,
            serial_override: None,
            disk_migration: None,
            remote_mirrors: Vec::new(),
            copying_storage: false,
            disk_info: Arc::new(Mutex::new(api::DiskMigrationInfo::default())),
            guest_commands: Default::default(),
            watchdog: None,
            events: Default::default(),
            incoming_lease: None,
            lease_slot: Default::default(),
        }
    }

    /// Pings systemd's watchdog from the control loop while the VM is healthy.
    pub fn set_watchdog(&mut self, watchdog: Option<crate::watchdog::Watchdog>) {
        self.watchdog = watchdog;
    }

    /// The next event; with a watchdog, None when a ping is due first.
    fn next_event(&mut self) -> Result<Option<ControlEvent>, ()> {
        let watchdog = self
            .watchdog
            .as_ref()
            .map(|w| w.wait(std::time::Instant::now()));
        let wait = match (watchdog, self.lease_wait()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match wait {
            None => self.events_rx.recv().map(Some).map_err(|_| ()),
            Some(wait) => match self.events_rx.recv_timeout(wait) {
                Ok(e) => Ok(Some(e)),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Ok(None),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(()),
            },
        }
    }

    /// A running clustered VM's write lease: how long until its deadline (the loop
    /// wakes then to pause the VM). None: no lease, or it has expired already.
    fn lease_wait(&self) -> Option<std::time::Duration> {
        let vm = self.vm.as_ref()?;
        let lease = vm.devices().write_lease.as_ref()?;
        if vm.state() != VmState::Running || lease.expired() {
            return None;
        }
        let left = lease
            .deadline_ns()
            .saturating_sub(devices::block::monotonic_ns());
        Some(std::time::Duration::from_nanos(left))
    }

    /// Past the write lease's deadline: pause the VM for good (its disks refuse
    /// writes already; another host may own them now).
    fn lease_tick(&mut self) {
        let Some(vm) = &mut self.vm else { return };
        let expired = vm
            .devices()
            .write_lease
            .as_ref()
            .is_some_and(|l| l.expired());
        if !expired || vm.state() != VmState::Running {
            return;
        }
        let (ahead_ms, renewed_ms_ago) = vm
            .devices()
            .write_lease
            .as_ref()
            .map_or((0.0, 0.0), |l| l.timing_ms(devices::block::monotonic_ns()));
        tracing::error!(
            passed_ms_ago = -ahead_ms,
            renewed_ms_ago,
            "write lease expired: this VMM's host may no longer run the VM; disks refuse writes, pausing the VM"
        );
        if let Err(e) =
            vm.pause_for("the write lease expired: another host may own this VM's disks now".into())
        {
            tracing::error!(error = %e, "cannot pause the VM after its write lease expired");
        }
    }

    /// Pings the watchdog if due (and the vCPUs are healthy).
    fn watchdog_tick(&mut self) {
        let Some(w) = &mut self.watchdog else {
            return;
        };
        let now = std::time::Instant::now();
        if w.wait(now) > std::time::Duration::ZERO {
            return;
        }
        let vcpus = self
            .vm
            .as_ref()
            .map(|vm| vm.vcpu_liveness())
            .unwrap_or_default();
        let kick = w.tick(now, &vcpus);
        if let Some(vm) = &self.vm {
            vm.kick_vcpus(&kick);
        }
    }

    /// How the API server reaches this loop. A write lease's renewal is taken on the
    /// API thread (`lease_slot`): it never waits behind the loop's other work.
    pub fn api_dispatch(&self) -> api::Dispatch {
        let tx = Mutex::new(self.events_tx.clone());
        let leases = self.lease_slot.clone();
        Arc::new(move |req| match leases.try_renew(req) {
            None => true,
            Some(req) => sync::lock(&tx).send(ControlEvent::Api(req)).is_ok(),
        })
    }

    /// Points the API thread's renewals at the lease in force: the VM's own, or an
    /// arriving clustered VM's.
    fn publish_lease(&self) {
        self.lease_slot.set(self.lease_in_force());
    }

    /// The VM's own lease, or while a clustered VM arrives (not built yet), the
    /// incoming one, which nothing ran under yet.
    fn lease_in_force(&self) -> Option<crate::lease_slot::InForce> {
        use crate::lease_slot::InForce;
        match &self.vm {
            Some(vm) => vm.devices().write_lease.clone().map(|lease| InForce {
                lease,
                unused: false,
            }),
            None => self.incoming_lease.clone().map(|lease| InForce {
                lease,
                unused: true,
            }),
        }
    }

    pub fn create(&mut self, config: VmConfig) -> Result<(), VmError> {
        self.vm = Some(Vm::new(
            config,
            self.events_tx.clone(),
            self.seccomp.clone(),
        )?);
        Ok(())
    }

    /// Where the serial output of a restored or incoming VM goes (instead of where its
    /// configuration says).
    pub fn set_serial_override(&mut self, serial: Option<api::config::OutputConfig>) {
        self.serial_override = serial;
    }

    /// Builds the VM from a snapshot directory; it stays paused until `vm.resume`.
    pub fn restore(&mut self, dir: &std::path::Path) -> Result<(), VmError> {
        let path = dir.to_path_buf();
        // Opened (beneath a storage root when the VMM has them) and read on the file
        // thread.
        let mut snapshot =
            crate::file_broker::run(crate::file_broker::FileOp::ReadSnapshot, move || {
                let dir_fd = crate::confinement::open_dir(&path)
                    .map_err(|e| VmError::Confined(e.to_string()))?;
                migration::Snapshot::<VmConfig, crate::vm::SavedVm>::open_at(dir_fd, &path)
                    .map_err(VmError::from)
            })?;
        if let Some(s) = &self.serial_override {
            snapshot.config.serial = s.clone();
        }
        self.vm = Some(Vm::restore(
            &snapshot,
            self.events_tx.clone(),
            self.seccomp.clone(),
        )?);
        Ok(())
    }

    /// Resumes a restored (paused) VM.
    pub fn resume(&mut self) -> Result<(), VmError> {
        match &mut self.vm {
            Some(vm) => vm.resume(),
            None => Ok(()),
        }
    }

    pub fn boot(&mut self) -> Result<(), VmError> {
        match &mut self.vm {
            Some(vm) => vm.boot(),
            None => Ok(()),
        }
    }

    /// Replaces the VM with a fresh one from the same configuration and boots it.
    fn reboot(&mut self) -> Result<(), VmError> {
        let Some(mut old) = self.vm.take() else {
            return Ok(());
        };
        let config = old.config().clone();
        // The host's virtio-mem request outlives the guest (its blocks do not: the new
        // guest plugs them again), as `desired_ram` is the VM's, not the boot's.
        let requested = old.devices().hotplug_sizes().map(|(_, r)| r);
        let _ = old.shutdown();
        drop(old); // Releases disk locks before the new VM takes them.
        let mut vm = Vm::new(config, self.events_tx.clone(), self.seccomp.clone())?;
        if let Some(r) = requested.filter(|&r| r > 0) {
            if let Err(e) = vm.devices().resize_hotplug(r) {
                tracing::warn!(error = %e, "virtio-mem: requested size not kept across the reboot");
            }
        }
        vm.boot()?;
        self.vm = Some(vm);
        tracing::info!("VM rebooted");
        Ok(())
    }

    /// Runs until the VM stops (or `vmm.shutdown`); returns why.
    pub fn run(&mut self) -> VmmExit {
        loop {
            self.publish_lease();
            self.watchdog_tick();
            self.lease_tick();
            let event = match self.next_event() {
                Ok(Some(e)) => e,
                Ok(None) => continue, // A watchdog ping or the lease's deadline is due.
                Err(()) => return VmmExit::Crashed("control channel closed".into()),
            };
            let exit = match event {
                ControlEvent::Power(PowerEvent::PowerOff) => Some(VmmExit::PowerOff),
                ControlEvent::Power(PowerEvent::GuestFailure(code)) => {
                    tracing::warn!(code, "guest reported failure");
                    Some(VmmExit::GuestFailure(code))
                }
                ControlEvent::Power(PowerEvent::Reset)
                | ControlEvent::Vcpu(VcpuEvent::Shutdown(_)) => {
                    tracing::info!("guest reset the machine");
                    self.reboot()
                        .err()
                        .map(|e| VmmExit::Crashed(format!("reboot failed: {e}")))
                }
                ControlEvent::Power(PowerEvent::DiskStopped { disk, op, errno }) => {
                    self.disk_stopped(disk, op, errno);
                    None
                }
                ControlEvent::Vcpu(VcpuEvent::Failed(id, why)) => {
                    Some(VmmExit::Crashed(format!("vCPU {id}: {why}")))
                }
                ControlEvent::Api(req) => self.handle_api(req),
                ControlEvent::Migration(ev) => self.handle_migration(ev),
            };
            if let Some(exit) = exit {
                if let Some(vm) = &mut self.vm {
                    let _ = vm.shutdown();
                    // The VM's last figures (exits, each device's counters), for whoever
                    // ran it: a poll of vm.counters cannot see them once the VMM exits.
                    match serde_json::to_string(&vm.counters()) {
                        Ok(json) => {
                            tracing::info!(counters = %json, "the VM's counters at its end")
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot encode the VM's counters"),
                    }
                }
                tracing::debug!("vCPUs stopped");
                // Dropping the VM stops device workers and flushes disks.
                self.vm = None;
                tracing::debug!("VM torn down");
                return exit;
            }
        }
    }

    /// A disk with on_error=stop failed a request on the host: pause the VM until the
    /// user fixes the cause and resumes (the request runs again then).
    fn disk_stopped(&mut self, disk: u32, op: &'static str, errno: i32) {
        let Some(vm) = &mut self.vm else { return };
        let id = vm
            .config()
            .device_ids()
            .into_iter()
            .nth(disk as usize)
            .unwrap_or_else(|| format!("disk{disk}"));
        let error = std::io::Error::from_raw_os_error(errno);
        let reason = format!(
            "disk {id}: {op} failed on the host: {error} (errno {errno}); the request is kept: fix the cause (e.g. free space) and resume"
        );
        tracing::error!(disk = %id, op, errno, error = %error, "disk stopped on a host I/O error (on_error=stop): pausing the VM");
        self.events.disk_stopped(&id, op, errno);
        if let Err(e) = vm.pause_for(reason) {
            tracing::error!(disk = %id, error = %e, "cannot pause the VM for a stopped disk");
        }
    }

    fn vm_mut(&mut self) -> Result<&mut Vm, ApiError> {
        self.vm
            .as_mut()
            .ok_or_else(|| ApiError::not_found("no VM has been created (PUT vm.create first)"))
    }

    fn handle_api(&mut self, req: ApiRequest) -> Option<VmmExit> {
        if let VmAction::GuestCommand(cmd) = &req.action {
            let cmd = cmd.clone();
            match self.vm_mut() {
                Err(e) => req.respond(Err(e)),
                Ok(vm) => {
                    let channel = vm.devices().guest_agent.clone();
                    self.guest_commands.start(channel, cmd, req);
                }
            }
            return None;
        }
        let mut exit = None;
        let result: ApiResponse = match &req.action {
            VmAction::Ping => Ok(Some(
                serde_json::json!({"version": env!("CARGO_PKG_VERSION")}),
            )),
            VmAction::Create(cfg) => {
                if self.vm.is_some() {
                    Err(ApiError::conflict("a VM already exists in this VMM"))
                } else if self.receiving() {
                    Err(ApiError::conflict(RECEIVING))
                } else {
                    self.create((**cfg).clone())
                        .map(|_| None)
                        .map_err(|e| ApiError::bad_request(error_chain(&e)))
                }
            }
            // No VM to boot yet: the one that arrives is this VMM's (it runs when its
            // source commits).
            VmAction::Boot if self.vm.is_none() && self.receiving() => {
                Err(ApiError::conflict(RECEIVING))
            }
            VmAction::Boot => self
                .vm_mut()
                .and_then(|vm| vm.boot().map(|_| None).map_err(api_error)),
            VmAction::Pause => self
                .vm_mut()
                .and_then(|vm| vm.pause().map(|_| None).map_err(api_error)),
            VmAction::Resume => self.vm_mut().and_then(|vm| {
                if let Some(l) = vm.devices().write_lease.as_ref().filter(|l| l.expired()) {
                    return Err(ApiError::conflict(
                        devices::block::LeaseError::Expired {
                            deadline_ns: l.deadline_ns(),
                        }
                        .to_string(),
                    ));
                }
                vm.resume().map(|_| None).map_err(api_error)
            }),
            // Normally taken on the API thread (`lease_slot`); here when the slot was
            // not published yet, or there is no lease.
            VmAction::Lease(l) => match self.lease_in_force() {
                Some(in_force) => in_force.renew(l.deadline_monotonic_ns),
                None => self.vm_mut().and_then(|_| {
                    Err(ApiError::conflict(
                        "this VM has no write lease (not a clustered VM)",
                    ))
                }),
            },
            VmAction::Shutdown => self.vm_mut().and_then(|vm| {
                vm.shutdown().map_err(api_error)?;
                exit = Some(VmmExit::PowerOff);
                Ok(None)
            }),
            VmAction::Reboot => match self.vm_mut() {
                Err(e) => Err(e),
                Ok(vm) => match vm.state().next(api::Action::Reboot) {
                    Err(e) => Err(ApiError::conflict(e.to_string())),
                    Ok(_) => self.reboot().map(|_| None).map_err(|e| {
                        exit = Some(VmmExit::Crashed(format!("reboot failed: {e}")));
                        ApiError::internal(error_chain(&e))
                    }),
                },
            },
            VmAction::ResizeBalloon(bytes) => self.vm_mut().and_then(|vm| {
                let memory = vm.config().memory.size;
                if *bytes > memory {
                    return Err(ApiError::bad_request(format!(
                        "desired_balloon ({} MiB) exceeds the VM's memory ({} MiB)",
                        bytes >> 20,
                        memory >> 20
                    )));
                }
                vm.devices()
                    .resize_balloon(*bytes)
                    .map(|_| None)
                    .map_err(ApiError::conflict)
            }),
            VmAction::ResizeRam(bytes) => self.vm_mut().and_then(|vm| {
                let m = &vm.config().memory;
                let block = api::config::HOTPLUG_BLOCK_SIZE;
                let Some(hotplug) = m.hotplug_size else {
                    return Err(ApiError::bad_request(
                        "desired_ram needs a hotplug region (--memory ...,hotplug_size=SIZE)",
                    ));
                };
                let (boot, max) = (m.size, m.size + hotplug);
                if *bytes < boot || *bytes > max || !(*bytes - boot).is_multiple_of(block) {
                    return Err(ApiError::bad_request(format!(
                        "desired_ram ({bytes} bytes) must be the boot memory ({} MiB) plus a \
                         multiple of the {} MiB block, at most {} MiB",
                        boot >> 20,
                        block >> 20,
                        max >> 20
                    )));
                }
                vm.devices()
                    .resize_hotplug(*bytes - boot)
                    .map(|_| None)
                    .map_err(ApiError::bad_request)
            }),
            VmAction::PowerButton => self
                .vm_mut()
                .and_then(|vm| vm.power_button().map(|_| None).map_err(api_error)),
            VmAction::Snapshot(_) if self.disk_migration.is_some() => Err(ApiError::conflict(
                "a storage migration is in progress; snapshot after it",
            )),
            VmAction::Snapshot(dir) => self.vm_mut().and_then(|vm| {
                if let Some(why) = vm.devices().migration_blocker() {
                    return Err(ApiError::conflict(format!(
                        "cannot snapshot this VM: {why}"
                    )));
                }
                vm.snapshot(dir).map(|_| None).map_err(api_error)
            }),
            VmAction::Restore(dir) => {
                if self.vm.is_some() {
                    Err(ApiError::conflict("a VM already exists in this VMM"))
                } else if self.receiving() {
                    Err(ApiError::conflict(RECEIVING))
                } else {
                    self.restore(dir)
                        .map(|_| None)
                        .map_err(|e| ApiError::bad_request(error_chain(&e)))
                }
            }
            VmAction::SendMigration(r) => self.send_migration(r).map(|_| None),
            VmAction::MigrateDisk(r) => self.migrate_disk(r).map(|_| None),
            VmAction::MigrateDiskCancel => match &self.disk_migration {
                Some(m) => {
                    m.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                    Ok(None)
                }
                None => Err(ApiError::conflict("no storage migration is in progress")),
            },
            VmAction::MigrateDiskInfo => serde_json::to_value(sync::lock(&self.disk_info).clone())
                .map(Some)
                .map_err(|e| ApiError::internal(e.to_string())),
            VmAction::ReceiveMigration(r) => self.receive_migration(r).map(|_| None),
            VmAction::MigrationInfo => serde_json::to_value(self.migration_info())
                .map(Some)
                .map_err(|e| ApiError::internal(e.to_string())),
            VmAction::ReplicaCut(req) => self.vm_mut().and_then(|vm| {
                let cut = crate::replica::cut(vm.devices(), &vm.config().disks, req.clone())?;
                serde_json::to_value(cut)
                    .map(Some)
                    .map_err(|e| ApiError::internal(e.to_string()))
            }),
            VmAction::Info => self.vm_mut().and_then(|vm| {
                serde_json::to_value(vm.info())
                    .map(Some)
                    .map_err(|e| ApiError::internal(e.to_string()))
            }),
            VmAction::Counters => self.vm_mut().and_then(|vm| {
                serde_json::to_value(vm.counters())
                    .map(Some)
                    .map_err(|e| ApiError::internal(e.to_string()))
            }),
            VmAction::Events => serde_json::to_value(self.events.list())
                .map(Some)
                .map_err(|e| ApiError::internal(e.to_string())),
            VmAction::VmmShutdown => {
                exit = Some(VmmExit::PowerOff);
                Ok(None)
            }
            // Answered above, from a thread of its own.
            VmAction::GuestCommand(_) => Err(ApiError::internal("guest command misrouted")),
            VmAction::SerialInput(bytes) => self.vm_mut().map(|vm| {
                let queued = sync::lock(&vm.devices().serial).enqueue_input(bytes);
                Some(serde_json::json!({ "queued": queued }))
            }),
        };
        req.respond(result);
        exit
    }
}

fn api_error(e: VmError) -> ApiError {
    match e {
        VmError::Transition(t) => ApiError::conflict(t.to_string()),
        VmError::Snapshot(s) => ApiError::bad_request(error_chain(&s)),
        VmError::Confined(why) => ApiError::bad_request(why),
        other => ApiError::internal(error_chain(&other)),
    }
}

pub use api::error_chain;
