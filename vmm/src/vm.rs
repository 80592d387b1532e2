//! One VM: builds memory, KVM, devices and vCPUs from a [`VmConfig`], then runs the
//! control loop that owns every lifecycle decision.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use devices::legacy::{PowerControl, PowerEvent};
use devices::virtio::GuestMemoryMmap;

use crate::arch::cpu::BootEntry;
use crate::arch::{acpi, cpu, linux, pvh};
use crate::boot::{self, BootError, BootProtocol};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::kvm::{Hypervisor, KvmError};
use crate::memory::{self, MemoryError};
use crate::vcpu::{self, VcpuContext, VcpuHandle};
use crate::vmm::ControlEvent;
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
    LinuxBoot(#[from] linux::LinuxBootError),
    #[error("cannot write the boot GDT: {0}")]
    Gdt(#[source] vm_memory::GuestMemoryError),
    #[error("cannot start vCPU thread: {0}")]
    VcpuThread(#[source] std::io::Error),
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    #[error("cannot interrupt the guest: {0}")]
    Interrupt(#[source] std::io::Error),
}

/// Forwards device power requests to the control loop.
struct PowerToControl(std::sync::Mutex<Sender<ControlEvent>>);

impl PowerControl for PowerToControl {
    fn request(&self, event: PowerEvent) {
        let tx = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = tx.send(ControlEvent::Power(event));
    }
}

pub struct Vm {
    config: VmConfig,
    // Field order matters for drop: vCPUs and devices go before memory.
    vcpus: Vec<VcpuHandle>,
    devices: DeviceManager,
    hv: Hypervisor,
    mem: Arc<GuestMemoryMmap>,
    state: VmState,
    entry: BootEntry,
    events_tx: Sender<ControlEvent>,
    seccomp: crate::seccomp::Filters,
    created_at: Instant,
    booted_at: Option<Instant>,
}

impl Vm {
    /// Builds the VM (memory, devices, loaded kernel) without running it.
    pub fn new(
        config: VmConfig,
        events_tx: Sender<ControlEvent>,
        seccomp: crate::seccomp::Filters,
    ) -> Result<Self, VmError> {
        config.validate()?;
        let created_at = Instant::now();
        let hv = Hypervisor::new()?;
        let mem = Arc::new(memory::create_guest_memory(
            config.memory.size,
            config.memory.hugepages,
        )?);
        hv.map_memory(&mem, false)?;

        let entry = Self::load_payload(&mem, &config)?;

        let power: Arc<dyn PowerControl> =
            Arc::new(PowerToControl(std::sync::Mutex::new(events_tx.clone())));
        let devices = DeviceManager::new(&hv, &mem, &config, power)?;
        Ok(Self {
            config,
            vcpus: Vec::new(),
            devices,
            hv,
            mem,
            state: VmState::Created,
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
        let rsdp = acpi::write_tables(mem, config.cpus.boot)?;
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

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn boot(&mut self) -> Result<(), VmError> {
        let next = self.state.next(Action::Boot)?;
        vcpu::install_kick_handler().map_err(VmError::VcpuThread)?;
        let cpus = self.config.cpus.boot;
        for id in 0..cpus {
            let fd = self.hv.create_vcpu(id)?;
            cpu::setup_vcpu(&self.hv.kvm, &fd, id, cpus, self.entry)?;
            let ctx = VcpuContext {
                pio: self.devices.pio.clone(),
                mmio: self.devices.mmio.clone(),
                ioapic: self.devices.ioapic.clone(),
                seccomp: self.seccomp.clone(),
                events: self.events_tx.clone(),
            };
            self.vcpus
                .push(VcpuHandle::spawn(id, fd, ctx).map_err(VmError::VcpuThread)?);
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

    pub fn pause(&mut self) -> Result<(), VmError> {
        let next = self.state.next(Action::Pause)?;
        for v in &self.vcpus {
            v.pause();
        }
        self.state = next;
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), VmError> {
        let next = self.state.next(Action::Resume)?;
        for v in &self.vcpus {
            v.resume();
        }
        self.state = next;
        Ok(())
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
        VmInfo {
            state: self.state,
            config: self.config.clone(),
            memory_actual_size: self.config.memory.size,
            uptime_ms: self
                .booted_at
                .map(|t| t.elapsed().as_millis() as u64)
                .unwrap_or(0),
        }
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
