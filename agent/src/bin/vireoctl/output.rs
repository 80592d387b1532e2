//! How vireoctl prints: JSON as vireod answered it, or tables and key/value pairs for people.

use super::*;

pub(crate) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub(crate) fn fmt_ms_ago(ms: Option<u64>) -> String {
    match ms {
        None => "-".into(),
        Some(t) => {
            let s = agent::now_ms().saturating_sub(t) / 1000;
            format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
        }
    }
}

pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
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

pub(crate) fn print_pairs(pairs: &[(&str, String)]) {
    let w = pairs.iter().map(|p| p.0.len()).max().unwrap_or(0);
    for (k, v) in pairs {
        println!("{k:<w$}  {v}");
    }
}

pub(crate) fn status_table(s: &VmStatus) {
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
        ("priority", s.priority.to_string()),
        ("restart", s.restart.to_string()),
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
        (
            "memory",
            super::memory::memory_cell(s.memory.as_ref(), s.definition.as_ref()),
        ),
    ]);
    if s.definition_pending {
        println!("the definition was changed while the VM ran: it applies at the next start");
    }
    if let Some(e) = &s.last_exit {
        if !e.serial_tail.is_empty() {
            println!("last serial lines:");
            for l in e.serial_tail.iter().rev().take(5).rev() {
                println!("  {l}");
            }
        }
    }
}

pub(crate) fn metrics_table(m: &MeteringReport) {
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

/// Bytes as the flags write them: 512M, 2G, 1536M.
pub(crate) fn fmt_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

pub(crate) fn fmt_time(ms: Option<u64>) -> String {
    ms.map(|t| format!("{}.{:03}", t / 1000, t % 1000))
        .unwrap_or_else(|| "-".into())
}

/// A JSON list of names as "a, b", or "none".
pub(crate) fn names_or_none(list: &Value) -> String {
    let names: Vec<String> = list.as_array().into_iter().flatten().map(text).collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

pub(crate) fn text(x: &Value) -> String {
    x.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| x.to_string())
}
