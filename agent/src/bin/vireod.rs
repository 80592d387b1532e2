//! `vireod`: the host agent. Owns the host's VMs (definitions, `vireo` processes,
//! sockets, metering) and serves its REST API on a unix socket.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agent::authz::{self, Group, Policy};
use agent::supervisor::{Config, Supervisor};
use agent::{error_chain, metering, server};
use clap::Parser;
use tracing::{info, warn};

/// The Vireo host agent.
#[derive(Parser, Debug)]
#[command(name = "vireod", version, about)]
struct Cli {
    /// Inventory database and per-VM logs.
    #[arg(long, default_value = "/var/lib/vireo")]
    state_dir: PathBuf,
    /// vireod's socket, the VMs' run directories (vms/NAME/: API socket), runtime
    /// configs and pid files (vms/NAME.json, vms/NAME.pid), jail roots (jail/NAME).
    #[arg(long, default_value = "/run/vireo")]
    run_dir: PathBuf,
    /// vireod's API socket (default: <run-dir>/vireod.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The VMM binary (default: `vireo` next to vireod, else from PATH).
    #[arg(long)]
    vireo_bin: Option<PathBuf>,
    /// A virtual switch on this host that VMs' adapters may name
    /// (`{"switch":"NAME","vlan":10}`): NAME[,uplink=IF[,trunk=V:V..][,native=V]].
    /// vireod runs `vireo-switch` for it, restarts it when it ends and adds its running
    /// VMs' ports again (docs/switch.md, "With vireod"). Repeatable.
    #[arg(long = "switch", value_name = "NAME[,uplink=IF]")]
    switches: Vec<agent::switches::SwitchSpec>,
    /// The `vireo-switch` binary (default: beside vireod, else on PATH).
    #[arg(long)]
    switch_bin: Option<PathBuf>,
    /// At most this many VMs start at once during automatic start.
    #[arg(long, default_value_t = 4)]
    max_concurrent_starts: usize,
    /// Seconds a VMM may take to report its VM running.
    #[arg(long, default_value_t = 30)]
    start_timeout_s: u64,
    /// Seconds a VM may take to stop before it is killed.
    #[arg(long, default_value_t = 30)]
    stop_timeout_s: u64,
    /// Metering sample period in milliseconds.
    #[arg(long, default_value_t = 1000)]
    meter_interval_ms: u64,
    /// Dynamic Memory: bytes all Dynamic Memory VMs together may have (e.g. 8G).
    /// Default: the host's available memory plus what they have, less --memory-reserve.
    #[arg(long, value_name = "SIZE", value_parser = size_flag)]
    memory_budget: Option<u64>,
    /// Dynamic Memory: memory the host keeps for itself when the budget is derived.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = size_flag)]
    memory_reserve: u64,
    /// Dynamic Memory: milliseconds between the balancer's rounds.
    #[arg(long, default_value_t = 1000)]
    balance_interval_ms: u64,
    /// Do not start VMs automatically (their priority is ignored).
    #[arg(long)]
    no_autostart: bool,
    /// A clustered node asked to stop first live-migrates its clustered VMs to other
    /// nodes for at most this many seconds (drain on shutdown), then stops what
    /// stayed; 0: stop them at once (they restart elsewhere). Back, the node resumes
    /// by itself and the VMs fail back.
    #[arg(long, default_value_t = 120)]
    shutdown_drain_timeout_s: u64,
    /// On SIGTERM leave the VMs running (for a restart or an upgrade of vireod);
    /// without it they are shut down, lowest priority first.
    #[arg(long)]
    keep_vms_on_exit: bool,
    /// Group (name or number) whose members are operators: they may do everything
    /// (root always may). Repeatable.
    #[arg(long)]
    operators_group: Vec<String>,
    /// Group (name or number) whose members are viewers: they may list, read info,
    /// metrics, events and console output, and change nothing. Repeatable.
    #[arg(long)]
    viewers_group: Vec<String>,
    /// Deprecated: the same as --operators-group (its members may do everything, as
    /// before). The VMs' sockets are no longer shared with it.
    #[arg(long)]
    socket_group: Option<String>,
    /// A directory whose files definitions may name as kernels, initramfs, disks and
    /// VHDX parents, and where copied disks may be stored (repeatable; default
    /// <state-dir>/images). Paths must resolve beneath a root without symlinks or '..';
    /// the VMMs get the same roots.
    #[arg(long, value_name = "DIR")]
    storage_root: Vec<PathBuf>,
    /// A block device definitions may name as a disk (repeatable; none by default).
    #[arg(long, value_name = "PATH")]
    allow_block_device: Vec<PathBuf>,
    /// Worker threads of the runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// At most this many outgoing live migrations run at once; the rest wait in order.
    #[arg(long, default_value_t = 2)]
    max_concurrent_migrations: usize,
    /// Seconds a receiving VMM waits for its source's first pages before the incoming
    /// migration is given up.
    #[arg(long, default_value_t = 300)]
    incoming_timeout_s: u64,
    /// How VMMs are started: auto (systemd units when systemd is PID 1, else direct),
    /// direct (vireod forks them), or systemd (`systemctl start vireo@NAME.service`).
    #[arg(long, default_value = "auto")]
    launcher: agent::launcher::LauncherKind,
    /// The systemctl of the systemd launcher.
    #[arg(long, default_value = "systemctl")]
    systemctl: PathBuf,
    /// Which cgroup hierarchy VMMs are placed in (direct launcher): auto (v2 when
    /// /sys/fs/cgroup is cgroup2, else v1), v1 or v2.
    #[arg(long, default_value = "auto")]
    cgroup_version: agent::cgroup::Version,
    /// cgroup v2: the delegated subtree VMMs are placed under (vireod moves itself to
    /// <root>/vireod, each VMM gets <root>/vms/NAME). Default: vireod's own cgroup
    /// (/sys/fs/cgroup/vireo when vireod runs in the root cgroup).
    #[arg(long, value_name = "DIR")]
    cgroup_root: Option<PathBuf>,
    /// cgroup v2: pids.max of each VM's cgroup (every thread of its VMM counts).
    #[arg(long, default_value_t = 1024)]
    vm_pids_max: u64,
    /// The cgroup v1 cpu directory under which VMMs are placed (direct launcher):
    /// <root>/boot while they boot, <root>/vms/NAME once their VM runs.
    #[arg(long, default_value = "/sys/fs/cgroup/cpu/vireo")]
    cpu_cgroup_root: PathBuf,
    /// cpu.shares of the cgroup root itself: all VMs together against everything
    /// else in the parent (default: left as created, 1024 = one nice-0 process).
    #[arg(long)]
    cpu_cgroup_shares: Option<u64>,
    /// Do not place VMMs in cgroups (v1 or v2).
    #[arg(long)]
    no_cpu_cgroups: bool,
    /// cpu.shares of <root>/boot (VMMs whose VM does not run yet; cgroup v2: the VM
    /// cgroup's cpu.weight until its VM runs, mapped as systemd maps shares).
    #[arg(long, default_value_t = 4096)]
    boot_cpu_shares: u64,
    /// cpu.shares of <root>/vmm (the running VMMs' control, API and migration threads).
    #[arg(long, default_value_t = 2048)]
    vmm_cpu_shares: u64,
    /// cpu.shares of <root>/vms (the guest threads of all running VMs together;
    /// cgroup v2: cpu.weight of <root>/vms against vireod's leaf).
    #[arg(long, default_value_t = 256)]
    vms_cpu_shares: u64,
    /// This host's certificate (PEM; `vireoctl pki issue` writes host.crt): its
    /// identity towards other hosts' vireods and in the VMMs' migration streams.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert.
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The host CA (PEM): peers' certificates must chain to it.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// The CA's certificate revocation list (PEM; `vireoctl pki revoke` writes
    /// ca.crl): peers whose certificates it revokes are refused in the handshake.
    /// vireod reads it, the certificate, key and CA again on SIGHUP.
    #[arg(long, requires = "tls_cert")]
    tls_crl: Option<PathBuf>,
    /// Serve the host-to-host API on this address (HTTPS, mutual TLS; only hosts on
    /// the --peer list get in). The full API stays on the unix socket.
    #[arg(long, requires_all = ["tls_cert", "peer"])]
    listen: Option<std::net::SocketAddr>,
    /// The TCP ports receiving VMMs listen on for migrations from peers, FIRST-LAST
    /// (on the --listen address; default: any free port). A port in use is skipped;
    /// when every port is taken an incoming migration is refused (503). Open exactly
    /// this range (and --listen) in the firewall.
    #[arg(long, value_name = "FIRST-LAST", requires = "listen")]
    migration_ports: Option<agent::migration_ports::PortRange>,
    /// The API socket of another vireod on this host that VMs may be migrated to
    /// (`destination_agent` names it; its VMs' sockets are in `vms/` beside it).
    /// Repeatable; no other socket path is accepted as a destination.
    #[arg(long, value_name = "PATH")]
    peer_socket: Vec<PathBuf>,
    /// A host admitted as a peer on --listen (its certificate's CN or DNS SAN);
    /// repeatable.
    #[arg(long = "peer", value_name = "NAME")]
    peer: Vec<String>,
    /// A directory the VMs a --peer host migrates here may name files beneath
    /// (kernel, disks, storage_dir; beneath a --storage-root), NAME=DIR; repeatable.
    /// A peer without one may name files beneath every storage root.
    #[arg(long = "peer-storage", value_name = "NAME=DIR", value_parser = agent::peer_scope::parse_flag, requires = "peer")]
    peer_storage: Vec<(String, PathBuf)>,
    /// Be a replica server (docs/replica.md): primaries' replicated VMs are stored in
    /// DIR/<primary host>/<vm>/. Served on --listen.
    #[arg(long, value_name = "DIR", requires_all = ["listen", "replica_allow"])]
    replica_dir: Option<PathBuf>,
    /// A host allowed to replicate its VMs here (its certificate's name; it must be a
    /// --peer too); repeatable.
    #[arg(long = "replica-allow", value_name = "NAME", requires = "replica_dir")]
    replica_allow: Vec<String>,
    /// The largest segment a primary may send (bytes, compressed and decompressed).
    #[arg(long, default_value_t = agent::replica_server::DEFAULT_MAX_SEGMENT)]
    replica_max_segment: u64,
    /// The uids (each also the gid) vireod gives its VMs, one per VM for its whole
    /// life: running as root, vireod jails every VMM (`vireo --jail`: that uid, no
    /// capabilities, its own mount and PID namespaces, a root holding only its files).
    /// Keep the range free of other users.
    #[arg(long, value_name = "FIRST-LAST", default_value = agent::jailing::DEFAULT_JAIL_UIDS)]
    jail_uids: agent::jailing::JailIds,
    /// Run the VMMs unjailed, as vireod's user (logged as a warning).
    #[arg(long)]
    no_jail: bool,
    /// Join a failover cluster on etcd: its client URLs, comma-separated
    /// (`http://10.0.0.1:2379,...`). See docs/cluster.md.
    #[arg(long, value_name = "URL[,URL...]", requires = "node_name")]
    cluster_etcd: Option<String>,
    /// This node's name in the cluster (unique among its nodes).
    #[arg(long, requires = "cluster_etcd")]
    node_name: Option<String>,
    /// Reach etcd in clear (`http://` endpoints) instead of over mutual TLS with the
    /// host's identity: for a test bench only (whoever reaches etcd then defines the
    /// VMs of every node). Logged as a warning.
    #[arg(long, requires = "cluster_etcd")]
    cluster_etcd_insecure: bool,
    /// The vCPUs this node offers clustered VMs (placement admits VMs up to it;
    /// default: the host's CPUs, no overcommit).
    #[arg(long, value_name = "N", requires = "cluster_etcd")]
    cluster_vcpus: Option<u32>,
    /// Cluster-Aware Updating: the directory of the update hooks this node may run
    /// (`vireoctl cluster update --run HOOK`). It and its hooks must be owned by root
    /// and writable by no group or other user. Without it no hook runs here.
    #[arg(long, value_name = "DIR", requires = "cluster_etcd")]
    update_hooks: Option<PathBuf>,
    /// How many of the cluster's failover events the store keeps (the newest); the
    /// first live node by name deletes older ones once a minute.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10_000,
        requires = "cluster_etcd"
    )]
    cluster_keep_events: usize,
    /// How long finished moves and done bulk requests stay in the store (a drain's
    /// moves stay while its node is draining or paused, for fail-back).
    #[arg(
        long,
        value_name = "DAYS",
        default_value_t = 7,
        requires = "cluster_etcd"
    )]
    cluster_keep_finished_days: u32,
}

