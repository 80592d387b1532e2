//! The control loop: the only place that changes the VM. vCPU threads, devices and the
//! API thread send it events; it applies lifecycle transitions and answers.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use vireo_util::sync;

use api::{
    ApiError, ApiRequest, ApiResponse, MigrationInfo, MigrationStatus, ReceiveMigrationRequest,
    SendMigrationRequest, VmAction, VmConfig, VmState,
};
use devices::legacy::PowerEvent;

use crate::live::{receive, send, MigrationEvent};
use crate::vcpu::VcpuEvent;
use crate::vm::{Vm, VmError};

/// Everything that wakes the control loop.
pub enum ControlEvent {
    Vcpu(VcpuEvent),
    Power(PowerEvent),
    Api(ApiRequest),
    Migration(MigrationEvent),
}

/// Why the VMM stopped; decides the process exit status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmExit {
    /// Clean power-off (ACPI S5, debug-exit 0, `vm.shutdown`, `vmm.shutdown`): status 0.
    PowerOff,
    /// The guest reported failure through the debug-exit port: status 2.
    GuestFailure(u32),
    /// The VM could not continue: status 1.
    Crashed(String),
    /// The VM now runs at a migration destination: status 0.
    Migrated,
}

impl VmmExit {
    pub fn status(&self) -> i32 {
        match self {
            VmmExit::PowerOff | VmmExit::Migrated => 0,
            VmmExit::GuestFailure(_) => 2,
            VmmExit::Crashed(_) => 1,
        }
    }
}

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
            VmAction::ReplicaCut => self.vm_mut().and_then(|vm| {
                let cut = crate::replica::cut(vm.devices(), &vm.config().disks)?;
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
            VmAction::SerialInput(bytes) => self.vm_mut().map(|vm| {
                let queued = sync::lock(&vm.devices().serial).enqueue_input(bytes);
                Some(serde_json::json!({ "queued": queued }))
            }),
        };
        req.respond(result);
        exit
    }
}

/// The refusal of `vm.create`, `vm.restore` and `vm.boot` while a migration is
/// awaited or received.
const RECEIVING: &str =
    "this VMM is receiving a migration (vm.receive-migration): its VM is the one that arrives; create, restore or boot a VM after the migration ended (vm.migration-info)";

impl Vmm {
    /// The figures `vm.migration-info` reports (the last send's or receive's).
    pub fn migration_info(&self) -> MigrationInfo {
        sync::lock(&self.migration).clone()
    }

    /// Whether this VMM waits for (or takes in) a migration: its VM is the one that
    /// arrives, so nothing may create another meanwhile.
    fn receiving(&self) -> bool {
        self.migration_info().status == MigrationStatus::Receiving
    }

    fn migration_busy(&self) -> bool {
        matches!(
            self.migration_info().status,
            MigrationStatus::Sending | MigrationStatus::Receiving
        )
    }

    fn set_migration(&self, info: MigrationInfo) {
        *sync::lock(&self.migration) = info;
    }

