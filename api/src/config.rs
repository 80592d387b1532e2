//! The VM description: one serde type for `--config vm.json`, the command-line flags
//! (parsed in Cloud Hypervisor's `key=value,key=value` style) and the REST API.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vireo_util::cpu_features::CpuFeatures;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{flag}: unknown option '{key}'")]
    UnknownKey { flag: &'static str, key: String },
    #[error("{flag}: '{item}' is not key=value")]
    NotKeyValue { flag: &'static str, item: String },
    #[error("{flag}: {key}={value}: {reason}")]
    BadValue {
        flag: &'static str,
        key: String,
        value: String,
        reason: String,
    },
    #[error("{flag}: missing required option '{key}'")]
    Missing {
        flag: &'static str,
        key: &'static str,
    },
    #[error("invalid VM config: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(
    expecting = "payload: an object with kernel (a path), and optionally cmdline and initramfs"
)]
pub struct PayloadConfig {
    pub kernel: PathBuf,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "cpus: an object such as {\"boot\": 2}")]
pub struct CpusConfig {
    pub boot: u8,
    /// How the vCPUs are arranged (CPUID leaves 0xB/0x1F, APIC IDs, MADT). Without it: one
    /// socket of `boot` single-threaded cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,
    /// Processor compatibility: the most CPU features the vCPUs get (a fingerprint
    /// string, `vireo_util::cpu_features`); each feature leaf of the host's CPUID is
    /// masked to it. A cluster gives its compatibility-mode VMs the features every
    /// node has, so they live-migrate between CPU generations. Without it: the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<CpuFeatures>,
}

impl Default for CpusConfig {
    fn default() -> Self {
        Self {
            boot: 1,
            topology: None,
            features: None,
        }
    }
}

/// Sockets, cores per socket and threads per core; their product is the vCPU count.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a CPU topology: an object with sockets, cores and threads")]
pub struct CpuTopology {
    pub sockets: u8,
    pub cores: u8,
    pub threads: u8,
}

/// Bits an x2APIC-style ID gives a level with `n` members: ceil(log2(n)).
fn id_bits(n: u8) -> u32 {
    u32::from(n.max(1)).next_power_of_two().trailing_zeros()
}

impl CpuTopology {
    /// Bits of the APIC ID that number the thread within its core.
    pub fn thread_bits(&self) -> u32 {
        id_bits(self.threads)
    }

    /// Bits of the APIC ID below the socket number (thread and core).
    pub fn package_bits(&self) -> u32 {
        self.thread_bits() + id_bits(self.cores)
    }

    /// The APIC ID of vCPU `index` (vCPUs are numbered thread first, then core, then
    /// socket): socket, core and thread each in their own bit field, as hardware does,
    /// so counts that are not powers of two leave gaps.
    pub fn apic_id(&self, index: u32) -> u32 {
        let threads = u32::from(self.threads.max(1));
        let cores = u32::from(self.cores.max(1));
        let thread = index % threads;
        let core = index / threads % cores;
        let socket = index / threads / cores;
        socket << self.package_bits() | core << self.thread_bits() | thread
    }
}

impl CpusConfig {
    /// The topology in effect: the configured one, or one socket of `boot` cores.
    pub fn topology(&self) -> CpuTopology {
        self.topology.unwrap_or(CpuTopology {
            sockets: 1,
            cores: self.boot,
            threads: 1,
        })
    }

    /// The APIC ID (= KVM vCPU ID) of each vCPU, in vCPU order.
    pub fn apic_ids(&self) -> Vec<u8> {
        let t = self.topology();
        (0..u32::from(self.boot))
            .map(|i| u8::try_from(t.apic_id(i)).unwrap_or(u8::MAX))
            .collect()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "memory: an object such as {\"size\": \"512M\"}")]
pub struct MemoryConfig {
    /// Bytes (JSON may say `"512M"`).
    #[serde(deserialize_with = "crate::json::size::de")]
    pub size: u64,
    #[serde(default)]
    pub hugepages: bool,
    /// The huge page size in bytes (2 MiB or 1 GiB) when `hugepages`; none: 2 MiB.
    #[serde(
        default,
        deserialize_with = "crate::json::size::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub hugepage_size: Option<u64>,
    /// May `size` exceed the host's RAM? Guest memory is only backed where the guest
    /// touches it, so a large guest that touches little fits on a small host; without
    /// this a VM larger than the host is refused at start (as Hyper-V refuses a VM whose
    /// memory the host cannot give).
    #[serde(default, skip_serializing_if = "is_off")]
    pub overcommit: bool,
    /// Back RAM by memfds mapped shared, so a vhost-user backend (`vireo-switch`) can
    /// map the guest's memory (Cloud Hypervisor's `shared=on`). Not with hugepages.
    #[serde(default, skip_serializing_if = "is_off")]
    pub shared: bool,
}

impl MemoryConfig {
    /// The huge page size in bytes when huge pages are on.
    pub fn huge_page(&self) -> Option<u64> {
        self.hugepages
            .then(|| self.hugepage_size.unwrap_or(2 << 20))
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: 512 << 20,
            hugepages: false,
            hugepage_size: None,
            overcommit: false,
            shared: false,
        }
    }
}

/// A disk image's format. It is declared, never guessed from the content: a guest
/// that writes a VHDX header into its raw disk must not turn it into a VHDX.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[serde(expecting = "a disk format: \"raw\" or \"vhdx\"")]
pub enum DiskFormat {
    Raw,
    Vhdx,
}