/// How this node reaches etcd: over mutual TLS with the host's identity, or in clear
/// when `--cluster-etcd-insecure` asks for it.
fn etcd_security(cli: &Cli) -> Result<cluster::EtcdSecurity, String> {
    if cli.cluster_etcd_insecure {
        warn!("--cluster-etcd-insecure: etcd is reached in clear; whoever reaches it defines the VMs of every node");
        return Ok(cluster::EtcdSecurity::Insecure);
    }
    match (&cli.tls_cert, &cli.tls_key, &cli.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => cluster::EtcdTls::from_files(ca, cert, key)
            .map(cluster::EtcdSecurity::Tls)
            .map_err(|e| format!("--cluster-etcd: {e}")),
        _ => Err(
            "--cluster-etcd: etcd is reached over mutual TLS with this host's identity \
             (--tls-cert, --tls-key, --tls-ca; https:// endpoints); \
             --cluster-etcd-insecure for a test bench in clear"
                .into(),
        ),
    }
}

/// Where other cluster nodes reach this one's peer listener for a drain's live
/// migrations: `https://` and the `--listen` address (its certificate must carry the
/// node's name). None without --listen, or on an unspecified address (other nodes
/// could not dial it): this node then receives no moved VMs.
fn cluster_peer_url(listen: Option<std::net::SocketAddr>) -> Option<String> {
    match listen {
        Some(a) if !a.ip().is_unspecified() => Some(format!("https://{a}")),
        Some(a) => {
            warn!(listen = %a, "--listen on an unspecified address: other cluster nodes cannot migrate VMs here (drain)");
            None
        }
        None => None,
    }
}

