//! `vireo-switch`: Vireo's host virtual switch. `run` switches frames between host
//! interfaces (a VM's tap, a veth end, an uplink) through AF_PACKET sockets, under the
//! policy of the `switch` library; `ctl` sends one request to a running switch's
//! control socket. See docs/switch.md.
//!
//! `run` confines itself (docs/switch.md, "Confinement"): every socket of its
//! configuration is opened first, then it drops every capability but CAP_NET_RAW (and
//! its uid with `--user`), sets no_new_privs and its rlimits, and each thread installs
//! its seccomp filter ([`confinement`]). Any panic ends the whole process.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod afpacket;
mod config;
mod confinement;
mod control;
mod daemon;
mod domain;
mod opener;
mod privileges;
mod seccomp;
mod team_io;
#[cfg(feature = "test-hooks")]
mod test_hooks;
mod vhost_user;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vireo-switch", version, about = "Vireo's host virtual switch")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the switch until SIGTERM or SIGINT.
    Run {
        /// A port: name=N[,iface=IF|,vhost-user=SOCKET][,vlan=V[,pvlan=isolated|community:C|promiscuous]]
        /// [,trunk=V:V..[,native=V]][,mac=M][,ip=A]..[,guard=mac+dhcp+router+arp+nd|all]
        /// [,storm=PPS][,mirror=MONITOR[:in|out|both]]; a team of uplinks:
        /// name=N,team=IF+IF..[,team-mode=active-backup|hash][,vlan/trunk options]
        #[arg(long = "port", value_name = "SPEC")]
        ports: Vec<String>,
        /// A TOML (or .json) file with control, aging_secs, mtu, ports and acls.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The control socket (JSON lines; owner-only).
        #[arg(long)]
        control: Option<PathBuf>,
        /// Seconds a learned MAC address lives unseen (default 300).
        #[arg(long)]
        aging_secs: Option<u64>,
        /// Largest payload after the Ethernet header (default 1500).
        #[arg(long)]
        mtu: Option<usize>,
        #[command(flatten)]
        confinement: confinement::Confinement,
    },
    /// Streams the frames entering and leaving PORT, with the switch's verdict on
    /// each, as pcapng to stdout (e.g. `| tshark -r -`) until interrupted.
    Trace {
        #[arg(long)]
        control: PathBuf,
        port: String,
    },
    /// Sends one JSON request (e.g. '{"op":"ports"}') and prints the reply.
    Ctl {
        #[arg(long)]
        control: PathBuf,
        request: String,
    },
}

fn run(
    ports: Vec<String>,
    config: Option<PathBuf>,
    control: Option<PathBuf>,
    aging_secs: Option<u64>,
    mtu: Option<usize>,
    confinement: confinement::Confinement,
) -> Result<(), String> {
    let file = config
        .as_deref()
        .map(config::read_file)
        .transpose()
        .map_err(|e| e.to_string())?;
    let cfg = config::build(file, control, &ports, aging_secs, mtu).map_err(|e| e.to_string())?;
    confinement.start(cfg)?.run().map_err(|e| e.to_string())
}

fn ctl(control: PathBuf, request: String) -> Result<bool, String> {
    let mut s = UnixStream::connect(&control)
        .map_err(|e| format!("control socket {}: {e}", control.display()))?;
    writeln!(s, "{}", request.trim()).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    print!("{line}");
    Ok(line.contains("\"ok\":true"))
}

fn trace(control: PathBuf, port: String) -> Result<bool, String> {
    use std::os::fd::AsFd;
    let mut s = UnixStream::connect(&control)
        .map_err(|e| format!("control socket {}: {e}", control.display()))?;
    let req = serde_json::json!({ "op": "trace", "port": port });
    writeln!(s, "{req}").map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.contains("\"ok\":true") {
        eprint!("{line}");
        return Ok(false);
    }
    eprintln!("vireo-switch: tracing port {port} (pcapng on stdout)");
    // Unbuffered: every block reaches the file as it comes, also when interrupted.
    let mut out = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .map_err(|e| e.to_string())?;
    std::io::copy(&mut reader, &mut out).map_err(|e| e.to_string())?;
    Ok(true)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    sandbox::panic::install_abort_hook("vireo-switch");
    let result = match Cli::parse().cmd {
        Cmd::Run {
            ports,
            config,
            control,
            aging_secs,
            mtu,
            confinement,
        } => run(ports, config, control, aging_secs, mtu, confinement).map(|()| true),
        Cmd::Ctl { control, request } => ctl(control, request),
        Cmd::Trace { control, port } => trace(control, port),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vireo-switch: {e}");
            ExitCode::from(2)
        }
    }
}