impl DiskFormat {
    /// The format a file name declares: `.vhdx`, or `.raw`/`.img` (None otherwise).
    pub fn from_extension(path: &std::path::Path) -> Option<DiskFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "vhdx" => Some(DiskFormat::Vhdx),
            "raw" | "img" => Some(DiskFormat::Raw),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Vhdx => "vhdx",
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "vhdx" => Ok(DiskFormat::Vhdx),
            _ => Err(format!("format '{s}': expected raw or vhdx")),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a disk: an object with path, and optionally format, readonly, id, ...")]
pub struct DiskConfig {
    pub path: PathBuf,
    /// raw or vhdx. A configuration written before formats were declared has none:
    /// it then opens as raw unless the file name ends in `.vhdx` (never by content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub direct: bool,
    /// Take the image's OFD lock (default). `false` (`locking=off`) is only for
    /// file systems without OFD locks where nothing else can open the image:
    /// with locking on, such a file system refuses the disk.
    #[serde(default = "locking_on", skip_serializing_if = "is_on")]
    pub locking: bool,
    /// Serial number the guest reads (default: the disk's id).
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default = "one")]
    pub num_queues: u16,
    /// Device id for the API (default: disk0, disk1, ...).
    #[serde(default)]
    pub id: Option<String>,
    /// IOPS and bandwidth limits (none by default).
    #[serde(default, skip_serializing_if = "RateLimitConfig::is_unlimited")]
    pub rate_limiter: RateLimitConfig,
    /// Microseconds a queue's worker keeps polling the ring after it ran dry
    /// (like QEMU's iothread `poll-max-ns`); 0 = sleep at once.
    #[serde(default = "default_poll_us")]
    pub poll_us: u32,
    /// The disk's size in bytes, as the guest sees it. Optional; when given, the image
    /// must have it. An incoming shared-nothing migration needs it: the copy is made
    /// this size, and the source may not write beyond it.
    #[serde(
        default,
        deserialize_with = "crate::json::size::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub size: Option<u64>,
    /// What a host I/O error does (QEMU's werror/rerror). Unset: `stop` for ENOSPC and
    /// EDQUOT (the host can free space), `report` for the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<OnError>,
    /// A clustered VM's fencing token (its ownership revision in the cluster store):
    /// the disk is refused if `DISK.fence` beside it records a newer one, else the
    /// token is recorded there (vmm/src/fencing.rs, docs/cluster.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<u64>,
    /// Replication: the directory of this disk's change log (Vireo Replica). Every
    /// completed write is recorded there; `vm.replica-cut` seals it into segments.
    /// Created if missing (beneath a storage root when the VMM has them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_log: Option<PathBuf>,
}

/// A disk's policy for host I/O errors.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[serde(expecting = "on_error: \"report\" or \"stop\"")]
pub enum OnError {
    /// The guest sees VIRTIO_BLK_S_IOERR.
    Report,
    /// ENOSPC, EDQUOT and EIO pause the VM (the request is kept and runs again on
    /// resume); other errors are reported.
    Stop,
}

impl DiskConfig {
    /// The format to open the image in: as declared, else (an old configuration) raw
    /// unless the file name ends in `.vhdx`.
    pub fn effective_format(&self) -> DiskFormat {
        self.format
            .unwrap_or(match DiskFormat::from_extension(&self.path) {
                Some(DiskFormat::Vhdx) => DiskFormat::Vhdx,
                _ => DiskFormat::Raw,
            })
    }
}

/// One virtio-net device on a host tap interface, or served by a vhost-user backend
/// (`vireo-switch`) listening on a unix socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a network device: an object with tap (and optionally mac, id, ...)")]
pub struct NetConfig {
    /// The tap interface (created if it does not exist, which needs CAP_NET_ADMIN).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tap: String,
    /// The vhost-user backend's socket (instead of a tap; needs `memory.shared`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_user: Option<PathBuf>,
    /// The guest's MAC address. Without one, the VMM picks a random locally
    /// administered address when it creates the VM and writes it here, so snapshots
    /// and migrations keep it (a new VM from the same flags gets another one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<net::MacAddr>,
    /// Device id for the API (default: net0, net1, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

fn locking_on() -> bool {
    true
}

fn is_on(b: &bool) -> bool {
    *b
}

fn is_off(b: &bool) -> bool {
    !*b
}

/// The default poll window of a disk queue's worker, in microseconds.
pub const DEFAULT_POLL_US: u32 = 50;

fn default_poll_us() -> u32 {
    DEFAULT_POLL_US
}

/// One token bucket: `size` tokens (bytes or operations), refilled from empty to full
/// in `refill_time` milliseconds (Cloud Hypervisor's and Firecracker's model).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a token bucket: an object with size and refill_time_ms")]
pub struct TokenBucket {
    pub size: u64,
    pub refill_time: u64,
}

/// A device's I/O limits: bandwidth in bytes, ops in operations.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a rate limiter: an object with bandwidth and/or ops token buckets")]
pub struct RateLimitConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

impl RateLimitConfig {
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    fn validate(&self, what: &str) -> Result<(), ConfigError> {
        for (name, b) in [("bandwidth", self.bandwidth), ("ops", self.ops)] {
            if let Some(b) = b {
                if b.size == 0 || b.refill_time == 0 {
                    return Err(ConfigError::Invalid(format!(
                        "{what}: {name} rate limit needs size > 0 and refill_time > 0 (ms)"
                    )));
                }
            }
        }
        Ok(())
    }
}

fn one() -> u16 {
    1
}

/// Where a character device goes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase", tag = "mode", content = "file")]
#[serde(
    expecting = "an output: {\"mode\": \"off\"}, {\"mode\": \"null\"}, {\"mode\": \"tty\"} or {\"mode\": \"file\", \"file\": PATH}"
)]
pub enum OutputConfig {
    #[default]
    Off,
    Null,
    Tty,
    File(PathBuf),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(
    expecting = "a VM configuration: an object with payload, and optionally cpus, memory, disks, nets, serial, console, ..."
)]
pub struct VmConfig {
    pub payload: PayloadConfig,
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default = "serial_default")]
    pub serial: OutputConfig,
    /// virtio-console: off (no device), null, tty (stdout, input from stdin) or file.
    #[serde(default)]
    pub console: OutputConfig,
    /// Most bytes a serial output file holds before it rotates to `PATH.1`
    /// (default [`DEFAULT_OUTPUT_MAX_SIZE`]).
    #[serde(
        default,
        deserialize_with = "crate::json::size::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub serial_max_size: Option<u64>,
    /// The same for the console's output file.
    #[serde(
        default,
        deserialize_with = "crate::json::size::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub console_max_size: Option<u64>,
    #[serde(default)]
    pub rng: bool,
    /// virtio-net devices, each on a tap (omitted when empty, so configurations
    /// without networking read as before).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    /// A clustered VM's write lease: its disks take writes only before this deadline
    /// (see [`crate::WriteLease`]); none for a VM outside a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_lease: Option<crate::WriteLease>,
    /// Virtual NUMA nodes (SRAT/SLIT); none: one node, no SRAT.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub numa: Vec<crate::numa::NumaNode>,
    /// A virtio-balloon device; none: no balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
}