/// Whether (and with which uids) the VMMs are jailed.
fn jail_uids(cli: &Cli, systemd_units: bool) -> Option<agent::jailing::JailIds> {
    if cli.no_jail {
        warn!("--no-jail: every VMM runs unconfined as vireod's user (root)");
        return None;
    }
    if systemd_units {
        // vireo@.service grants `vireo --jail` its set-up capabilities (which the jail
        // drops before the VMM opens anything); no PID namespace of its own there.
        info!("systemd launcher: each vireo@ unit's VMM jails itself (its own uid and root)");
    }
    if !agent::jailing::running_as_root() {
        info!("not running as root: VMMs run as vireod's user, unjailed");
        return None;
    }
    info!(
        first = cli.jail_uids.first,
        last = cli.jail_uids.last,
        "VMMs are jailed, each with its own uid"
    );
    Some(cli.jail_uids)
}

/// The roles' groups from the command line (`--socket-group` counts as an operators
/// group).
fn policy(cli: &Cli) -> Result<Policy, String> {
    let resolve = |flag: &str, specs: &[String]| {
        specs
            .iter()
            .map(|g| Group::resolve(g).map_err(|e| format!("--{flag} {g}: {e}")))
            .collect::<Result<Vec<_>, _>>()
    };
    if cli.socket_group.is_some() {
        warn!("--socket-group is deprecated: its members are operators; use --operators-group");
    }
    let mut operators = resolve("operators-group", &cli.operators_group)?;
    operators.extend(resolve("socket-group", cli.socket_group.as_slice())?);
    Ok(Policy {
        operators,
        viewers: resolve("viewers-group", &cli.viewers_group)?,
    })
}