    /// Starts sending the running (or paused) VM to a listening destination.
    fn send_migration(&mut self, r: &SendMigrationRequest) -> Result<(), ApiError> {
        // The same rule as the receive side: a unix socket beneath a storage root or in
        // a `--socket-dir` (vireod passes its own and its configured peers' `vms/`).
        crate::confinement::check_url(&r.destination_url)
            .map_err(|e| ApiError::bad_request(format!("destination_url: {e}")))?;
        let url: migration::transport::MigrationUrl =
            r.destination_url
                .parse()
                .map_err(|e: migration::transport::TransportError| {
                    ApiError::bad_request(e.to_string())
                })?;
        tcp_by_address(&url, "destination_url")?;
        let connections = r.connections.unwrap_or(1);
        if !(1..=migration::protocol::MAX_CONNECTIONS).contains(&connections) {
            return Err(ApiError::bad_request(format!(
                "connections must be 1..={}, got {connections}",
                migration::protocol::MAX_CONNECTIONS
            )));
        }
        let tls = r
            .tls
            .as_ref()
            .map(|t| crate::live::tls::client(t, &url))
            .transpose()
            .map_err(ApiError::bad_request)?;
        let secret =
            crate::live::tls::policy(&url, r.tls.is_some(), r.insecure, r.secret.as_deref())
                .map_err(ApiError::bad_request)?;
        if self.migration_busy() {
            return Err(ApiError::conflict("a migration is already in progress"));
        }
        if self.disk_migration.is_some() {
            return Err(ApiError::conflict(
                "a storage migration is in progress; migrate the VM after it",
            ));
        }
        let seccomp = self.seccomp.clone();
        let events = self.events_tx.clone();
        let info = self.migration.clone();
        let vm = self.vm_mut()?;
        if let Some(why) = vm.devices().migration_blocker() {
            return Err(ApiError::conflict(format!("cannot migrate this VM: {why}")));
        }
        if !matches!(vm.state(), VmState::Running | VmState::Paused) {
            return Err(ApiError::conflict(format!(
                "cannot migrate a VM that is {:?}",
                vm.state()
            )));
        }
        let config =
            serde_json::to_value(vm.config()).map_err(|e| ApiError::internal(e.to_string()))?;
        let shape = migration::protocol::GuestShape {
            disk_sizes: vm
                .config()
                .disks
                .iter()
                .map(crate::live::image_size::of)
                .collect::<Result<_, _>>()
                .map_err(ApiError::internal)?,
            cpuid: vm.cpu_features().map_err(api_error)?,
        };
        vm.set_dirty_logging(true).map_err(api_error)?;
        let (mem, vmfd) = vm.memory_and_vm();
        let manual_dirty_log = vm.manual_dirty_log();
        let (throttle, vcpu_threads) = vm.throttle();
        self.copying_storage = r.copy_storage;
        self.set_migration(MigrationInfo {
            status: MigrationStatus::Sending,
            ..Default::default()
        });
        let job = send::SendJob {
            url,
            tls,
            secret,
            shape,
            connections,
            downtime: std::time::Duration::from_millis(r.downtime_ms.unwrap_or(50)),
            compress: r.compress,
            copy_storage: r.copy_storage,
            bandwidth_limit: r.bandwidth_mib_s.map(|m| m << 20),
            config,
            mem,
            vm: vmfd,
            events,
            info,
            seccomp,
            throttle,
            vcpu_threads,
            manual_dirty_log,
        };
        send::spawn(job).map_err(|e| {
            self.set_migration(MigrationInfo::default());
            ApiError::internal(format!("cannot start the migration thread: {e}"))
        })
    }

    /// Starts moving disk `r.id` to a new image while the VM runs (see `live::disk`).
    fn migrate_disk(&mut self, r: &api::MigrateDiskRequest) -> Result<(), ApiError> {
        use api::config::DiskFormat;
        use devices::block::Mirror;
        crate::confinement::check(&r.destination)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        if self.disk_migration.is_some() {
            return Err(ApiError::conflict(
                "a storage migration is already in progress",
            ));
        }
        if self.migration_busy() {
            return Err(ApiError::conflict("a live migration is in progress"));
        }
        let events = self.events_tx.clone();
        let seccomp = self.seccomp.clone();
        let vm = self.vm_mut()?;
        if !matches!(vm.state(), VmState::Running | VmState::Paused) {
            return Err(ApiError::conflict(format!(
                "cannot migrate a disk of a VM that is {:?}",
                vm.state()
            )));
        }
        let disks = &vm.config().disks;
        let index = disks
            .iter()
            .enumerate()
            .position(|(i, d)| d.id.clone().unwrap_or_else(|| format!("disk{i}")) == r.id)
            .ok_or_else(|| ApiError::not_found(format!("no disk '{}'", r.id)))?;
        let source = disks[index].clone();
        if source.readonly {
            return Err(ApiError::bad_request(format!(
                "disk '{}' is read-only",
                r.id
            )));
        }
        if source.replica_log.is_some() {
            return Err(ApiError::conflict(format!(
                "disk '{}' is replicated (replica_log): moving a replicated disk is not supported yet",
                r.id
            )));
        }
        if r.destination.exists() {
            return Err(ApiError::bad_request(format!(
                "{} exists (storage migration creates a new image)",
                r.destination.display()
            )));
        }
        let format = match r.format.as_deref() {
            Some(f) => f.parse::<DiskFormat>().map_err(ApiError::bad_request)?,
            None => source.effective_format(),
        };
        let src = vm
            .devices()
            .with_block(&r.id, |b| Ok(b.backend()))
            .map_err(ApiError::internal)?;
        crate::confinement::create_image(
            &r.destination,
            format,
            src.size(),
            src.logical_block_size(),
            src.physical_block_size(),
        )
        .map_err(|e| ApiError::bad_request(format!("cannot create the new image: {e}")))?;
        let destination = api::config::DiskConfig {
            path: r.destination.clone(),
            format: Some(format),
            ..source.clone()
        };
        let started = (|| {
            let dst = crate::device_manager::open_disk(&destination).map_err(|e| e.to_string())?;
            let dst = crate::device_manager::under_lease(dst, vm.devices().write_lease.as_ref());
            let mirror = Arc::new(Mirror::new(src, dst).map_err(|e| e.to_string())?);
            vm.devices().with_block(&r.id, |b| {
                b.replace_backend(mirror.clone(), None)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })?;
            Ok::<_, String>(mirror)
        })();
        let mirror = match started {
            Ok(m) => m,
            Err(e) => {
                let _ = crate::confinement::remove_file(&r.destination);
                return Err(ApiError::internal(format!("cannot start the mirror: {e}")));
            }
        };
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        *sync::lock(&self.disk_info) = api::DiskMigrationInfo {
            status: MigrationStatus::Sending,
            id: Some(r.id.clone()),
            destination: Some(r.destination.clone()),
            total_bytes: mirror.size_bytes(),
            ..Default::default()
        };
        crate::live::disk::spawn_copy(crate::live::disk::CopyJob {
            mirror: mirror.clone(),
            cancel: cancel.clone(),
            info: self.disk_info.clone(),
            events,
            seccomp,
        })
        .map_err(|e| ApiError::internal(format!("cannot start the copy thread: {e}")))?;
        self.disk_migration = Some(crate::live::disk::DiskMigration {
            id: r.id.clone(),
            index,
            source,
            destination,
            delete_source: r.delete_source,
            mirror,
            cancel,
        });
        tracing::info!(disk = %r.id, to = %r.destination.display(), "storage migration started");
        Ok(())
    }

