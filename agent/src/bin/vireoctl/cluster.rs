//! `vireoctl cluster ...` and `vireoctl node ...`: the failover cluster from the command line.

use super::*;

#[derive(Subcommand, Debug)]
pub(crate) enum ClusterCommand {
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
pub(crate) struct UpdateArgs {
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
pub(crate) enum UpdateCommand {
    /// The last update run: each node's phase, the hook's exit status and output tail.
    Status,
}

#[derive(Subcommand, Debug)]
pub(crate) enum NodeCommand {
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

/// `vireoctl node ...` for people.
pub(crate) fn node_table(cmd: &NodeCommand, v: &Value) {
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
pub(crate) fn cluster_validate(ctx: &Ctx, out: &std::path::Path) -> Result<(), CtlError> {
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
pub(crate) fn cluster_update(ctx: &Ctx, u: UpdateArgs, output: Output) -> Result<(), CtlError> {
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

/// An update run for people: its state, then one line per node, then the output tail
/// of the node that failed.
pub(crate) fn update_table(v: &Value) {
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
pub(crate) fn cluster_table(v: &Value) {
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