fn find_bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
    {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from(name)
}

/// SIGHUP: the host identity's files again (a rotated certificate and key, a new CA
/// bundle or CRL), for the peer listener and for calls to peers.
/// Whether it was reloaded.
fn reload_identity(
    identity: Option<&agent::hosttls::HostIdentity>,
    listener: Option<&agent::peer_server::Reloader>,
) -> bool {
    let r = match (listener, identity) {
        (Some(l), _) => l.reload(),
        (None, Some(id)) => id.reload(),
        (None, None) => {
            info!("SIGHUP: no host identity to reload");
            return false;
        }
    };
    match r {
        Ok(()) => {
            info!("SIGHUP: host identity reloaded (certificate, key, CA, CRL)");
            true
        }
        Err(e) => {
            warn!(error = %error_chain(&e), "SIGHUP: host identity not reloaded; the one in use stays");
            false
        }
    }
}

/// `--peer-storage`, each naming a `--peer`; a peer without one is logged.
fn peer_storage(cli: &Cli) -> Result<Vec<(String, PathBuf)>, String> {
    let listed = |name: &str| cli.peer.iter().any(|p| p.eq_ignore_ascii_case(name));
    if let Some((name, _)) = cli.peer_storage.iter().find(|(n, _)| !listed(n)) {
        return Err(format!(
            "--peer-storage {name}=...: {name} is not a --peer (only peers migrate VMs here)"
        ));
    }
    for p in &cli.peer {
        if !cli
            .peer_storage
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(p))
        {
            info!(peer = %p, "a peer's arriving VMs may name files beneath every storage root (no --peer-storage)");
        }
    }
    Ok(cli.peer_storage.clone())
}