/// The balloon: how much memory the host asks back at start, and what the guest may do.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "balloon: an object such as {\"size\": \"256M\"}")]
pub struct BalloonConfig {
    /// Bytes the guest is asked to give back at start (`vm.resize` changes it).
    #[serde(default, deserialize_with = "crate::json::size::de")]
    pub size: u64,
    /// The guest may take pages back from the balloon when it runs out of memory.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// The guest reports free pages, which go back to the host.
    #[serde(default)]
    pub free_page_reporting: bool,
    /// Seconds between statistics requests (0: no statistics).
    #[serde(default = "default_stats_interval")]
    pub stats_interval_s: u32,
}

fn default_stats_interval() -> u32 {
    1
}

pub fn parse_balloon(s: &str) -> Result<BalloonConfig, ConfigError> {
    const F: &str = "--balloon";
    let mut b = BalloonConfig {
        size: 0,
        deflate_on_oom: false,
        free_page_reporting: false,
        stats_interval_s: default_stats_interval(),
    };
    for (k, v) in pairs(F, s)? {
        let bad = |reason: &str| ConfigError::BadValue {
            flag: F,
            key: k.clone(),
            value: v.clone(),
            reason: reason.into(),
        };
        match k.as_str() {
            "size" => b.size = parse_size(&v).ok_or_else(|| bad("expected a size such as 256M"))?,
            "deflate_on_oom" => b.deflate_on_oom = on_off(F, &k, &v)?,
            "free_page_reporting" => b.free_page_reporting = on_off(F, &k, &v)?,
            "stats_interval" => {
                b.stats_interval_s = v.parse().map_err(|_| bad("expected seconds (0: off)"))?
            }
            _ => return Err(ConfigError::UnknownKey { flag: F, key: k }),
        }
    }
    Ok(b)
}

/// The cap of a serial or console output file when none is configured: a guest that
/// prints in a loop cannot fill the host disk.
pub const DEFAULT_OUTPUT_MAX_SIZE: u64 = 16 << 20;

fn serial_default() -> OutputConfig {
    OutputConfig::Tty
}

/// Largest vCPU count we configure (MADT uses 8-bit APIC IDs).
pub const MAX_VCPUS: u8 = 254;
pub const MIN_MEMORY: u64 = 16 << 20;
/// The largest guest: 4 TiB (RAM above 4 GiB is one KVM memory slot, at most 8 TiB;
/// half of that keeps the guest's physical addresses well inside 40 bits).
pub const MAX_MEMORY: u64 = 4 << 40;

