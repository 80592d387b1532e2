//! Builds the VM's devices and wires them to the buses, KVM interrupts and ioeventfds.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};
use vireo_util::sync;

use api::config::DiskFormat;
use devices::block::{BlockBackend, Leased, OpenError, RawFile, VhdxDisk, WriteLease};
use devices::legacy::{
    AcpiGed, AcpiGedMmio, AcpiPmDevice, DebugExit, Ioapic, IoapicLine, IoapicMmio, PowerControl,
    SerialDevice, SerialOutput, ACPI_PM_PORT, ACPI_PM_PORT_LEN, COM1_IRQ, COM1_PORT, COM1_PORT_LEN,
    DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_LEN, GED_IRQ, GED_SIZE, GED_START, I8042, I8042_PORT,
    I8042_PORT_LEN, IOAPIC_SIZE, IOAPIC_START,
};
use devices::pci::{PciDevice, PciEcam, PciRoot, PciRootError, ECAM_BUS_SIZE};
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::net::{Net, NetConfig, VhostUserNet};

/// How long a VMM waits for a vhost-user backend (a switch starting, restarting).
const VHOST_USER_CONNECT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
use devices::vfio_user::UserPciDevice;
use devices::virtio::{
    GuestMemoryMmap, VirtioDevice, VirtioPciDevice, VirtioPciError, VIRTIO_PCI_BAR_SIZE,
};
use devices::{Bus, BusError};

