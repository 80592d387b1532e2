//! The VMs' lifecycle: define, start, stop, kill, pause, resume, delete; watching
//! each VMM process, recording how it ended and restarting it per the VM's policy;
//! re-adopting running VMMs when vireod starts again; automatic start in priority
//! order; host shutdown lowest priority first.
//!
//! One lock (`vms`) guards the in-memory view; it is never held across an await.
//! The inventory (SQLite) is the durable truth for definitions and history.
//!
//! Live migration between two vireods is in [`outgoing`] (the source's queue and
//! hand-over) and [`incoming`] (the destination's receiving VMM).

mod incoming;
pub use incoming::IncomingGuard;
mod outgoing;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use api::config::OutputConfig;
use tokio::sync::{broadcast, Semaphore};
use tracing::{info, warn};

use crate::client;
use crate::inventory::Inventory;
use crate::launcher::{self, Exit, Handle, LaunchSpec, Launcher, NotAdopted, VmmArgs, Watch};
use crate::migrations::Migrations;
use crate::model::{
    validate_name, Event, ExitRecord, HostInfo, MigrationRecord, Priority, RestartPolicy,
    VmDefinition, VmState, VmStatus,
};
use crate::{error_chain, now_ms, AgentError};

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
}

const VMM_TIMEOUT: Duration = Duration::from_secs(5);
/// A pause answers once every vCPU has left the guest; on an overcommitted host that
/// takes a scheduling round of every busy vCPU (seconds with hundreds of them).
const TRANSITION_TIMEOUT: Duration = Duration::from_secs(30);
const SERIAL_TAIL_LINES: usize = 20;
/// A VMM that ran this long resets the count of restarts in a row.
const STABLE_RUN: Duration = Duration::from_secs(60);
const LOG_TAIL_LINES: usize = 10;

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