    /// The copy ended: switch to the new image, or back to the old one.
    fn disk_copied(&mut self, result: Result<(), String>) -> Option<VmmExit> {
        let m = self.disk_migration.take()?;
        let vm = self.vm.as_mut()?;
        let result = result.and_then(|()| {
            let reopen =
                crate::device_manager::reopen_for(&m.destination, vm.devices().write_lease.clone())
                    .map_err(|e| format!("keeping the new image open: {e}"))?;
            vm.devices().with_block(&m.id, |b| {
                b.replace_backend(m.mirror.destination(), Some(reopen))
                    .map(drop)
                    .map_err(|e| format!("switching to the new image: {e}"))
            })
        });
        match &result {
            Ok(()) => {
                vm.set_disk(m.index, m.destination.clone());
                drop(m.mirror);
                tracing::info!(disk = %m.id, path = %m.destination.path.display(), "storage migration done");
                if m.delete_source {
                    if let Err(e) = crate::confinement::remove_file(&m.source.path) {
                        tracing::warn!(error = %e, path = %m.source.path.display(), "cannot delete the old image");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(disk = %m.id, error = %e, "storage migration abandoned; the disk stays on its image");
                let back = vm.devices().with_block(&m.id, |b| {
                    b.replace_backend(m.mirror.source(), None)
                        .map(drop)
                        .map_err(|e| e.to_string())
                });
                if let Err(e) = back {
                    return Some(VmmExit::Crashed(format!(
                        "cannot put disk {} back on its image: {e}",
                        m.id
                    )));
                }
                drop(m.mirror);
                let _ = crate::confinement::remove_file(&m.destination.path);
            }
        }
        crate::live::disk::finish(&self.disk_info, &result);
        None
    }

    /// Listens for a source; the VM arrives paused and runs when the source commits.
    fn receive_migration(&mut self, r: &ReceiveMigrationRequest) -> Result<(), ApiError> {
        crate::confinement::check_url(&r.receiver_url)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        if let Some(dir) = &r.storage_dir {
            crate::confinement::open_dir(dir).map_err(|e| ApiError::bad_request(e.to_string()))?;
        }
        let url: migration::transport::MigrationUrl =
            r.receiver_url
                .parse()
                .map_err(|e: migration::transport::TransportError| {
                    ApiError::bad_request(e.to_string())
                })?;
        tcp_by_address(&url, "receiver_url")?;
        if self.vm.is_some() {
            return Err(ApiError::conflict("a VM already exists in this VMM"));
        }
        if self.migration_busy() {
            return Err(ApiError::conflict("a migration is already in progress"));
        }
        let mut config = r.config.as_deref().cloned().ok_or_else(|| {
            ApiError::bad_request(
                "vm.receive-migration needs config: the VM to run here, as vm.create takes it",
            )
        })?;
        if let Some(s) = &self.serial_override {
            config.serial = s.clone();
        }
        config
            .validate()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let tls = r
            .tls
            .as_ref()
            .map(crate::live::tls::server)
            .transpose()
            .map_err(ApiError::bad_request)?;
        let secret =
            crate::live::tls::policy(&url, r.tls.is_some(), r.insecure, r.secret.as_deref())
                .map_err(ApiError::bad_request)?;
        // Shared storage: the images are here already; shared-nothing: the
        // configuration declares the sizes (the copies are made so).
        let disk_sizes = config
            .disks
            .iter()
            .map(|d| crate::live::image_size::of(d).ok())
            .collect();
        let listener = url
            .listen_with(tls)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        self.set_migration(MigrationInfo {
            status: MigrationStatus::Receiving,
            ..Default::default()
        });
        self.incoming_lease = config
            .write_lease
            .as_ref()
            .map(|l| Arc::new(devices::block::WriteLease::new(l.deadline_monotonic_ns)));
        receive::spawn(receive::ReceiveJob {
            write_lease: self.incoming_lease.clone(),
            listener,
            config,
            disk_sizes,
            secret,
            timeout: std::time::Duration::from_secs(r.timeout_s.unwrap_or(300)),
            storage_dir: r.storage_dir.clone(),
            events: self.events_tx.clone(),
            info: self.migration.clone(),
            seccomp: self.seccomp.clone(),
        })
        .map_err(|e| ApiError::internal(format!("cannot start the migration thread: {e}")))
    }

    /// Pauses the VM, saves its state and hands its disks over; on any failure the VM
    /// is put back as it was.
    fn switch_over(&mut self) -> Result<Vec<u8>, String> {
        let vm = self.vm.as_mut().ok_or("the VM is gone")?;
        let was_running = vm.state() == VmState::Running;
        if was_running {
            vm.pause().map_err(|e| error_chain(&e))?;
        }
        self.resume_if_migration_fails = was_running;
        let state = vm
            .saved_state()
            .map(|s| crate::vm::SavedVm {
                running: was_running,
                ..s
            })
            .map_err(|e| error_chain(&e))
            .and_then(|s| serde_json::to_vec(&s).map_err(|e| e.to_string()))?;
        // Shared storage changes hands; copied storage stays here, untouched.
        if !self.copying_storage {
            vm.detach_storage().map_err(|e| error_chain(&e))?;
        }
        Ok(state)
    }

    /// Shared-nothing: a mirror under every disk, its second half the migration queue.
    fn mirror_disks(
        &mut self,
        ops: std::sync::mpsc::Sender<migration::protocol::DiskOp>,
    ) -> Result<crate::live::MirroredDisks, String> {
        use devices::block::{BlockBackend, Mirror};
        let vm = self.vm.as_ref().ok_or("the VM is gone")?;
        let mut out = Vec::new();
        for (i, d) in vm.config().disks.iter().enumerate() {
            let id = d.id.clone().unwrap_or_else(|| format!("disk{i}"));
            let format = d.effective_format();
            let name = d
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("{id}.img"));
            let mirror = vm.devices().with_block(&id, |b| {
                let src = b.backend();
                let remote =
                    crate::live::remote_disk::RemoteDisk::new(i as u32, src.as_ref(), ops.clone());
                let m = Arc::new(Mirror::new(src, Arc::new(remote)).map_err(|e| e.to_string())?);
                b.replace_backend(m.clone(), None)
                    .map_err(|e| e.to_string())?;
                Ok(m)
            })?;
            let begin = migration::protocol::DiskBegin {
                index: i as u32,
                name,
                format: format.to_string(),
                size: mirror.size_bytes(),
                logical_sector: mirror.logical_block_size(),
                physical_sector: mirror.physical_block_size(),
            };
            self.remote_mirrors.push((id, mirror.clone()));
            out.push((mirror, begin));
        }
        Ok(out)
    }

    /// Takes every shared-nothing mirror away again (the migration failed).
    fn unmirror_disks(&mut self) -> Result<(), String> {
        let mirrors = std::mem::take(&mut self.remote_mirrors);
        let Some(vm) = self.vm.as_ref() else {
            return Ok(());
        };
        for (id, m) in mirrors {
            vm.devices().with_block(&id, |b| {
                b.replace_backend(m.source(), None)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })?;
        }
        Ok(())
    }

    /// After a failed send: disks back, dirty logging off, the guest running again.
    fn recover_from_failed_send(&mut self) -> Result<(), String> {
        let resume = std::mem::take(&mut self.resume_if_migration_fails);
        self.unmirror_disks()?;
        self.copying_storage = false;
        let Some(vm) = self.vm.as_mut() else {
            return Ok(());
        };
        vm.reattach_storage().map_err(|e| error_chain(&e))?;
        if let Err(e) = vm.set_dirty_logging(false) {
            tracing::warn!(error = %error_chain(&e), "cannot turn the dirty log off");
        }
        if resume && vm.state() == VmState::Paused {
            vm.resume().map_err(|e| error_chain(&e))?;
        }
        Ok(())
    }

    fn handle_migration(&mut self, ev: MigrationEvent) -> Option<VmmExit> {
        match ev {
            MigrationEvent::SwitchOver(reply) => {
                let r = self.switch_over();
                if let Err(e) = &r {
                    tracing::warn!(error = %e, "switch-over failed; the VM stays here");
                    if let Err(e) = self.recover_from_failed_send() {
                        return Some(VmmExit::Crashed(format!("cannot recover the VM: {e}")));
                    }
                }
                let _ = reply.send(r);
                None
            }
            MigrationEvent::SendFinished(Ok(())) => {
                tracing::info!("VM migrated; this VMM stops");
                Some(VmmExit::Migrated)
            }
            MigrationEvent::SendFinished(Err(e)) => {
                {
                    let mut i = self.migration.lock().unwrap_or_else(|p| p.into_inner());
                    i.status = MigrationStatus::Failed;
                    i.error = Some(e);
                }
                match self.recover_from_failed_send() {
                    Ok(()) => None,
                    Err(e) => Some(VmmExit::Crashed(format!("cannot recover the VM: {e}"))),
                }
            }
            MigrationEvent::Incoming(vm, running, reply) => {
                let r = if self.vm.is_some() {
                    Err("a VM already exists in this VMM".to_string())
                } else {
                    // Renewals taken while the VM was built went to the incoming lease;
                    // the VM has not run yet, so its own lease is still unused.
                    if let (Some(arrived), Some(own)) =
                        (&self.incoming_lease, vm.devices().write_lease.as_ref())
                    {
                        let now = devices::block::monotonic_ns();
                        let (arrived_ahead_ms, arrived_renewed_ms_ago) = arrived.timing_ms(now);
                        let taken = own.renew_unused(arrived.deadline_ns());
                        let (ahead_ms, _) = own.timing_ms(now);
                        tracing::info!(
                            arrived_ahead_ms,
                            arrived_renewed_ms_ago,
                            ahead_ms,
                            taken = taken.is_ok(),
                            "the arrived VM takes the write lease renewed while it arrived"
                        );
                    }
                    self.vm = Some(*vm);
                    self.incoming_lease = None;
                    self.run_incoming_on_go = running;
                    Ok(())
                };
                let _ = reply.send(r);
                None
            }
            MigrationEvent::IncomingGo if !self.run_incoming_on_go => {
                tracing::info!("incoming VM here, paused as it was on the source");
                None
            }
            MigrationEvent::IncomingGo => {
                let r = self.vm.as_mut().map(|vm| vm.resume());
                match r {
                    Some(Ok(())) => {
                        tracing::info!("incoming VM running");
                        None
                    }
                    Some(Err(e)) => Some(VmmExit::Crashed(format!(
                        "cannot resume the migrated VM: {}",
                        error_chain(&e)
                    ))),
                    None => Some(VmmExit::Crashed("the migrated VM is gone".into())),
                }
            }
            MigrationEvent::DiskCopied(result) => self.disk_copied(result),
            MigrationEvent::MirrorDisks(ops, reply) => {
                let r = self.mirror_disks(ops);
                if r.is_err() {
                    let _ = self.unmirror_disks();
                }
                let _ = reply.send(r);
                None
            }
            MigrationEvent::OnControl(job) => {
                job();
                None
            }
            MigrationEvent::IncomingFailed(e) => {
                tracing::warn!(error = %e, "incoming migration failed; discarding the copy");
                self.incoming_lease = None;
                if let Some(mut vm) = self.vm.take() {
                    let _ = vm.shutdown();
                }
                None
            }
        }
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
/// A TCP migration URL must name an address (`tcp:IP:PORT`): resolving a host name
/// reads `/etc/hosts` and `/etc/nsswitch.conf` and may query DNS, which no thread of a
/// confined VMM may do (the control thread opens no file, the file thread makes no
/// socket). vireod resolves its peers' names before it asks.
fn tcp_by_address(url: &migration::transport::MigrationUrl, field: &str) -> Result<(), ApiError> {
    match url {
        migration::transport::MigrationUrl::Tcp(a) if a.parse::<std::net::SocketAddr>().is_err() => {
            Err(ApiError::bad_request(format!(
                "{field} tcp:{a}: name an address (tcp:IP:PORT); this VMM does not resolve host names"
            )))
        }
        _ => Ok(()),
    }
}
