//! `vireoctl`: the command-line client of vireod (or, with `--vm-socket`, of one VMM).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use agent::audit::Entry as AuditEntry;
use agent::client;
use agent::model::{
    MeteringReport, MigrationRecord, MigrationState, Priority, RestartPolicy, VmDefinition,
    VmStatus,
};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

#[path = "vireoctl/bulk.rs"]
mod bulk;
#[path = "vireoctl/cluster_events.rs"]
mod cluster_events;
use serde_json::Value;

/// Manage the VMs of a host through vireod.
#[derive(Parser, Debug)]
#[command(name = "vireoctl", version, about)]
struct Cli {
    /// vireod's socket.
    #[arg(
        long,
        global = true,
        default_value = "/run/vireo/vireod.sock",
        env = "VIREOD_SOCKET"
    )]
    socket: PathBuf,
    /// Talk straight to one VMM's socket instead of vireod (info, pause, resume, stop,
    /// metrics).
    #[arg(long, global = true)]
    vm_socket: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCommand),
    /// This host.
    #[command(subcommand)]
    Host(HostCommand),
    /// Live migrations (this host's queue and history).
    #[command(subcommand)]
    Migration(MigrationCommand),
    /// The failover cluster this vireod is a node of (docs/cluster.md).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// A cluster node: drain, resume (and fail back), release from quarantine.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Replication of VMs to a replica server's vireod (docs/replica.md).
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Host identities for vireod <-> vireod mutual TLS: a host CA and host
    /// certificates (no vireod needed).
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Who changed what: the audit trail, oldest first (operators only).
    Audit {
        /// Only requests about this VM.
        #[arg(long)]
        vm: Option<String>,
        /// The newest N entries.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
}