impl VmConfig {
    /// An empty path is named as such (not as a file that cannot be opened).
    fn no_empty_paths(&self) -> Result<(), ConfigError> {
        let empty = |p: &std::path::Path| p.as_os_str().is_empty();
        let mut named: Vec<(String, bool)> = vec![
            ("payload.kernel".into(), empty(&self.payload.kernel)),
            (
                "payload.initramfs".into(),
                self.payload.initramfs.as_deref().is_some_and(empty),
            ),
        ];
        for (what, out) in [("serial", &self.serial), ("console", &self.console)] {
            if let OutputConfig::File(p) = out {
                named.push((format!("{what}.file"), empty(p)));
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            named.push((format!("disks[{i}].path"), empty(&d.path)));
            named.push((
                format!("disks[{i}].replica_log"),
                d.replica_log.as_deref().is_some_and(empty),
            ));
        }
        match named.into_iter().find(|(_, is_empty)| *is_empty) {
            Some((field, _)) => Err(ConfigError::Invalid(format!(
                "{field} is empty: give a path"
            ))),
            None => Ok(()),
        }
    }

    /// Checks what serde cannot: ranges and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.no_empty_paths()?;
        if self.cpus.boot == 0 || self.cpus.boot > MAX_VCPUS {
            return Err(ConfigError::Invalid(format!(
                "cpus.boot must be 1..={MAX_VCPUS}, got {}",
                self.cpus.boot
            )));
        }
        if let Some(t) = self.cpus.topology {
            let product = u32::from(t.sockets) * u32::from(t.cores) * u32::from(t.threads);
            if t.sockets == 0
                || t.cores == 0
                || t.threads == 0
                || product != u32::from(self.cpus.boot)
            {
                return Err(ConfigError::Invalid(format!(
                    "cpus.topology {}:{}:{} (sockets:cores:threads) must multiply to cpus.boot {}",
                    t.sockets, t.cores, t.threads, self.cpus.boot
                )));
            }
            let highest = t.apic_id(u32::from(self.cpus.boot) - 1);
            if highest > u32::from(MAX_VCPUS) {
                return Err(ConfigError::Invalid(format!(
                    "cpus.topology {}:{}:{} needs APIC IDs up to {highest}; at most {MAX_VCPUS} \
                     (round cores and threads to powers of two, or use fewer sockets)",
                    t.sockets, t.cores, t.threads
                )));
            }
        }
        crate::numa::validate(&self.numa, self.cpus.boot, self.memory.size)?;
        if let Some(b) = &self.balloon {
            if b.size > self.memory.size {
                return Err(ConfigError::Invalid(format!(
                    "balloon.size ({} MiB) exceeds the VM's memory ({} MiB)",
                    b.size >> 20,
                    self.memory.size >> 20
                )));
            }
            if self.memory.hugepages {
                return Err(ConfigError::Invalid(
                    "a balloon cannot give back huge pages 4 KiB at a time; use it without hugepages".into(),
                ));
            }
            if self.memory.shared {
                return Err(ConfigError::Invalid(
                    "a balloon cannot give back shared memory (madvise does not free memfd \
                     pages); use it without memory.shared"
                        .into(),
                ));
            }
        }
        if self.memory.size < MIN_MEMORY {
            return Err(ConfigError::Invalid(format!(
                "memory.size must be at least 16M, got {} bytes",
                self.memory.size
            )));
        }
        if !self.memory.size.is_multiple_of(4096) {
            return Err(ConfigError::Invalid(
                "memory.size must be a multiple of 4 KiB".into(),
            ));
        }
        if self.memory.size > MAX_MEMORY {
            return Err(ConfigError::Invalid(format!(
                "memory.size must be at most {} GiB, got {} GiB",
                MAX_MEMORY >> 30,
                self.memory.size >> 30
            )));
        }
        if let Some(page) = self.memory.hugepage_size {
            if !self.memory.hugepages {
                return Err(ConfigError::Invalid(
                    "memory.hugepage_size needs hugepages=on".into(),
                ));
            }
            if page != 2 << 20 && page != 1 << 30 {
                return Err(ConfigError::Invalid(format!(
                    "memory.hugepage_size must be 2M or 1G, got {page} bytes"
                )));
            }
            if !self.memory.size.is_multiple_of(page) {
                return Err(ConfigError::Invalid(format!(
                    "memory.size ({} MiB) must be a multiple of the huge page size ({} MiB)",
                    self.memory.size >> 20,
                    page >> 20
                )));
            }
        }
        if self.memory.overcommit && self.memory.hugepages {
            return Err(ConfigError::Invalid(
                "memory.overcommit cannot be used with hugepages (a huge page the pool \
                 cannot give is a SIGBUS in the VMM, not a slower guest)"
                    .into(),
            ));
        }
        if self.memory.shared && self.memory.hugepages {
            return Err(ConfigError::Invalid(
                "memory.shared cannot be used with hugepages yet (shared memory is a \
                 memfd of normal pages)"
                    .into(),
            ));
        }
        if self.serial == OutputConfig::Tty && self.console == OutputConfig::Tty {
            return Err(ConfigError::Invalid(
                "serial and console cannot both be tty (one of them owns the terminal)".into(),
            ));
        }
        for (what, cap) in [
            ("serial_max_size", self.serial_max_size),
            ("console_max_size", self.console_max_size),
        ] {
            if cap == Some(0) {
                return Err(ConfigError::Invalid(format!(
                    "{what} must be at least 1 byte"
                )));
            }
        }
        let mut taps = std::collections::BTreeSet::new();
        for n in &self.nets {
            if let Some(path) = &n.vhost_user {
                if !n.tap.is_empty() {
                    return Err(ConfigError::Invalid(
                        "a network device has either a tap or a vhost_user socket, not both".into(),
                    ));
                }
                if !path.is_absolute() {
                    return Err(ConfigError::Invalid(format!(
                        "vhost-user socket {} must be an absolute path",
                        path.display()
                    )));
                }
                if !self.memory.shared {
                    return Err(ConfigError::Invalid(format!(
                        "vhost-user network device {} needs shared guest memory \
                         (--memory ...,shared=on) so its backend can map it",
                        path.display()
                    )));
                }
                continue;
            }
            net::validate_tap_name(&n.tap).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            if !taps.insert(n.tap.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "two network devices use tap {} (a tap serves one device)",
                    n.tap
                )));
            }
        }
        let mut ids = std::collections::BTreeSet::new();
        for id in self.device_ids() {
            if !ids.insert(id.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "two devices have the id '{id}'"
                )));
            }
        }
        for d in &self.disks {
            d.rate_limiter
                .validate(&format!("disk {}", d.path.display()))?;
            if d.num_queues == 0 || d.num_queues > 16 {
                return Err(ConfigError::Invalid(format!(
                    "disk {}: num_queues must be 1..=16",
                    d.path.display()
                )));
            }
        }
        Ok(())
    }
}

impl VmConfig {
    /// Gives every network device without a MAC one from `pick` (the VMM does this
    /// once, when it creates the VM; the address then travels with the config).
    pub fn assign_missing_macs(&mut self, mut pick: impl FnMut() -> net::MacAddr) {
        for n in &mut self.nets {
            n.mac.get_or_insert_with(&mut pick);
        }
    }

    /// Every virtio device's API id, with the defaults filled in (disk0.., net0..).
    pub fn device_ids(&self) -> Vec<String> {
        let disks = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| d.id.clone().unwrap_or_else(|| format!("disk{i}")));
        let nets = self
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| n.id.clone().unwrap_or_else(|| format!("net{i}")));
        disks.chain(nets).collect()
    }
}

/// Parses `key=value,key=value` into pairs.
fn pairs(flag: &'static str, s: &str) -> Result<Vec<(String, String)>, ConfigError> {
    s.split(',')
        .filter(|i| !i.is_empty())
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| ConfigError::NotKeyValue {
                    flag,
                    item: item.to_string(),
                })
        })
        .collect()
}

fn on_off(flag: &'static str, key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(ConfigError::BadValue {
            flag,
            key: key.into(),
            value: v.into(),
            reason: "expected on or off".into(),
        }),
    }
}

/// Parses a size with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 10),
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'G' | 'g') => (&s[..i], 30),
        (i, 'T' | 't') => (&s[..i], 40),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

pub fn parse_cpus(s: &str) -> Result<CpusConfig, ConfigError> {
    const F: &str = "--cpus";
    let mut c = CpusConfig::default();
    for (k, v) in pairs(F, s)? {
        match k.as_str() {
            "boot" => {
                c.boot = v.parse().map_err(|_| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason: "expected a number of vCPUs".into(),
                })?
            }
            "topology" => {
                let bad = |reason: &str| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason: reason.into(),
                };
                let parts: Vec<&str> = v.split(':').collect();
                let [s, co, th] = parts.as_slice() else {
                    return Err(bad("expected SOCKETS:CORES:THREADS"));
                };
                let n = |x: &str| x.parse::<u8>().ok().filter(|&n| n > 0);
                let (Some(sockets), Some(cores), Some(threads)) = (n(s), n(co), n(th)) else {
                    return Err(bad("each of SOCKETS:CORES:THREADS must be 1..=255"));
                };
                c.topology = Some(CpuTopology {
                    sockets,
                    cores,
                    threads,
                });
            }
            // Leaves joined by '+' (',' separates the flag's keys).
            "features" => {
                c.features = Some(CpuFeatures::parse_mask(&v.replace('+', ",")).map_err(|e| {
                    ConfigError::BadValue {
                        flag: F,
                        key: k.clone(),
                        value: v.clone(),
                        reason: e.to_string(),
                    }
                })?)
            }
            _ => return Err(ConfigError::UnknownKey { flag: F, key: k }),
        }
    }
    Ok(c)
}