use crate::kvm::{Hypervisor, KvmError};
use crate::layout;
use api::config::{DiskConfig, OutputConfig};
use api::VmConfig;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    VirtioMem(#[from] devices::virtio::mem::BlocksError),
    #[error("cannot map a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Pci(#[from] PciRootError),
    #[error("cannot create virtio device: {0}")]
    VirtioPci(#[from] VirtioPciError),
    #[error(transparent)]
    Disk(#[from] OpenError),
    #[error(transparent)]
    Tap(#[from] net::TapError),
    #[error(transparent)]
    VhostUser(#[from] devices::virtio::net::VhostUserError),
    #[error("vhost-user socket {0}")]
    SocketConfined(String),
    #[error("a network device names switch {0}: only vireod connects a VM to its host's switches (give vhost-user=SOCKET)")]
    SwitchAdapter(String),
    #[error(transparent)]
    UserDevice(#[from] devices::vfio_user::UserDeviceError),
    #[error("vfio-user device {id}: guest memory region at {addr:#x} is not shared (fd-backed)")]
    UnsharedMemory { id: String, addr: u64 },
    #[error("cannot open serial output {path}: {source}")]
    SerialFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {0}")]
    Confined(String),
    #[error(transparent)]
    Fence(#[from] crate::fencing::FenceError),
    #[error("replica: {0}")]
    Replica(String),
    #[error("cannot set up the guest agent channel: {0}")]
    GuestAgent(#[source] std::io::Error),
    #[error("the PCI MMIO window is full")]
    MmioExhausted,
    #[error("disk {path}: the configuration declares {declared} bytes, the image has {actual}")]
    DiskSize {
        path: String,
        declared: u64,
        actual: u64,
    },
}

/// A virtio-pci function with the bookkeeping the VMM needs.
pub struct PciFunction {
    pub id: String,
    pub device: Arc<Mutex<VirtioPciDevice>>,
    pub bar: u64,
}

pub struct DeviceManager {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub pci: Arc<PciRoot>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub ioapic: Arc<Ioapic>,
    /// The ACPI Generic Event Device (power button).
    pub ged: Arc<AcpiGed>,
    pub functions: Vec<PciFunction>,
    /// vfio-user functions by id, with what the API reports of them.
    pub user_devices: Vec<(String, Arc<devices::vfio_user::UserDeviceStatus>)>,
    /// The replicated disks (id, backend): what `vm.replica-cut` holds and seals.
    pub replicated: Vec<(String, Arc<dyn BlockBackend>)>,
    /// A clustered VM's write lease: every disk's writes pass it (see
    /// `devices::block::Leased`).
    pub write_lease: Option<Arc<WriteLease>>,
    /// The host end of the guest agent's console port (`vm.guest-command`), if the VM
    /// has one.
    pub guest_agent: Option<devices::virtio::console::AgentChannel>,
    next_bar: u64,
}

/// Writer that discards output (serial=null).
struct Sink;
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where guest output goes; a file is capped at `max_size` bytes (default
/// [`api::config::DEFAULT_OUTPUT_MAX_SIZE`]) and rotates to `PATH.1`.
fn serial_output(cfg: &OutputConfig, max_size: Option<u64>) -> Result<SerialOutput, DeviceError> {
    Ok(match cfg {
        OutputConfig::Off | OutputConfig::Null => Box::new(Sink),
        OutputConfig::Tty => Box::new(std::io::stdout()),
        OutputConfig::File(p) => {
            let cap = max_size.unwrap_or(api::config::DEFAULT_OUTPUT_MAX_SIZE);
            let path = p.clone();
            let file = crate::file_broker::run(crate::file_broker::FileOp::OpenOutput, move || {
                devices::output::RotatingFile::create(&path, cap)
            });
            Box::new(file.map_err(|source| DeviceError::SerialFile {
                path: p.display().to_string(),
                source,
            })?)
        }
    })
}

/// A non-blocking duplicate of stdin for the guest console (None if stdin is closed).
fn stdin_for_guest() -> Option<File> {
    use std::os::fd::{AsFd, OwnedFd};
    let fd: OwnedFd = std::io::stdin().as_fd().try_clone_to_owned().ok()?;
    let file = File::from(fd);
    // SAFETY: fcntl on a valid, owned fd with integer arguments.
    unsafe {
        use std::os::fd::AsRawFd;
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
    Some(file)
}

/// The device model's view of a disk's `on_error`.
fn error_policy(cfg: Option<api::config::OnError>) -> devices::virtio::block::ErrorPolicy {
    use devices::virtio::block::ErrorPolicy;
    match cfg {
        None => ErrorPolicy::Auto,
        Some(api::config::OnError::Report) => ErrorPolicy::Report,
        Some(api::config::OnError::Stop) => ErrorPolicy::Stop,
    }
}

/// Where disk `index` asks the control loop to pause the VM (on_error=stop).
fn stop_sink(index: usize, power: Arc<dyn PowerControl>) -> devices::virtio::block::StopSink {
    let disk = u32::try_from(index).unwrap_or(u32::MAX);
    devices::virtio::block::StopSink(Arc::new(move |s| {
        power.request(devices::legacy::PowerEvent::DiskStopped {
            disk,
            op: s.op,
            errno: s.errno,
        })
    }))
}

/// The device model's view of a configured rate limit.
fn rate_limiter(cfg: &api::config::RateLimitConfig) -> devices::rate_limiter::RateLimiterConfig {
    use devices::rate_limiter::TokenBucketConfig;
    let bucket = |b: api::config::TokenBucket| TokenBucketConfig {
        size: b.size,
        refill_time_ms: b.refill_time,
    };
    devices::rate_limiter::RateLimiterConfig {
        bandwidth: cfg.bandwidth.map(bucket),
        ops: cfg.ops.map(bucket),
    }
}

/// How a block device takes its image back after a migration that did not complete,
/// under the VM's write lease if it has one. It opens the image now and keeps that
/// descriptor (no lock held through it): the image it takes back is the one it had,
/// even if the path no longer leads there or is no longer this VMM's to open (a
/// jailed receiver on the same host chowned a shared disk to its own uid).
pub fn reopen_for(
    disk: &DiskConfig,
    lease: Option<Arc<WriteLease>>,
) -> Result<devices::virtio::block::Reopen, DeviceError> {
    let disk = disk.clone();
    let kept = open_image_file(&disk)?;
    Ok(Box::new(move || {
        let file = kept.try_clone()?;
        open_disk_from(&disk, file)
            .map(|b| under_lease(b, lease.as_ref()))
            .map_err(std::io::Error::other)
    }))
}

/// `disk` with its writes gated by the VM's write lease (a clustered VM), or as it is.
pub fn under_lease(
    disk: Arc<dyn BlockBackend>,
    lease: Option<&Arc<WriteLease>>,
) -> Arc<dyn BlockBackend> {
    match lease {
        Some(l) => Arc::new(Leased::new(disk, l.clone())),
        None => disk,
    }
}

/// How a network device opens its tap again (a migration that did not complete).
fn reopen_tap(name: &str) -> devices::virtio::net::ReopenNet {
    let name = name.to_string();
    Box::new(move || {
        let tap = open_tap(&name).map_err(std::io::Error::other)?;
        Ok(Arc::new(tap) as Arc<dyn devices::virtio::net::NetBackend>)
    })
}

/// Opens the tap `name`: `/dev/net/tun` on the file thread, configured here (TUNSETIFF
/// and the rest are the control thread's ioctls).
pub fn open_tap(name: &str) -> Result<net::Tap, net::TapError> {
    let owned = name.to_string();
    let tun = crate::file_broker::run(crate::file_broker::FileOp::OpenTun, move || {
        net::Tap::open_tun(&owned)
    })?;
    net::Tap::attach(name, tun)
}

/// Opens a disk image in its declared format (never guessed from the content; an
/// old configuration without one: raw unless the name ends in `.vhdx`), beneath the
/// storage roots when the VMM has them (see `confinement`).
pub fn open_disk(cfg: &DiskConfig) -> Result<Arc<dyn BlockBackend>, DeviceError> {
    open_disk_from(cfg, open_image_file(cfg)?)
}

/// The image file of `cfg`, opened beneath the storage roots (when the VMM has them).
fn open_image_file(cfg: &DiskConfig) -> Result<std::fs::File, DeviceError> {
    // A raw image is the data path itself: O_DIRECT on it when asked. A VHDX's
    // metadata stays buffered (its O_DIRECT descriptor is a reopen of this file).
    let direct = cfg.direct && cfg.effective_format() == DiskFormat::Raw;
    crate::confinement::open_image(&cfg.path, !cfg.readonly, direct)
        .map_err(|e| DeviceError::Confined(e.to_string()))
}

/// [`open_disk`] on an image file already open, on the file thread: a VHDX opens its
/// parents and its O_DIRECT descriptor, a clustered disk reads and rewrites its
/// fencing record, a replicated disk opens its change log.
fn open_disk_from(
    cfg: &DiskConfig,
    file: std::fs::File,
) -> Result<Arc<dyn BlockBackend>, DeviceError> {
    let cfg = cfg.clone();
    crate::file_broker::run(crate::file_broker::FileOp::OpenDisk, move || {
        open_disk_here(&cfg, file)
    })
}

fn open_disk_here(
    cfg: &DiskConfig,
    file: std::fs::File,
) -> Result<Arc<dyn BlockBackend>, DeviceError> {
    let format = cfg.effective_format();
    tracing::info!(path = %cfg.path.display(), %format, readonly = cfg.readonly, "opening disk");
    let flags = devices::block::OpenFlags {
        read_only: cfg.readonly,
        direct: cfg.direct,
        locking: cfg.locking,
    };
    let disk: Arc<dyn BlockBackend> = match format {
        DiskFormat::Raw => Arc::new(RawFile::from_file(file, &cfg.path, flags)?),
        DiskFormat::Vhdx => Arc::new(VhdxDisk::from_file(
            file,
            &cfg.path,
            flags,
            crate::confinement::parent_opener(),
        )?),
    };
    // With the image's lock held (taken by the backend), so no other VMM on this
    // image runs the check at the same time.
    if let Some(token) = cfg.fencing_token {
        crate::fencing::admit(&cfg.path, token)?;
    }
    match cfg.size {
        Some(declared) if declared != disk.size() => Err(DeviceError::DiskSize {
            path: cfg.path.display().to_string(),
            declared,
            actual: disk.size(),
        }),
        _ => match &cfg.replica_log {
            Some(dir) if !cfg.readonly => crate::replica::track(disk, dir),
            _ => Ok(disk),
        },
    }
}

impl DeviceManager {
    pub fn new(
        hv: &Hypervisor,
        mem: &Arc<GuestMemoryMmap>,
        config: &VmConfig,
        power: Arc<dyn PowerControl>,
    ) -> Result<Self, DeviceError> {
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());

        let ioapic = Arc::new(Ioapic::new(hv.msi_sink()));
        mmio.insert(
            Arc::new(Mutex::new(IoapicMmio(ioapic.clone()))),
            IOAPIC_START,
            IOAPIC_SIZE,
        )?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            Arc::new(IoapicLine {
                ioapic: ioapic.clone(),
                pin: COM1_IRQ as usize,
            }),
            serial_output(&config.serial, config.serial_max_size)?,
        )));
        if config.serial != OutputConfig::Off {
            pio.insert(serial.clone(), COM1_PORT, COM1_PORT_LEN)?;
        }
        pio.insert(
            Arc::new(Mutex::new(DebugExit::new(power.clone()))),
            DEBUG_EXIT_PORT,
            DEBUG_EXIT_PORT_LEN,
        )?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(power.clone()))),
            I8042_PORT,
            I8042_PORT_LEN,
        )?;
        pio.insert(
            Arc::new(Mutex::new(AcpiPmDevice::new(power.clone()))),
            ACPI_PM_PORT,
            ACPI_PM_PORT_LEN,
        )?;

        let ged = Arc::new(AcpiGed::new(Arc::new(IoapicLine {
            ioapic: ioapic.clone(),
            pin: GED_IRQ as usize,
        })));
        mmio.insert(
            Arc::new(Mutex::new(AcpiGedMmio(ged.clone()))),
            GED_START,
            GED_SIZE,
        )?;

        let pci = Arc::new(PciRoot::new(&mmio));
        mmio.insert(
            Arc::new(Mutex::new(PciEcam::new(pci.clone()))),
            layout::ECAM_START,
            ECAM_BUS_SIZE,
        )?;

        let mut dm = Self {
            pio,
            mmio,
            pci,
            serial,
            ioapic,
            ged,
            functions: Vec::new(),
            user_devices: Vec::new(),
            replicated: Vec::new(),
            write_lease: config
                .write_lease
                .map(|l| Arc::new(WriteLease::new(l.deadline_monotonic_ns))),
            guest_agent: None,
            next_bar: layout::PCI_MMIO_START,
        };
        for (i, disk) in config.disks.iter().enumerate() {
            let id = disk.id.clone().unwrap_or_else(|| format!("disk{i}"));
            let backend = under_lease(open_disk(disk)?, dm.write_lease.as_ref());
            if backend.tracked().is_some() {
                dm.replicated.push((id.clone(), backend.clone()));
            }
            let block = Block::new(
                backend,
                BlockConfig {
                    read_only: disk.readonly,
                    serial: disk.serial.clone().unwrap_or_else(|| id.clone()),
                    num_queues: disk.num_queues,
                    rate_limiter: rate_limiter(&disk.rate_limiter),
                    poll_us: disk.poll_us,
                    on_error: error_policy(disk.on_error),
                    stop_sink: Some(stop_sink(i, power.clone())),
                },
            )
            .with_reopen(reopen_for(disk, dm.write_lease.clone())?);
            dm.add_virtio(hv, mem, id, Box::new(block))?;
        }
        for (i, n) in config.nets.iter().enumerate() {
            let id = n.id.clone().unwrap_or_else(|| format!("net{i}"));
            // `Vm::new` assigned one; a configuration restored from elsewhere may lack it.
            let mac = n.mac.unwrap_or_else(net::MacAddr::random_local);
            if let Some(sw) = &n.switch {
                return Err(DeviceError::SwitchAdapter(sw.clone()));
            }
            if let Some(path) = &n.vhost_user {
                crate::confinement::check_socket(path)
                    .map_err(|e| DeviceError::SocketConfined(e.to_string()))?;
                tracing::info!(%id, socket = %path.display(), %mac, "vhost-user network device");
                let dev = VhostUserNet::connect(path, mac, VHOST_USER_CONNECT_DEADLINE)?;
                dm.add_virtio(hv, mem, id, Box::new(dev))?;
                continue;
            }
            let tap = Arc::new(open_tap(&n.tap)?);
            tracing::info!(%id, tap = %n.tap, %mac, "network device");
            let dev = Net::new(tap, NetConfig { mac }).with_reopen(reopen_tap(&n.tap));
            dm.add_virtio(hv, mem, id, Box::new(dev))?;
        }
        for (i, u) in config.user_devices.iter().enumerate() {
            let id = u.id.clone().unwrap_or_else(|| format!("user{i}"));
            crate::confinement::check_socket(&u.socket)
                .map_err(|e| DeviceError::SocketConfined(e.to_string()))?;
            dm.add_user_device(hv, mem, id, &u.socket)?;
        }
        if config.console != OutputConfig::Off || config.guest_agent {
            let input = match config.console {
                OutputConfig::Tty => stdin_for_guest(),
                _ => None,
            };
            // Off with a guest agent: the console's output is discarded.
            let mut console = devices::virtio::console::Console::new(
                serial_output(&config.console, config.console_max_size)?,
                input,
            );
            if config.guest_agent {
                let agent = devices::virtio::console::AgentChannel::new()
                    .map_err(DeviceError::GuestAgent)?;
                tracing::info!("guest agent channel: console port org.qemu.guest_agent.0");
                console = console.with_guest_agent(agent.clone());
                dm.guest_agent = Some(agent);
            }
            dm.add_virtio(hv, mem, "console0".into(), Box::new(console))?;
        }
        if config.rng {
            let rng = devices::virtio::rng::Rng::new();
            dm.add_virtio(hv, mem, "rng0".into(), Box::new(rng))?;
        }
        if let Some(b) = &config.balloon {
            let balloon =
                devices::virtio::balloon::Balloon::new(devices::virtio::balloon::BalloonConfig {
                    size: b.size,
                    deflate_on_oom: b.deflate_on_oom,
                    free_page_reporting: b.free_page_reporting,
                    stats_interval_s: b.stats_interval_s,
                });
            dm.add_virtio(hv, mem, BALLOON_ID.into(), Box::new(balloon))?;
        }
        if let Some((addr, region_size)) =
            layout::hotplug_region(config.memory.size, config.memory.hotplug_size)
        {
            let dev = devices::virtio::mem::VirtioMem::new(
                devices::virtio::mem::VirtioMemConfig {
                    addr,
                    region_size,
                    block_size: api::config::HOTPLUG_BLOCK_SIZE,
                },
                mem.clone(),
            )?;
            tracing::info!(
                addr = format_args!("{addr:#x}"),
                region_mib = region_size >> 20,
                "virtio-mem device"
            );
            dm.add_virtio(hv, mem, MEM_ID.into(), Box::new(dev))?;
        }
        Ok(dm)
    }

    fn allocate_bar(&mut self, size: u64) -> Result<u64, DeviceError> {
        let addr = self.next_bar.next_multiple_of(size);
        let end = addr.checked_add(size).ok_or(DeviceError::MmioExhausted)?;
        if end > layout::PCI_MMIO_END {
            return Err(DeviceError::MmioExhausted);
        }
        self.next_bar = end;
        Ok(addr)
    }

    fn add_virtio(
        &mut self,
        hv: &Hypervisor,
        mem: &Arc<GuestMemoryMmap>,
        id: String,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), DeviceError> {
        let mut pci_dev = VirtioPciDevice::new(device, mem.clone(), hv.msi_sink())?;
        let bar = self.allocate_bar(VIRTIO_PCI_BAR_SIZE)?;
        pci_dev.config_mut().set_bar_address(0, bar);
        pci_dev.config_mut().enable_memory_and_master();
        for (offset, fd) in pci_dev.notify_eventfds() {
            hv.register_ioevent(fd, bar + offset)?;
        }
        let dev = Arc::new(Mutex::new(pci_dev));
        let slot = self.pci.add_device(dev.clone())?;
        tracing::info!(%id, slot, bar = format_args!("{bar:#x}"), "virtio-pci device added");
        self.functions.push(PciFunction {
            id,
            device: dev,
            bar,
        });
        Ok(())
    }

    /// Connects a vfio-user server's PCI function, lets it map every RAM region (by
    /// the region's memfd) for DMA, and plugs it into the PCI root.
    fn add_user_device(
        &mut self,
        hv: &Hypervisor,
        mem: &Arc<GuestMemoryMmap>,
        id: String,
        socket: &std::path::Path,
    ) -> Result<(), DeviceError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mut dma = Vec::new();
        for r in mem.iter() {
            let addr = r.start_addr().0;
            let fo = r.file_offset().ok_or_else(|| DeviceError::UnsharedMemory {
                id: id.clone(),
                addr,
            })?;
            dma.push((fo.file(), fo.start(), addr, r.len()));
        }
        let dev = UserPciDevice::connect(&id, socket, &dma, hv.msi_sink())?;
        let status = dev.status();
        let mut dev = dev;
        let mut bars = Vec::new();
        let layout: Vec<(usize, u64)> = dev.config().bars().map(|b| (b.index, b.size)).collect();
        for (index, size) in layout {
            let addr = self.allocate_bar(size)?;
            dev.config_mut().set_bar_address(index, addr);
            bars.push((index, addr));
        }
        dev.config_mut().enable_memory_and_master();
        let slot = self.pci.add_device(Arc::new(Mutex::new(dev)))?;
        tracing::info!(%id, slot, ?bars, "vfio-user device added");
        self.user_devices.push((id, status));
        Ok(())
    }

    /// Why this VM's devices cannot be saved (a snapshot, a live migration): a
    /// vfio-user device's state lives in its server, which this VMM cannot save.
    pub fn migration_blocker(&self) -> Option<String> {
        self.user_devices.first().map(|(id, _)| {
            format!(
                "vfio-user device {id} does not support migration (its state lives in its \
                 server; the vfio-user migration region is not implemented)"
            )
        })
    }

    /// Devices that failed while the VM runs, with why.
    pub fn device_faults(&self) -> Vec<(String, String)> {
        self.user_devices
            .iter()
            .filter_map(|(id, s)| s.failure().map(|f| (id.clone(), f)))
            .collect()
    }

    /// Coalesces each virtio function's `queue_select` register (crate::coalesced): the
    /// VM's ring must be mapped and drained by its vCPUs first.
    pub fn coalesce_queue_selects(&self, hv: &Hypervisor) -> Result<(), KvmError> {
        for f in &self.functions {
            hv.register_coalesced_mmio(f.bar + devices::virtio::QUEUE_SELECT_OFFSET, 2)?;
        }
        Ok(())
    }

    /// Per-device counters for `vm.counters`.
    pub fn counters(&self) -> Vec<(String, Vec<(&'static str, u64)>)> {
        self.functions
            .iter()
            .map(|f| {
                let d = sync::lock(&f.device);
                (f.id.clone(), d.device().counters())
            })
            .chain(
                self.user_devices
                    .iter()
                    .map(|(id, s)| (id.clone(), s.counters())),
            )
            .collect()
    }
}

/// Every device's state in a snapshot (the virtio functions by their ids).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    pub ioapic: devices::legacy::IoapicState,
    pub serial: devices::legacy::SerialSnapshot,
    pub ged_pending: u8,
    pub virtio: Vec<(String, devices::virtio::VirtioPciState)>,
}

/// Why saved device state does not fit this VM's devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("{device}: {reason}")]
    Mismatch { device: String, reason: String },
    #[error(transparent)]
    Virtio(#[from] devices::virtio::VirtioStateError),
}

impl DeviceManager {
    /// Stops every device worker (they keep their queues) — nothing touches guest
    /// memory until [`Self::resume`].
    pub fn pause(&self) {
        for f in &self.functions {
            let _ = sync::lock(&f.device).pause();
        }
    }

    pub fn resume(&self) {
        for f in &self.functions {
            sync::lock(&f.device).resume();
        }
    }

    /// Runs `f` on block device `id` with its workers stopped (they restart after).
    pub fn with_block<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Block) -> Result<T, String>,
    ) -> Result<T, String> {
        let func = self
            .functions
            .iter()
            .find(|f| f.id == id)
            .ok_or_else(|| format!("no device '{id}'"))?;
        let mut d = sync::lock(&func.device);
        // A paused VM's devices stay paused afterwards.
        let paused_here = d.pause();
        let result = match d.device_mut().as_any_mut().downcast_mut::<Block>() {
            Some(block) => f(block),
            None => Err(format!("device '{id}' is not a disk")),
        };
        if paused_here {
            d.resume();
        }
        result
    }

    /// Asks the balloon for `bytes` (the guest inflates or deflates to it); the
    /// workers keep running.
    pub fn resize_balloon(&self, bytes: u64) -> Result<(), String> {
        let func = self
            .functions
            .iter()
            .find(|f| f.id == BALLOON_ID)
            .ok_or("this VM has no balloon (--balloon)")?;
        let mut d = sync::lock(&func.device);
        match d
            .device_mut()
            .as_any_mut()
            .downcast_mut::<devices::virtio::balloon::Balloon>()
        {
            Some(b) => {
                b.resize(bytes);
                Ok(())
            }
            None => Err(format!("device '{BALLOON_ID}' is not a balloon")),
        }
    }

    /// The virtio-mem device, if the VM has a hotplug region, with `f` run on it.
    fn with_virtio_mem<T>(
        &self,
        f: impl FnOnce(&mut devices::virtio::mem::VirtioMem) -> T,
    ) -> Option<T> {
        let func = self.functions.iter().find(|f| f.id == MEM_ID)?;
        let mut d = sync::lock(&func.device);
        d.device_mut()
            .as_any_mut()
            .downcast_mut::<devices::virtio::mem::VirtioMem>()
            .map(f)
    }

    /// Asks the guest to have `bytes` of the hotplug region plugged (a configuration
    /// change interrupt tells it); the workers keep running.
    pub fn resize_hotplug(&self, bytes: u64) -> Result<(), String> {
        self.with_virtio_mem(|m| m.resize(bytes).map_err(|e| e.to_string()))
            .unwrap_or_else(|| {
                Err("this VM has no hotplug region (--memory ...,hotplug_size=)".into())
            })
    }

    /// The hotplug region's (plugged, requested) bytes, if the VM has one.
    pub fn hotplug_sizes(&self) -> Option<(u64, u64)> {
        self.with_virtio_mem(|m| {
            let (plugged, requested, _, _) = m.sizes();
            (plugged, requested)
        })
    }

    /// Flushes and closes every disk and tap (they must be paused), so a migration
    /// destination can open them; stops at the first failure.
    pub fn detach_storage(&self) -> Result<(), String> {
        for f in &self.functions {
            let mut d = sync::lock(&f.device);
            d.detach_storage().map_err(|e| format!("{}: {e}", f.id))?;
        }
        Ok(())
    }

    /// Opens every detached disk and tap again, retrying while another process (a destination
    /// that is letting go) still holds a lock.
    pub fn reattach_storage(&self) -> Result<(), String> {
        for f in &self.functions {
            let mut d = sync::lock(&f.device);
            let mut tries = 0;
            loop {
                match d.reattach_storage() {
                    Ok(()) => break,
                    Err(e) if tries < 50 => {
                        tracing::debug!(device = %f.id, error = %e, "reattach: retrying");
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    Err(e) => return Err(format!("{}: {e}", f.id)),
                }
            }
        }
        Ok(())
    }

    /// The state of every device; the devices must be paused.
    pub fn state(&self) -> Result<DevicesState, DeviceStateError> {
        let mut virtio = Vec::with_capacity(self.functions.len());
        for f in &self.functions {
            let d = sync::lock(&f.device);
            virtio.push((f.id.clone(), d.state()?));
        }
        Ok(DevicesState {
            ioapic: self.ioapic.state(),
            serial: sync::lock(&self.serial).state(),
            ged_pending: self.ged.pending(),
            virtio,
        })
    }

    /// Puts saved state into this VM's (freshly built, same-configuration) devices.
    pub fn restore(&self, s: &DevicesState) -> Result<(), DeviceStateError> {
        let mismatch = |device: &str, reason: String| DeviceStateError::Mismatch {
            device: device.into(),
            reason,
        };
        self.ioapic
            .restore(&s.ioapic)
            .map_err(|r| mismatch("ioapic", r))?;
        sync::lock(&self.serial)
            .restore(&s.serial)
            .map_err(|r| mismatch("serial", r))?;
        self.ged.restore(s.ged_pending);
        let ours: Vec<&str> = self.functions.iter().map(|f| f.id.as_str()).collect();
        let saved: Vec<&str> = s.virtio.iter().map(|(id, _)| id.as_str()).collect();
        if ours != saved {
            return Err(mismatch(
                "virtio",
                format!("the snapshot has devices {saved:?}, this VM {ours:?}"),
            ));
        }
        for (f, (_, state)) in self.functions.iter().zip(&s.virtio) {
            let mut d = sync::lock(&f.device);
            if d.config().bar_address(0) != state_bar0(state) {
                return Err(mismatch(
                    &f.id,
                    "the guest moved the device's BAR; restoring moved BARs is not supported"
                        .into(),
                ));
            }
            d.restore(state)?;
        }
        Ok(())
    }
}

/// The balloon's device id (at most one balloon per VM).
const BALLOON_ID: &str = "balloon0";
/// The virtio-mem device's id (at most one hotplug region per VM).
const MEM_ID: &str = "mem0";

/// BAR 0's address in saved configuration registers (64-bit BAR at registers 4 and 5).
fn state_bar0(s: &devices::virtio::VirtioPciState) -> u64 {
    let lo = u64::from(s.pci_registers.get(4).copied().unwrap_or(0) & !0xf);
    let hi = u64::from(s.pci_registers.get(5).copied().unwrap_or(0));
    (hi << 32) | lo
}
