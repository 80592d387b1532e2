//! `vireoctl cluster events`: the failover controller's decisions, newest first.

use super::{fmt_time, print_json, print_table, text, CtlError, Ctx, Output};

/// Prints the newest `limit` events of the cluster (`GET /api/v1/cluster/events`).
pub fn list(ctx: &Ctx, limit: usize, out: Output) -> Result<(), CtlError> {
    let v = ctx.json(
        "GET",
        &format!("/api/v1/cluster/events?limit={limit}"),
        None,
    )?;
    if out == Output::Json {
        print_json(&v);
        return Ok(());
    }
    let or_dash = |x: &serde_json::Value| x.as_str().unwrap_or("-").to_string();
    let rows: Vec<Vec<String>> = v["events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                fmt_time(e["at_ms"].as_u64()),
                text(&e["revision"]),
                text(&e["vm"]),
                text(&e["action"]),
                or_dash(&e["from"]),
                or_dash(&e["to"]),
            ]
        })
        .collect();
    print_table(&["TIME", "TOKEN", "VM", "ACTION", "FROM", "TO"], &rows);
    Ok(())
}