pub fn parse_memory(s: &str) -> Result<MemoryConfig, ConfigError> {
    const F: &str = "--memory";
    let mut m = MemoryConfig::default();
    for (k, v) in pairs(F, s)? {
        match k.as_str() {
            "size" => {
                m.size = parse_size(&v).ok_or_else(|| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason: "expected a size such as 512M or 2G".into(),
                })?
            }
            "hugepages" => m.hugepages = on_off(F, &k, &v)?,
            "hugepage_size" => {
                m.hugepage_size = Some(parse_size(&v).ok_or_else(|| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason: "expected 2M or 1G".into(),
                })?)
            }
            "overcommit" => m.overcommit = on_off(F, &k, &v)?,
            "shared" => m.shared = on_off(F, &k, &v)?,
            _ => return Err(ConfigError::UnknownKey { flag: F, key: k }),
        }
    }
    Ok(m)
}

pub fn parse_disk(s: &str) -> Result<DiskConfig, ConfigError> {
    const F: &str = "--disk";
    let mut path = None;
    let mut d = DiskConfig {
        path: PathBuf::new(),
        format: None,
        readonly: false,
        direct: false,
        locking: true,
        serial: None,
        num_queues: 1,
        id: None,
        rate_limiter: RateLimitConfig::default(),
        poll_us: DEFAULT_POLL_US,
        size: None,
        on_error: None,
        fencing_token: None,
        replica_log: None,
    };
    let mut bw = (None, None);
    let mut ops = (None, None);
    for (k, v) in pairs(F, s)? {
        match k.as_str() {
            "path" => path = Some(PathBuf::from(v)),
            "format" => {
                d.format = Some(v.parse().map_err(|reason| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason,
                })?)
            }
            "readonly" => d.readonly = on_off(F, &k, &v)?,
            "direct" => d.direct = on_off(F, &k, &v)?,
            "locking" => d.locking = on_off(F, &k, &v)?,
            "serial" => d.serial = Some(v),
            "id" => d.id = Some(v),
            "num_queues" => d.num_queues = number(F, &k, &v)?,
            "poll_us" => d.poll_us = number(F, &k, &v)?,
            "fencing_token" => d.fencing_token = Some(number(F, &k, &v)?),
            "size" => {
                d.size = Some(parse_size(&v).ok_or_else(|| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason: "expected a size such as 64M".into(),
                })?)
            }
            "on_error" => {
                d.on_error = Some(match v.as_str() {
                    "report" => OnError::Report,
                    "stop" => OnError::Stop,
                    _ => {
                        return Err(ConfigError::BadValue {
                            flag: F,
                            key: k.clone(),
                            value: v.clone(),
                            reason: "expected report or stop".into(),
                        })
                    }
                })
            }
            "replica_log" => d.replica_log = Some(PathBuf::from(v)),
            "bw_size" => bw.0 = Some(number(F, &k, &v)?),
            "bw_refill_time" => bw.1 = Some(number(F, &k, &v)?),
            "ops_size" => ops.0 = Some(number(F, &k, &v)?),
            "ops_refill_time" => ops.1 = Some(number(F, &k, &v)?),
            _ => return Err(ConfigError::UnknownKey { flag: F, key: k }),
        }
    }
    d.rate_limiter = RateLimitConfig {
        bandwidth: bucket(F, "bw", bw)?,
        ops: bucket(F, "ops", ops)?,
    };
    d.path = path.ok_or(ConfigError::Missing {
        flag: F,
        key: "path",
    })?;
    if d.readonly && d.replica_log.is_some() {
        return Err(ConfigError::BadValue {
            flag: F,
            key: "replica_log".into(),
            value: d
                .replica_log
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            reason: "a read-only disk has no writes to replicate".into(),
        });
    }
    Ok(d)
}

/// `--net tap=NAME[,mac=52:54:00:12:34:56][,id=ID]` or
/// `--net vhost-user=SOCKET[,mac=..][,queues=N][,id=ID]`.
pub fn parse_net(s: &str) -> Result<NetConfig, ConfigError> {
    const F: &str = "--net";
    let mut tap = None;
    let mut n = NetConfig {
        tap: String::new(),
        vhost_user: None,
        mac: None,
        id: None,
    };
    for (k, v) in pairs(F, s)? {
        match k.as_str() {
            "vhost-user" | "vhost_user" => {
                if v.is_empty() {
                    return Err(ConfigError::BadValue {
                        flag: F,
                        key: k.clone(),
                        value: v.clone(),
                        reason: "expected the backend's unix socket path".into(),
                    });
                }
                n.vhost_user = Some(PathBuf::from(v))
            }
            "queues" => {
                let q: u32 = number(F, &k, &v)?;
                if q != 1 {
                    return Err(ConfigError::BadValue {
                        flag: F,
                        key: k.clone(),
                        value: v.clone(),
                        reason: "only one queue pair is supported (multiqueue is not done)".into(),
                    });
                }
            }
            "tap" => {
                net::validate_tap_name(&v).map_err(|e| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason: match e {
                        net::TapError::BadName { reason, .. } => reason.to_string(),
                        other => other.to_string(),
                    },
                })?;
                tap = Some(v)
            }
            "mac" => {
                n.mac = Some(
                    v.parse()
                        .map_err(|e: net::MacParseError| ConfigError::BadValue {
                            flag: F,
                            key: k.clone(),
                            value: v.clone(),
                            reason: match e {
                                net::MacParseError::Syntax(_) => {
                                    "expected six hex bytes such as 52:54:00:12:34:56".into()
                                }
                                net::MacParseError::Multicast(_) => {
                                    "a multicast address; a NIC needs a unicast one".into()
                                }
                            },
                        })?,
                )
            }
            "id" => n.id = Some(v),
            _ => return Err(ConfigError::UnknownKey { flag: F, key: k }),
        }
    }
    match (tap, &n.vhost_user) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::BadValue {
                flag: F,
                key: "vhost-user".into(),
                value: s.into(),
                reason: "give either tap= or vhost-user=, not both".into(),
            })
        }
        (Some(t), None) => n.tap = t,
        (None, Some(_)) => {}
        (None, None) => {
            return Err(ConfigError::Missing {
                flag: F,
                key: "tap (or vhost-user)",
            })
        }
    }
    Ok(n)
}

