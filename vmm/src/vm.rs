//! One VM: builds memory, KVM, devices and vCPUs from a [`VmConfig`], then runs the
//! control loop that owns every lifecycle decision.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;
use vireo_util::sync;

use devices::legacy::{PowerControl, PowerEvent};
use devices::virtio::GuestMemoryMmap;

use crate::arch::cpu::BootEntry;
use crate::arch::{acpi, cpu, cpu_state, linux, pvh};
use crate::boot::{self, BootError, BootProtocol};
use crate::control::ControlEvent;
use crate::device_manager::{DeviceError, DeviceManager};
use crate::kvm::{Hypervisor, KvmError};
use crate::memory::{self, MemoryError};
use crate::vcpu::{self, VcpuContext, VcpuHandle};
use api::config::ConfigError;
use api::{Action, Counters, InvalidTransition, VmConfig, VmInfo, VmState};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error(transparent)]
    Pvh(#[from] pvh::PvhError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Numa(#[from] crate::arch::numa::NumaError),
    #[error(transparent)]
    LinuxBoot(#[from] linux::LinuxBootError),
    #[error("cannot write the boot GDT: {0}")]
    Gdt(#[source] vm_memory::GuestMemoryError),
    #[error("cannot start vCPU thread: {0}")]
    VcpuThread(#[source] std::io::Error),
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    #[error("cannot interrupt the guest: {0}")]
    Interrupt(#[source] std::io::Error),
    #[error("this VM was restored, not loaded: it cannot boot")]
    NoPayload,
    #[error(transparent)]
    Snapshot(#[from] migration::SnapshotError),
    #[error("{0}")]
    Confined(String),
    #[error("the snapshot does not fit its own configuration: {0}")]
    SnapshotMismatch(String),
    #[error("cannot save vCPU state: {0}")]
    VcpuState(String),
    #[error("disk hand-over: {0}")]
    Storage(String),
    #[error(transparent)]
    DeviceState(#[from] crate::device_manager::DeviceStateError),
}

/// What a snapshot's state.json holds (format [`migration::SNAPSHOT_VERSION`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedVm {
    pub vcpus: Vec<cpu_state::VcpuState>,
    pub clock: kvm_bindings::kvm_clock_data,
    pub devices: crate::device_manager::DevicesState,
    /// Whether the guest ran when the switch-over of a live migration paused it: a VM
    /// the user had paused arrives paused (Hyper-V keeps a moved VM's state too). A
    /// snapshot is always taken paused and restored paused; states without the field
    /// (older sources) arrive running, as they always did.
    #[serde(default = "running_by_default")]
    pub running: bool,
}

fn running_by_default() -> bool {
    true
}

/// A VM being received (restore, incoming migration): hypervisor and memory exist, the
/// memory is filled by the caller, then [`IncomingVm::finish`] builds the rest.
pub struct IncomingVm {
    pub config: VmConfig,
    hv: Hypervisor,
    pub mem: Arc<GuestMemoryMmap>,
    created_at: Instant,
}

impl IncomingVm {
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        config.validate()?;
        let created_at = Instant::now();
        let hv = Hypervisor::new()?;
        let mem = Arc::new(memory::create_guest_memory(
            config.memory.size,
            config.memory.huge_page(),
            config.memory.overcommit,
            config.memory.shared,
            config.memory.hotplug_size,
        )?);
        if !config.numa.is_empty() {
            let ranges = api::numa::node_ranges(
                &config.numa,
                &crate::layout::ram_ranges(config.memory.size),
            );
            crate::arch::numa::bind_host_nodes(&mem, &config.numa, &ranges)?;
        }
        hv.map_memory(&mem, false)?;
        Ok(Self {
            config,
            hv,
            mem,
            created_at,
        })
    }

    /// The CPU features this host gives the incoming VM's vCPUs (masked to its
    /// processor compatibility set, if it has one).
    pub fn cpu_features(&self) -> Result<Vec<migration::protocol::CpuidLeaf>, VmError> {
        Ok(crate::arch::cpu::feature_leaves(
            &self.hv.kvm,
            self.config.cpus.features.as_ref(),
        )?)
    }

    /// Opens the devices (and disks), puts back their state, the clock and every vCPU
    /// (parked). The VM is Paused.
    pub fn finish(
        self,
        saved: &SavedVm,
        events_tx: Sender<ControlEvent>,
        seccomp: crate::seccomp::Filters,
    ) -> Result<Vm, VmError> {
        let IncomingVm {
            config,
            hv,
            mem,
            created_at,
        } = self;
        if saved.vcpus.len() != usize::from(config.cpus.boot) {
            return Err(VmError::SnapshotMismatch(format!(
                "{} vCPUs saved, the configuration has {}",
                saved.vcpus.len(),
                config.cpus.boot
            )));
        }
        let power: Arc<dyn PowerControl> =
            Arc::new(PowerToControl(std::sync::Mutex::new(events_tx.clone())));
        let devices = DeviceManager::new(&hv, &mem, &config, power)?;
        devices.restore(&saved.devices)?;
        let mut clock = saved.clock;
        clock.flags = 0; // KVM_SET_CLOCK takes only the time.
        hv.vm.set_clock(&clock).map_err(|source| KvmError::Ioctl {
            op: "SET_CLOCK",
            source,
        })?;
        let mut vm = Vm::assemble(
            IncomingVm {
                config,
                hv,
                mem,
                created_at,
            },
            devices,
            None,
            events_tx,
            seccomp,
        )?;
        vm.state = VmState::Paused;
        vm.booted_at = Some(Instant::now());
        vcpu::install_kick_handler().map_err(VmError::VcpuThread)?;
        let cpus = vm.config.cpus.boot;
        let topology = vm.config.cpus.topology();
        for s in &saved.vcpus {
            let fd = vm.hv.create_vcpu(s.id)?;
            let tsc_khz = fd.get_tsc_khz().ok().filter(|&k| k > 0);
            let features = vm.config.cpus.features.as_ref();
            fd.set_cpuid2(&cpu::cpuid_for(
                &vm.hv.kvm, s.id, &topology, features, tsc_khz,
            )?)
            .map_err(|source| KvmError::Ioctl {
                op: "SET_CPUID2",
                source,
            })?;
            s.restore(&fd)?;
            vm.coalesce_mmio(&fd);
            let ctx = vm.vcpu_context();
            vm.vcpus
                .push(VcpuHandle::spawn(s.id, fd, ctx, true).map_err(VmError::VcpuThread)?);
        }
        // The devices were restored running; hold them with the vCPUs until resume.
        vm.devices.pause();
        tracing::info!(
            cpus,
            setup_ms = vm.created_at.elapsed().as_secs_f64() * 1e3,
            "VM state restored (paused)"
        );
        Ok(vm)
    }
}

/// Forwards device power requests to the control loop.
struct PowerToControl(std::sync::Mutex<Sender<ControlEvent>>);

impl PowerControl for PowerToControl {
    fn request(&self, event: PowerEvent) {
        let tx = sync::lock(&self.0);
        let _ = tx.send(ControlEvent::Power(event));
    }
}

pub struct Vm {
    config: VmConfig,
    // Field order matters for drop: vCPUs and devices go before memory.
    vcpus: Vec<VcpuHandle>,
    devices: DeviceManager,
    /// KVM's coalesced MMIO ring, mapped with the first vCPU (crate::coalesced).
    coalesced: Option<Arc<crate::coalesced::CoalescedRing>>,
    hv: Hypervisor,
    mem: Arc<GuestMemoryMmap>,
    state: VmState,
    /// Why the VMM paused the VM by itself (see [`Vm::pause_for`]).
    pause_reason: Option<String>,
    /// Where the boot vCPU starts (None for a restored VM, which never boots).
    entry: Option<BootEntry>,
    /// MSRs a vCPU state save reads; XCR support.
    msr_indices: Arc<Vec<u32>>,
    has_xcrs: bool,
    /// Auto-converge throttle shared with the vCPU threads.
    throttle: Arc<vcpu::Throttle>,
    events_tx: Sender<ControlEvent>,
    seccomp: crate::seccomp::Filters,
    created_at: Instant,
    booted_at: Option<Instant>,
}

impl Vm {
    /// Builds the VM (memory, devices, loaded kernel) without running it.
    pub fn new(
        mut config: VmConfig,
        events_tx: Sender<ControlEvent>,
        seccomp: crate::seccomp::Filters,
    ) -> Result<Self, VmError> {
        // Chosen once, here: snapshots and migrations carry the config, so the guest
        // keeps its MAC wherever the VM goes.
        config.assign_missing_macs(net::MacAddr::random_local);
        // Hypervisor and memory are made as for an arriving VM; then the payload.
        let IncomingVm {
            config,
            hv,
            mem,
            created_at,
        } = IncomingVm::new(config)?;
        let entry = Self::load_payload(&mem, &config)?;

        let power: Arc<dyn PowerControl> =
            Arc::new(PowerToControl(std::sync::Mutex::new(events_tx.clone())));
        let devices = DeviceManager::new(&hv, &mem, &config, power)?;
        Self::assemble(
            IncomingVm {
                config,
                hv,
                mem,
                created_at,
            },
            devices,
            Some(entry),
            events_tx,
            seccomp,
        )
    }

    /// The one place a `Vm` is put together (state Created, not booted).
    fn assemble(
        parts: IncomingVm,
        devices: DeviceManager,
        entry: Option<BootEntry>,
        events_tx: Sender<ControlEvent>,
        seccomp: crate::seccomp::Filters,
    ) -> Result<Self, VmError> {
        let IncomingVm {
            config,
            hv,
            mem,
            created_at,
        } = parts;
        Ok(Self {
            config,
            vcpus: Vec::new(),
            devices,
            coalesced: None,
            msr_indices: Arc::new(cpu_state::msr_list(&hv.kvm)?),
            has_xcrs: hv.kvm.check_extension(kvm_ioctls::Cap::Xcrs),
            throttle: Arc::default(),
            hv,
            mem,
            state: VmState::Created,
            pause_reason: None,
            entry,
            events_tx,
            seccomp,
            created_at,
            booted_at: None,
        })
    }

    /// Loads kernel and initramfs and writes what the boot protocol needs (ACPI,
    /// command line, PVH start info or Linux zero page and page tables).
    fn load_payload(mem: &GuestMemoryMmap, config: &VmConfig) -> Result<BootEntry, VmError> {
        let size = config.memory.size;
        let (protocol, kernel_end) = boot::load_kernel(mem, &config.payload.kernel)?;
        let initramfs = match &config.payload.initramfs {
            Some(p) => Some(boot::load_initramfs(mem, size, kernel_end, p)?),
            None => None,
        };
        cpu::write_boot_gdt(mem).map_err(VmError::Gdt)?;
        let rsdp = acpi::write_tables(
            mem,
            &acpi::Machine {
                apic_ids: &config.cpus.apic_ids(),
                numa: &config.numa,
                numa_ranges: &api::numa::node_ranges(
                    &config.numa,
                    &crate::layout::ram_ranges(config.memory.size),
                ),
            },
        )?;
        let cmdline = config.payload.cmdline.clone().unwrap_or_default();
        Ok(match protocol {
            BootProtocol::Pvh { entry } => {
                pvh::write_boot_info(mem, size, &cmdline, rsdp, initramfs)?;
                BootEntry::Pvh32 { entry }
            }
            BootProtocol::Linux64 { entry, header } => {
                pvh::write_cmdline(mem, &cmdline)?;
                linux::write_zero_page(mem, &header, size, cmdline.len(), initramfs, rsdp)?;
                let cr3 = linux::write_page_tables(mem)?;
                BootEntry::Long64 { entry, cr3 }
            }
        })
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    /// Guest RAM (snapshots and migration read it).
    pub fn guest_memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// Each vCPU as the watchdog sees it.
    pub fn vcpu_liveness(&self) -> Vec<crate::watchdog::VcpuLiveness> {
        self.vcpus.iter().map(|v| v.liveness()).collect()
    }

    /// Kicks these vCPUs out of KVM_RUN once (they go on running).
    pub fn kick_vcpus(&self, which: &[usize]) {
        for &i in which {
            if let Some(v) = self.vcpus.get(i) {
                v.kick();
            }
        }
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    fn vcpu_context(&self) -> VcpuContext {
        VcpuContext {
            pio: self.devices.pio.clone(),
            mmio: self.devices.mmio.clone(),
            ioapic: self.devices.ioapic.clone(),
            seccomp: self.seccomp.clone(),
            events: self.events_tx.clone(),
            msr_indices: self.msr_indices.clone(),
            has_xcrs: self.has_xcrs,
            throttle: self.throttle.clone(),
            coalesced: self.coalesced.clone(),
        }
    }

    /// Maps the coalesced MMIO ring through the first vCPU's descriptor and coalesces
    /// the devices' `queue_select` writes. Without KVM support, or if the ring cannot
    /// be mapped, every write exits as before.
    fn coalesce_mmio(&mut self, vcpu: &kvm_ioctls::VcpuFd) {
        if self.coalesced.is_some() || !self.hv.has_coalesced_mmio() {
            return;
        }
        match crate::coalesced::CoalescedRing::map(vcpu) {
            Ok(ring) => {
                // The ring before any zone: a zone without a consumer loses writes.
                self.coalesced = Some(Arc::new(ring));
                if let Err(e) = self.devices.coalesce_queue_selects(&self.hv) {
                    tracing::warn!(error = %e, "queue_select writes not coalesced");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot map the coalesced MMIO ring"),
        }
    }

    pub fn boot(&mut self) -> Result<(), VmError> {
        let next = self.state.next(Action::Boot)?;
        let entry = self.entry.ok_or(VmError::NoPayload)?;
        vcpu::install_kick_handler().map_err(VmError::VcpuThread)?;
        let cpus = self.config.cpus.boot;
        // Every vCPU exists, in its power-on state, before the boot CPU runs: a guest
        // that sends INIT-SIPI-SIPI at once must not find an AP missing or half set up
        // (its INIT would be lost, or undone by the AP's later SET_LAPIC).
        // KVM's vCPU ID is the APIC ID, which the topology may space out.
        let topology = self.config.cpus.topology();
        let apic_ids = self.config.cpus.apic_ids();
        self.hv.check_vcpus(&apic_ids)?;
        let mut fds = Vec::with_capacity(apic_ids.len());
        for &id in &apic_ids {
            let fd = self.hv.create_vcpu(id)?;
            let features = self.config.cpus.features.as_ref();
            cpu::setup_vcpu(&self.hv.kvm, &fd, id, &topology, features, entry)?;
            self.coalesce_mmio(&fd);
            fds.push(fd);
        }
        for (id, fd) in apic_ids.into_iter().zip(fds) {
            let ctx = self.vcpu_context();
            self.vcpus
                .push(VcpuHandle::spawn(id, fd, ctx, false).map_err(VmError::VcpuThread)?);
        }
        self.state = next;
        self.booted_at = Some(Instant::now());
        tracing::info!(
            cpus,
            memory_mib = self.config.memory.size >> 20,
            setup_ms = self.created_at.elapsed().as_secs_f64() * 1e3,
            "VM booted"
        );
        Ok(())
    }

    /// Parks every vCPU, then stops the device workers: nothing changes guest memory
    /// or device state until resume.
    pub fn pause(&mut self) -> Result<(), VmError> {
        let next = self.state.next(Action::Pause)?;
        for v in &self.vcpus {
            v.pause();
        }
        self.devices.pause();
        self.state = next;
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), VmError> {
        let next = self.state.next(Action::Resume)?;
        self.pause_reason = None;
        self.devices.resume();
        for v in &self.vcpus {
            v.resume();
        }
        self.state = next;
        Ok(())
    }

    /// Writes a snapshot of the paused VM into `dir` (see [`migration::snapshot`]).
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<(), VmError> {
        if self.state != VmState::Paused {
            return Err(VmError::Transition(InvalidTransition {
                from: self.state,
                action: Action::Snapshot,
            }));
        }
        let state = self.saved_state()?;
        let started = Instant::now();
        // Pages never written are not read: a large guest costs what it touched
        // (PAGEMAP_SCAN is this thread's ioctl).
        let populated = crate::live::dirty::populated_pages(self.mem.as_ref());
        let (path, config, mem) = (dir.to_path_buf(), self.config.clone(), self.mem.clone());
        // The directory and its files are made and written on the file thread: beneath
        // a storage root when the VMM has them; 0700, files 0600 (guest RAM).
        let stats =
            crate::file_broker::run(crate::file_broker::FileOp::WriteSnapshot, move || {
                let dir_fd = crate::confinement::create_dir(&path).map_err(VmError::Confined)?;
                migration::snapshot::write_at(
                    std::os::fd::AsFd::as_fd(&dir_fd),
                    &path,
                    &config,
                    &state,
                    mem.as_ref(),
                    Some(&populated),
                )
                .map_err(VmError::Snapshot)
            })?;
        tracing::info!(
            dir = %dir.display(),
            pages_written = stats.pages_written,
            zero_pages = stats.zero_pages,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "snapshot written"
        );
        Ok(())
    }

    /// vCPUs, clock and devices of the paused VM.
    pub fn saved_state(&self) -> Result<SavedVm, VmError> {
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(v.save_state().map_err(VmError::VcpuState)?);
        }
        let clock = self.hv.vm.get_clock().map_err(|source| KvmError::Ioctl {
            op: "GET_CLOCK",
            source,
        })?;
        Ok(SavedVm {
            vcpus,
            clock,
            devices: self.devices.state()?,
            running: self.state() == VmState::Running,
        })
    }

    /// Builds a VM from a snapshot: same configuration, memory and device state put
    /// back, vCPUs restored and parked. The VM is Paused; `resume` runs it.
    pub fn restore(
        snapshot: &migration::Snapshot<VmConfig, SavedVm>,
        events_tx: Sender<ControlEvent>,
        seccomp: crate::seccomp::Filters,
    ) -> Result<Self, VmError> {
        let incoming = IncomingVm::new(snapshot.config.clone())?;
        snapshot
            .load_memory(incoming.mem.as_ref())
            .map_err(VmError::Snapshot)?;
        let vm = incoming.finish(&snapshot.state, events_tx, seccomp)?;
        tracing::info!(dir = %snapshot.dir.display(), "VM restored (paused)");
        Ok(vm)
    }

    /// Guest RAM and the hypervisor VM (for the dirty log of a migration).
    pub fn memory_and_vm(&self) -> (Arc<GuestMemoryMmap>, Arc<kvm_ioctls::VmFd>) {
        (self.mem.clone(), self.hv.vm.clone())
    }

    /// The CPU features this host gives the VM's vCPUs (a migration's Hello says them):
    /// masked to its processor compatibility set, if it has one.
    pub fn cpu_features(&self) -> Result<Vec<migration::protocol::CpuidLeaf>, VmError> {
        Ok(crate::arch::cpu::feature_leaves(
            &self.hv.kvm,
            self.config.cpus.features.as_ref(),
        )?)
    }

    /// Whether KVM's dirty log is under manual protection (cleared by its reader).
    pub fn manual_dirty_log(&self) -> bool {
        self.hv.manual_dirty_log
    }

    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// Disk `index` now lives at `disk` (a completed storage migration).
    pub fn set_disk(&mut self, index: usize, disk: api::config::DiskConfig) {
        if let Some(d) = self.config.disks.get_mut(index) {
            *d = disk;
        }
    }

    /// The vCPU throttle and the vCPU threads to kick for it (auto-converge).
    pub fn throttle(&self) -> (Arc<vcpu::Throttle>, Vec<libc::pthread_t>) {
        (
            self.throttle.clone(),
            self.vcpus.iter().filter_map(|v| v.pthread()).collect(),
        )
    }

    /// Turns KVM's dirty-page logging of guest RAM on or off.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        self.hv.map_memory(&self.mem, on)?;
        tracing::info!(
            on,
            manual_protect = self.hv.manual_dirty_log,
            "dirty logging"
        );
        Ok(())
    }

    /// Flushes and closes every disk (migration hand-over); the VM must be paused.
    pub fn detach_storage(&self) -> Result<(), VmError> {
        self.devices.detach_storage().map_err(VmError::Storage)
    }

    pub fn reattach_storage(&self) -> Result<(), VmError> {
        self.devices.reattach_storage().map_err(VmError::Storage)
    }

    /// Stops every vCPU for good.
    pub fn shutdown(&mut self) -> Result<(), VmError> {
        let next = self.state.next(Action::Shutdown)?;
        for v in &mut self.vcpus {
            v.stop();
        }
        self.state = next;
        Ok(())
    }

    /// Presses the ACPI power button: a GED event the guest's `_EVT` turns into a
    /// power-button notification. Only a running VM has anyone to press it for.
    pub fn power_button(&mut self) -> Result<(), VmError> {
        self.state.next(Action::PowerButton)?;
        self.devices
            .ged
            .notify(devices::legacy::GED_POWER_BUTTON)
            .map_err(VmError::Interrupt)
    }

    pub fn info(&self) -> VmInfo {
        let hotplug = self.devices.hotplug_sizes();
        let plugged = hotplug.map(|(p, _)| p);
        VmInfo {
            state: self.state,
            config: self.config.clone(),
            memory_actual_size: self.config.memory.size + plugged.unwrap_or(0),
            memory_plugged_size: plugged,
            memory_requested_size: hotplug.map(|(_, r)| r),
            uptime_ms: self
                .booted_at
                .map(|t| t.elapsed().as_millis() as u64)
                .unwrap_or(0),
            pause_reason: self.pause_reason.clone(),
            cpu_features: self
                .cpu_features()
                .map_err(|e| tracing::warn!(error = %e, "the vCPUs' CPU features are not known"))
                .ok()
                .map(|l| vireo_util::cpu_features::cpuid_fingerprint(&l)),
            device_errors: self
                .devices
                .device_faults()
                .into_iter()
                .map(|(id, error)| api::DeviceFault { id, error })
                .collect(),
        }
    }

    /// Pauses a running VM because a disk stopped on a host I/O error; the first
    /// reason stays until resume. A VM that is not running is left as it is.
    pub fn pause_for(&mut self, reason: String) -> Result<(), VmError> {
        if self.state == VmState::Running {
            self.pause()?;
        }
        if self.state == VmState::Paused {
            self.pause_reason.get_or_insert(reason);
        }
        Ok(())
    }

    pub fn counters(&self) -> Counters {
        let mut c = Counters::new();
        for (id, values) in self.devices.counters() {
            c.insert(
                id,
                values
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            );
        }
        let exits: u64 = self.vcpus.iter().map(|v| v.exits()).sum();
        c.insert(
            "vcpus".into(),
            [("exits".to_string(), exits)].into_iter().collect(),
        );
        c
    }
}