#[derive(Subcommand, Debug)]
enum PkiCommand {
    /// Make a host CA: DIR/ca.key (0600) and DIR/ca.crt (0644), DIR 0700. Keep ca.key
    /// off the hosts; give each host ca.crt.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Vireo host CA")]
        name: String,
    },
    /// Issue a host certificate signed by the CA: OUT/host.key (0600), OUT/host.crt
    /// (CN and DNS SAN = NAME, serverAuth + clientAuth) and OUT/ca.crt, for vireod's
    /// --tls-key, --tls-cert and --tls-ca.
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        /// The host's name (what its peers list with --peer and call it by).
        #[arg(long)]
        name: String,
        /// Another name or IP address the certificate is valid for (repeatable).
        #[arg(long = "san", value_name = "DNS|IP")]
        san: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke a host certificate: add its serial to CA_DIR/revoked and write
    /// CA_DIR/ca.crl (signed by the CA) with every revoked one. Give ca.crl to each
    /// vireod (--tls-crl) and send it SIGHUP: the revoked host is refused from its
    /// next handshake on (the VMMs vireod starts for migrations read the file at each
    /// migration, before any SIGHUP). A replacement for a host: `pki issue` into a new
    /// directory.
    Revoke {
        #[arg(long)]
        ca_dir: PathBuf,
        /// The certificate to revoke (PEM, e.g. the host's host.crt).
        #[arg(long)]
        cert: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum HostCommand {
    /// vireod's version, directories and VM counts.
    Info,
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Nodes, clustered VMs, their owners and fencing tokens.
    Status,
    /// Cluster-Aware Updating: one node at a time, drain it, run update hook HOOK on
    /// it (a file of that node's `vireod --update-hooks` directory), wait until it is
    /// back, resume it with fail-back, next. Stops at the first node whose hook fails
    /// or that does not come back (it stays paused, its VMs elsewhere). Waits for the
    /// run to end unless --detach. `cluster update status`: the run's progress.
    Update(UpdateArgs),
    /// Validate the cluster: KVM and capabilities, CPU features, versions, shared
    /// storage (a probe file read back by every node), reachability and latency, clock
    /// skew, etcd health and quorum, certificates, capacity to lose the largest node.
    /// Writes DIR/report.json and DIR/report.html; fails when a check fails.
    Validate {
        /// Where the report goes (default: the current directory).
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// The failover controller's decisions (a VM placed, failed over, preempted,
    /// restarted), newest first, with the fencing token each gave.
    Events {
        /// At most this many (1..=10000).
        #[arg(long, default_value_t = agent::cluster_events::DEFAULT_LIMIT,
              value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
        limit: usize,
    },
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct UpdateArgs {
    #[command(subcommand)]
    cmd: Option<UpdateCommand>,
    /// The hook to run on each node (a plain file name).
    #[arg(long, value_name = "HOOK")]
    run: Option<String>,
    /// An argument for the hook (repeatable, at most 16).
    #[arg(long = "arg", value_name = "A", allow_hyphen_values = true)]
    args: Vec<String>,
    /// The nodes, in the order they go (default: every node, by name).
    #[arg(long, value_delimiter = ',', value_name = "A,B,C")]
    nodes: Vec<String>,
    /// Seconds each phase of a node (drain, hook, coming back, fail-back) may take.
    #[arg(long, value_name = "S")]
    timeout: Option<u64>,
    /// Start the run and return (follow it with `cluster update status`).
    #[arg(long)]
    detach: bool,
}

#[derive(Subcommand, Debug)]
enum UpdateCommand {
    /// The last update run: each node's phase, the hook's exit status and output tail.
    Status,
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Live-migrate every VM of NODE to other nodes (High first) and pause it. Refused
    /// when a VM has no place, unless --force (those stay on NODE).
    Drain {
        node: String,
        #[arg(long)]
        force: bool,
        /// Moves at once (default 2).
        #[arg(long)]
        concurrency: Option<u32>,
    },
    /// Cancel NODE's drain: moves not started yet are dropped, those migrating
    /// finish, and NODE is up again.
    CancelDrain { node: String },
    /// Make a paused NODE up again; --failback moves the VMs its drain moved back.
    Resume {
        node: String,
        #[arg(long)]
        failback: bool,
    },
    /// Release a quarantined NODE (it gets VMs again).
    Release { node: String },
    /// NODE's state, departures, drain progress and moves.
    Status { node: String },
}

#[derive(Subcommand, Debug)]
enum ReplicaCommand {
    /// Start replicating VM NAME (its disks with replica_log) to a replica server.
    Enable {
        name: String,
        /// The replica server's vireod peer listener, HOST:PORT.
        #[arg(long)]
        to: String,
        /// The host name its certificate must carry (default HOST).
        #[arg(long)]
        to_name: Option<String>,
        /// Time between cuts: 30s, 5m, 1s ... (at least 1 s).
        #[arg(long, default_value = "30s", value_parser = parse_interval)]
        interval: f64,
        /// Recovery points the replica keeps (1: only the latest; Hyper-V keeps up to
        /// 24 hourly ones and the latest).
        #[arg(long, default_value_t = 1)]
        history: u32,
        /// Thin the history: at least this long between two kept points other than
        /// the latest (1h: Hyper-V's hourly points, with --history 25). Default: every
        /// point is kept until --history drops it.
        #[arg(long, value_name = "DURATION", value_parser = parse_spacing)]
        history_spacing: Option<u64>,
        /// Limit the bytes sent to the replica to MBIT Mbit/s (0.1 to 100000).
        #[arg(long, value_name = "MBIT")]
        bandwidth: Option<String>,
    },
    /// Change NAME's bandwidth limit to MBIT Mbit/s, or lift it (`off`); the sender
    /// obeys it from its next write.
    Bandwidth {
        name: String,
        /// Mbit/s, or `off`.
        mbit: String,
    },
    /// On the replica host: the recovery points kept of NAME (id, time, bytes).
    Points {
        name: String,
        /// The primary whose replica (needed when several hold NAME).
        #[arg(long)]
        primary: Option<String>,
    },
    /// On the replica host: start a copy of NAME (`NAME-test`) from a recovery point
    /// on throw-away disks while replication goes on; `--stop` discards it.
    TestFailover {
        name: String,
        /// `latest` (default) or a point's id (`replica points`).
        #[arg(long, conflicts_with = "stop")]
        point: Option<String>,
        #[arg(long)]
        primary: Option<String>,
        /// Define the copy but do not start it.
        #[arg(long, conflicts_with = "stop")]
        no_start: bool,
        /// Stop and delete the copy and its disks.
        #[arg(long)]
        stop: bool,
    },
    /// On the host a VM was failed over to (planned or unplanned): replicate it back
    /// to its old primary, whose replica starts from its own disks (only the blocks
    /// that differ — changed here or written there after the point — are sent). A running VM is restarted once if its disks have no change log.
    Reverse {
        name: String,
        /// The old primary's vireod peer listener, HOST:PORT.
        #[arg(long)]
        to: String,
        /// Time between cuts (at least 1 s).
        #[arg(long, default_value = "30s", value_parser = parse_interval)]
        interval: f64,
        /// Recovery points the old primary keeps.
        #[arg(long, default_value_t = 1)]
        history: u32,
    },
    /// Every replicated VM, or one (state failed-over-elsewhere: its replica host
    /// failed it over and said so; it does not start here).
    Status { name: Option<String> },
    /// Stop cutting and shipping for now (the change log keeps everything).
    Pause { name: String },
    /// Go on after a pause.
    Resume { name: String },
    /// Stop replicating NAME (the replica keeps its last recovery point); of a VM
    /// failed over elsewhere, forget the failover (it may start here again).
    Disable { name: String },
    /// Fail NAME over to its replica. `--planned` on the primary: the VM is shut
    /// down, its last changes sent, and it starts on the replica host. `--point latest`
    /// on the replica host (the primary gone): it starts from the latest recovery point.
    #[command(group(clap::ArgGroup::new("kind").required(true).args(["planned", "point"])))]
    Failover {
        name: String,
        #[arg(long)]
        planned: bool,
        /// The recovery point: `latest` or a kept point's id (`replica points`).
        #[arg(long)]
        point: Option<String>,
        /// With --point: the primary whose replica to start (needed when several hold NAME).
        #[arg(long, requires = "point")]
        primary: Option<String>,
        /// Define the VM on the replica host but do not start it.
        #[arg(long)]
        no_start: bool,
    },
}

/// `30s`, `5m`, `1h` or plain seconds.
/// `--history-spacing`: 30m, 1h, 2h ... (1 s to a week), in whole seconds.
fn parse_spacing(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a whole number with s, m, h or d"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    match secs {
        Some(secs) if (1..=7 * 86_400).contains(&secs) => Ok(secs),
        _ => Err(format!("{s:?}: from 1s to 7d")),
    }
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with s, m or h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: the unit is s, m or h")),
    };
    if !(1.0..=86400.0).contains(&secs) {
        return Err(format!("{s:?}: from 1s to 24h"));
    }
    Ok(secs)
}

/// A bandwidth argument as JSON: a number when it is one, else the word as given
/// (vireod takes `off` and refuses anything else with one line).
fn limit_value(arg: &str) -> Value {
    arg.parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map(Value::Number)
        .unwrap_or_else(|| Value::String(arg.to_string()))
}

/// A JSON value as a table cell (null: `-`).
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn replica(ctx: &Ctx, cmd: ReplicaCommand, out: Output) -> Result<(), CtlError> {
    let path = |n: &str| format!("/api/v1/vms/{n}/replication");
    let v = match &cmd {
        ReplicaCommand::Enable {
            name,
            to,
            to_name,
            interval,
            history,
            history_spacing,
            bandwidth,
        } => {
            let body = serde_json::json!({"to": to, "server_name": to_name, "interval_s": interval, "history": history, "history_spacing_s": history_spacing, "bandwidth_mbit": bandwidth.as_deref().map(limit_value)});
            ctx.json("PUT", &path(name), Some(body.to_string().into_bytes()))?
        }
        ReplicaCommand::Bandwidth { name, mbit } => {
            let body = serde_json::json!({ "mbit": limit_value(mbit) });
            ctx.json(
                "PUT",
                &format!("{}/bandwidth", path(name)),
                Some(body.to_string().into_bytes()),
            )?
        }
        ReplicaCommand::Points { name, primary } => {
            let q = primary
                .as_ref()
                .map(|p| format!("?primary={p}"))
                .unwrap_or_default();
            let v = ctx.json("GET", &format!("/api/v1/replicas/{name}/points{q}"), None)?;
            if out == Output::Json {
                print_json(&v);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["points"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|p| {
                    let t = p["time_s"].as_u64().unwrap_or(0);
                    vec![
                        cell(&p["cut_id"]),
                        if t == 0 {
                            "-".into()
                        } else {
                            fmt_ms_ago(Some(t * 1000))
                        },
                        cell(&p["changed_bytes"]),
                        cell(&p["undo_bytes"]),
                    ]
                })
                .collect();
            print_table(&["ID", "AGO", "CHANGED BYTES", "KEPT BYTES"], &rows);
            return Ok(());
        }
        ReplicaCommand::TestFailover {
            name,
            point,
            primary,
            no_start,
            stop,
        } => {
            let path = format!("/api/v1/replicas/{name}/test-failover");
            let v = if *stop {
                let q = primary
                    .as_ref()
                    .map(|p| format!("?primary={p}"))
                    .unwrap_or_default();
                ctx.json("DELETE", &format!("{path}{q}"), None)?
            } else {
                let body = serde_json::json!({"point": point.as_deref().unwrap_or("latest"), "primary": primary, "start": !no_start});
                ctx.json("POST", &path, Some(body.to_string().into_bytes()))?
            };
            if out == Output::Json {
                print_json(&v);
            } else if *stop {
                println!("{}: stopped and deleted, its disks removed", cell(&v["vm"]));
            } else {
                println!(
                    "{}: a test copy of {name} from recovery point {} ({})",
                    cell(&v["vm"]),
                    cell(&v["point"]),
                    cell(&v["status"]["state"])
                );
            }
            return Ok(());
        }
        ReplicaCommand::Reverse {
            name,
            to,
            interval,
            history,
        } => {
            let body = serde_json::json!({"to": to, "interval_s": interval, "history": history});
            ctx.json(
                "POST",
                &format!("{}/reverse", path(name)),
                Some(body.to_string().into_bytes()),
            )?
        }
        ReplicaCommand::Status { name: Some(n) } => ctx.json("GET", &path(n), None)?,
        ReplicaCommand::Status { name: None } => ctx.json("GET", "/api/v1/replication", None)?,
        ReplicaCommand::Pause { name } => {
            ctx.json("POST", &format!("{}/pause", path(name)), None)?
        }
        ReplicaCommand::Resume { name } => {
            ctx.json("POST", &format!("{}/resume", path(name)), None)?
        }
        ReplicaCommand::Disable { name } => ctx.json("DELETE", &path(name), None)?,
        ReplicaCommand::Failover {
            name,
            planned: true,
            no_start,
            ..
        } => {
            let body = serde_json::json!({"planned": true, "start": !no_start})
                .to_string()
                .into_bytes();
            ctx.json("POST", &format!("{}/failover", path(name)), Some(body))?
        }
        ReplicaCommand::Failover {
            name,
            point,
            primary,
            no_start,
            ..
        } => {
            let body = serde_json::json!({"point": point, "primary": primary, "start": !no_start});
            let v = ctx.json(
                "POST",
                &format!("/api/v1/replicas/{name}/failover"),
                Some(body.to_string().into_bytes()),
            )?;
            if out != Output::Json {
                println!(
                    "{name}: failed over here from {}'s recovery point {}",
                    cell(&v["primary"]),
                    cell(&v["point"])
                );
                return Ok(());
            }
            v
        }
    };
    if let (ReplicaCommand::Failover { name, .. }, Output::Table) = (&cmd, out) {
        println!(
            "{name}: failed over at recovery point {} to the replica",
            cell(&v["point"])
        );
        return Ok(());
    }
    if out == Output::Json {
        print_json(&v);
        return Ok(());
    }
    let list = match v {
        Value::Array(a) => a,
        one => vec![one],
    };
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                cell(&r["vm"]),
                cell(&r["to"]),
                cell(&r["state"]),
                r["last_point"]
                    .as_u64()
                    .map(|p| p.to_string())
                    .unwrap_or("-".into()),
                fmt_ms_ago(r["last_point_at_ms"].as_u64()),
                format!(
                    "{}",
                    r["segment_bytes_sent"].as_u64().unwrap_or(0)
                        + r["base_bytes_sent"].as_u64().unwrap_or(0)
                ),
                r["bandwidth_mbit"]
                    .as_f64()
                    .map(|m| format!("{m} Mbit/s"))
                    .unwrap_or("-".into()),
                // A pause the loop made itself (a full replica) says why.
                cell(if r["paused_reason"].is_null() {
                    &r["last_error"]
                } else {
                    &r["paused_reason"]
                }),
            ]
        })
        .collect();
    print_table(
        &[
            "VM",
            "TO",
            "STATE",
            "POINT",
            "AT",
            "BYTES SENT",
            "LIMIT",
            "ERROR",
        ],
        &rows,
    );
    Ok(())
}

