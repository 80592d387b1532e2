//! Dynamic Memory's balancer (Hyper-V's): every round (`--balance-interval-ms`,
//! default 1 s) it reads each running Dynamic Memory VM's memory from its VMM
//! (`vm.info`: boot + plugged; `vm.counters`: the balloon and the guest's
//! statistics), decides what each should have ([`policy::decide`]) within the host's
//! budget, and asks the VMMs (`vm.resize`: virtio-mem plugs above boot memory, the
//! balloon below it).
//!
//! The budget is what all Dynamic Memory VMs together may have: `--memory-budget`,
//! or else the host's MemAvailable plus what those VMs have now, less
//! `--memory-reserve`. A VMM that does not answer within the round's timeout is
//! skipped (logged once, when it stops and when it answers again): it keeps what it
//! has, which stays counted against the budget, and the others go on.
//!
//! Nothing is stored: each round starts from what the VMMs report, so a restarted
//! vireod picks up where the last one left off.

pub mod policy;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use self::policy::VmView;
use crate::model::MemoryStatus;
use crate::supervisor::{Current, Supervisor};
use crate::{client, error_chain, now_ms};

/// How the balancer runs (vireod's flags).
#[derive(Clone, Debug)]
pub struct BalancerConfig {
    /// Bytes all Dynamic Memory VMs together may have (`--memory-budget`); None: the
    /// host's available memory plus theirs, less `reserve`.
    pub budget: Option<u64>,
    /// Memory the host keeps for itself when the budget is derived (`--memory-reserve`).
    pub reserve: u64,
    /// Time between rounds (`--balance-interval-ms`).
    pub interval: Duration,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            budget: None,
            reserve: 1 << 30,
            interval: Duration::from_secs(1),
        }
    }
}

/// What one VMM said of its memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// Boot memory + plugged - ballooned.
    pub assigned: u64,
    /// The guest's total - available (statistics), none before it sent any.
    pub used: Option<u64>,
    pub current: Current,
}

/// A number field of a JSON object.
fn field(v: &serde_json::Value, key: &str) -> Option<u64> {
    v.get(key).and_then(serde_json::Value::as_u64)
}

/// Reads a [`Reading`] from `vm.info` and `vm.counters` answers.
pub fn reading(info: &serde_json::Value, counters: &serde_json::Value) -> Option<Reading> {
    let actual = field(info, "memory_actual_size")?;
    let boot = info
        .get("config")
        .and_then(|c| c.get("memory"))
        .and_then(|m| field(m, "size"))?;
    let balloon = counters.get("balloon0");
    let ballooned = balloon.and_then(|b| field(b, "actual_bytes")).unwrap_or(0);
    let used = balloon.and_then(|b| {
        let total = field(b, "total_memory")?;
        let avail = field(b, "available_memory").or_else(|| field(b, "free_memory"))?;
        Some(total.saturating_sub(avail))
    });
    Some(Reading {
        assigned: actual.saturating_sub(ballooned),
        used,
        current: Current {
            desired_ram: field(info, "memory_requested_size").map(|r| boot + r),
            desired_balloon: balloon.and_then(|b| field(b, "target_bytes")),
        },
    })
}

async fn get_json(
    socket: &Path,
    route: &str,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    let r = client::request(socket, "GET", route, None, timeout)
        .await
        .map_err(|e| error_chain(&e))?;
    if !r.ok() {
        return Err(format!("{route}: {} {}", r.status, r.error_message()));
    }
    r.json().ok_or_else(|| format!("{route}: not JSON"))
}

/// Reads the memory of the VMM on `socket` (`vm.info`, `vm.counters`).
pub async fn read(socket: &Path, timeout: Duration) -> Result<Reading, String> {
    let info = get_json(socket, "/api/v1/vm.info", timeout).await?;
    let counters = get_json(socket, "/api/v1/vm.counters", timeout).await?;
    reading(&info, &counters).ok_or_else(|| "vm.info has no memory sizes".to_string())
}

/// The balancer's memory between rounds: only what keeps its logs short.
#[derive(Default)]
struct Round {
    /// VMs whose VMM did not answer last time.
    unresponsive: HashSet<String>,
    /// The last target set per VM (an event and a log line when it changes).
    targets: HashMap<String, u64>,
    /// The last assigned memory seen per VM (what a silent one is counted at).
    assigned: HashMap<String, u64>,
}

/// Runs the balancer until vireod ends.
pub async fn run(sup: Arc<Supervisor>) {
    let cfg = sup.cfg.balancer.clone();
    info!(
        budget_mib = cfg.budget.map(|b| b >> 20),
        reserve_mib = cfg.reserve >> 20,
        interval_ms = cfg.interval.as_millis() as u64,
        "dynamic memory balancer"
    );
    let mut round = Round::default();
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        balance_once(&sup, &cfg, &mut round).await;
    }
}

