//! The VMs' lifecycle: define, start, stop, kill, pause, resume, delete; watching
//! each VMM process, recording how it ended and restarting it per the VM's policy;
//! re-adopting running VMMs when vireod starts again; automatic start in priority
//! order; host shutdown lowest priority first.
//!
//! One lock (`vms`) guards the in-memory view; it is never held across an await.
//! The inventory (SQLite) is the durable truth for definitions and history.
//!
//! This file holds the [`Supervisor`] itself, its shared state and opening it; its
//! jobs are in the submodules:
//! - [`definitions`]: define, redefine, delete;
//! - [`start`]: starting a VM's VMM; [`exits`]: watching it end, the restart policy;
//! - [`stop`]: stop, kill, pause, resume; [`power`]: the guest's shutdown (ACPI power
//!   button, then stop), reset; [`save`]: save (Hyper-V's saved state) and discard;
//! - [`recovery`]: re-adopting running VMMs after a vireod restart;
//! - [`ordering`]: automatic start and host shutdown in priority order;
//! - [`status`]: queries of the per-VM state; [`events`]: event publication;
//! - [`paths`]: where a VM's files live and how its VMM is launched;
//! - [`records`]: the migration records;
//! - [`memory`]: running VMs' memory (Dynamic Memory VMs for the balancer, resize).
//!
//! Live migration between two vireods is in [`outgoing`] (the source's queue and
//! hand-over) and [`incoming`] (the destination's receiving VMM).

mod definitions;
mod events;
mod exits;
mod incoming;
mod memory;
pub use incoming::IncomingGuard;
pub use memory::{devices_of, Current, DynamicVm};
mod ordering;
mod outgoing;
mod paths;
mod power;
mod records;
mod recovery;
mod save;
pub use save::{area_beside_disks, shared_saved_area, Answer, ClusterSaves, SAVED};
mod start;
mod status;
mod stop;
mod switching;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tracing::warn;

use crate::inventory::Inventory;
use crate::launcher::{Handle, Launcher};
use crate::migrations::Migrations;
use crate::model::{Event, ExitRecord, VmDefinition, VmState};
use crate::AgentError;

/// How vireod runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Inventory database, per-VM serial and VMM logs.
    pub state_dir: PathBuf,
    /// vireod's socket; `vms/`: each VM's socket, runtime config and pid file.
    pub run_dir: PathBuf,
    pub vireo_bin: PathBuf,
    /// At most this many VMs boot at the same time during automatic start.
    pub max_concurrent_starts: usize,
    /// How long a VMM may take from exec to reporting its VM running.
    pub start_timeout: Duration,
    /// How long a VM may take to stop before it is killed.
    pub stop_timeout: Duration,
    /// Metering sample period.
    pub meter_interval: Duration,
    /// How VMMs are started (directly, or as systemd units) and placed (CPU cgroups).
    pub launcher: Launcher,
    /// At most this many outgoing live migrations run at once; the rest queue.
    pub max_concurrent_migrations: usize,
    /// How long a receiving VMM waits for its source to connect.
    pub incoming_timeout: Duration,
    /// This host's identity (`--tls-cert/--tls-key/--tls-ca`): needed to call another
    /// host's vireod and to receive from one; the VMMs' migration streams use it too.
    pub identity: Option<crate::hosttls::HostIdentity>,
    /// The address of the peer listener (`--listen`): its IP is where receiving VMMs
    /// of migrations from peers listen.
    pub listen: Option<std::net::SocketAddr>,
    /// The ports receiving VMMs of migrations from peers listen on
    /// (`--migration-ports`; None: any free port).
    pub migration_ports: Option<crate::migration_ports::PortPool>,
    /// Where definitions may name files (empty: `<state-dir>/images`, created).
    pub storage_roots: Vec<PathBuf>,
    /// Block devices a definition may name as disks.
    pub block_devices: Vec<PathBuf>,
    /// Jail every VMM with its own uid from this range (`vireod --jail-uids`); None:
    /// VMMs run as vireod's user, unconfined (`--no-jail`, or vireod is not root).
    pub jail_uids: Option<crate::jailing::JailIds>,
    /// The API sockets of other vireods on this host (`--peer-socket`): the only
    /// sockets a `destination_agent` path may name; their VMs' sockets are in the
    /// `vms/` directory beside each.
    pub peer_sockets: Vec<PathBuf>,
    /// Peer hosts' storage scopes (`--peer-storage NAME=DIR`, see
    /// [`crate::peer_scope`]): (peer, directory) pairs.
    pub peer_storage: Vec<(String, PathBuf)>,
    /// The replica directory (`--replica-dir`) when this host is a replica server:
    /// an arriving VM may name only its own primary's part of it.
    pub replica_dir: Option<PathBuf>,
    /// The Dynamic Memory balancer's budget, reserve and period.
    pub balancer: crate::balancer::BalancerConfig,
    /// The host's virtual switches vireod runs (`--switch`), see [`crate::switches`].
    pub switches: Vec<crate::switches::SwitchSpec>,
    /// The `vireo-switch` binary.
    pub switch_bin: PathBuf,
}

