//! Resource metering (Hyper-V's `Measure-VM`): every interval, for each running VM,
//! CPU time (/proc/PID/stat, all threads), resident memory (/proc/PID/status) and the
//! VMM's disk and network counters (`vm.counters`), added to the VM's totals in the
//! inventory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::inventory::Sample;
use crate::supervisor::Supervisor;
use crate::{client, error_chain, now_ms, procfs};

/// Sums the block counters of every device in a `vm.counters` answer:
/// (read bytes, write bytes, read ops, write ops).
pub fn disk_totals(counters: &serde_json::Value) -> (u64, u64, u64, u64) {
    let mut t = (0, 0, 0, 0);
    if let Some(devs) = counters.as_object() {
        for c in devs.values() {
            let g = |k: &str| c.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            t.0 += g("read_bytes");
            t.1 += g("write_bytes");
            t.2 += g("read_ops");
            t.3 += g("write_ops");
        }
    }
    t
}

/// Sums the traffic of every network device in a `vm.counters` answer: (bytes the
/// guest received, bytes it sent). Network devices are those that count packets
/// (`rx_packets`, `tx_packets`); the console's `rx_bytes`/`tx_bytes` are not traffic.
pub fn net_totals(counters: &serde_json::Value) -> (u64, u64) {
    let mut t = (0, 0);
    if let Some(devs) = counters.as_object() {
        for c in devs.values() {
            if c.get("rx_packets").is_none() || c.get("tx_packets").is_none() {
                continue;
            }
            let g = |k: &str| c.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            t.0 += g("rx_bytes");
            t.1 += g("tx_bytes");
        }
    }
    t
}

async fn read_sample(name: String, pid: i32, start_ticks: u64, socket: &Path) -> Option<Sample> {
    let counters = client::request(
        socket,
        "GET",
        "/api/v1/vm.counters",
        None,
        Duration::from_secs(2),
    )
    .await
    .ok()
    .filter(|r| r.ok())
    .and_then(|r| r.json());
    let st = procfs::stat(pid)?;
    if st.start_ticks != start_ticks {
        return None; // Not the same process any more.
    }
    let rss = procfs::rss_bytes(pid).unwrap_or(0);
    let (dr, dw, ro, wo) = counters.as_ref().map(disk_totals).unwrap_or_default();
    let (net_rx, net_tx) = counters.as_ref().map(net_totals).unwrap_or_default();
    Some(Sample {
        name,
        at_ms: now_ms(),
        pid,
        start_ticks,
        age_ms: procfs::age_ms(start_ticks),
        cpu_ns: st.cpu_ns,
        rss_bytes: rss,
        disk_read: dr,
        disk_write: dw,
        read_ops: ro,
        write_ops: wo,
        net_rx,
        net_tx,
    })
}

/// Samples every running VM once.
pub async fn sample_all(sup: &Arc<Supervisor>) {
    let mut tasks = tokio::task::JoinSet::new();
    for (name, pid, start, sock) in sup.running_processes() {
        let s = sup.clone();
        tasks.spawn(async move {
            crate::vmm_events::poll(&s, &name, pid, &sock).await;
            read_sample(name, pid, start, &sock).await
        });
    }
    let mut samples = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some(s)) = r {
            samples.push(s);
        }
    }
    // The transaction waits for fsync: off the runtime's worker threads.
    let sup = sup.clone();
    let _ = tokio::task::spawn_blocking(move || store(&sup, &samples)).await;
}

/// Samples one VM now (before it is stopped, so its last I/O is counted).
pub async fn sample_one(sup: &Arc<Supervisor>, name: &str) {
    let Some((n, pid, start, sock)) = sup.running_processes().into_iter().find(|p| p.0 == name)
    else {
        return;
    };
    if let Some(s) = read_sample(n, pid, start, &sock).await {
        store(sup, &[s]);
    }
}

fn store(sup: &Supervisor, samples: &[Sample]) {
    if samples.is_empty() {
        return;
    }
    if let Err(e) = sup.inventory().record_samples(samples) {
        warn!(error = %error_chain(&e), "cannot store metering samples");
    }
}

/// Runs forever: one round of samples per interval.
pub async fn run(sup: Arc<Supervisor>) {
    let mut tick = tokio::time::interval(sup.cfg.meter_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sample_all(&sup).await;
    }
}

