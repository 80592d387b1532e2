//! `vireoctl replica ...`: Vireo Replica from the command line (enable, status, pause, resume, failover and its kin).

use super::*;

#[derive(Subcommand, Debug)]
pub(crate) enum ReplicaCommand {
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
        /// Bytes of segments each disk's change log may hold while the replica is
        /// unreachable (2G, 512M ...; default 2G, at least 1M): over it the log keeps
        /// a region bitmap and replication catches up from it.
        #[arg(long, value_name = "BYTES")]
        log_budget: Option<String>,
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
pub(crate) fn parse_spacing(s: &str) -> Result<u64, String> {
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

pub(crate) fn parse_interval(s: &str) -> Result<f64, String> {
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
pub(crate) fn limit_value(arg: &str) -> Value {
    arg.parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map(Value::Number)
        .unwrap_or_else(|| Value::String(arg.to_string()))
}

/// A JSON value as a table cell (null: `-`).
pub(crate) fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn replica(ctx: &Ctx, cmd: ReplicaCommand, out: Output) -> Result<(), CtlError> {
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
            log_budget,
        } => {
            let body = serde_json::json!({"to": to, "server_name": to_name, "interval_s": interval, "history": history, "history_spacing_s": history_spacing, "bandwidth_mbit": bandwidth.as_deref().map(limit_value), "log_budget": log_budget});
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
                if r["log_degraded"] == true {
                    format!("{} (log over budget: region bitmap)", cell(&r["state"]))
                } else {
                    cell(&r["state"])
                },
                r["last_point"]
                    .as_u64()
                    .map(|p| p.to_string())
                    .unwrap_or("-".into()),
                fmt_ms_ago(r["last_point_at_ms"].as_u64()),
                format!(
                    "{}",
                    r["segment_bytes_sent"].as_u64().unwrap_or(0)
                        + r["base_bytes_sent"].as_u64().unwrap_or(0)
                        + r["catch_up_bytes_sent"].as_u64().unwrap_or(0)
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