async fn run(
    cli: Cli,
    signal_rx: tokio::sync::oneshot::Receiver<i32>,
    mut hup_rx: tokio::sync::mpsc::UnboundedReceiver<()>,
) -> Result<(), Box<dyn std::error::Error>> {
    // Checked before anything is set up: a node without its identity stops here.
    let etcd_security = match &cli.cluster_etcd {
        Some(eps) => {
            let security = etcd_security(&cli)?;
            let urls = agent::cluster_node::endpoints(eps, &security)?;
            cluster::etcd::check_endpoints(&urls, &security)
                .map_err(|e| format!("--cluster-etcd: {e}"))?;
            Some(security)
        }
        None => None,
    };
    let launcher_kind = cli.launcher;
    let systemd_units = launcher_kind == agent::launcher::LauncherKind::Systemd
        || (launcher_kind == agent::launcher::LauncherKind::Auto
            && agent::launcher::systemd_booted());
    let cgroups = if systemd_units {
        // systemd places its units itself (vireo.slice).
        agent::cgroup::CpuCgroups::off()
    } else {
        agent::cgroup::CpuCgroups::setup(&agent::cgroup::CgroupConfig {
            enabled: !cli.no_cpu_cgroups,
            version: cli.cgroup_version,
            v1_root: Some(cli.cpu_cgroup_root.clone()),
            v2_root: cli.cgroup_root.clone(),
            root_shares: cli.cpu_cgroup_shares,
            boot_shares: cli.boot_cpu_shares,
            vmm_shares: cli.vmm_cpu_shares,
            vms_shares: cli.vms_cpu_shares,
            vm_pids_max: cli.vm_pids_max,
        })
    };
    let launcher = agent::launcher::Launcher::new(launcher_kind, cli.systemctl.clone(), cgroups);
    let identity = match (&cli.tls_cert, &cli.tls_key, &cli.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            let crl = cli
                .tls_crl
                .as_deref()
                .map(std::path::absolute)
                .transpose()?;
            let id = agent::hosttls::HostIdentity::load_with_crl(
                agent::hosttls::IdentityFiles {
                    cert: std::path::absolute(cert)?,
                    key: std::path::absolute(key)?,
                    ca: std::path::absolute(ca)?,
                },
                crl,
            )?;
            info!(host = %id.name, "host identity loaded");
            Some(id)
        }
        _ => None,
    };
    let replica = cli
        .replica_dir
        .as_deref()
        .map(|dir| {
            agent::replica_server::ReplicaServer::new(
                dir,
                &cli.replica_allow,
                &cli.peer,
                cli.replica_max_segment,
            )
            .map(std::sync::Arc::new)
        })
        .transpose()?;
    // A replica's failover VM runs on its images: the replica directory is a storage
    // root too (beside the operator's, or the default `<state-dir>/images`).
    let mut storage_roots = cli.storage_root.clone();
    if let Some(dir) = &cli.replica_dir {
        if storage_roots.is_empty() {
            let images = cli.state_dir.join("images");
            std::os::unix::fs::DirBuilderExt::mode(
                std::fs::DirBuilder::new().recursive(true),
                0o700,
            )
            .create(&images)?;
            storage_roots.push(images);
        }
        storage_roots.push(std::path::absolute(dir)?);
    }
    let cfg = Config {
        state_dir: cli.state_dir.clone(),
        run_dir: cli.run_dir.clone(),
        vireo_bin: cli.vireo_bin.clone().unwrap_or_else(|| find_bin("vireo")),
        max_concurrent_starts: cli.max_concurrent_starts,
        start_timeout: Duration::from_secs(cli.start_timeout_s),
        stop_timeout: Duration::from_secs(cli.stop_timeout_s),
        meter_interval: Duration::from_millis(cli.meter_interval_ms.max(10)),
        launcher,
        max_concurrent_migrations: cli.max_concurrent_migrations.max(1),
        incoming_timeout: Duration::from_secs(cli.incoming_timeout_s),
        identity,
        listen: cli.listen,
        migration_ports: cli
            .migration_ports
            .map(agent::migration_ports::PortPool::new),
        storage_roots,
        block_devices: cli.allow_block_device.clone(),
        jail_uids: jail_uids(&cli, systemd_units),
        peer_sockets: cli.peer_socket.clone(),
        peer_storage: peer_storage(&cli)?,
        replica_dir: cli
            .replica_dir
            .as_deref()
            .map(std::path::absolute)
            .transpose()?,
        balancer: agent::balancer::BalancerConfig {
            budget: cli.memory_budget,
            reserve: cli.memory_reserve,
            interval: Duration::from_millis(cli.balance_interval_ms.max(50)),
        },
        switches: cli.switches.clone(),
        switch_bin: cli
            .switch_bin
            .clone()
            .unwrap_or_else(|| find_bin("vireo-switch")),
    };
    let policy = policy(&cli)?;
    let sup = Supervisor::open(cfg)?;
    let sock = cli
        .socket
        .clone()
        .unwrap_or_else(|| cli.run_dir.join("vireod.sock"));
    let listener = server::bind(&sock)?;
    let validation = std::sync::Arc::new(agent::cluster_validate::Local::default());
    let peer_listener = match cli.listen {
        Some(addr) => {
            let l =
                agent::peer_server::PeerListener::bind(addr, sup.cfg.identity.as_ref(), &cli.peer)
                    .await?
                    .with_validation(validation.clone());
            Some(match replica.clone() {
                Some(r) => {
                    info!(primaries = ?cli.replica_allow, "replica server");
                    l.with_replica(r)
                }
                None => l,
            })
        }
        None => None,
    };
    sup.recover().await;
    tokio::spawn(metering::run(sup.clone()));
    tokio::spawn(agent::balancer::run(sup.clone()));
    // The cluster node's loop and what tells it to leave when vireod stops.
    let mut node_loop = None;
    let cluster = match (&cli.cluster_etcd, &cli.node_name) {
        (Some(eps), Some(node)) => {
            agent::model::validate_name(node).map_err(|e| format!("--node-name {node}: {e}"))?;
            let security = etcd_security
                .clone()
                .ok_or("--cluster-etcd: no way to reach etcd")?;
            let store = agent::cluster_node::connect(eps, &security).await?;
            let lease = agent::cluster_node::LeaseRuntime::start(eps, &security).await?;
            let n = std::sync::Arc::new(agent::cluster_node::ClusterNode {
                view: cluster::inventory::View::start(store.clone()),
                store,
                lease: std::sync::Arc::new(lease),
                node: node.clone(),
                sup: sup.clone(),
                peer_url: cluster_peer_url(cli.listen),
                vcpus: cli.cluster_vcpus,
                moves: Default::default(),
                retention: cluster::history::Retention {
                    events: cli.cluster_keep_events,
                    finished: std::time::Duration::from_secs(
                        u64::from(cli.cluster_keep_finished_days) * 24 * 3600,
                    ),
                },
            });
            n.start_moves();
            validation.set(node, n.store.clone());
            let hooks = match &cli.update_hooks {
                Some(d) => Some(
                    agent::cluster_update::HookDir::open(d)
                        .map_err(|e| format!("--update-hooks: {e}"))?,
                ),
                None => None,
            };
            tokio::spawn(agent::cluster_update::Updater::new(&n, hooks, sock.clone()).run());
            let (leave_tx, leave_rx) = tokio::sync::watch::channel(false);
            let running = tokio::spawn(n.as_ref().clone().run(leave_rx));
            info!(node = %node, etcd = %eps, "cluster node");
            node_loop = Some((leave_tx, running, n.clone()));
            Some(n)
        }
        _ => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let replications = agent::replication::Replications::new(sup.clone(), replica.clone());
    if let Some(s) = &replica {
        s.attach(&replications);
    }
    replications.restore();
    replications.forget_deleted();
    let learner = replications.clone();
    let app = authz::protect(
        server::router(sup.clone())
            .merge(agent::cluster_routes::router(cluster))
            .merge(agent::replication::router(replications)),
        sup.clone(),
        policy.clone(),
    );
    // What the host's automatic start considers: the VMs defined before any API or
    // peer serves (one a client defines meanwhile is the client's to start).
    let boot_vms = sup.defined_now();
    let reloader = peer_listener.as_ref().map(|l| l.reloader());
    let peers = peer_listener.map(|l| tokio::spawn(l.serve(sup.clone())));
    let identity = sup.cfg.identity.clone();
    let hup_sup = sup.clone();
    tokio::spawn(async move {
        while hup_rx.recv().await.is_some() {
            if reload_identity(identity.as_ref(), reloader.as_ref()) {
                let cut = hup_sup.cut_untrusted_migrations();
                if cut > 0 {
                    warn!(
                        streams = cut,
                        "SIGHUP: cut the migration streams of peers no longer trusted"
                    );
                }
            }
        }
    });
    let serve = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<authz::Peer>(),
        )
        .with_graceful_shutdown(async {
            let _ = stop_rx.await;
        })
        .await
    });
    info!(
        socket = %sock.display(),
        vireo = %sup.cfg.vireo_bin.display(),
        launcher = sup.cfg.launcher.name(),
        operators = ?policy.operators.iter().map(|g| g.gid).collect::<Vec<_>>(),
        viewers = ?policy.viewers.iter().map(|g| g.gid).collect::<Vec<_>>(),
        "vireod ready"
    );
    agent::notify::notify("READY=1");
    if !cli.no_autostart {
        let s = sup.clone();
        let defined = boot_vms;
        // A VM its replica host failed over while this host was down must not start
        // here: the replica hosts are asked first (each at most 10 s).
        tokio::spawn(async move {
            learner.learn_failovers(Duration::from_secs(10)).await;
            s.autostart(&defined).await
        });
    } else {
        tokio::spawn(async move { learner.learn_failovers(Duration::from_secs(10)).await });
    }
    tokio::select! {
        sig = signal_rx => info!(signal = sig.unwrap_or(0), "asked to stop"),
        r = serve => {
            warn!(result = ?r, "API server ended");
            return Err("API server ended".into());
        }
    }
    agent::notify::notify("STOPPING=1");
    if let Some((leave, running, node)) = node_loop {
        if cli.shutdown_drain_timeout_s > 0 {
            let drain = Duration::from_secs(cli.shutdown_drain_timeout_s);
            // systemd's TimeoutStopSec= covers the VMs' stop; the drain comes first.
            let more = drain + 2 * sup.cfg.stop_timeout + Duration::from_secs(10);
            agent::notify::notify(&format!("EXTEND_TIMEOUT_USEC={}", more.as_micros()));
            agent::cluster_shutdown::drain_before_leaving(&node, drain, sup.cfg.stop_timeout).await;
        }
        // Clustered VMs never stay (--keep-vms-on-exit or not): without this node's
        // lease they may not run here; stopped first, they start elsewhere at once.
        let _ = leave.send(true);
        let limit = sup.cfg.stop_timeout + Duration::from_secs(10);
        if tokio::time::timeout(limit, running).await.is_err() {
            warn!("the cluster node did not leave in time: its lease expires instead");
        }
    }
    if cli.keep_vms_on_exit {
        info!("leaving the VMs running");
    } else {
        info!("shutting the VMs down, lowest priority first");
        sup.shutdown_all().await;
    }
    if let Some(p) = peers {
        p.abort();
    }
    let _ = stop_tx.send(());
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