const VMM_TIMEOUT: Duration = Duration::from_secs(5);

struct Vm {
    def: VmDefinition,
    state: VmState,
    handle: Option<Handle>,
    adopted: bool,
    started_at_ms: Option<u64>,
    restarts: u32,
    last_exit: Option<ExitRecord>,
    /// Set by stop/kill: the coming exit was asked for.
    stop_requested: bool,
    /// The exit record's reason for the coming requested exit when it is not plain
    /// "requested" (a shutdown the guest carries out).
    stop_reason: Option<&'static str>,
    /// A definition stored while the VMM ran (`set_definition`): it replaces `def` at
    /// the next start; `def` stays what the running VMM was started with.
    pending_def: Option<VmDefinition>,
    /// Which process the watcher belongs to (a stale watcher must not touch a new one).
    generation: u64,
    /// The live migration (outgoing or incoming) that owns this VM's VMM right now:
    /// its exit is then the migration's business, not the restart policy's.
    migration: Option<String>,
}

impl Vm {
    fn new(def: VmDefinition) -> Self {
        Vm {
            def,
            state: VmState::Stopped,
            handle: None,
            adopted: false,
            started_at_ms: None,
            restarts: 0,
            last_exit: None,
            stop_requested: false,
            stop_reason: None,
            pending_def: None,
            generation: 0,
            migration: None,
        }
    }
}

pub struct Supervisor {
    pub cfg: Config,
    inv: Mutex<Inventory>,
    vms: Mutex<BTreeMap<String, Vm>>,
    events: broadcast::Sender<Event>,
    seq: AtomicU64,
    started: Instant,
    generation: AtomicU64,
    migrations: Migrations,
    /// The storage roots, opened (see `confinement`).
    roots: Arc<confine::Roots>,
    /// What each peer host may name in a VM it migrates here (`--peer-storage`).
    peer_scopes: crate::peer_scope::PeerScopes,
    /// The replica directory, when this host is a replica server.
    replica_area: Option<crate::peer_scope::ReplicaArea>,
    /// Per VM: the VMM process and the last of its `vm.events` seen.
    vmm_events_seen: Mutex<std::collections::HashMap<String, (i32, u64)>>,
    /// The migration gateways running (`tls_gateway`), to cut a revoked peer's streams.
    gateways: Mutex<Vec<std::sync::Weak<crate::tls_gateway::GatewayStats>>>,
    /// A cluster node's check of incoming VMs (see [`incoming::IncomingGuard`]).
    incoming_guard: std::sync::OnceLock<Arc<dyn incoming::IncomingGuard>>,
    /// A cluster node's side of saving clustered VMs (see [`save::ClusterSaves`]).
    cluster_saves: std::sync::OnceLock<Arc<dyn save::ClusterSaves>>,
    /// The saved-state areas on the cluster's shared storage of the clustered VMs
    /// defined here ([`shared_saved_area`]); the others have theirs under the state
    /// directory. Kept beside `vms` (a leaf lock: nothing is locked while it is held)
    /// so that a path can be found with `vms` held.
    saved_areas: Mutex<std::collections::HashMap<String, PathBuf>>,
    /// Per VM: its VMM process and what was last seen of its memory (the balancer's
    /// round, a resize). A leaf lock, like `saved_areas`.
    memory: Mutex<std::collections::HashMap<String, (i32, crate::model::MemoryStatus)>>,
    /// The host's switches and the running VMs' ports on them.
    switches: crate::switches::Switches,
}