/// One round over every running Dynamic Memory VM.
async fn balance_once(sup: &Arc<Supervisor>, cfg: &BalancerConfig, round: &mut Round) {
    let vms = sup.dynamic_vms();
    round
        .targets
        .retain(|n, _| vms.iter().any(|v| &v.name == n));
    if vms.is_empty() {
        return;
    }
    // Every VMM is read at once, each within the round's time: a silent one delays
    // nobody.
    let timeout = cfg
        .interval
        .clamp(Duration::from_millis(200), Duration::from_secs(2));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, vm) in vms.iter().enumerate() {
        let vm = vm.clone();
        tasks.spawn(async move { (i, read(&vm.socket, timeout).await) });
    }
    let mut readings: Vec<Option<Reading>> = vec![None; vms.len()];
    while let Some(r) = tasks.join_next().await {
        let Ok((i, r)) = r else { continue };
        let name = &vms[i].name;
        match r {
            Ok(r) => {
                if round.unresponsive.remove(name) {
                    info!(vm = %name, "VMM answers again; balancing it");
                }
                readings[i] = Some(r);
            }
            Err(e) => {
                if round.unresponsive.insert(name.clone()) {
                    warn!(vm = %name, error = %e, "VMM does not answer; skipping it");
                }
                let mut st = sup.memory_of(name, Some(vms[i].pid)).unwrap_or_default();
                st.unresponsive = true;
                sup.note_memory(name, vms[i].pid, st);
            }
        }
    }
    let mut live = Vec::new();
    let mut silent = 0u64;
    for (vm, r) in vms.iter().zip(&readings) {
        match r {
            Some(r) => {
                round.assigned.insert(vm.name.clone(), r.assigned);
                live.push((vm.clone(), *r));
            }
            // Counted at what it had when last seen (its maximum if never).
            None => {
                silent += round
                    .assigned
                    .get(&vm.name)
                    .copied()
                    .unwrap_or(vm.settings.maximum)
            }
        }
    }
    let views: Vec<VmView> = live
        .iter()
        .map(|(vm, r)| VmView {
            name: vm.name.clone(),
            minimum: vm.settings.minimum,
            maximum: vm.settings.maximum,
            buffer: vm.settings.buffer,
            weight: vm.settings.weight,
            assigned: r.assigned,
            used: r.used,
        })
        .collect();
    let budget = match cfg.budget {
        Some(b) => b,
        None => {
            let theirs: u64 = views.iter().map(|v| v.assigned).sum();
            crate::procfs::mem_available_bytes()
                .unwrap_or(0)
                .saturating_add(theirs)
                .saturating_sub(cfg.reserve)
        }
    }
    .saturating_sub(silent);
    let decisions = policy::decide(&views, budget);
    let mut asks = tokio::task::JoinSet::new();
    for ((vm, reading), (view, d)) in live.into_iter().zip(views.iter().zip(&decisions)) {
        sup.note_memory(
            &vm.name,
            vm.pid,
            MemoryStatus {
                assigned_bytes: reading.assigned,
                used_bytes: reading.used,
                demand_bytes: Some(d.demand),
                target_bytes: Some(d.target),
                unresponsive: false,
                at_ms: now_ms(),
            },
        );
        let plan = match vm.devices.plan(d.target) {
            Ok(p) => p,
            Err(e) => {
                warn!(vm = %vm.name, error = %e, "cannot reach the balancer's target");
                continue;
            }
        };
        if round.targets.insert(vm.name.clone(), d.target) != Some(d.target) {
            info!(
                vm = %vm.name,
                assigned_mib = view.assigned >> 20,
                used_mib = view.used.map(|u| u >> 20),
                demand_mib = d.demand >> 20,
                target_mib = d.target >> 20,
                budget_mib = budget >> 20,
                why = d.why.as_str(),
                "memory target"
            );
            sup.memory_event(
                &vm.name,
                format!(
                    "target {} MiB (assigned {} MiB, demand {} MiB, {})",
                    d.target >> 20,
                    view.assigned >> 20,
                    d.demand >> 20,
                    d.why.as_str()
                ),
            );
        }
        let sup = sup.clone();
        asks.spawn(async move {
            if let Err(e) = sup
                .apply_memory_plan(&vm.name, plan, reading.current, timeout)
                .await
            {
                warn!(vm = %vm.name, error = %error_chain(&e), "memory resize failed");
            }
        });
    }
    while asks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_is_boot_plus_plugged_minus_ballooned() {
        let info = serde_json::json!({
            "memory_actual_size": 768u64 << 20,
            "memory_requested_size": 512u64 << 20,
            "config": {"memory": {"size": 512u64 << 20}},
        });
        let counters = serde_json::json!({
            "balloon0": {
                "actual_bytes": 64u64 << 20,
                "target_bytes": 64u64 << 20,
                "total_memory": 704u64 << 20,
                "available_memory": 200u64 << 20,
            },
        });
        let r = reading(&info, &counters).unwrap();
        assert_eq!(r.assigned, 704 << 20);
        assert_eq!(r.used, Some(504 << 20));
        assert_eq!(r.current.desired_ram, Some(1024 << 20));
        assert_eq!(r.current.desired_balloon, Some(64 << 20));
        // No statistics yet: no use; no balloon: no balloon target.
        let r = reading(&info, &serde_json::json!({})).unwrap();
        assert_eq!((r.used, r.current.desired_balloon), (None, None));
        assert_eq!(r.assigned, 768 << 20);
        assert!(reading(&serde_json::json!({}), &counters).is_none());
    }
}