/// Prometheus text exposition of every VM's state and totals.
pub fn prometheus(sup: &Supervisor) -> String {
    use std::fmt::Write;
    let vms = sup.list();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    };
    let mut rows = Vec::new();
    for v in &vms {
        for s in crate::model::VmState::ALL.map(|s| s.as_str()) {
            rows.push((
                format!("vm=\"{}\",state=\"{s}\"", v.name),
                f64::from(u8::from(v.state.as_str() == s)),
            ));
        }
    }
    metric(
        "vireo_vm_state",
        "gauge",
        "1 for the VM's current state",
        rows,
    );
    metric(
        "vireo_vm_restarts",
        "gauge",
        "Restarts by the restart policy since the last user start",
        vms.iter()
            .map(|v| (format!("vm=\"{}\"", v.name), f64::from(v.restarts)))
            .collect(),
    );
    let reports: Vec<_> = {
        let inv = sup.inventory();
        vms.iter()
            .filter_map(|v| inv.metering(&v.name).ok().flatten())
            .collect()
    };
    let per = |f: &dyn Fn(&crate::model::MeteringReport) -> f64| {
        reports
            .iter()
            .map(|r| (format!("vm=\"{}\"", r.name), f(r)))
            .collect::<Vec<_>>()
    };
    metric(
        "vireo_vm_cpu_seconds_total",
        "counter",
        "CPU time of the VM's VMM since the metering start",
        per(&|r| r.cpu_ns as f64 / 1e9),
    );
    metric(
        "vireo_vm_memory_avg_bytes",
        "gauge",
        "Average resident memory since the metering start",
        per(&|r| r.avg_memory_bytes as f64),
    );
    metric(
        "vireo_vm_memory_max_bytes",
        "gauge",
        "Largest resident memory since the metering start",
        per(&|r| r.max_memory_bytes as f64),
    );
    metric(
        "vireo_vm_disk_read_bytes_total",
        "counter",
        "Bytes the guest read from its disks",
        per(&|r| r.disk_read_bytes as f64),
    );
    metric(
        "vireo_vm_disk_written_bytes_total",
        "counter",
        "Bytes the guest wrote to its disks",
        per(&|r| r.disk_write_bytes as f64),
    );
    metric(
        "vireo_vm_network_rx_bytes_total",
        "counter",
        "Bytes the guest received on its network devices",
        per(&|r| r.net_rx_bytes as f64),
    );
    metric(
        "vireo_vm_network_tx_bytes_total",
        "counter",
        "Bytes the guest sent on its network devices",
        per(&|r| r.net_tx_bytes as f64),
    );
    let running = vms.iter().filter(|v| v.state.has_process()).count();
    let _ = writeln!(
        out,
        "# HELP vireod_vms VMs defined\n# TYPE vireod_vms gauge\nvireod_vms {}\n# HELP vireod_vms_running VMs with a VMM process\n# TYPE vireod_vms_running gauge\nvireod_vms_running {running}",
        vms.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_totals_sum_every_disk() {
        let c = serde_json::json!({
            "vcpus": {"exits": 5},
            "disk0": {"read_bytes": 512, "write_bytes": 4096, "read_ops": 1, "write_ops": 8},
            "disk1": {"read_bytes": 1024, "write_bytes": 0, "read_ops": 2, "write_ops": 0},
        });
        assert_eq!(disk_totals(&c), (1536, 4096, 3, 8));
        assert_eq!(disk_totals(&serde_json::json!(null)), (0, 0, 0, 0));
    }

    #[test]
    fn net_totals_sum_network_devices_only() {
        let c = serde_json::json!({
            "disk0": {"read_bytes": 512, "write_bytes": 4096},
            "console0": {"rx_bytes": 3, "tx_bytes": 900},
            "net0": {"rx_bytes": 1000, "rx_packets": 10, "tx_bytes": 60, "tx_packets": 1},
            "lan": {"rx_bytes": 24, "rx_packets": 2, "tx_bytes": 0, "tx_packets": 0},
        });
        assert_eq!(net_totals(&c), (1024, 60));
        assert_eq!(net_totals(&serde_json::json!({})), (0, 0));
    }
}