/// How a start was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StartKind {
    User,
    Auto,
    Restart,
}

/// `DISK.fence`, the fencing record the VMM keeps beside a clustered disk
/// (`vmm/src/fencing.rs`).
fn vmm_fence_record(disk: &Path) -> PathBuf {
    let mut name = disk.file_name().unwrap_or_default().to_os_string();
    name.push(".fence");
    disk.with_file_name(name)
}

use vireo_util::sync::lock;

/// Makes `path` (and its parents) and gives it `mode` whatever the umask.
pub(crate) fn mkdir(path: &Path, mode: u32) -> Result<(), AgentError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|e| AgentError::io("cannot create directory", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| AgentError::io("cannot set permissions of", path, e))
}

/// Writes a file of vireod's own privately (0600) and atomically, never through a
/// symlink at its name.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    let dir = confine::open_dir(dir)?;
    confine::write_private_atomic(std::os::fd::AsFd::as_fd(&dir), name, bytes)
}

/// Makes `path` vireod's own: owned by its user and group, mode 0600.
fn make_private(path: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid/getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| AgentError::io("cannot change the owner of", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| AgentError::io("cannot set permissions of", path, e))
}

impl Supervisor {
    /// Opens the inventory and prepares the directories. Call [`Supervisor::recover`]
    /// next (inside the tokio runtime) to re-adopt running VMMs.
    pub fn open(mut cfg: Config) -> Result<Arc<Self>, AgentError> {
        for (flag, dir) in [("--state-dir", &cfg.state_dir), ("--run-dir", &cfg.run_dir)] {
            if !dir.is_absolute() {
                return Err(AgentError::BadConfig(format!(
                    "{flag} {}: must be an absolute path",
                    dir.display()
                )));
            }
        }
        for p in &cfg.peer_sockets {
            crate::confinement::check_peer_socket_flag(p)?;
        }
        if cfg.storage_roots.is_empty() {
            let images = cfg.state_dir.join("images");
            mkdir(&images, 0o700)?;
            cfg.storage_roots.push(images);
        }
        let roots = confine::Roots::new(&cfg.storage_roots, &cfg.block_devices)
            .map_err(|e| AgentError::BadConfig(format!("--storage-root: {e}")))?;
        let peer_scopes = crate::peer_scope::PeerScopes::open(&roots, &cfg.peer_storage)?;
        let replica_area = cfg
            .replica_dir
            .as_deref()
            .map(crate::peer_scope::ReplicaArea::new)
            .transpose()?;
        mkdir(&cfg.state_dir, 0o750)?;
        mkdir(&cfg.state_dir.join("vms"), 0o750)?;
        mkdir(&cfg.run_dir, 0o755)?;
        // The VMs' sockets, configs and pid files: vireod's user only (callers reach
        // the VMs through vireod's API, which checks who they are).
        mkdir(&cfg.run_dir.join("vms"), 0o700)?;
        // The jails' roots (each a tmpfs in its VMM's own mount namespace).
        mkdir(&cfg.run_dir.join("jail"), 0o700)?;
        let mut inv = Inventory::open(&cfg.state_dir.join("inventory.db"))?;
        let mut vms = BTreeMap::new();
        let mut saved_areas = std::collections::HashMap::new();
        for (name, def) in inv.list()? {
            if let Some(area) = shared_saved_area(&name, &def) {
                saved_areas.insert(name.clone(), area);
            }
            let last_exit = inv.exits(&name, 1)?.into_iter().next();
            let mut vm = Vm::new(def);
            vm.last_exit = last_exit;
            if save::is_complete(&cfg.state_dir.join("vms").join(&name).join("saved")) {
                vm.state = VmState::Saved;
            }
            vms.insert(name, vm);
        }
        let (migrations, interrupted) =
            Migrations::new(cfg.max_concurrent_migrations, inv.migrations()?);
        for rec in &interrupted {
            inv.save_migration(rec)?;
        }
        let (events, _) = broadcast::channel(4096);
        let switches = crate::switches::Switches::new(
            &cfg.switches,
            &cfg.run_dir,
            &cfg.state_dir,
            cfg.switch_bin.clone(),
        )?;
        switches.start();
        Ok(Arc::new(Self {
            cfg,
            inv: Mutex::new(inv),
            vms: Mutex::new(vms),
            events,
            seq: AtomicU64::new(0),
            started: Instant::now(),
            generation: AtomicU64::new(1),
            migrations,
            roots: Arc::new(roots),
            peer_scopes,
            replica_area,
            vmm_events_seen: Mutex::default(),
            gateways: Mutex::default(),
            incoming_guard: std::sync::OnceLock::new(),
            cluster_saves: std::sync::OnceLock::new(),
            saved_areas: Mutex::new(saved_areas),
            memory: Mutex::default(),
            switches,
        }))
    }