#[derive(Subcommand, Debug)]
enum MigrationCommand {
    /// Every migration vireod knows: queued, running and finished.
    List {
        /// The cluster-wide queue instead: every move between nodes (drains',
        /// fail-backs', bulk requests') with its state and request.
        #[arg(long)]
        cluster: bool,
    },
    /// One migration with its progress.
    Info { id: String },
    /// Take a queued migration out of the queue (or give up an incoming one).
    Cancel {
        id: String,
        /// ID is a cluster bulk request: its moves not started yet are cancelled.
        #[arg(long)]
        cluster: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PriorityArg {
    High,
    Medium,
    Low,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RestartArg {
    Never,
    OnFailure,
    Always,
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// Define a VM from a JSON file: a VM config (as `vireo --config` takes) or a full
    /// definition ({"config": ..., "priority": ..., "restart": ...}).
    Define {
        name: String,
        /// The JSON file ("-" for standard input).
        #[arg(long, short)]
        file: PathBuf,
        #[arg(long, value_enum)]
        priority: Option<PriorityArg>,
        #[arg(long, value_enum)]
        restart: Option<RestartArg>,
        #[arg(long)]
        max_restarts: Option<u32>,
        /// Define it in the cluster (vireod must be a cluster node): it runs on the
        /// node the cluster picks and fails over by --priority (off: No Auto Start).
        #[arg(long)]
        cluster: bool,
        /// With --cluster: a node to prefer (repeatable, best first).
        #[arg(long = "preferred-owner", requires = "cluster")]
        preferred_owners: Vec<String>,
        /// With --cluster: a node allowed to run it (repeatable; none: every node).
        #[arg(long = "possible-owner", requires = "cluster")]
        possible_owners: Vec<String>,
        /// With --cluster: VMs of one class are spread over nodes when possible.
        #[arg(long, requires = "cluster")]
        anti_affinity: Option<String>,
        /// With --cluster: define it without starting it.
        #[arg(long, requires = "cluster")]
        no_start: bool,
    },
    /// Start a VM; returns when it runs. With --selector: the clustered VMs it
    /// selects that are off are asked to run (the cluster places them).
    Start {
        #[arg(required_unless_present = "selector")]
        name: Option<String>,
        /// Clustered VMs by KEY=VALUE[,KEY=VALUE] over priority, node and class.
        #[arg(long, conflicts_with = "name")]
        selector: Option<String>,
        /// With --selector: start those that have a place, leave the others.
        #[arg(long, requires = "selector")]
        force: bool,
    },
    /// Shut a VM down (killed after the timeout). With --selector: the clustered VMs
    /// it selects are turned off (their nodes kill their VMMs) and stay off.
    Stop {
        name: Option<String>,
        /// Seconds before the VM is killed (vireod's default if not given).
        #[arg(long, conflicts_with = "selector")]
        timeout: Option<u64>,
        /// Clustered VMs by KEY=VALUE[,KEY=VALUE] over priority, node and class.
        #[arg(long, conflicts_with = "name")]
        selector: Option<String>,
    },
    /// Save clustered VMs (--selector or names): refused for now, vireod has no save
    /// of a VM; the answer says why.
    Save {
        names: Vec<String>,
        #[arg(long, required_unless_present = "names", conflicts_with = "names")]
        selector: Option<String>,
    },
    /// Kill a VM's VMM at once.
    Kill {
        name: String,
    },
    Pause {
        name: Option<String>,
    },
    Resume {
        name: Option<String>,
    },
    /// All VMs and their state.
    List,
    /// One VM: state, process, last exit, definition.
    Info {
        name: Option<String>,
    },
    /// The guest's serial console: its output, and with --input (or --send) input.
    Console {
        name: String,
        /// Lines to show.
        #[arg(long, default_value_t = 50)]
        lines: usize,
        /// Keep printing new output.
        #[arg(long, short)]
        follow: bool,
        /// Send this text and a newline to the guest's serial port first.
        #[arg(long)]
        send: Option<String>,
        /// Interactive: what you type goes to the guest (the terminal in raw mode;
        /// Ctrl-] or the end of standard input ends it); output is followed.
        #[arg(long, short)]
        input: bool,
    },
    /// Live-migrate a running VM to another host's vireod (queued: at most
    /// --max-concurrent-migrations run at once on this host). Clustered VMs — several
    /// names, --selector, or a --to that is a cluster node's name or `auto` — are
    /// moved by the cluster: one queued move each, --concurrency at once per source
    /// and per destination node, High first (`vireoctl migration list --cluster`).
    Migrate {
        #[arg(required_unless_present = "selector")]
        names: Vec<String>,
        /// Clustered VMs by KEY=VALUE[,KEY=VALUE] over priority, node and class.
        #[arg(long, conflicts_with = "names")]
        selector: Option<String>,
        /// The destination's vireod (the VM then belongs to it): https://HOST:PORT (its
        /// peer listener, mutual TLS) or its socket on this host; or, for clustered
        /// VMs, a node's name or `auto` (placement picks).
        #[arg(long, required_unless_present = "to_url", conflicts_with = "to_url")]
        to: Option<String>,
        /// Clustered VMs: moves at once per source and per destination node (default 2).
        #[arg(long)]
        concurrency: Option<u32>,
        /// Clustered VMs: move those that have a place, leave the others (reported).
        #[arg(long)]
        force: bool,
        /// With an https:// --to: the host name its certificate must carry (default HOST).
        #[arg(long, requires = "to")]
        to_name: Option<String>,
        /// Or a `vireo` already listening (unix:/path, tcp:host:port); the VM is then
        /// forgotten here.
        #[arg(long)]
        to_url: Option<String>,
        /// Where the destination's VMM listens (default: a unix socket on its host).
        #[arg(long)]
        receiver_url: Option<String>,
        /// Downtime target in milliseconds.
        #[arg(long)]
        downtime_ms: Option<u64>,
        /// Compress memory pages (zstd).
        #[arg(long)]
        compress: bool,
        /// Bandwidth limit in MiB/s.
        #[arg(long)]
        bandwidth_mib_s: Option<u64>,
        /// Copy the disks too (shared-nothing); with --storage-dir on the destination.
        #[arg(long)]
        copy_storage: bool,
        #[arg(long)]
        storage_dir: Option<PathBuf>,
        /// Streams that carry memory pages (1..=16; default 1). Between hosts each is
        /// its own mutual TLS connection.
        #[arg(long)]
        connections: Option<u32>,
        /// Wait for the end, with a progress bar; fails if the migration does.
        #[arg(long, short)]
        wait: bool,
        /// With --wait: give up waiting after SECS and exit 124. The migration goes
        /// on (`vireoctl migration cancel` stops it).
        #[arg(long, value_name = "SECS", requires = "wait", value_parser = clap::value_parser!(u64).range(1..))]
        timeout: Option<u64>,
    },
    /// Resource metering since the last reset.
    Metrics {
        name: Option<String>,
        /// Start metering afresh.
        #[arg(long)]
        reset: bool,
    },
    /// Remove a stopped VM's definition and history.
    Delete {
        name: String,
    },
    /// The definitions as JSON (one VM, or all).
    Export {
        name: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("cannot reach {what} at {path}: {reason} (is it running? see --socket / --vm-socket)")]
    Connect {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Api(String),
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// `--wait --timeout` ran out: what is still unfinished goes on.
    #[error("{what}: not finished after {secs} s ({state}); it goes on: {hint}")]
    WaitTimedOut {
        what: String,
        secs: u64,
        state: String,
        hint: String,
    },
}

/// The exit status of a `--wait` whose `--timeout` ran out (as timeout(1)'s).
const EXIT_WAIT_TIMED_OUT: u8 = 124;

const TIMEOUT: Duration = Duration::from_secs(120);

struct Ctx {
    socket: PathBuf,
    what: &'static str,
    rt: tokio::runtime::Runtime,
}

impl Ctx {
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<client::Response, CtlError> {
        let r = self
            .rt
            .block_on(client::request(&self.socket, method, path, body, TIMEOUT))
            .map_err(|e| match e {
                client::ClientError::Connect { path, source } => CtlError::Connect {
                    what: self.what,
                    path,
                    reason: source.to_string(),
                },
                other => CtlError::Api(agent::error_chain(&other)),
            })?;
        if !r.ok() {
            return Err(CtlError::Api(format!(
                "{} ({})",
                r.error_message(),
                r.status
            )));
        }
        Ok(r)
    }

    fn json(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Value, CtlError> {
        let r = self.call(method, path, body)?;
        Ok(r.json().unwrap_or(Value::Null))
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn fmt_ms_ago(ms: Option<u64>) -> String {
    match ms {
        None => "-".into(),
        Some(t) => {
            let s = agent::now_ms().saturating_sub(t) / 1000;
            format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
        }
    }
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn print_pairs(pairs: &[(&str, String)]) {
    let w = pairs.iter().map(|p| p.0.len()).max().unwrap_or(0);
    for (k, v) in pairs {
        println!("{k:<w$}  {v}");
    }
}

fn status_table(s: &VmStatus) {
    let exit = s.last_exit.as_ref().map(|e| {
        let how = match (e.status, e.signal) {
            (Some(c), _) => format!("status {c}"),
            (None, Some(sig)) => format!("signal {sig}"),
            _ => "status unknown".into(),
        };
        format!("{} ({how})", e.reason)
    });
    print_pairs(&[
        ("name", s.name.clone()),
        ("state", s.state.to_string()),
        ("priority", format!("{:?}", s.priority)),
        ("restart", format!("{:?}", s.restart)),
        ("pid", s.pid.map(|p| p.to_string()).unwrap_or("-".into())),
        ("socket", s.socket.clone().unwrap_or("-".into())),
        ("adopted", s.adopted.to_string()),
        (
            "uptime",
            if s.pid.is_some() {
                fmt_ms_ago(s.started_at_ms)
            } else {
                "-".into()
            },
        ),
        ("restarts", s.restarts.to_string()),
        ("last exit", exit.unwrap_or("-".into())),
    ]);
    if let Some(e) = &s.last_exit {
        if !e.serial_tail.is_empty() {
            println!("last serial lines:");
            for l in e.serial_tail.iter().rev().take(5).rev() {
                println!("  {l}");
            }
        }
    }
}

fn metrics_table(m: &MeteringReport) {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    print_pairs(&[
        ("name", m.name.clone()),
        ("since", fmt_ms_ago(Some(m.since_ms)) + " ago"),
        ("running", format!("{:.1} s", m.running_ms as f64 / 1000.0)),
        ("avg cpu", format!("{:.1} % of one CPU", m.avg_cpu_percent)),
        ("cpu time", format!("{:.2} s", m.cpu_ns as f64 / 1e9)),
        (
            "memory avg/min/max",
            format!(
                "{} / {} / {}",
                mib(m.avg_memory_bytes),
                mib(m.min_memory_bytes),
                mib(m.max_memory_bytes)
            ),
        ),
        (
            "disk read",
            format!("{} bytes ({} ops)", m.disk_read_bytes, m.disk_read_ops),
        ),
        (
            "disk written",
            format!("{} bytes ({} ops)", m.disk_write_bytes, m.disk_write_ops),
        ),
        (
            "network rx/tx",
            format!("{} / {} bytes", m.net_rx_bytes, m.net_tx_bytes),
        ),
        ("samples", m.samples.to_string()),
    ]);
}

fn name_of(n: &Option<String>) -> Result<&str, CtlError> {
    n.as_deref()
        .ok_or_else(|| CtlError::Usage("a VM name is required (or --vm-socket PATH)".into()))
}

fn read_definition(
    file: &Path,
    priority: Option<PriorityArg>,
    restart: Option<RestartArg>,
    max_restarts: Option<u32>,
) -> Result<Value, CtlError> {
    let text = if file == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|source| {
            CtlError::Read {
                path: file.to_path_buf(),
                source,
            }
        })?;
        s
    } else {
        std::fs::read_to_string(file).map_err(|source| CtlError::Read {
            path: file.to_path_buf(),
            source,
        })?
    };
    let v: Value = serde_json::from_str(&text).map_err(|source| CtlError::Json {
        path: file.to_path_buf(),
        source,
    })?;
    let mut def = if v.get("config").is_some() {
        v
    } else {
        serde_json::json!({ "config": v })
    };
    if let Some(p) = priority {
        def["priority"] = serde_json::to_value(match p {
            PriorityArg::High => Priority::High,
            PriorityArg::Medium => Priority::Medium,
            PriorityArg::Low => Priority::Low,
            PriorityArg::Off => Priority::Off,
        })
        .unwrap_or(Value::Null);
    }
    if let Some(r) = restart {
        def["restart"] = serde_json::to_value(match r {
            RestartArg::Never => RestartPolicy::Never,
            RestartArg::OnFailure => RestartPolicy::OnFailure,
            RestartArg::Always => RestartPolicy::Always,
        })
        .unwrap_or(Value::Null);
    }
    if let Some(m) = max_restarts {
        def["max_restarts"] = m.into();
    }
    Ok(def)
}

/// Direct access to one VMM's own API (no vireod).
fn direct(ctx: &Ctx, cmd: &VmCommand, out: Output) -> Result<(), CtlError> {
    let (method, route) = match cmd {
        VmCommand::Info { .. } => ("GET", "vm.info"),
        VmCommand::Pause { .. } => ("PUT", "vm.pause"),
        VmCommand::Resume { .. } => ("PUT", "vm.resume"),
        VmCommand::Stop { .. } => ("PUT", "vm.shutdown"),
        VmCommand::Metrics { .. } => ("GET", "vm.counters"),
        _ => {
            return Err(CtlError::Usage(
                "with --vm-socket only info, pause, resume, stop and metrics are available".into(),
            ))
        }
    };
    let v = ctx.json(method, &format!("/api/v1/{route}"), None)?;
    match (out, &v) {
        (_, Value::Null) => {}
        (Output::Json, v) => print_json(v),
        (Output::Table, Value::Object(m)) if route == "vm.info" => {
            let get = |k: &str| {
                m.get(k)
                    .map(|x| x.to_string().trim_matches('"').to_string())
                    .unwrap_or_default()
            };
            print_pairs(&[
                ("state", get("state")),
                ("memory", get("memory_actual_size")),
                ("uptime_ms", get("uptime_ms")),
            ]);
        }
        (Output::Table, Value::Object(m)) => {
            let mut rows = Vec::new();
            for (dev, c) in m {
                if let Some(c) = c.as_object() {
                    for (k, x) in c {
                        rows.push(vec![dev.clone(), k.clone(), x.to_string()]);
                    }
                }
            }
            print_table(&["DEVICE", "COUNTER", "VALUE"], &rows);
        }
        (Output::Table, v) => print_json(v),
    }
    Ok(())
}

fn vm(ctx: &Ctx, cmd: VmCommand, out: Output) -> Result<(), CtlError> {
    let path = |n: &str, verb: &str| {
        if verb.is_empty() {
            format!("/api/v1/vms/{n}")
        } else {
            format!("/api/v1/vms/{n}/{verb}")
        }
    };
    let show_status = |v: Value| -> Result<(), CtlError> {
        match out {
            Output::Json => print_json(&v),
            Output::Table => match serde_json::from_value::<VmStatus>(v.clone()) {
                Ok(s) => status_table(&s),
                Err(_) => print_json(&v),
            },
        }
        Ok(())
    };
    match cmd {
        VmCommand::Define {
            name,
            file,
            priority,
            restart,
            max_restarts,
            cluster,
            preferred_owners,
            possible_owners,
            anti_affinity,
            no_start,
        } => {
            let def = read_definition(&file, priority, restart, max_restarts)?;
            // Checked here too, for an error that points at the file.
            if let Err(e) = serde_json::from_value::<VmDefinition>(def.clone()) {
                return Err(CtlError::Usage(format!(
                    "{}: invalid VM definition: {e}",
                    file.display()
                )));
            }
            if cluster {
                let priority = match priority.unwrap_or(PriorityArg::Medium) {
                    PriorityArg::High => "high",
                    PriorityArg::Medium => "medium",
                    PriorityArg::Low => "low",
                    PriorityArg::Off => "no_auto_start",
                };
                let req = serde_json::json!({
                    "definition": def,
                    "priority": priority,
                    "preferred_owners": preferred_owners,
                    "possible_owners": possible_owners,
                    "anti_affinity": anti_affinity,
                    "start": !no_start,
                });
                let v = ctx.json(
                    "PUT",
                    &format!("/api/v1/cluster/vms/{name}"),
                    Some(req.to_string().into_bytes()),
                )?;
                print_json(&v);
                return Ok(());
            }
            let v = ctx.json("PUT", &path(&name, ""), Some(def.to_string().into_bytes()))?;
            show_status(v)
        }
        VmCommand::Start {
            selector: Some(sel),
            force,
            ..
        } => {
            let ask = bulk::Ask {
                op: "start",
                selector: Some(&sel),
                force,
                ..Default::default()
            };
            bulk::request(ctx, ask, out)
        }
        VmCommand::Start { name, .. } => {
            show_status(ctx.json("PUT", &path(name_of(&name)?, "start"), None)?)
        }
        VmCommand::Stop {
            selector: Some(sel),
            ..
        } => {
            let ask = bulk::Ask {
                op: "stop",
                selector: Some(&sel),
                ..Default::default()
            };
            bulk::request(ctx, ask, out)
        }
        VmCommand::Save { names, selector } => {
            let ask = bulk::Ask {
                op: "save",
                names: &names,
                selector: selector.as_deref(),
                ..Default::default()
            };
            bulk::request(ctx, ask, out)
        }
        VmCommand::Stop { name, timeout, .. } => {
            let n = name_of(&name)?;
            let q = timeout
                .map(|t| format!("?timeout_s={t}"))
                .unwrap_or_default();
            show_status(ctx.json("PUT", &(path(n, "stop") + &q), None)?)
        }
        VmCommand::Kill { name } => show_status(ctx.json("PUT", &path(&name, "kill"), None)?),
        VmCommand::Pause { name } => {
            show_status(ctx.json("PUT", &path(name_of(&name)?, "pause"), None)?)
        }
        VmCommand::Resume { name } => {
            show_status(ctx.json("PUT", &path(name_of(&name)?, "resume"), None)?)
        }
        VmCommand::Info { name } => {
            show_status(ctx.json("GET", &path(name_of(&name)?, ""), None)?)
        }
        VmCommand::List => {
            let v = ctx.json("GET", "/api/v1/vms", None)?;
            match out {
                Output::Json => print_json(&v),
                Output::Table => {
                    let list: Vec<VmStatus> =
                        serde_json::from_value(v).map_err(|e| CtlError::Api(e.to_string()))?;
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|s| {
                            vec![
                                s.name.clone(),
                                s.state.to_string(),
                                format!("{:?}", s.priority),
                                s.pid.map(|p| p.to_string()).unwrap_or("-".into()),
                                if s.pid.is_some() {
                                    fmt_ms_ago(s.started_at_ms)
                                } else {
                                    "-".into()
                                },
                                s.restarts.to_string(),
                            ]
                        })
                        .collect();
                    print_table(
                        &["NAME", "STATE", "PRIORITY", "PID", "UPTIME", "RESTARTS"],
                        &rows,
                    );
                }
            }
            Ok(())
        }
        VmCommand::Console {
            name,
            lines,
            follow,
            send,
            input,
        } => console(ctx, &name, lines, follow || input, send, input),
        VmCommand::Migrate {
            names,
            selector,
            to,
            concurrency,
            force,
            wait,
            timeout,
            ..
        } if selector.is_some()
            || names.len() > 1
            || to.as_deref().is_some_and(bulk::is_cluster_target) =>
        {
            let ask = bulk::Ask {
                op: "migrate",
                names: &names,
                selector: selector.as_deref(),
                to: to.as_deref(),
                force,
                concurrency,
                wait,
                timeout: timeout.map(Duration::from_secs),
            };
            bulk::request(ctx, ask, out)
        }
        VmCommand::Migrate {
            names,
            to,
            to_name,
            to_url,
            receiver_url,
            downtime_ms,
            compress,
            bandwidth_mib_s,
            copy_storage,
            storage_dir,
            connections,
            wait,
            timeout,
            ..
        } => {
            let [name] = names.as_slice() else {
                return Err(CtlError::Usage(
                    "a migration to another host's vireod takes one VM".into(),
                ));
            };
            let to = match to {
                Some(p) if p.starts_with("https://") => Some(p),
                Some(p) => Some(
                    std::path::absolute(&p)
                        .map_err(|source| CtlError::Read {
                            path: p.clone().into(),
                            source,
                        })?
                        .to_string_lossy()
                        .into_owned(),
                ),
                None => None,
            };
            let body = serde_json::json!({
                "destination_agent": to,
                "destination_name": to_name,
                "destination_url": to_url,
                "receiver_url": receiver_url,
                "downtime_ms": downtime_ms,
                "compress": compress,
                "bandwidth_mib_s": bandwidth_mib_s,
                "copy_storage": copy_storage,
                "storage_dir": storage_dir,
                "connections": connections,
            });
            let v = ctx.json(
                "PUT",
                &path(name, "migrate"),
                Some(body.to_string().into_bytes()),
            )?;
            let rec: MigrationRecord =
                serde_json::from_value(v.clone()).map_err(|e| CtlError::Api(e.to_string()))?;
            if !wait {
                match out {
                    Output::Json => print_json(&v),
                    Output::Table => println!("migration {} of {name}: {:?}", rec.id, rec.state),
                }
                return Ok(());
            }
            let done = follow_migration(ctx, &rec.id, out, timeout.map(Duration::from_secs))?;
            match done.state {
                MigrationState::Completed => Ok(()),
                s => Err(CtlError::Api(format!(
                    "migration {} {}: {}",
                    done.id,
                    format!("{s:?}").to_lowercase(),
                    done.error.unwrap_or_default()
                ))),
            }
        }
        VmCommand::Metrics { name, reset } => {
            let n = name_of(&name)?;
            if reset {
                ctx.call("PUT", &path(n, "metrics/reset"), None)?;
            }
            let v = ctx.json("GET", &path(n, "metrics"), None)?;
            match out {
                Output::Json => print_json(&v),
                Output::Table => match serde_json::from_value::<MeteringReport>(v.clone()) {
                    Ok(m) => metrics_table(&m),
                    Err(_) => print_json(&v),
                },
            }
            Ok(())
        }
        VmCommand::Delete { name } => {
            ctx.call("DELETE", &path(&name, ""), None)?;
            if out == Output::Table {
                println!("deleted {name}");
            }
            Ok(())
        }
        VmCommand::Export { name } => {
            let v = match name {
                Some(n) => ctx
                    .json("GET", &path(&n, ""), None)?
                    .get("definition")
                    .cloned()
                    .unwrap_or(Value::Null),
                None => ctx.json("GET", "/api/v1/export", None)?,
            };
            print_json(&v);
            Ok(())
        }
    }
}

/// The terminal in raw mode while it lives (keys reach the guest unprocessed).
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        // SAFETY: tcgetattr fills the zeroed termios for fd 0; cfmakeraw and tcsetattr
        // only read and write that struct and the terminal's settings.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(Self { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: puts back the settings tcgetattr returned for the same fd.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// Ctrl-]: ends an interactive console (as in telnet and virsh).
const CONSOLE_ESCAPE: u8 = 0x1d;

/// Sends input to the guest's serial port; says so if it did not take all of it.
fn serial_send(ctx: &Ctx, name: &str, bytes: Vec<u8>) -> Result<(), CtlError> {
    let n = bytes.len();
    let v = ctx.json("POST", &format!("/api/v1/vms/{name}/serial"), Some(bytes))?;
    let sent = v.get("sent").and_then(|s| s.as_u64()).unwrap_or(0) as usize;
    if sent < n {
        eprintln!(
            "vireoctl: the guest took {sent} of {n} bytes (it is not reading its serial port)"
        );
    }
    Ok(())
}

fn console(
    ctx: &Ctx,
    name: &str,
    lines: usize,
    follow: bool,
    send: Option<String>,
    input: bool,
) -> Result<(), CtlError> {
    use std::io::{IsTerminal, Read};
    let serial = format!("/api/v1/vms/{name}/serial");
    if let Some(text) = send {
        let mut b = text.into_bytes();
        b.push(b'\n');
        serial_send(ctx, name, b)?;
    }
    let r = ctx.call("GET", &format!("{serial}?lines={lines}"), None)?;
    let mut last: Vec<String> = String::from_utf8_lossy(&r.body)
        .lines()
        .map(str::to_string)
        .collect();
    // Keys come from a thread (a blocking read of stdin); None = the end.
    let keys = input.then(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Option<Vec<u8>>>();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(None);
                        return;
                    }
                    Ok(n) => {
                        let chunk = &buf[..n];
                        if let Some(i) = chunk.iter().position(|&b| b == CONSOLE_ESCAPE) {
                            let _ = tx.send(Some(chunk[..i].to_vec()));
                            let _ = tx.send(None);
                            return;
                        }
                        if tx.send(Some(chunk.to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        rx
    });
    let raw = if input && std::io::stdin().is_terminal() {
        RawTerminal::enter()
    } else {
        None
    };
    let eol = if raw.is_some() { "\r\n" } else { "\n" };
    let mut out = std::io::stdout();
    for l in &last {
        let _ = write!(out, "{l}{eol}");
    }
    let _ = out.flush();
    if !follow {
        return Ok(());
    }
    if raw.is_some() {
        eprint!("[console of {name}: input goes to the guest; Ctrl-] ends]\r\n");
    }
    loop {
        if let Some(rx) = &keys {
            loop {
                match rx.try_recv() {
                    Ok(Some(b)) if !b.is_empty() => serial_send(ctx, name, b)?,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(std::sync::mpsc::TryRecvError::Disconnected) => return Ok(()),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                }
            }
        }
        std::thread::sleep(Duration::from_millis(if input { 50 } else { 200 }));
        let r = ctx.call("GET", &format!("{serial}?lines=1000"), None)?;
        let now: Vec<String> = String::from_utf8_lossy(&r.body)
            .lines()
            .map(str::to_string)
            .collect();
        // Print what follows the last line we printed.
        let start = last
            .last()
            .and_then(|l| now.iter().rposition(|x| x == l))
            .map(|i| i + 1)
            .unwrap_or(0);
        for l in &now[start.min(now.len())..] {
            let _ = write!(out, "{l}{eol}");
        }
        let _ = out.flush();
        last = now;
    }
}

/// One line about a migration's progress.
fn progress_line(r: &MigrationRecord) -> String {
    match &r.progress {
        Some(p) if r.state == MigrationState::Running => format!(
            "round {}, {:.1} MiB sent, {} pages left, {:.0} MiB/s",
            p.rounds,
            p.bytes_sent as f64 / (1u64 << 20) as f64,
            p.remaining_pages,
            p.bandwidth_mib_s
        ),
        _ => format!("{:?}", r.state).to_lowercase(),
    }
}

/// Polls a migration until it ends, drawing a progress bar on a terminal (plain
/// lines at each state change otherwise); returns the final record.
fn follow_migration(
    ctx: &Ctx,
    id: &str,
    out: Output,
    timeout: Option<Duration>,
) -> Result<MigrationRecord, CtlError> {
    use std::io::IsTerminal;
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(100);
    if !std::io::stderr().is_terminal() || out == Output::Json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos:>3}% {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut last_state = None;
    loop {
        let v = ctx.json("GET", &format!("/api/v1/migrations/{id}"), None)?;
        let r: MigrationRecord =
            serde_json::from_value(v.clone()).map_err(|e| CtlError::Api(e.to_string()))?;
        bar.set_prefix(format!(
            "{} {}",
            r.vm,
            format!("{:?}", r.state).to_lowercase()
        ));
        bar.set_position(r.percent.round() as u64);
        bar.set_message(progress_line(&r));
        if last_state != Some(r.state) && bar.is_hidden() && out == Output::Table {
            eprintln!("migration {id} of {}: {}", r.vm, progress_line(&r));
        }
        last_state = Some(r.state);
        if r.state.finished() {
            bar.finish_and_clear();
            match out {
                Output::Json => print_json(&v),
                Output::Table => migration_table(&r),
            }
            return Ok(r);
        }
        if let Some(t) = timeout.filter(|t| started.elapsed() >= *t) {
            bar.finish_and_clear();
            return Err(CtlError::WaitTimedOut {
                what: format!("migration {id} of {}", r.vm),
                secs: t.as_secs(),
                state: progress_line(&r),
                hint: format!("vireoctl migration cancel {id}"),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn fmt_time(ms: Option<u64>) -> String {
    ms.map(|t| format!("{}.{:03}", t / 1000, t % 1000))
        .unwrap_or_else(|| "-".into())
}

fn migration_table(r: &MigrationRecord) {
    let p = r.progress.clone().unwrap_or_default();
    print_pairs(&[
        ("id", r.id.clone()),
        ("vm", r.vm.clone()),
        ("direction", format!("{:?}", r.direction).to_lowercase()),
        ("peer", r.peer.clone()),
        ("state", format!("{:?}", r.state).to_lowercase()),
        ("progress", format!("{:.0} %", r.percent)),
        ("rounds", p.rounds.to_string()),
        (
            "sent",
            format!("{} pages, {} bytes", p.pages_sent, p.bytes_sent),
        ),
        ("downtime", format!("{:.1} ms", p.downtime_ms)),
        ("streams", r.streams.to_string()),
        ("queued at", fmt_time(Some(r.queued_at_ms))),
        ("started at", fmt_time(r.started_at_ms)),
        ("finished at", fmt_time(r.finished_at_ms)),
        ("receiver", r.receiver_url.clone().unwrap_or("-".into())),
        ("error", r.error.clone().unwrap_or("-".into())),
    ]);
}

fn migration(ctx: &Ctx, cmd: MigrationCommand, out: Output) -> Result<(), CtlError> {
    let (v, one) = match &cmd {
        MigrationCommand::List { cluster: true } => return bulk::list(ctx, out),
        MigrationCommand::Cancel { id, cluster: true } => return bulk::cancel(ctx, id, out),
        MigrationCommand::List { .. } => (ctx.json("GET", "/api/v1/migrations", None)?, false),
        MigrationCommand::Info { id } => (
            ctx.json("GET", &format!("/api/v1/migrations/{id}"), None)?,
            true,
        ),
        MigrationCommand::Cancel { id, .. } => (
            ctx.json("DELETE", &format!("/api/v1/migrations/{id}"), None)?,
            true,
        ),
    };
    if out == Output::Json {
        print_json(&v);
        return Ok(());
    }
    if one {
        let r: MigrationRecord =
            serde_json::from_value(v).map_err(|e| CtlError::Api(e.to_string()))?;
        migration_table(&r);
        return Ok(());
    }
    let list: Vec<MigrationRecord> =
        serde_json::from_value(v).map_err(|e| CtlError::Api(e.to_string()))?;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.vm.clone(),
                format!("{:?}", r.direction).to_lowercase(),
                format!("{:?}", r.state).to_lowercase(),
                format!("{:.0}%", r.percent),
                fmt_ms_ago(Some(r.queued_at_ms)),
                r.peer.clone(),
                r.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "VM",
            "DIRECTION",
            "STATE",
            "PROGRESS",
            "QUEUED",
            "PEER",
            "ERROR",
        ],
        &rows,
    );
    Ok(())
}

fn audit(ctx: &Ctx, vm: Option<&str>, limit: usize, out: Output) -> Result<(), CtlError> {
    let mut path = format!("/api/v1/audit?limit={limit}");
    if let Some(vm) = vm {
        if agent::model::validate_name(vm).is_err() {
            return Err(CtlError::Usage(format!("--vm {vm:?}: not a VM name")));
        }
        path.push_str(&format!("&vm={vm}"));
    }
    let v = ctx.json("GET", &path, None)?;
    if out == Output::Json {
        print_json(&v);
        return Ok(());
    }
    let list: Vec<AuditEntry> =
        serde_json::from_value(v).map_err(|e| CtlError::Api(e.to_string()))?;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|e| {
            vec![
                fmt_time(Some(e.at_ms)),
                e.uid.map_or("-".into(), |u| u.to_string()),
                e.pid.map_or("-".into(), |p| p.to_string()),
                match &e.peer {
                    Some(p) => format!("peer {p}"),
                    None => e.role.clone(),
                },
                e.method.clone(),
                e.route.clone(),
                e.vm.clone().unwrap_or("-".into()),
                e.status.to_string(),
                e.detail.clone(),
            ]
        })
        .collect();
    print_table(
        &[
            "TIME", "UID", "PID", "ROLE", "METHOD", "ROUTE", "VM", "STATUS", "DETAIL",
        ],
        &rows,
    );
    Ok(())
}

fn run(cli: Cli) -> Result<(), CtlError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CtlError::Api(format!("cannot start the runtime: {e}")))?;
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "vireoctl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Pki(PkiCommand::Init { dir, name }) => {
            let w = agent::pki::init_ca(&dir, &name)
                .map_err(|e| CtlError::Api(agent::error_chain(&e)))?;
            println!(
                "CA certificate {}, key {}",
                w.cert.display(),
                w.key.display()
            );
            Ok(())
        }
        Command::Pki(PkiCommand::Issue {
            ca_dir,
            name,
            san,
            out,
        }) => {
            let w = agent::pki::issue(&ca_dir, &name, &san, &out)
                .map_err(|e| CtlError::Api(agent::error_chain(&e)))?;
            println!(
                "host {name}: certificate {}, key {}, CA {}",
                w.cert.display(),
                w.key.display(),
                out.join(agent::pki::CA_CERT).display()
            );
            Ok(())
        }
        Command::Pki(PkiCommand::Revoke { ca_dir, cert }) => {
            let crl = agent::pki::revoke(&ca_dir, &cert)
                .map_err(|e| CtlError::Api(agent::error_chain(&e)))?;
            println!("revoked {}: CRL {}", cert.display(), crl.display());
            Ok(())
        }
        Command::Man => {
            let man = clap_mangen::Man::new(Cli::command());
            man.render(&mut std::io::stdout())
                .map_err(|e| CtlError::Api(format!("cannot write the man page: {e}")))
        }
        Command::Host(HostCommand::Info) => {
            let ctx = Ctx {
                socket: cli.socket,
                what: "vireod",
                rt,
            };
            let v = ctx.json("GET", "/api/v1/host.info", None)?;
            match cli.output {
                Output::Json => print_json(&v),
                Output::Table => {
                    if let Value::Object(m) = &v {
                        let pairs: Vec<(&str, String)> = m
                            .iter()
                            .map(|(k, x)| (k.as_str(), x.to_string().trim_matches('"').to_string()))
                            .collect();
                        print_pairs(&pairs);
                    }
                }
            }
            Ok(())
        }
        Command::Cluster(ClusterCommand::Update(u)) => cluster_update(
            &Ctx {
                socket: cli.socket,
                what: "vireod",
                rt,
            },
            u,
            cli.output,
        ),
        Command::Cluster(ClusterCommand::Validate { out }) => cluster_validate(
            &Ctx {
                socket: cli.socket,
                what: "vireod",
                rt,
            },
            &out,
        ),
        Command::Cluster(ClusterCommand::Events { limit }) => cluster_events::list(
            &Ctx {
                socket: cli.socket,
                what: "vireod",
                rt,
            },
            limit,
            cli.output,
        ),
        Command::Cluster(ClusterCommand::Status) => {
            let ctx = Ctx {
                socket: cli.socket,
                what: "vireod",
                rt,
            };
            let v = ctx.json("GET", "/api/v1/cluster", None)?;
            match cli.output {
                Output::Json => print_json(&v),
                Output::Table => cluster_table(&v),
            }
            Ok(())
        }
        Command::Node(cmd) => {
            let ctx = Ctx {
                socket: cli.socket,
                what: "vireod",
                rt,
            };
            let (method, path, body) = match &cmd {
                NodeCommand::Drain {
                    node,
                    force,
                    concurrency,
                } => (
                    "POST",
                    format!("/api/v1/cluster/nodes/{node}/drain"),
                    Some(serde_json::json!({"force": force, "concurrency": concurrency})),
                ),
                NodeCommand::CancelDrain { node } => (
                    "DELETE",
                    format!("/api/v1/cluster/nodes/{node}/drain"),
                    None,
                ),
                NodeCommand::Resume { node, failback } => (
                    "POST",
                    format!("/api/v1/cluster/nodes/{node}/resume"),
                    Some(serde_json::json!({"failback": failback})),
                ),
                NodeCommand::Release { node } => (
                    "POST",
                    format!("/api/v1/cluster/nodes/{node}/release"),
                    None,
                ),
                NodeCommand::Status { node } => {
                    ("GET", format!("/api/v1/cluster/nodes/{node}"), None)
                }
            };
            let v = ctx.json(method, &path, body.map(|b| b.to_string().into_bytes()))?;
            match cli.output {
                Output::Json => print_json(&v),
                Output::Table => node_table(&cmd, &v),
            }
            Ok(())
        }
        Command::Replica(cmd) => replica(
            &Ctx {
                socket: cli.socket,
                what: "vireod",
                rt,
            },
            cmd,
            cli.output,
        ),
        Command::Migration(cmd) => migration(
            &Ctx {
                socket: cli.socket,
                what: "vireod",
                rt,
            },
            cmd,
            cli.output,
        ),
        Command::Audit { vm, limit } => audit(
            &Ctx {
                socket: cli.socket,
                what: "vireod",
                rt,
            },
            vm.as_deref(),
            limit,
            cli.output,
        ),
        Command::Vm(cmd) => match cli.vm_socket {
            Some(s) => direct(
                &Ctx {
                    socket: s,
                    what: "the VMM",
                    rt,
                },
                &cmd,
                cli.output,
            ),
            None => vm(
                &Ctx {
                    socket: cli.socket,
                    what: "vireod",
                    rt,
                },
                cmd,
                cli.output,
            ),
        },
    }
}

fn main() -> ExitCode {
    // `vireoctl vm list | head`: a closed pipe ends us quietly, as it does any Unix
    // tool, instead of a panic in println!.
    // SAFETY: resetting SIGPIPE's disposition before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vireoctl: error: {e}");
            match e {
                CtlError::WaitTimedOut { .. } => ExitCode::from(EXIT_WAIT_TIMED_OUT),
                _ => ExitCode::from(1),
            }
        }
    }
}

/// `vireoctl node ...` for people.
fn node_table(cmd: &NodeCommand, v: &Value) {
    let text = |x: &Value| {
        x.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| x.to_string())
    };
    let moves = |key: &str| {
        for m in v[key].as_array().into_iter().flatten() {
            println!(
                "  {} -> {} ({})",
                text(&m["vm"]),
                text(&m["to"]),
                text(&m["priority"])
            );
        }
    };
    match cmd {
        NodeCommand::Drain { node, .. } => {
            println!("draining {node}; moves:");
            moves("moves");
            for l in v["left"].as_array().into_iter().flatten() {
                println!(
                    "  {} stays on {node}: {}",
                    text(&l["vm"]),
                    text(&l["reason"])
                );
            }
        }
        NodeCommand::CancelDrain { node } => {
            println!(
                "{node}'s drain cancelled; {node} is up; moves dropped: {}",
                names_or_none(&v["cancelled"])
            );
        }
        NodeCommand::Resume { node, .. } => {
            println!("{node} is up; moving back:");
            moves("failback");
        }
        NodeCommand::Release { node } => println!("{node} released: up"),
        NodeCommand::Status { .. } => {
            let p = &v["progress"];
            println!(
                "{} {}: {} queued, {} migrating, {} moved, {} failed; {} departures in the last hour",
                text(&v["name"]),
                text(&v["state"]),
                p["queued"],
                p["migrating"],
                p["moved"],
                p["failed"],
                v["departures"].as_array().map_or(0, Vec::len)
            );
            println!(
                "{:<16} {:<10} {:<10} {:<10} {:<10} ERROR",
                "VM", "FROM", "TO", "REASON", "STATE"
            );
            for m in v["moves"].as_array().into_iter().flatten() {
                println!(
                    "{:<16} {:<10} {:<10} {:<10} {:<10} {}",
                    text(&m["vm"]),
                    text(&m["from"]),
                    text(&m["to"]),
                    text(&m["reason"]),
                    text(&m["state"]),
                    m["error"].as_str().unwrap_or("")
                );
            }
        }
    }
}

/// `vireoctl cluster validate`: the report, written as JSON and HTML; a table of the
/// checks that did not pass.
fn cluster_validate(ctx: &Ctx, out: &std::path::Path) -> Result<(), CtlError> {
    let v = ctx.json("GET", "/api/v1/cluster/validate", None)?;
    let report: agent::cluster_validate::Report =
        serde_json::from_value(v.clone()).map_err(|e| CtlError::Api(format!("the report: {e}")))?;
    let write = |name: &str, text: String| {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|e| CtlError::Api(format!("{}: {e}", p.display())))
    };
    write(
        "report.json",
        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
    )?;
    write("report.html", agent::cluster_validate::html(&report))?;
    use agent::cluster_validate::Status;
    let word = |s: Status| match s {
        Status::Pass => "pass",
        Status::Warn => "WARN",
        Status::Fail => "FAIL",
    };
    let pass = report
        .checks
        .iter()
        .filter(|c| c.status == Status::Pass)
        .count();
    println!(
        "cluster validation: {} ({pass} of {} checks pass); {}",
        word(report.status),
        report.checks.len(),
        out.join("report.html").display()
    );
    for c in report.checks.iter().filter(|c| c.status != Status::Pass) {
        println!(
            "  {} {:<14} {:<10} {}",
            word(c.status),
            c.check,
            c.node.as_deref().unwrap_or("cluster"),
            c.detail
        );
    }
    if report.status == Status::Fail {
        return Err(CtlError::Api("the cluster failed validation".into()));
    }
    Ok(())
}

