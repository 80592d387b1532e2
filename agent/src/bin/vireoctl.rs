//! `vireoctl`: the command-line client of vireod (or, with `--vm-socket`, of one VMM).

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use agent::audit::Entry as AuditEntry;
use agent::client;
use agent::model::{
    MeteringReport, MigrationRecord, MigrationState, Priority, RestartPolicy, VmDefinition,
    VmState, VmStatus,
};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

#[path = "vireoctl/bulk.rs"]
mod bulk;
#[path = "vireoctl/cluster.rs"]
mod cluster;
#[path = "vireoctl/cluster_events.rs"]
mod cluster_events;
#[path = "vireoctl/console.rs"]
mod console;
#[path = "vireoctl/definitions.rs"]
mod definitions;
#[path = "vireoctl/memory.rs"]
mod memory;
#[path = "vireoctl/migration.rs"]
mod migration;
#[path = "vireoctl/output.rs"]
mod output;
#[path = "vireoctl/power.rs"]
mod power;
#[path = "vireoctl/replica.rs"]
mod replica;
#[path = "vireoctl/vm.rs"]
mod vm;
use cluster::{
    cluster_table, cluster_update, cluster_validate, node_table, ClusterCommand, NodeCommand,
};
use console::console;
use migration::{follow_migration, migration, MigrationCommand};
use output::*;
use replica::{replica, ReplicaCommand};
use serde_json::Value;
use vm::{direct, vm, VmCommand};

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

// Parsed once per run: the size of the VM flags' variant (a Vec per repeatable flag)
// costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
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
    /// The host's virtual switches (vireod --switch): running or not, restarts, and
    /// the running VMs' ports on each.
    Switches,
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
        Command::Host(HostCommand::Switches) => {
            let ctx = Ctx {
                socket: cli.socket,
                what: "vireod",
                rt,
            };
            let v = ctx.json("GET", "/api/v1/switches", None)?;
            match cli.output {
                Output::Json => print_json(&v),
                Output::Table => {
                    let s = |x: &Value| x.as_str().unwrap_or("-").to_string();
                    let rows: Vec<Vec<String>> = v
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default()
                        .iter()
                        .map(|w| {
                            let ports: Vec<String> = w["ports"]
                                .as_array()
                                .map(Vec::as_slice)
                                .unwrap_or_default()
                                .iter()
                                .map(|p| s(&p["port"]))
                                .collect();
                            vec![
                                s(&w["name"]),
                                s(&w["uplink"]),
                                if w["running"] == true { "yes" } else { "no" }.into(),
                                w["pid"].as_u64().map_or("-".into(), |p| p.to_string()),
                                w["restarts"].to_string(),
                                ports.join(","),
                            ]
                        })
                        .collect();
                    print_table(
                        &["NAME", "UPLINK", "RUNNING", "PID", "RESTARTS", "PORTS"],
                        &rows,
                    );
                }
            }
            Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks over every command (flattened VM flags beside
    /// vireoctl's own: no clashing names).
    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn vm_create_takes_vireos_flags() {
        let cli = Cli::try_parse_from([
            "vireoctl",
            "vm",
            "create",
            "web",
            "--kernel",
            "/k",
            "--memory",
            "2G",
            "--cpus",
            "4",
            "--disk",
            "path=/d.vhdx",
            "--net",
            "tap=t0",
            "--priority",
            "high",
            "--restart",
            "on-failure",
        ])
        .unwrap();
        let Command::Vm(VmCommand::Create { vm, policy, .. }) = cli.command else {
            panic!("not vm create");
        };
        let cfg = vm.config("tty").unwrap().unwrap();
        assert_eq!(cfg.memory.size, 2 << 30);
        assert_eq!(cfg.cpus.boot, 4);
        assert_eq!(cfg.nets.len(), 1);
        assert_eq!(policy.priority, Some(Priority::High));
        assert_eq!(policy.restart, Some(RestartPolicy::OnFailure));
        assert!(Cli::try_parse_from(["vireoctl", "vm", "destroy", "web"]).is_ok());
        assert!(Cli::try_parse_from(["vireoctl", "vm", "undefine", "web"]).is_ok());
        assert!(
            Cli::try_parse_from(["vireoctl", "vm", "create", "w", "--priority", "High"]).is_err()
        );
    }
}
