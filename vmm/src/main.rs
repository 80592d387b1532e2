//! `vireo`: one VMM process per VM.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use api::config;
use api::VmConfig;
use vmm::jail::JailPath;
use vmm::landlock::{ControlDomain, Use};
use vmm::notify;
use vmm::seccomp::{Filters, SeccompMode, ThreadKind};
use vmm::vmm::{error_chain, Vmm};

/// Run one virtual machine on KVM.
#[derive(Parser, Debug)]
#[command(name = "vireo", version, about)]
struct Cli {
    /// The VM: --kernel, --cpus, --memory, --disk, --net, ... (the same flags as
    /// `vireoctl vm create`).
    #[command(flatten)]
    vm: config::VmFlags,
    /// The VM as a JSON file (the same schema as `vm.create`); the VM flags given
    /// beside it override the file's values (`--disk`, `--net` and `--numa` its
    /// whole list).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Restore a snapshot: DIR or source_url=file:///DIR[,resume=on]. The VM comes up
    /// paused (resume with `vm.resume`) unless resume=on.
    #[arg(long, conflicts_with_all = ["kernel", "cmdline", "initramfs", "disk", "net", "config"])]
    restore: Option<String>,
    /// Serve the REST API on this unix socket.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Confine this VMM before it opens anything (run as root):
    /// uid=U,gid=G,root=DIR[,netns=PATH][,bind=PATH]...[,bind_ro=PATH]...[,cgroup=NAME][,memory_max=BYTES]
    /// [,pids_max=N][,nofile=N][,nproc=N][,pidns=new]. Own uid/gid, new mount/IPC/UTS
    /// (and with pidns=new PID) namespaces
    /// rooted in DIR where only the paths this VM names (and bind= extras, e.g. a
    /// snapshot directory; bind_ro= read-only ones) exist at their usual paths, no capabilities, no_new_privs,
    /// rlimits, cgroup v1 memory/pids limits. Files it writes (writable disks, serial
    /// and console files, the API socket's directory, bind= paths) are chowned to U:G.
    #[arg(long)]
    jail: Option<vmm::jail::JailConfig>,
    /// A storage root (repeatable). With one, every path this VMM is given (disks,
    /// kernel, initramfs, VHDX parents, snapshot destinations and sources,
    /// vm.migrate-disk destinations, vm.receive-migration storage_dir, unix migration
    /// sockets) must resolve beneath a root: no symlinks, no '..', checked on the opened
    /// file. Without one, paths are taken as given (a user who runs vireo directly can
    /// open those files anyway). vireod always passes its roots.
    #[arg(long, value_name = "DIR")]
    storage_root: Vec<PathBuf>,
    /// A block device that may be a disk under --storage-root (repeatable).
    #[arg(long, value_name = "PATH")]
    allow_block_device: Vec<PathBuf>,
    /// A directory where unix migration sockets may be, besides the storage roots
    /// (repeatable; with --storage-root).
    #[arg(long, value_name = "DIR")]
    socket_dir: Vec<PathBuf>,
    /// Seccomp filtering of every thread: true, false (debugging) or log.
    #[arg(long, default_value = "true")]
    seccomp: vmm::seccomp::SeccompMode,
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot read config file {path}: {source}")]
    ReadConfig {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    ParseConfig { path: String, reason: String },
    #[error("{} describe a new VM: give --kernel or --config with them (a restored or arriving VM keeps its own configuration; only --serial applies to it)", .0.join(", "))]
    FlagsWithoutVm(Vec<&'static str>),
    #[error("nothing to run: give --kernel (or --config, --restore), or --api-socket to wait for vm.create")]
    NothingToRun,
    #[error("--restore: {0}")]
    Restore(String),
    #[error("--storage-root: {0}")]
    Roots(#[from] confine::ConfineError),
}

fn vm_config(cli: &Cli) -> Result<Option<VmConfig>, CliError> {
    if let Some(path) = &cli.config {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CliError::ReadConfig {
            path: p.clone(),
            source,
        })?;
        let mut cfg: VmConfig = api::json::from_slice(text.as_bytes())
            .map_err(|reason| CliError::ParseConfig { path: p, reason })?;
        cli.vm.apply(&mut cfg)?;
        cfg.validate()?;
        return Ok(Some(cfg));
    }
    if cli.vm.kernel.is_none() {
        let given = cli.vm.new_vm_flags();
        if !given.is_empty() {
            return Err(CliError::FlagsWithoutVm(given));
        }
    }
    Ok(cli.vm.config("tty")?)
}

/// `--restore DIR` or `--restore source_url=file:///DIR[,resume=on]`: (dir, resume).
fn parse_restore(s: &str) -> Result<(PathBuf, bool), CliError> {
    if !s.contains('=') {
        return Ok((PathBuf::from(s), false));
    }
    let (mut dir, mut resume) = (None, false);
    for item in s.split(',') {
        match item.split_once('=') {
            Some(("source_url", url)) => {
                dir = Some(api::file_url_path(url).map_err(CliError::Restore)?)
            }
            Some(("resume", v)) => {
                resume = match v {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => return Err(CliError::Restore(format!("resume={v}: expected on or off"))),
                }
            }
            _ => return Err(CliError::Restore(format!("unknown option '{item}'"))),
        }
    }
    dir.map(|d| (d, resume))
        .ok_or_else(|| CliError::Restore("missing source_url=file:///DIR".into()))
}

/// The parents of a differencing VHDX, found as the VMM will find them (beneath the
/// storage roots when there are any), to be bound read-only into the jail. An image
/// that does not open is left to the VMM to report.
fn vhdx_parents(disk: &config::DiskConfig, roots: Option<&Arc<confine::Roots>>) -> Vec<PathBuf> {
    let is_vhdx = match disk.format {
        Some(f) => f == config::DiskFormat::Vhdx,
        None => disk.path.extension().is_some_and(|e| e == "vhdx"),
    };
    if !is_vhdx {
        return Vec::new();
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (record, roots) = (seen.clone(), roots.cloned());
    let opener = vhdx::ParentOpener(Arc::new(move |_child, candidate| {
        let opened = match &roots {
            Some(r) => r.open_file(candidate, false).map_err(|e| e.to_string()),
            None => std::fs::File::open(candidate).map_err(|e| e.to_string()),
        };
        match opened {
            Ok(f) => {
                if let Ok(mut s) = record.lock() {
                    s.push(candidate.to_path_buf());
                }
                Ok(Some(f))
            }
            Err(_) => Ok(None),
        }
    }));
    let opts = vhdx::OpenOptions {
        read_only: true,
        no_lock: true,
        parent_opener: Some(opener),
        ..Default::default()
    };
    let _ = vhdx::Vhdx::open(&disk.path, opts);
    let found = seen.lock().map(|s| s.clone()).unwrap_or_default();
    found
}

/// Makes a disk's missing change log directory (0700) for the jail to bind: beneath its
/// storage root when there is one (no symlink on the way), else only the last component
/// (`mkdir` never follows a link there; the jail then refuses a final symlink). A
/// directory that cannot be made is left to the jail to report when it opens it.
fn create_log_dir(log: &std::path::Path, roots: Option<&confine::Roots>) {
    let made = match roots.filter(|r| r.contains(log)) {
        Some(r) => r
            .create_dir_private(log)
            .map(drop)
            .map_err(|e| e.to_string()),
        None => std::fs::DirBuilder::new()
            .mode(confine::PRIVATE_DIR_MODE)
            .create(log)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(|e| e.to_string()),
    };
    if let Err(e) = made {
        tracing::warn!(log = %log.display(), error = %e, "cannot make the change log directory");
    }
}

/// What a jailed VMM needs to see: every path the VM names, at its usual path.
fn jail_paths(
    cli: &Cli,
    cfg: Option<&VmConfig>,
    restore: Option<&std::path::Path>,
    jail: &vmm::jail::JailConfig,
) -> Vec<JailPath> {
    let mut paths = Vec::new();
    let output = |o: &config::OutputConfig, paths: &mut Vec<JailPath>| {
        if let config::OutputConfig::File(f) = o {
            paths.push(JailPath::writable(f));
            // A size-capped output file rotates into PATH.1, opened at start too.
            paths.push(JailPath::writable(devices::output::rotated_path(f)));
        }
    };
    if let Some(cfg) = cfg {
        paths.push(JailPath::read_only(&cfg.payload.kernel));
        if let Some(rd) = &cfg.payload.initramfs {
            paths.push(JailPath::read_only(rd));
        }
        // Checked against the roots as the VMM will (opened here, outside the jail,
        // only to find the chain; dropped before the jail).
        let roots = (!cli.storage_root.is_empty())
            .then(|| confine::Roots::new(&cli.storage_root, &cli.allow_block_device).ok())
            .flatten()
            .map(Arc::new);
        for d in &cfg.disks {
            paths.push(JailPath {
                path: d.path.clone(),
                writable: !d.readonly,
                socket: false,
            });
            paths.extend(
                vhdx_parents(d, roots.as_ref())
                    .into_iter()
                    .map(JailPath::read_only),
            );
            // A clustered disk's fencing record beside it is read and rewritten in
            // place (made empty here if missing: an empty record holds no token).
            if d.fencing_token.is_some() {
                paths.push(JailPath::writable(vmm::fencing::record_path(&d.path)));
            }
            // A replicated disk's change log directory is written too (made here if
            // missing: the jail would otherwise make an empty file at its path).
            if let Some(log) = d.replica_log.as_ref().filter(|_| !d.readonly) {
                create_log_dir(log, roots.as_deref());
                paths.push(JailPath::writable(log));
            }
        }
        // A vfio-user server's socket: bound alone (not its directory), at its path,
        // and given to the jail's uid so that the VMM may connect to it. Beneath a
        // storage root it is opened as the disks are (no symlinks); inside the jail
        // the device manager checks it against the roots and `--socket-dir` as it
        // does a vhost-user socket.
        paths.extend(cfg.user_devices.iter().map(|u| JailPath::socket(&u.socket)));
        output(&cfg.serial, &mut paths);
        output(&cfg.console, &mut paths);
    } else if let Some(s) = cli.vm.serial.as_deref() {
        if let Ok(o) = config::parse_output("--serial", s) {
            output(&o, &mut paths);
        }
    }
    if let Some(dir) = restore {
        paths.push(JailPath::read_only(dir));
        // The snapshot's VM names its own disks (and outputs, unless --serial
        // overrides); an unreadable configuration is left to the restore to report.
        let saved = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<VmConfig>(&t).ok());
        if let Some(saved) = saved {
            for d in &saved.disks {
                paths.push(JailPath {
                    path: d.path.clone(),
                    writable: !d.readonly,
                    socket: false,
                });
                // A clustered disk's fencing record, as for a boot (a VM saved on one
                // cluster node resumes on another under its new token).
                if d.fencing_token.is_some() {
                    paths.push(JailPath::writable(vmm::fencing::record_path(&d.path)));
                }
            }
            if cli.vm.serial.is_none() {
                output(&saved.serial, &mut paths);
            }
            output(&saved.console, &mut paths);
        }
    }
    if let Some(dir) = cli.api_socket.as_deref().and_then(|s| s.parent()) {
        paths.push(JailPath::writable(dir));
    }
    paths.extend(jail.binds.iter().map(JailPath::writable));
    // Read-only extras that do not exist are left to the VMM to report when it opens
    // them (a receiving VMM's disks come with the VM).
    paths.extend(
        jail.read_only
            .iter()
            .filter(|p| p.exists())
            .map(JailPath::read_only),
    );
    paths
}

/// What the control thread may reach after start besides its storage roots (see
/// vmm::landlock): its output files' directories, the change-log directories of its
/// replicated disks, the socket directories and the jail's extra binds.
fn control_domain(cli: &Cli, cfg: Option<&VmConfig>) -> ControlDomain {
    let mut domain = ControlDomain::new();
    let mut output = |o: &config::OutputConfig| {
        if let config::OutputConfig::File(f) = o {
            domain.allow_output_file(f);
        }
    };
    if let Some(Ok(o)) = cli
        .vm
        .serial
        .as_deref()
        .map(|s| config::parse_output("--serial", s))
    {
        output(&o);
    }
    if let Some(cfg) = cfg {
        output(&cfg.serial);
        output(&cfg.console);
        for log in cfg.disks.iter().filter_map(|d| d.replica_log.as_ref()) {
            domain.allow(log, Use::Storage);
        }
    }
    for dir in &cli.socket_dir {
        domain.allow(dir, Use::Sockets);
    }
    if let Some(jail) = &cli.jail {
        for bind in &jail.binds {
            domain.allow(bind, Use::Storage);
        }
    }
    domain
}

/// Opens the storage roots (`--storage-root`); a jailed VMM does it inside its jail.
fn set_storage_roots(cli: &Cli, roots: &[PathBuf]) -> Result<(), CliError> {
    let roots = confine::Roots::new(roots, &cli.allow_block_device).map_err(CliError::Roots)?;
    vmm::confinement::set_roots(roots);
    vmm::confinement::set_socket_dirs(cli.socket_dir.clone());
    Ok(())
}

/// The storage roots as seen inside the jail: a root's directory descriptor opened
/// before `pivot_root` would still reach the host's directory (every file of it the
/// jail's uid may read), so the roots are opened after it, where only the VM's own
/// files exist. A root nothing of the VM is under does not exist there and is left
/// out; if none is left, the jail's root (which holds only the VM's files) is the one.
fn roots_inside_the_jail(given: &[PathBuf]) -> Vec<PathBuf> {
    let inside: Vec<PathBuf> = given.iter().filter(|r| r.is_dir()).cloned().collect();
    if inside.is_empty() {
        vec![PathBuf::from("/")]
    } else {
        inside
    }
}

fn run(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if !cli.storage_root.is_empty() && cli.jail.is_none() {
        set_storage_roots(&cli, &cli.storage_root)?;
    }
    let cfg = vm_config(&cli)?;
    let restore = cli.restore.as_deref().map(parse_restore).transpose()?;
    if cfg.is_none() && restore.is_none() && cli.api_socket.is_none() {
        return Err(Box::new(CliError::NothingToRun));
    }
    if let Some(jail) = &cli.jail {
        // First, while this process is single-threaded and has opened nothing: its own
        // PID namespace if it asks for one (the parent stays outside; see pidns).
        if jail.new_pid_namespace {
            vmm::pidns::enter()?;
        }
        let paths = jail_paths(
            &cli,
            cfg.as_ref(),
            restore.as_ref().map(|r| r.0.as_path()),
            jail,
        );
        let mut devices = vec!["/dev/kvm", "/dev/urandom"];
        if cfg.as_ref().is_some_and(|c| !c.nets.is_empty()) {
            devices.push("/dev/net/tun");
        }
        // systemd's notify socket is not in the jail: connect to it first.
        notify::connect_early();
        // The paths beneath the storage roots are bound and chowned through descriptors
        // opened beneath them (no symlinks); the jail closes those roots before it
        // pivots, and the VMM opens its own inside.
        vmm::jail::enter(
            jail,
            &paths,
            &devices,
            &cli.storage_root,
            &cli.allow_block_device,
        )?;
        if !cli.storage_root.is_empty() {
            set_storage_roots(&cli, &roots_inside_the_jail(&cli.storage_root))?;
        }
    }
    let filters = Filters::new(cli.seccomp)?;
    if cli.seccomp != SeccompMode::Off {
        vmm::seccomp::install_violation_handler();
    }
    let worker_filters = filters.clone();
    devices::threads::set_start_hook(Box::new(move |kind| {
        worker_filters.apply_or_exit(match kind {
            devices::threads::WorkerKind::Block => ThreadKind::BlockWorker,
            devices::threads::WorkerKind::Rng => ThreadKind::RngWorker,
            devices::threads::WorkerKind::Console => ThreadKind::ConsoleWorker,
            devices::threads::WorkerKind::Net => ThreadKind::NetWorker,
            devices::threads::WorkerKind::VhostUserLink => ThreadKind::VhostUserLink,
            devices::threads::WorkerKind::UserDeviceIrq => ThreadKind::UserDeviceIrq,
            devices::threads::WorkerKind::Balloon => ThreadKind::BalloonWorker,
            devices::threads::WorkerKind::Mem => ThreadKind::MemWorker,
        })
    }));
    vmm::activator::start(filters.clone())?;
    let mut vmm = Vmm::new(filters.clone());
    // WATCHDOG=1 from the control loop when systemd asks for it (WatchdogSec=).
    vmm.set_watchdog(vmm::watchdog::Watchdog::from_env());
    let server = match &cli.api_socket {
        Some(path) => {
            let f = filters.clone();
            let on_start = Box::new(move || f.apply_or_exit(ThreadKind::Api));
            Some(api::serve(path, vmm.api_dispatch(), on_start)?)
        }
        None => None,
    };
    let cfg_is_none = cfg.is_none();
    let domain = control_domain(&cli, cfg.as_ref());
    // The file thread, in the same domain under its own filter: from here on the only
    // thread that opens, creates or removes files (the control thread's filter has no
    // openat, mkdir or unlink).
    vmm::file_broker::start(filters.clone(), domain.clone())?;
    // The control thread is confined before any guest code runs: a guest that starts
    // its devices at once meets a control thread under its filter and domain (this
    // thread builds and boots VMs under them anyway: vm.create, a reboot). It keeps
    // the domain for the unix sockets it binds.
    vmm::landlock::confine_control_thread(domain)?;
    filters.apply(ThreadKind::Control)?;
    #[cfg(feature = "test-hooks")]
    {
        vmm::test_hooks::probe_open();
        vmm::test_hooks::probe_syscall("control");
    }
    if let Some(cfg) = cfg {
        vmm.create(cfg)?;
        vmm.boot()?;
        notify::notify("READY=1");
    }
    // A VM that arrives (restore, incoming migration) writes its serial output where
    // this process's --serial says, if it says.
    if cfg_is_none {
        vmm.set_serial_override(
            cli.vm
                .serial
                .as_deref()
                .map(|s| config::parse_output("--serial", s))
                .transpose()?,
        );
    }
    if let Some((dir, resume)) = restore {
        vmm.restore(&dir)?;
        if resume {
            vmm.resume()?;
        }
    }
    if cfg_is_none {
        // Ready for what comes next: the restored VM is in place, or the API waits
        // for vm.create / vm.restore / vm.receive-migration (a systemd unit that
        // receives a migration is "started" once it can listen).
        notify::notify("READY=1");
    }
    let exit = vmm.run();
    if let Some(server) = server {
        // Removes the API socket (on the file thread).
        server.shutdown();
    }
    match &exit {
        vmm::control::VmmExit::Crashed(why) => eprintln!("vireo: error: {why}"),
        vmm::control::VmmExit::GuestFailure(code) => {
            eprintln!("vireo: guest reported failure (debug-exit code {code:#x})")
        }
        vmm::control::VmmExit::PowerOff => {}
        vmm::control::VmmExit::Migrated => {
            tracing::info!("the VM runs at its migration destination");
            // The final figures, for whoever launched this VMM: it exits before a poll of
            // vm.migration-info would see them (vireod reads this line from the log).
            match serde_json::to_string(&vmm.migration_info()) {
                Ok(json) => eprintln!("{}{json}", api::MIGRATION_RESULT_PREFIX),
                Err(e) => tracing::warn!(error = %e, "cannot encode the migration result"),
            }
        }
    }
    Ok(ExitCode::from(exit.status() as u8))
}

fn main() -> ExitCode {
    // Whatever this process creates (snapshots, images, sockets) is its own.
    confine::set_private_umask();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    vmm::panic::install_abort_hook();
    // Cloned into its own PID namespace by vireod (a jailed VMM): signals that would end
    // it must be caught to end it at all.
    vmm::jail::end_on_fatal_signals_as_init();
    vmm::seccomp::keep_malloc_off_the_filesystem();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vireo: error: {}", error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