/// The receivers of vireod's signals: the first SIGTERM or SIGINT, and each SIGHUP.
type Signals = (
    tokio::sync::oneshot::Receiver<i32>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
);

/// SIGTERM, SIGINT and SIGHUP are blocked in every thread (call this before any thread
/// starts) and received by one thread with sigwait: it reports the first SIGTERM or
/// SIGINT, and each SIGHUP (reload the host identity).
/// (Not tokio's signal driver: its feature would be unified into the VMM's tokio,
/// whose seccomp-filtered API thread must not create the driver's socket pair.)
fn signals() -> std::io::Result<Signals> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it and
    // pthread_sigmask only changes this thread's mask (inherited by later threads).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
        set
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (hup_tx, hup_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("vireod-signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait with an initialised set and a valid out pointer.
            let r = unsafe { libc::sigwait(&set, &mut sig) };
            if r == 0 && sig == libc::SIGHUP {
                let _ = hup_tx.send(());
                continue;
            }
            let _ = tx.send(if r == 0 { sig } else { 0 });
            return;
        })?;
    Ok((rx, hup_rx))
}

fn main() -> ExitCode {
    // Whatever vireod creates is its own unless it says otherwise (sockets it shares
    // with --socket-group get their mode explicitly).
    confine::set_private_umask();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let (signal_rx, hup_rx) = match signals() {
        Ok(rx) => rx,
        Err(e) => {
            eprintln!("vireod: error: cannot handle signals: {e}");
            return ExitCode::from(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vireod: error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli, signal_rx, hup_rx)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vireod: error: {}", error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

/// A size flag: bytes, or a size such as 512M or 8G.
fn size_flag(s: &str) -> Result<u64, String> {
    api::config::parse_size(s).ok_or_else(|| format!("{s:?}: expected a size such as 512M or 8G"))
}