fn number<T: std::str::FromStr>(flag: &'static str, key: &str, v: &str) -> Result<T, ConfigError> {
    v.parse().map_err(|_| ConfigError::BadValue {
        flag,
        key: key.into(),
        value: v.into(),
        reason: "expected a number".into(),
    })
}

/// `<p>_size` and `<p>_refill_time` (ms) come together or not at all.
fn bucket(
    flag: &'static str,
    prefix: &str,
    (size, refill): (Option<u64>, Option<u64>),
) -> Result<Option<TokenBucket>, ConfigError> {
    match (size, refill) {
        (None, None) => Ok(None),
        (Some(size), Some(refill_time)) => Ok(Some(TokenBucket { size, refill_time })),
        _ => Err(ConfigError::Invalid(format!(
            "{flag}: {prefix}_size and {prefix}_refill_time (ms) must be given together"
        ))),
    }
}

pub fn parse_output(flag: &'static str, s: &str) -> Result<OutputConfig, ConfigError> {
    parse_output_capped(flag, s).map(|(o, _)| o)
}

/// `off`, `null`, `tty` or `file=PATH[,max_size=BYTES]` (BYTES such as 16M): the
/// output and its file's cap, if given.
pub fn parse_output_capped(
    flag: &'static str,
    s: &str,
) -> Result<(OutputConfig, Option<u64>), ConfigError> {
    match s {
        "off" => Ok((OutputConfig::Off, None)),
        "null" => Ok((OutputConfig::Null, None)),
        "tty" => Ok((OutputConfig::Tty, None)),
        _ => match s.split_once('=') {
            Some(("file", rest)) => {
                // A path may hold commas; only a trailing `,max_size=` is the cap.
                let (p, cap) = match rest.rsplit_once(",max_size=") {
                    Some((p, v)) => {
                        let cap = parse_size(v).filter(|&c| c > 0).ok_or_else(|| {
                            ConfigError::BadValue {
                                flag,
                                key: "max_size".into(),
                                value: v.into(),
                                reason: "expected a size of at least 1 byte such as 16M".into(),
                            }
                        })?;
                        (p, Some(cap))
                    }
                    None => (rest, None),
                };
                if p.is_empty() {
                    return Err(ConfigError::BadValue {
                        flag,
                        key: "file".into(),
                        value: s.into(),
                        reason: "expected file=PATH".into(),
                    });
                }
                Ok((OutputConfig::File(PathBuf::from(p)), cap))
            }
            _ => Err(ConfigError::BadValue {
                flag,
                key: "mode".into(),
                value: s.into(),
                reason: "expected off, null, tty or file=PATH[,max_size=BYTES]".into(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn apic_ids_put_thread_core_and_socket_in_their_own_bit_fields() {
        let c = parse_cpus("boot=8,topology=2:2:2").unwrap();
        assert_eq!(c.apic_ids(), vec![0, 1, 2, 3, 4, 5, 6, 7]);
        // 3 cores need 2 bits, 4 threads 2 bits: socket 1 starts at 16, core 2 at 8.
        let c = parse_cpus("boot=24,topology=2:3:4").unwrap();
        let ids = c.apic_ids();
        assert_eq!(&ids[..4], &[0, 1, 2, 3]);
        assert_eq!(ids[8], 8);
        assert_eq!(ids[12], 16);
        assert_eq!(ids[23], 16 + 8 + 3);
        // Without a topology: one socket of single-threaded cores, IDs 0..n.
        let c = parse_cpus("boot=5").unwrap();
        assert_eq!(c.apic_ids(), vec![0, 1, 2, 3, 4]);
        assert_eq!(c.topology().package_bits(), 3);
    }

    #[test]
    fn a_topology_survives_json_and_is_absent_when_not_set() {
        let c = parse_cpus("boot=4,topology=1:2:2").unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            json.contains(r#""topology":{"sockets":1,"cores":2,"threads":2}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<CpusConfig>(&json).unwrap(), c);
        let plain = serde_json::to_string(&parse_cpus("boot=4").unwrap()).unwrap();
        assert_eq!(plain, r#"{"boot":4}"#);
    }

    /// `features=` takes a fingerprint with its leaves joined by '+' on the command
    /// line, the same string with ',' in JSON; a mask without long mode, or a leaf
    /// that lists no features, is one line naming why.
    #[test]
    fn cpu_features_parse_from_the_flag_and_json_and_bad_masks_are_refused() {
        let one = "1.0:0000000000000000000000010789f3f9";
        let lm = "80000001.0:00000000000000000000000020100800";
        let c = parse_cpus(&format!("boot=2,features={one}+{lm}")).unwrap();
        let f = c.features.clone().unwrap();
        assert_eq!(f.to_string(), format!("{one},{lm}"));
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            json.contains(&format!(r#""features":"{one},{lm}""#)),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<CpusConfig>(&json).unwrap(), c);
        for (bad, why) in [
            (format!("boot=2,features={one}"), "x86-64 baseline"),
            (
                "boot=2,features=4.0:00000000000000000000000000000000".into(),
                "lists no features",
            ),
            ("boot=2,features=1.0:12".into(), "LEAF.SUBLEAF"),
        ] {
            let e = parse_cpus(&bad).unwrap_err().to_string();
            assert!(e.contains(why) && !e.contains('\n'), "{bad}: {e}");
        }
        let e = serde_json::from_str::<CpusConfig>(&format!(r#"{{"boot":1,"features":"{one}"}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x86-64 baseline"), "{e}");
    }
    use super::*;

    #[test]
    fn parses_flags_in_cloud_hypervisor_style() {
        assert_eq!(parse_cpus("boot=4").unwrap().boot, 4);
        assert_eq!(parse_memory("size=512M").unwrap().size, 512 << 20);
        assert_eq!(parse_memory("size=2G,hugepages=on").unwrap().size, 2 << 30);
        let d = parse_disk("path=/a.vhdx,readonly=on,serial=abc").unwrap();
        assert_eq!(d.path, PathBuf::from("/a.vhdx"));
        assert!(d.readonly && !d.direct);
        assert!(d.locking, "locking is on unless turned off");
        let off = parse_disk("path=/a.vhdx,locking=off").unwrap();
        assert!(!off.locking);
        // Round trip: the default is not written out, off is.
        let j = serde_json::to_value(&off).unwrap();
        assert_eq!(j["locking"], serde_json::json!(false));
        let back: DiskConfig = serde_json::from_value(j).unwrap();
        assert!(!back.locking);
        let on = parse_disk("path=/a.vhdx").unwrap();
        assert!(serde_json::to_value(&on).unwrap().get("locking").is_none());
        assert!(parse_disk("path=/a,locking=maybe").is_err());
        // A clustered VM's fencing token: a number, absent unless given.
        assert_eq!(d.fencing_token, None);
        let fenced = parse_disk("path=/a,fencing_token=42").unwrap();
        assert_eq!(fenced.fencing_token, Some(42));
        assert_eq!(serde_json::to_value(&fenced).unwrap()["fencing_token"], 42);
        assert!(parse_disk("path=/a,fencing_token=-1").is_err());
        assert!(serde_json::to_value(&on)
            .unwrap()
            .get("fencing_token")
            .is_none());
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert_eq!(d.on_error, None);
        let d = parse_disk("path=/a,on_error=stop").unwrap();
        assert_eq!(d.on_error, Some(OnError::Stop));
        assert!(parse_disk("path=/a,on_error=ignore").is_err());
        let d = parse_disk("path=/a,replica_log=/a.rlog").unwrap();
        assert_eq!(
            d.replica_log.as_deref(),
            Some(std::path::Path::new("/a.rlog"))
        );
        assert!(parse_disk("path=/a,readonly=on,replica_log=/a.rlog").is_err());
        assert!(serde_json::to_value(parse_disk("path=/a").unwrap())
            .unwrap()
            .get("replica_log")
            .is_none());
        assert_eq!(
            parse_output("--serial", "file=/tmp/x").unwrap(),
            OutputConfig::File("/tmp/x".into())
        );
        assert_eq!(
            parse_output_capped("--serial", "file=/tmp/a,b,max_size=4M").unwrap(),
            (OutputConfig::File("/tmp/a,b".into()), Some(4 << 20))
        );
    }

    #[test]
    fn rejects_bad_flags_with_a_clear_reason() {
        assert!(matches!(
            parse_disk("readonly=on"),
            Err(ConfigError::Missing { key: "path", .. })
        ));
        assert!(matches!(
            parse_disk("path=/a,colour=red"),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(matches!(
            parse_disk("path=/a,readonly=maybe"),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            parse_memory("size=lots"),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            parse_cpus("boot"),
            Err(ConfigError::NotKeyValue { .. })
        ));
        assert!(parse_output("--serial", "file=").is_err());
        assert!(parse_output_capped("--serial", "file=/x,max_size=0").is_err());
        assert!(parse_output_capped("--serial", "file=/x,max_size=lots").is_err());
        assert!(parse_output_capped("--serial", "file=,max_size=1M").is_err());
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("99999999999999T"), None);
    }

    #[test]
    fn disk_rate_limits_parse_in_pairs_and_validate() {
        let d = parse_disk(
            "path=/a,ops_size=100,ops_refill_time=1000,bw_size=1048576,bw_refill_time=100",
        )
        .unwrap();
        assert_eq!(
            d.rate_limiter.ops,
            Some(TokenBucket {
                size: 100,
                refill_time: 1000
            })
        );
        assert_eq!(d.rate_limiter.bandwidth.map(|b| b.size), Some(1 << 20));
        assert!(matches!(
            parse_disk("path=/a,ops_size=100"),
            Err(ConfigError::Invalid(m)) if m.contains("ops_refill_time")
        ));
        assert!(matches!(
            parse_disk("path=/a,bw_size=fast,bw_refill_time=1"),
            Err(ConfigError::BadValue { .. })
        ));
        let json = r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/d",
                      "rate_limiter":{"ops":{"size":0,"refill_time":10}}}]}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        assert!(
            matches!(c.validate(), Err(ConfigError::Invalid(m)) if m.contains("ops rate limit"))
        );
        // An unlimited disk serializes without the field (older readers accept it).
        let plain = serde_json::to_value(parse_disk("path=/a").unwrap()).unwrap();
        assert!(plain.get("rate_limiter").is_none());
    }

    #[test]
    fn disk_formats_are_declared_and_old_configs_follow_the_extension_rule() {
        let d = parse_disk("path=/a.img,format=vhdx").unwrap();
        assert_eq!(d.format, Some(DiskFormat::Vhdx));
        assert_eq!(d.effective_format(), DiskFormat::Vhdx);
        assert!(matches!(
            parse_disk("path=/a,format=qcow2"),
            Err(ConfigError::BadValue { reason, .. }) if reason.contains("expected raw or vhdx")
        ));
        // An old configuration (no format): raw unless the name ends in .vhdx.
        for (path, want) in [
            ("/d/x.vhdx", DiskFormat::Vhdx),
            ("/d/x.VHDX", DiskFormat::Vhdx),
            ("/d/x.img", DiskFormat::Raw),
            ("/d/x", DiskFormat::Raw),
        ] {
            let d = parse_disk(&format!("path={path}")).unwrap();
            assert_eq!((d.format, d.effective_format()), (None, want), "{path}");
        }
        let c: VmConfig = serde_json::from_str(
            r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/d","format":"raw"}]}"#,
        )
        .unwrap();
        assert_eq!(c.disks[0].format, Some(DiskFormat::Raw));
    }

    #[test]
    fn nets_parse_validate_and_keep_a_stable_mac() {
        let n = parse_net("tap=vtap0,mac=52:54:00:aa:bb:cc,id=lan").unwrap();
        assert_eq!(n.tap, "vtap0");
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:aa:bb:cc");
        assert_eq!(n.id.as_deref(), Some("lan"));
        for (bad, needle) in [
            (
                "mac=52:54:00:aa:bb:cc",
                "missing required option 'tap (or vhost-user)'",
            ),
            ("tap=", "tap=: empty"),
            ("tap=a234567890123456", "longer than 15 bytes"),
            ("tap=t0,mac=52:54:00:aa:bb", "six hex bytes"),
            ("tap=t0,mac=01:00:5e:00:00:01", "multicast"),
            ("tap=t0,queues=4", "only one queue pair"),
        ] {
            let e = parse_net(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
            assert!(!e.contains('\n'));
        }
        let mut c: VmConfig = serde_json::from_str(
            r#"{"payload":{"kernel":"/k"},"nets":[{"tap":"a"},{"tap":"b","mac":"52:54:00:00:00:09"}]}"#,
        )
        .unwrap();
        let mut n = 0u8;
        c.assign_missing_macs(|| {
            n += 1;
            net::MacAddr::new([2, 0, 0, 0, 0, n])
        });
        assert_eq!(c.nets[0].mac.unwrap().to_string(), "02:00:00:00:00:01");
        assert_eq!(
            c.nets[1].mac.unwrap().to_string(),
            "52:54:00:00:00:09",
            "kept"
        );
        let two = r#"{"payload":{"kernel":"/k"},"nets":[{"tap":"t"},{"tap":"t"}]}"#;
        let c: VmConfig = serde_json::from_str(two).unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(m)) if m.contains("tap t")));

        let json =
            r#"{"payload":{"kernel":"/k"},"nets":[{"tap":"vtap0","mac":"52:54:00:01:02:03"}]}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        c.validate().unwrap();
        assert_eq!(c.device_ids(), ["net0"]);
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let bad_mac = r#"{"payload":{"kernel":"/k"},"nets":[{"tap":"t","mac":"zz"}]}"#;
        let e = serde_json::from_str::<VmConfig>(bad_mac)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a MAC address"), "{e}");
        let unknown = r#"{"payload":{"kernel":"/k"},"nets":[{"tap":"t","vhost":true}]}"#;
        assert!(serde_json::from_str::<VmConfig>(unknown).is_err());
        let long = r#"{"payload":{"kernel":"/k"},"nets":[{"tap":"a234567890123456"}]}"#;
        let c: VmConfig = serde_json::from_str(long).unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(m)) if m.contains("IFNAMSIZ")));
        let clash = r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/d","id":"x"}],
                        "nets":[{"tap":"t","id":"x"}]}"#;
        let c: VmConfig = serde_json::from_str(clash).unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(m)) if m.contains("'x'")));
        // A configuration without networking serializes without the field.
        let plain: VmConfig = serde_json::from_str(r#"{"payload":{"kernel":"/k"}}"#).unwrap();
        assert!(serde_json::to_value(&plain).unwrap().get("nets").is_none());
    }

    #[test]
    fn the_openapi_document_describes_every_config_field() {
        let doc: serde_yaml::Value = serde_yaml::from_str(crate::OPENAPI_YAML).unwrap();
        let vm = &doc["components"]["schemas"]["VmConfig"]["properties"];
        let keys = |v: &serde_yaml::Value| -> Vec<String> {
            let mut k: Vec<String> = v
                .as_mapping()
                .map(|m| {
                    m.keys()
                        .filter_map(|k| k.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            k.sort();
            k
        };
        let full = VmConfig {
            numa: vec![crate::numa::parse_numa(
                "node=0,cpus=0,memory=512M,host_node=0,distances=1@20",
            )
            .unwrap()],
            balloon: Some(parse_balloon("size=1M,deflate_on_oom=on").unwrap()),
            payload: PayloadConfig {
                kernel: "/k".into(),
                cmdline: None,
                initramfs: None,
            },
            cpus: parse_cpus("boot=2,topology=1:2:1").unwrap(),
            memory: parse_memory("size=1G,hugepages=on,hugepage_size=2M,overcommit=on,shared=on")
                .unwrap(),
            disks: vec![parse_disk("path=/d").unwrap()],
            serial: OutputConfig::Null,
            console: OutputConfig::Off,
            serial_max_size: Some(1 << 20),
            console_max_size: Some(1 << 20),
            rng: true,
            // Every field at once, for the keys (a valid device has a tap or a socket).
            nets: vec![NetConfig {
                vhost_user: Some("/run/vs/n.sock".into()),
                ..parse_net("tap=t,mac=52:54:00:00:00:01,id=n").unwrap()
            }],
            write_lease: Some(crate::WriteLease {
                deadline_monotonic_ns: 1,
            }),
        };
        let json = serde_json::to_value(&full).unwrap();
        let serde_keys = |v: &serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(vm), serde_keys(&json), "VmConfig properties");
        assert_eq!(
            keys(&vm["nets"]["items"]["properties"]),
            serde_keys(&json["nets"][0]),
            "NetConfig properties"
        );
        for (field, what) in [("cpus", "CpusConfig"), ("memory", "MemoryConfig")] {
            assert_eq!(
                keys(&vm[field]["properties"]),
                serde_keys(&json[field]),
                "{what} properties"
            );
        }
        assert_eq!(
            keys(&vm["cpus"]["properties"]["topology"]["properties"]),
            serde_keys(&json["cpus"]["topology"]),
            "CpuTopology properties"
        );
        assert_eq!(
            keys(&vm["balloon"]["properties"]),
            serde_keys(&json["balloon"]),
            "BalloonConfig properties"
        );
        assert_eq!(
            keys(&vm["numa"]["items"]["properties"]),
            serde_keys(&json["numa"][0]),
            "NumaNode properties"
        );
    }

    #[test]
    fn json_config_round_trips_and_validates() {
        let json = r#"{"payload":{"kernel":"/k"},"cpus":{"boot":2},"memory":{"size":268435456},
                      "disks":[{"path":"/d.vhdx"}],"serial":{"mode":"file","file":"/s"}}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        c.validate().unwrap();
        assert_eq!(c.disks[0].num_queues, 1);
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let mut bad = c.clone();
        bad.cpus.boot = 0;
        assert!(bad.validate().is_err());
        assert!(
            serde_json::from_str::<VmConfig>(r#"{"payload":{"kernel":"/k"},"cpu":{}}"#).is_err()
        );
    }
}
