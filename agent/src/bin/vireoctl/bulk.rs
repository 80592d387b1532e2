//! `vireoctl vm migrate|start|stop|save --selector ...` (and `vm migrate A B --to NODE`):
//! bulk requests on clustered VMs (`POST /api/v1/cluster/bulk`), and `vireoctl
//! migration list|cancel --cluster`: the cluster-wide migration queue.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::{fmt_time, names_or_none, print_json, print_table, text, CtlError, Ctx, Output};

/// Whether `vm migrate --to TO` names a cluster node (or `auto`) rather than another
/// host's vireod: not an `https://` URL, no `/`, and no file of that name here (a
/// vireod socket).
pub fn is_cluster_target(to: &str) -> bool {
    !to.starts_with("https://") && !to.contains('/') && !std::path::Path::new(to).exists()
}

/// A bulk request as asked on the command line.
#[derive(Default)]
pub struct Ask<'a> {
    pub op: &'a str,
    /// The VMs by name, or `selector`.
    pub names: &'a [String],
    pub selector: Option<&'a str>,
    /// Migrate: a node's name, or `auto`.
    pub to: Option<&'a str>,
    pub force: bool,
    pub concurrency: Option<u32>,
    /// Migrate: follow the moves until each ended.
    pub wait: bool,
    /// How long `wait` follows them at most.
    pub timeout: Option<Duration>,
}

/// Sends a bulk request and prints its answer; with `wait`, follows its moves until
/// each ended (an error when one failed).
pub fn request(ctx: &Ctx, ask: Ask<'_>, out: Output) -> Result<(), CtlError> {
    let op = ask.op;
    let body = serde_json::json!({
        "op": op,
        "names": ask.names,
        "selector": ask.selector,
        "to": ask.to,
        "force": ask.force,
        "concurrency": ask.concurrency,
    });
    let v = ctx.json(
        "POST",
        "/api/v1/cluster/bulk",
        Some(body.to_string().into_bytes()),
    )?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => print_request(&v),
    }
    let id = v["id"].as_str().unwrap_or_default().to_string();
    if ask.wait && op == "migrate" {
        follow(ctx, &id, out, ask.timeout)?;
    }
    Ok(())
}

fn print_request(v: &Value) {
    let acted = v["vms"].as_array().map_or(0, Vec::len);
    println!("request {}: {} {acted} VMs", text(&v["id"]), text(&v["op"]));
    for m in v["moves"].as_array().into_iter().flatten() {
        println!(
            "  {} {} -> {} ({})",
            text(&m["vm"]),
            text(&m["from"]),
            text(&m["to"]),
            text(&m["priority"])
        );
    }
    if v["moves"].as_array().is_none_or(Vec::is_empty) {
        for vm in v["vms"].as_array().into_iter().flatten() {
            println!("  {}", text(vm));
        }
    }
    for (key, what) in [("skipped", "skipped"), ("left", "left where it is")] {
        for s in v[key].as_array().into_iter().flatten() {
            println!("  {} {what}: {}", text(&s["vm"]), text(&s["reason"]));
        }
    }
}

/// How often `--wait` reads the queue.
const POLL: Duration = Duration::from_millis(500);

/// Follows request `id`'s moves until none is unfinished (or `timeout` passed),
/// printing each change.
fn follow(ctx: &Ctx, id: &str, out: Output, timeout: Option<Duration>) -> Result<(), CtlError> {
    let started = std::time::Instant::now();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let q = ctx.json("GET", "/api/v1/cluster/migrations", None)?;
        let mine: Vec<&Value> = q["moves"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["request"] == id)
            .collect();
        for m in &mine {
            let vm = text(&m["vm"]);
            let state = text(&m["state"]);
            if seen.get(&vm) != Some(&state) && out == Output::Table {
                println!("  {vm}: {state} {}", m["error"].as_str().unwrap_or(""));
            }
            seen.insert(vm, state);
        }
        if mine
            .iter()
            .all(|m| ["moved", "failed"].contains(&text(&m["state"]).as_str()))
        {
            let failed: Vec<String> = mine
                .iter()
                .filter(|m| m["state"] == "failed")
                .map(|m| format!("{} ({})", text(&m["vm"]), text(&m["error"])))
                .collect();
            if failed.is_empty() {
                return Ok(());
            }
            return Err(CtlError::Api(format!(
                "request {id}: moves failed: {}",
                failed.join(", ")
            )));
        }
        if let Some(t) = timeout.filter(|t| started.elapsed() >= *t) {
            let unfinished: Vec<String> = seen
                .iter()
                .filter(|(_, state)| !["moved", "failed"].contains(&state.as_str()))
                .map(|(vm, state)| format!("{vm} {state}"))
                .collect();
            return Err(CtlError::WaitTimedOut {
                what: format!("request {id}"),
                secs: t.as_secs(),
                state: unfinished.join(", "),
                hint: format!("vireoctl migration cancel --cluster {id}"),
            });
        }
        std::thread::sleep(POLL);
    }
}

/// `vireoctl migration list --cluster`.
pub fn list(ctx: &Ctx, out: Output) -> Result<(), CtlError> {
    let q = ctx.json("GET", "/api/v1/cluster/migrations", None)?;
    if out == Output::Json {
        print_json(&q);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = q["moves"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let of = match m["reason"].as_str() {
                Some("bulk") => text(&m["request"]),
                Some(r) => format!("{r} {}", text(&m["drain_of"])),
                None => "-".into(),
            };
            vec![
                text(&m["vm"]),
                text(&m["from"]),
                text(&m["to"]),
                text(&m["priority"]),
                text(&m["state"]),
                of,
                fmt_time(m["started_ms"].as_u64()),
                fmt_time(m["finished_ms"].as_u64()),
                m["error"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "VM", "FROM", "TO", "PRIORITY", "STATE", "REQUEST", "STARTED", "FINISHED", "ERROR",
        ],
        &rows,
    );
    Ok(())
}

/// `vireoctl migration cancel --cluster ID`.
pub fn cancel(ctx: &Ctx, id: &str, out: Output) -> Result<(), CtlError> {
    let v = ctx.json("DELETE", &format!("/api/v1/cluster/bulk/{id}"), None)?;
    match out {
        Output::Json => print_json(&v),
        Output::Table => {
            println!(
                "request {id} cancelled; moves dropped: {}",
                names_or_none(&v["cancelled"])
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_name_or_auto_is_a_cluster_target_a_url_or_a_path_is_not() {
        assert!(is_cluster_target("node2"));
        assert!(is_cluster_target("auto"));
        assert!(!is_cluster_target("https://host-b:7443"));
        assert!(!is_cluster_target("/run/vireo/b.sock"));
        assert!(!is_cluster_target("./b.sock"));
    }
}