/// `vireoctl cluster update`: starts a run and follows it, or shows the last one.
fn cluster_update(ctx: &Ctx, u: UpdateArgs, output: Output) -> Result<(), CtlError> {
    let show = |v: &Value| match output {
        Output::Json => print_json(v),
        Output::Table => update_table(v),
    };
    let Some(hook) = u.run else {
        let v = ctx.json("GET", "/api/v1/cluster/update", None)?;
        show(&v);
        return Ok(());
    };
    let body = serde_json::json!({
        "hook": hook, "args": u.args, "nodes": u.nodes, "timeout_s": u.timeout,
    });
    let started = ctx.json(
        "POST",
        "/api/v1/cluster/update",
        Some(body.to_string().into_bytes()),
    )?;
    let id = started["id"].clone();
    if u.detach {
        show(&started);
        return Ok(());
    }
    if output == Output::Table {
        println!("update run {id}: hook {hook}");
    }
    // Followed until it ends; vireod may be restarted by its own node's hook
    // meanwhile, so errors are tried again for a while.
    let mut seen = String::new();
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let v = match ctx.json("GET", "/api/v1/cluster/update", None) {
            Ok(v) => {
                failing_since = None;
                v
            }
            Err(e) => {
                let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > std::time::Duration::from_secs(120) {
                    return Err(e);
                }
                continue;
            }
        };
        if v["id"] != id {
            return Err(CtlError::Api(format!(
                "another update run replaced run {id}"
            )));
        }
        if output == Output::Table {
            let now: Vec<String> = v["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| format!("{} {}", text(&s["node"]), text(&s["phase"])))
                .collect();
            let now = now.join(", ");
            if now != seen {
                println!("  {now}");
                seen = now;
            }
        }
        match v["state"].as_str() {
            Some("running") => continue,
            Some("succeeded") => {
                show(&v);
                return Ok(());
            }
            _ => {
                show(&v);
                return Err(CtlError::Api(format!(
                    "update run {id} failed: {}",
                    v["error"].as_str().unwrap_or("(no reason recorded)")
                )));
            }
        }
    }
}