    /// Has `guard` check (and adjust) every incoming VM from now on (set once: a
    /// cluster node's).
    pub fn set_incoming_guard(&self, guard: Arc<dyn incoming::IncomingGuard>) {
        if self.incoming_guard.set(guard).is_err() {
            warn!("an incoming guard is set already; keeping the first");
        }
    }

    /// Has `saves` carry out the cluster's part of saving clustered VMs (set once: a
    /// cluster node's).
    pub fn set_cluster_saves(&self, saves: Arc<dyn save::ClusterSaves>) {
        if self.cluster_saves.set(saves).is_err() {
            warn!("cluster saves are set already; keeping the first");
        }
    }

    /// Follows `def` (a VM's new definition): where its saved state lives.
    fn note_saved_area(&self, name: &str, def: &VmDefinition) {
        let mut areas = lock(&self.saved_areas);
        match shared_saved_area(name, def) {
            Some(area) => areas.insert(name.to_string(), area),
            None => areas.remove(name),
        };
    }

    /// Keeps track of a migration gateway for [`Supervisor::cut_untrusted_migrations`].
    fn watch_gateway(&self, g: &crate::tls_gateway::Gateway) {
        let mut gateways = lock(&self.gateways);
        gateways.retain(|w| w.strong_count() > 0);
        gateways.push(Arc::downgrade(&g.stats()));
    }

    /// After the host identity was reloaded (SIGHUP): cuts the streams of running
    /// migrations whose peer certificate the CA and CRL now in use no longer trust (a
    /// host revoked mid-migration). Those migrations fail; a source keeps its VM.
    /// Returns how many streams were cut.
    pub fn cut_untrusted_migrations(&self) -> usize {
        let Some(id) = self.cfg.identity.as_ref() else {
            return 0;
        };
        let gateways: Vec<_> = lock(&self.gateways)
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        gateways
            .iter()
            .map(|g| g.cut_untrusted(|chain| id.still_trusts(chain)))
            .sum()
    }

    /// The storage roots, opened.
    pub fn roots(&self) -> &Arc<confine::Roots> {
        &self.roots
    }

    /// The host's switches, as `GET /api/v1/switches` shows them.
    pub fn switches(&self) -> Vec<crate::switches::SwitchStatus> {
        self.switches.status()
    }
}