fn mkdir(path: &Path, mode: u32) -> Result<(), AgentError> {
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
        for (name, def) in inv.list()? {
            let last_exit = inv.exits(&name, 1)?.into_iter().next();
            let mut vm = Vm::new(def);
            vm.last_exit = last_exit;
            vms.insert(name, vm);
        }
        let (migrations, interrupted) =
            Migrations::new(cfg.max_concurrent_migrations, inv.migrations()?);
        for rec in &interrupted {
            inv.save_migration(rec)?;
        }
        let (events, _) = broadcast::channel(4096);
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
        }))
    }

    /// Has `guard` check (and adjust) every incoming VM from now on (set once: a
    /// cluster node's).
    pub fn set_incoming_guard(&self, guard: Arc<dyn incoming::IncomingGuard>) {
        if self.incoming_guard.set(guard).is_err() {
            warn!("an incoming guard is set already; keeping the first");
        }
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

    // ---- paths ----

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join("vms").join(name)
    }

    /// The VM's own run directory: its VMM's API and migration sockets, and what
    /// vireod hands a jailed VMM at run time (the jail binds it; nothing else of the
    /// run directory is visible there).
    pub fn vm_run_dir(&self, name: &str) -> PathBuf {
        self.cfg.run_dir.join("vms").join(name)
    }

    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.vm_run_dir(name).join("api.sock")
    }

    /// Where vireod relays a jailed VMM's outgoing migration to a unix receiver.
    fn relay_socket_path(&self, name: &str) -> PathBuf {
        self.vm_run_dir(name).join("send.sock")
    }

    /// The jail of `name`'s next VMM (None with jailing off): its uid (given now if it
    /// has none yet), its root, its run directory and `binds`/`read_only` extras.
    fn jail_spec(
        &self,
        name: &str,
        binds: Vec<PathBuf>,
        read_only: Vec<PathBuf>,
    ) -> Result<Option<launcher::JailSpec>, AgentError> {
        let Some(ids) = self.cfg.jail_uids else {
            return Ok(None);
        };
        let uid = lock(&self.inv).jail_uid(name, ids.range())?;
        let mut all = vec![self.vm_run_dir(name)];
        all.extend(binds);
        Ok(Some(launcher::JailSpec {
            uid,
            root: self.cfg.run_dir.join("jail").join(name),
            netns: None,
            binds: all,
            read_only,
            new_pid_namespace: false,
        }))
    }

    /// The uid of `name`'s jail, when jailing is on and it has one.
    fn jail_uid(&self, name: &str) -> Option<u32> {
        self.cfg.jail_uids?;
        lock(&self.inv).jail_uid_of(name).ok().flatten()
    }

    pub fn serial_path(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("serial.log")
    }

    fn config_path(&self, name: &str) -> PathBuf {
        self.cfg.run_dir.join("vms").join(format!("{name}.json"))
    }

    /// Where an incoming migration's VMM listens by default.
    /// Where this vireod's VMMs may have unix migration sockets: its own `vms/` and
    /// its same-host peers' (`--peer-socket`).
    fn send_socket_dirs(&self) -> Vec<PathBuf> {
        std::iter::once(self.cfg.run_dir.join("vms"))
            .chain(crate::confinement::peer_socket_dirs(&self.cfg.peer_sockets))
            .collect()
    }

    fn migrate_socket_path(&self, name: &str) -> PathBuf {
        self.vm_run_dir(name).join("migrate.sock")
    }

    /// The launch of a VMM that boots the VM's runtime configuration.
    fn spec(&self, name: &str) -> LaunchSpec {
        let run = self.cfg.run_dir.join("vms");
        LaunchSpec {
            name: name.to_string(),
            vireo_bin: self.cfg.vireo_bin.clone(),
            args: VmmArgs::Boot {
                config: self.config_path(name),
            },
            socket: self.socket_path(name),
            log: self.vm_dir(name).join("vireo.log"),
            pid_file: run.join(format!("{name}.pid")),
            env_file: run.join(format!("{name}.env")),
            storage_roots: self.cfg.storage_roots.clone(),
            block_devices: self.cfg.block_devices.clone(),
            socket_dirs: self.send_socket_dirs(),
            memory: None,
            jail: None,
        }
    }

    /// The launch of a VMM that waits for the VM to arrive by live migration.
    fn receive_spec(&self, name: &str) -> LaunchSpec {
        LaunchSpec {
            args: VmmArgs::Receive {
                serial: self.serial_path(name),
            },
            ..self.spec(name)
        }
    }

    fn remove_run_files(&self, name: &str) {
        let s = self.spec(name);
        for p in [
            &s.socket,
            &s.pid_file,
            &self.config_path(name),
            &s.env_file,
            &self.migrate_socket_path(name),
            &self.relay_socket_path(name),
            // A VMM of the old layout's socket (see `legacy_spec`).
            &self.cfg.run_dir.join("vms").join(format!("{name}.sock")),
        ] {
            let _ = std::fs::remove_file(p);
        }
        // An older vireod copied the host identity here for a TLS migration.
        let _ = std::fs::remove_dir_all(self.vm_run_dir(name).join("tls"));
        let _ = std::fs::remove_dir(self.vm_run_dir(name));
    }

    /// A deleted VM's writable disks (and fencing records, and change-log directories
    /// with their files) go back to root (files 0600): its jail uid is free for the
    /// next VM. Call before the definition is removed from the inventory.
    fn give_back_files(&self, name: &str, def: &VmDefinition) {
        if self.jail_uid(name).is_none() {
            return;
        }
        for d in &def.config.disks {
            if !d.readonly {
                crate::jailing::give_back(&self.roots, &d.path);
            }
            if d.fencing_token.is_some() {
                crate::jailing::give_back(&self.roots, &vmm_fence_record(&d.path));
            }
            if let Some(log) = &d.replica_log {
                crate::jailing::give_back_log_dir(&self.roots, log);
            }
        }
    }

    // ---- events ----

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The storage roots, opened.
    pub fn roots(&self) -> &Arc<confine::Roots> {
        &self.roots
    }

    /// Stores (or with `None` removes) VM `name`'s replication settings.
    pub fn save_replication(&self, name: &str, settings: Option<&str>) -> Result<(), AgentError> {
        lock(&self.inv).save_replication(name, settings)
    }

    /// Every stored replication setting: (VM name, JSON).
    pub fn stored_replications(&self) -> Result<Vec<(String, String)>, AgentError> {
        lock(&self.inv).replications()
    }

    /// An event of a VM's replication (`replication-*`, see [`crate::replication`]).
    pub fn replication_event(&self, vm: &str, event: &str, detail: Option<String>) {
        self.emit(vm, event, detail);
    }

    fn emit(&self, vm: &str, event: &str, detail: Option<String>) {
        let e = Event {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            at_ms: now_ms(),
            vm: vm.to_string(),
            event: event.to_string(),
            detail,
        };
        info!(vm = %e.vm, event = %e.event, detail = e.detail.as_deref().unwrap_or(""), "event");
        let _ = self.events.send(e);
    }

    fn set_state(&self, name: &str, vm: &mut Vm, state: VmState, detail: Option<String>) {
        if vm.state != state {
            vm.state = state;
            self.emit(name, state.as_str(), detail);
        }
    }

    /// The events of `list` (VM `name`'s VMM, process `pid`) not seen before.
    pub fn new_vmm_events(
        &self,
        name: &str,
        pid: i32,
        list: Vec<crate::vmm_events::VmmEvent>,
    ) -> Vec<crate::vmm_events::VmmEvent> {
        let mut seen = lock(&self.vmm_events_seen);
        let last = match seen.get(name) {
            Some(&(p, s)) if p == pid => s,
            _ => 0,
        };
        let new: Vec<_> = list.into_iter().filter(|e| e.seq > last).collect();
        let top = new.iter().map(|e| e.seq).max().unwrap_or(last);
        seen.insert(name.to_string(), (pid, top));
        new
    }

    /// A disk stopped VM `name` (its VMM paused it): a `disk-stopped` event and, if
    /// vireod had it running, the state `Paused` with the reason.
    pub fn disk_stopped(&self, name: &str, e: &crate::vmm_events::VmmEvent) {
        warn!(vm = %name, disk = %e.disk, op = %e.op, errno = e.errno, error = %e.error, "a disk stopped the VM (on_error=stop): paused until resumed");
        self.emit(name, "disk-stopped", Some(e.detail()));
        if let Some(vm) = lock(&self.vms).get_mut(name) {
            if vm.state == VmState::Running {
                let reason = format!(
                    "disk {}: {} failed on the host: {} (errno {})",
                    e.disk, e.op, e.error, e.errno
                );
                self.set_state(name, vm, VmState::Paused, Some(reason));
            }
        }
    }

    /// Sets the state of `name` (if it is still defined).
    fn set_state_of(&self, name: &str, state: VmState, detail: Option<String>) {
        if let Some(vm) = lock(&self.vms).get_mut(name) {
            self.set_state(name, vm, state, detail);
        }
    }

    // ---- migration records ----

    pub fn migrations(&self) -> Vec<MigrationRecord> {
        self.migrations.list()
    }

    pub fn migration(&self, id: &str) -> Result<MigrationRecord, AgentError> {
        self.migrations.get(id)
    }

    /// Asks migration `id` to stop (a queued one, or an incoming one).
    pub fn cancel_migration(&self, id: &str) -> Result<MigrationRecord, AgentError> {
        self.migrations.cancel(id)?;
        self.migrations.get(id)
    }

    /// Migration `id` as peer host `peer` may see it: only an incoming one it sent
    /// (any other is unknown to it).
    pub fn peer_migration(&self, id: &str, peer: &str) -> Result<MigrationRecord, AgentError> {
        match self.migrations.get(id) {
            Ok(r)
                if r.direction == crate::model::MigrationDirection::Incoming
                    && r.peer_host.as_deref() == Some(peer) =>
            {
                Ok(r)
            }
            _ => Err(AgentError::UnknownMigration(id.to_string())),
        }
    }

    /// Cancels the incoming migration `id` that peer host `peer` sent.
    pub fn peer_cancel_migration(
        &self,
        id: &str,
        peer: &str,
    ) -> Result<MigrationRecord, AgentError> {
        self.peer_migration(id, peer)?;
        self.cancel_migration(id)
    }

    fn save_record(&self, rec: &MigrationRecord) {
        if let Err(e) = lock(&self.inv).save_migration(rec) {
            warn!(id = %rec.id, error = %error_chain(&e), "cannot store migration record");
        }
    }

    /// Changes a record and stores it (state changes; progress is only kept in memory).
    fn record(&self, id: &str, f: impl FnOnce(&mut MigrationRecord)) -> Option<MigrationRecord> {
        let rec = self.migrations.update(id, f)?;
        self.save_record(&rec);
        Some(rec)
    }

    /// Removes a VM that is no longer this host's (migrated away, or an incoming one
    /// that never arrived): definition, history, files. Its VMM must be gone.
    fn forget(&self, name: &str) {
        let mut vms = lock(&self.vms);
        // Its disks stay as they are: after a migration they are the destination's.
        if vms.remove(name).is_none() {
            return;
        }
        if let Err(e) = lock(&self.inv).delete(name) {
            warn!(vm = name, error = %error_chain(&e), "cannot remove the VM from the inventory");
        }
        drop(vms);
        self.remove_run_files(name);
        self.cfg.launcher.ended(&self.spec(name));
        let dir = self.vm_dir(name);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(vm = name, dir = %dir.display(), error = %e, "cannot remove VM directory");
            }
        }
        self.emit(name, "deleted", None);
    }

    // ---- queries ----

    fn status_of(&self, name: &str, vm: &Vm, with_definition: bool) -> VmStatus {
        VmStatus {
            name: name.to_string(),
            state: vm.state,
            priority: vm.def.priority,
            restart: vm.def.restart,
            pid: vm.handle.as_ref().map(|h| h.pid),
            socket: vm
                .handle
                .as_ref()
                .map(|_| self.socket_path(name).display().to_string()),
            adopted: vm.adopted,
            started_at_ms: vm.started_at_ms,
            restarts: vm.restarts,
            last_exit: vm.last_exit.clone(),
            migration: vm.migration.clone(),
            definition: with_definition.then(|| vm.def.clone()),
        }
    }

    pub fn list(&self) -> Vec<VmStatus> {
        let vms = lock(&self.vms);
        vms.iter()
            .map(|(n, vm)| self.status_of(n, vm, false))
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<VmStatus, AgentError> {
        let vms = lock(&self.vms);
        let vm = vms
            .get(name)
            .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
        Ok(self.status_of(name, vm, true))
    }

    /// Every definition (the inventory as JSON).
    pub fn export(&self) -> BTreeMap<String, VmDefinition> {
        let vms = lock(&self.vms);
        vms.iter()
            .map(|(n, vm)| (n.clone(), vm.def.clone()))
            .collect()
    }

    pub fn exits(&self, name: &str, limit: usize) -> Result<Vec<ExitRecord>, AgentError> {
        self.require(name)?;
        lock(&self.inv).exits(name, limit)
    }

    fn require(&self, name: &str) -> Result<(), AgentError> {
        if lock(&self.vms).contains_key(name) {
            Ok(())
        } else {
            Err(AgentError::UnknownVm(name.to_string()))
        }
    }

    /// The last `lines` lines of the guest's serial output.
    pub fn serial_tail(&self, name: &str, lines: usize) -> Result<Vec<String>, AgentError> {
        self.require(name)?;
        Ok(launcher::tail_complete_lines(
            &self.serial_path(name),
            lines,
        ))
    }

    /// Gives `bytes` to the guest's serial port, as fast as the guest reads them (the
    /// UART's receive FIFO holds 64); returns how many it took within 10 s.
    pub async fn serial_input(&self, name: &str, bytes: &[u8]) -> Result<usize, AgentError> {
        {
            let vms = lock(&self.vms);
            let vm = vms
                .get(name)
                .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
            if !matches!(
                vm.state,
                VmState::Running | VmState::Paused | VmState::Migrating
            ) {
                return Err(AgentError::WrongState {
                    name: name.to_string(),
                    state: vm.state.to_string(),
                    action: "send it serial input",
                });
            }
        }
        let sock = self.socket_path(name);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sent = 0;
        while sent < bytes.len() && Instant::now() < deadline {
            let r = client::request(
                &sock,
                "PUT",
                "/api/v1/vm.serial-input",
                Some(bytes[sent..].to_vec()),
                VMM_TIMEOUT,
            )
            .await
            .map_err(|e| AgentError::Vmm {
                name: name.to_string(),
                message: error_chain(&e),
            })?;
            if !r.ok() {
                return Err(AgentError::Vmm {
                    name: name.to_string(),
                    message: format!("vm.serial-input: {} {}", r.status, r.error_message()),
                });
            }
            let queued = r
                .json()
                .and_then(|v| v.get("queued").and_then(|q| q.as_u64()))
                .unwrap_or(0) as usize;
            sent += queued;
            if queued == 0 {
                // The FIFO is full: the guest has not read yet.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(sent)
    }

    pub fn host_info(&self) -> HostInfo {
        let (vms, running) = {
            let v = lock(&self.vms);
            (
                v.len(),
                v.values().filter(|vm| vm.state.has_process()).count(),
            )
        };
        HostInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            hostname: crate::procfs::hostname(),
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            state_dir: self.cfg.state_dir.display().to_string(),
            run_dir: self.cfg.run_dir.display().to_string(),
            vireo_bin: self.cfg.vireo_bin.display().to_string(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_total_bytes: crate::procfs::mem_total_bytes(),
            vms,
            vms_running: running,
            launcher: self.cfg.launcher.name().to_string(),
            cpu_cgroup: match &self.cfg.launcher {
                Launcher::Direct(d) => d.cgroups.root().map(|p| p.display().to_string()),
                Launcher::Systemd(_) => Some("vireo.slice".into()),
            },
            max_concurrent_migrations: self.migrations.limit(),
        }
    }

    /// (name, pid, start ticks, socket) of every VM whose VMM runs: what metering samples.
    pub fn running_processes(&self) -> Vec<(String, i32, u64, PathBuf)> {
        let vms = lock(&self.vms);
        vms.iter()
            .filter(|(_, vm)| {
                matches!(
                    vm.state,
                    VmState::Running | VmState::Paused | VmState::Migrating
                )
            })
            .filter_map(|(n, vm)| {
                vm.handle
                    .as_ref()
                    .map(|h| (n.clone(), h.pid, h.start_ticks, self.socket_path(n)))
            })
            .collect()
    }

    pub fn inventory(&self) -> MutexGuard<'_, Inventory> {
        lock(&self.inv)
    }

    // ---- definitions ----

    /// Checks every path `def` names against the storage roots and declares each
    /// disk's format (see [`crate::confinement`]).
    pub(crate) fn confine(&self, name: &str, def: &mut VmDefinition) -> Result<(), AgentError> {
        crate::confinement::confine_definition(&self.roots, &self.vm_dir(name), def)
    }

    pub fn define(&self, name: &str, mut def: VmDefinition) -> Result<VmStatus, AgentError> {
        validate_name(name)?;
        def.validate()?;
        self.confine(name, &mut def)?;
        let mut vms = lock(&self.vms);
        if vms.contains_key(name) {
            return Err(AgentError::Duplicate(name.to_string()));
        }
        lock(&self.inv).insert(name, &def, now_ms())?;
        let vm = Vm::new(def);
        let st = self.status_of(name, &vm, true);
        vms.insert(name.to_string(), vm);
        drop(vms);
        self.emit(name, "defined", None);
        Ok(st)
    }

    /// Replaces the definition of VM `name`, which must not be running (checked
    /// against the storage roots like a new one).
    pub fn redefine(&self, name: &str, mut def: VmDefinition) -> Result<VmStatus, AgentError> {
        def.validate()?;
        self.confine(name, &mut def)?;
        let mut vms = lock(&self.vms);
        let vm = vms
            .get_mut(name)
            .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
        if vm.state.has_process() {
            return Err(AgentError::WrongState {
                name: name.to_string(),
                state: vm.state.to_string(),
                action: "change its definition (stop it first)",
            });
        }
        lock(&self.inv).update(name, &def)?;
        vm.def = def;
        let st = self.status_of(name, vm, true);
        drop(vms);
        self.emit(name, "redefined", None);
        Ok(st)
    }

    pub fn delete(&self, name: &str) -> Result<(), AgentError> {
        let mut vms = lock(&self.vms);
        let vm = vms
            .get(name)
            .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
        if vm.state.has_process() {
            return Err(AgentError::WrongState {
                name: name.to_string(),
                state: vm.state.to_string(),
                action: "delete it (stop it first)",
            });
        }
        self.give_back_files(name, &vm.def);
        lock(&self.inv).delete(name)?;
        vms.remove(name);
        drop(vms);
        self.remove_run_files(name);
        let dir = self.vm_dir(name);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(vm = name, dir = %dir.display(), error = %e, "cannot remove VM directory");
            }
        }
        self.emit(name, "deleted", None);
        Ok(())
    }

    // ---- start ----

    /// Starts the VM and returns once its VMM reports it running (or failed).
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<VmStatus, AgentError> {
        self.start_as(name, StartKind::User).await
    }

    async fn start_as(
        self: &Arc<Self>,
        name: &str,
        kind: StartKind,
    ) -> Result<VmStatus, AgentError> {
        self.no_vmm_answers(name)?;
        self.not_failed_over_elsewhere(name)?;
        let (def, generation) = {
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
            vm.stop_requested = false;
            vm.adopted = false;
            vm.generation = self.generation.fetch_add(1, Ordering::Relaxed);
            let detail = match kind {
                StartKind::User => None,
                StartKind::Auto => Some(format!("automatic start, priority {:?}", vm.def.priority)),
                StartKind::Restart => Some(format!(
                    "restart {} of {}",
                    vm.restarts, vm.def.max_restarts
                )),
            };
            self.set_state(name, vm, VmState::Starting, detail);
            (vm.def.clone(), vm.generation)
        };
        match self.launch(name, &def, generation).await {
            Ok(()) => self.get(name),
            Err((err, exit)) => {
                let mut vms = lock(&self.vms);
                if let Some(vm) = vms.get_mut(name) {
                    if vm.generation == generation {
                        vm.handle = None;
                        if let Some(e) = exit {
                            vm.last_exit = Some(e);
                        }
                        self.set_state(name, vm, VmState::Stopped, Some(err.to_string()));
                    }
                }
                drop(vms);
                self.remove_run_files(name);
                Err(err)
            }
        }
    }

    /// Refuses a start while some VMM still answers on the VM's socket (one this
    /// vireod does not know of, e.g. left by another incarnation): a second VMM would
    /// truncate the running one's serial file and replace its socket and config, and
    /// the failed start would remove them.
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

    /// Writes the runtime config, spawns the VMM and waits until it reports the VM
    /// running; then hands the process to a watcher task.
    async fn launch(
        self: &Arc<Self>,
        name: &str,
        def: &VmDefinition,
        generation: u64,
    ) -> Result<(), (AgentError, Option<ExitRecord>)> {
        let mut spec = LaunchSpec {
            memory: Some(def.config.memory.size),
            ..self.spec(name)
        };
        mkdir(&self.vm_dir(name), 0o750).map_err(|e| (e, None))?;
        mkdir(&self.vm_run_dir(name), 0o700).map_err(|e| (e, None))?;
        spec.jail = self
            .jail_spec(name, Vec::new(), Vec::new())
            .map_err(|e| (e, None))?;
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
            let logs: Vec<&Path> = logs.iter().map(|(l, _)| *l).collect();
            let restarted =
                crate::replica_crash::prepare_logs(&self.roots, name, &logs).map_err(|e| {
                    (
                        AgentError::io("cannot mark the change logs", logs[0], e),
                        None,
                    )
                })?;
            if restarted {
                self.replication_event(
                    name,
                    "replication-resync-required",
                    Some(
                        "the host went down while the VM wrote: the change logs start again".into(),
                    ),
                );
            }
        }
        let mut cfg = def.config.clone();
        // vireod owns the serial port: it goes to a file it can show and tail.
        cfg.serial = OutputConfig::File(self.serial_path(name));
        let json = serde_json::to_vec_pretty(&cfg)
            .map_err(|e| (AgentError::BadDefinition(e.to_string()), None))?;
        let config = self.config_path(name);
        write_private(&config, &json).map_err(|e| {
            (
                AgentError::io("cannot write runtime config", &config, e),
                None,
            )
        })?;
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
    fn private_socket(&self, name: &str, socket: &Path) {
        if let Err(e) = make_private(socket) {
            warn!(vm = name, error = %error_chain(&e), "cannot make the VM's socket private");
        }
    }

    fn watch(self: &Arc<Self>, name: String, generation: u64, pid: i32, watch: Watch) {
        let me = self.clone();
        tokio::spawn(async move {
            let exit = watch.wait().await;
            me.on_exit(&name, generation, pid, exit);
        });
    }

    fn exit_record(&self, name: &str, pid: i32, exit: Exit, reason: &str) -> ExitRecord {
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

    /// A VMM ended: record it, then stop, mark crashed, or restart per the policy.
    /// After VM `name`'s VMM of `generation` ended: its replicated disks' writes made
    /// durable and their change logs' writer marks removed, unless a new VMM of the VM
    /// began meanwhile (see `replica_crash`). On a blocking thread.
    fn settle_replica_logs(self: &Arc<Self>, name: &str, def: &VmDefinition, generation: u64) {
        let logs: Vec<(PathBuf, PathBuf)> = replica_logs(def)
            .into_iter()
            .map(|(l, i)| (l.to_path_buf(), i.to_path_buf()))
            .collect();
        if logs.is_empty() {
            return;
        }
        let (me, name) = (self.clone(), name.to_string());
        tokio::task::spawn_blocking(move || {
            let settled = crate::replica_crash::sync_logs(&me.roots, &logs).and_then(|dirs| {
                let vms = lock(&me.vms);
                if vms.get(&name).is_some_and(|vm| vm.generation == generation) {
                    for d in &dirs {
                        crate::replica_crash::unmark_writer(std::os::fd::AsFd::as_fd(d))?;
                    }
                }
                Ok(())
            });
            if let Err(e) = settled {
                warn!(vm = %name, error = %e, "change logs not settled: a host crash before the next start resyncs the replica");
            }
        });
    }

    fn on_exit(self: &Arc<Self>, name: &str, generation: u64, pid: i32, exit: Exit) {
        let mut vms = lock(&self.vms);
        let Some(vm) = vms.get_mut(name) else {
            return;
        };
        if vm.generation != generation {
            return;
        }
        self.settle_replica_logs(name, &vm.def, generation);
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
            "requested"
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
        let state = if vm.stop_requested || reason == "power-off" {
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

    // ---- stop, kill, pause, resume ----

    /// Asks the VMM to shut the VM down; kills it after `timeout`. Returns once the
    /// process is gone.
    pub async fn stop(
        self: &Arc<Self>,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<VmStatus, AgentError> {
        let handle = self.begin_stop(name, "stop it")?;
        crate::metering::sample_one(self, name).await;
        let sock = self.socket_path(name);
        let timeout = timeout.unwrap_or(self.cfg.stop_timeout);
        // The VMM answers once its vCPUs have stopped: let them run at the VMMs' share
        // meanwhile (they are gone with the process).
        self.cfg.launcher.boost(&self.spec(name), handle.pid);
        let asked = client::request(
            &sock,
            "PUT",
            "/api/v1/vm.shutdown",
            None,
            timeout.max(VMM_TIMEOUT),
        )
        .await;
        // A VMM that refuses (or cannot be reached) is killed at once.
        let asked = matches!(&asked, Ok(r) if r.ok());
        let gone = asked && self.wait_gone(name, &handle, timeout).await;
        if !gone {
            warn!(vm = name, "VMM did not stop in time; killing it");
            let _ = handle.signal(libc::SIGKILL);
            self.wait_gone(name, &handle, Duration::from_secs(10)).await;
        }
        self.get(name)
    }

    /// SIGKILL to the VMM; returns once it is gone.
    pub async fn kill(self: &Arc<Self>, name: &str) -> Result<VmStatus, AgentError> {
        let handle = self.begin_stop(name, "kill it")?;
        // A killed VM that was migrating stays here (the migration fails before its
        // commit); one that was arriving is discarded by its migration.
        handle
            .signal(libc::SIGKILL)
            .map_err(|e| AgentError::io("cannot kill VMM", &self.cfg.vireo_bin, e))?;
        self.wait_gone(name, &handle, Duration::from_secs(10)).await;
        self.get(name)
    }

    fn begin_stop(&self, name: &str, action: &'static str) -> Result<Handle, AgentError> {
        let mut vms = lock(&self.vms);
        let vm = vms
            .get_mut(name)
            .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
        // A migrating VM cannot be shut down (a clean exit would look like the hand-over),
        // only killed.
        let killable =
            action == "kill it" && matches!(vm.state, VmState::Migrating | VmState::Incoming);
        let handle = match (&vm.handle, vm.state) {
            (
                Some(h),
                VmState::Running | VmState::Paused | VmState::Starting | VmState::Stopping,
            ) => h.clone(),
            (Some(h), _) if killable => h.clone(),
            _ => {
                return Err(AgentError::WrongState {
                    name: name.to_string(),
                    state: vm.state.to_string(),
                    action,
                })
            }
        };
        vm.stop_requested = true;
        if !killable {
            self.set_state(name, vm, VmState::Stopping, None);
        }
        Ok(handle)
    }

    /// Waits until the watcher has seen the process end (true) or `timeout` (false).
    async fn wait_gone(&self, name: &str, handle: &Handle, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let still = {
                let vms = lock(&self.vms);
                vms.get(name)
                    .and_then(|vm| vm.handle.as_ref())
                    .is_some_and(|h| h.pid == handle.pid && h.start_ticks == handle.start_ticks)
            };
            if !still {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn pause(&self, name: &str) -> Result<VmStatus, AgentError> {
        self.vmm_transition(
            name,
            VmState::Running,
            VmState::Paused,
            "vm.pause",
            "pause it",
        )
        .await
    }

    pub async fn resume(&self, name: &str) -> Result<VmStatus, AgentError> {
        self.vmm_transition(
            name,
            VmState::Paused,
            VmState::Running,
            "vm.resume",
            "resume it",
        )
        .await
    }

    async fn vmm_transition(
        &self,
        name: &str,
        from: VmState,
        to: VmState,
        route: &str,
        action: &'static str,
    ) -> Result<VmStatus, AgentError> {
        {
            let vms = lock(&self.vms);
            let vm = vms
                .get(name)
                .ok_or_else(|| AgentError::UnknownVm(name.to_string()))?;
            if vm.state != from {
                return Err(AgentError::WrongState {
                    name: name.to_string(),
                    state: vm.state.to_string(),
                    action,
                });
            }
        }
        let sock = self.socket_path(name);
        // A pause waits for every vCPU to leave the guest: they get the VMMs' share
        // for that moment, then go back to the VM's own (parked, they use none).
        let pid = lock(&self.vms)
            .get(name)
            .and_then(|vm| vm.handle.as_ref().map(|h| h.pid));
        let boost = (to == VmState::Paused).then_some(pid).flatten();
        if let Some(pid) = boost {
            self.cfg.launcher.boost(&self.spec(name), pid);
        }
        let r = client::request(
            &sock,
            "PUT",
            &format!("/api/v1/{route}"),
            None,
            TRANSITION_TIMEOUT,
        )
        .await;
        if let Some(pid) = boost {
            self.cfg.launcher.unboost(&self.spec(name), pid);
        }
        let r = r.map_err(|e| AgentError::Vmm {
            name: name.to_string(),
            message: error_chain(&e),
        })?;
        if !r.ok() {
            return Err(AgentError::Vmm {
                name: name.to_string(),
                message: format!("{route}: {} {}", r.status, r.error_message()),
            });
        }
        let mut vms = lock(&self.vms);
        if let Some(vm) = vms.get_mut(name) {
            if vm.state == from {
                self.set_state(name, vm, to, None);
            }
        }
        drop(vms);
        self.get(name)
    }

    // ---- agent start and stop ----

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

    /// Starts every VM whose priority is not Off and that is not running: all High
    /// ones first, then Medium, then Low; at most `max_concurrent_starts` at a time.
    pub async fn autostart(self: &Arc<Self>) {
        let sem = Arc::new(Semaphore::new(self.cfg.max_concurrent_starts.max(1)));
        for prio in [Priority::High, Priority::Medium, Priority::Low] {
            let names: Vec<String> = lock(&self.vms)
                .iter()
                .filter(|(_, vm)| vm.def.priority == prio && !vm.state.has_process())
                .map(|(n, _)| n.clone())
                .collect();
            let mut tasks = tokio::task::JoinSet::new();
            for name in names {
                let me = self.clone();
                let sem = sem.clone();
                tasks.spawn(async move {
                    let Ok(_permit) = sem.acquire().await else {
                        return;
                    };
                    if let Err(e) = me.start_as(&name, StartKind::Auto).await {
                        warn!(vm = %name, error = %error_chain(&e), "automatic start failed");
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        }
    }

    /// Host shutdown: stops every running VM, lowest priority first (Off, Low,
    /// Medium, High), each group within the stop timeout.
    pub async fn shutdown_all(self: &Arc<Self>) {
        for prio in Priority::ALL.iter().rev() {
            let names: Vec<String> = lock(&self.vms)
                .iter()
                .filter(|(_, vm)| vm.def.priority == *prio && vm.handle.is_some())
                .map(|(n, _)| n.clone())
                .collect();
            let mut tasks = tokio::task::JoinSet::new();
            for name in names {
                let me = self.clone();
                tasks.spawn(async move {
                    if let Err(e) = me.stop(&name, None).await {
                        warn!(vm = %name, error = %error_chain(&e), "stop at shutdown failed");
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        }
    }
}

/// A VM's writable replicated disks: (change-log directory, image).
fn replica_logs(def: &VmDefinition) -> Vec<(&Path, &Path)> {
    def.config
        .disks
        .iter()
        .filter(|d| !d.readonly)
        .filter_map(|d| d.replica_log.as_deref().map(|l| (l, d.path.as_path())))
        .collect()
}

fn describe_exit(e: Exit) -> String {
    match (e.status, e.signal) {
        (Some(s), _) => format!("exit status {s}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "exit status unknown (not vireod's child)".into(),
    }
}