/// A JSON list of names as "a, b", or "none".
fn names_or_none(list: &Value) -> String {
    let names: Vec<String> = list.as_array().into_iter().flatten().map(text).collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

fn text(x: &Value) -> String {
    x.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| x.to_string())
}

/// An update run for people: its state, then one line per node, then the output tail
/// of the node that failed.
fn update_table(v: &Value) {
    println!(
        "update run {}: hook {} {}: {}",
        v["id"],
        text(&v["hook"]),
        v["args"]
            .as_array()
            .map(|a| a.iter().map(text).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
        text(&v["state"])
    );
    if let Some(e) = v["error"].as_str() {
        println!("{e}");
    }
    println!("{:<16} {:<14} {:>6} ERROR", "NODE", "PHASE", "EXIT");
    for s in v["steps"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<14} {:>6} {}",
            text(&s["node"]),
            text(&s["phase"]),
            s["exit_code"]
                .as_i64()
                .map_or("-".into(), |c| c.to_string()),
            s["error"].as_str().unwrap_or("")
        );
    }
    for s in v["steps"].as_array().into_iter().flatten() {
        if s["phase"] == "failed" && !s["output_tail"].as_str().unwrap_or("").is_empty() {
            println!("--- hook output on {} (tail) ---", text(&s["node"]));
            print!("{}", text(&s["output_tail"]));
        }
    }
}

/// `vireoctl cluster status` as two tables: nodes, then VMs.
fn cluster_table(v: &Value) {
    let text = |x: &Value| {
        x.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| x.to_string())
    };
    println!(
        "{:<16} {:<12} {:>10} {:>6}",
        "NODE", "STATE", "MEMORY", "VCPUS"
    );
    for n in v["nodes"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<12} {:>10} {:>6}",
            text(&n["name"]),
            text(&n["state"]),
            format!("{}M", n["capacity"]["memory_mib"]),
            n["capacity"]["vcpus"]
        );
    }
    println!();
    println!(
        "{:<16} {:<14} {:<20} {:>8}",
        "VM", "PRIORITY", "OWNER", "TOKEN"
    );
    for vm in v["vms"].as_array().into_iter().flatten() {
        let owner = match &vm["owner"] {
            Value::Object(o) if o.get("alive") == Some(&Value::Bool(false)) => {
                format!("{} (dead)", text(&o["node"]))
            }
            Value::Object(o) => text(&o["node"]),
            other => text(other),
        };
        println!(
            "{:<16} {:<14} {:<20} {:>8}",
            text(&vm["name"]),
            text(&vm["priority"]),
            owner,
            text(&vm["fencing_token"])
        );
    }
}
