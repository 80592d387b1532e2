//! One node agent as vireod runs it (agent/src/cluster_node.rs), with stand-in VMs: a
//! turn every 100 ms (membership step: fence, renew or join, reconcile), the failover
//! controller every other turn while not fenced, the lease renewed in a task on the
//! fleet's lease runtime through a connection of its own; its controller passes run
//! while it is among the first `CONTROLLERS` live nodes. A VM the reconcile starts is
//! marked running at once (no VMM), one it stops is forgotten.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::failover::{Controller, CONTROLLERS};
use cluster::keys::NodeRecord;
use cluster::membership::{NodeAgent, Timing};
use cluster::EtcdStore;
use tracing::warn;

use super::counted::Counted;

/// vireod's node loop period; the controller runs every other turn.
pub const TURN: Duration = Duration::from_millis(100);

/// What the stand-in VMs of one node are: VM → fencing token.
pub type Running = Arc<Mutex<BTreeMap<String, i64>>>;

/// Every live node's stand-in VMs, by node name (where a migration delivers a VM).
pub type Hosts = Arc<Mutex<BTreeMap<String, Running>>>;

/// What every node's loop did, summed over the fleet.
#[derive(Debug, Default)]
pub struct Stats {
    /// Controller passes, the decisions they applied and those a concurrent change
    /// voided, and passes that failed (store errors).
    pub passes: AtomicU64,
    pub applied: AtomicU64,
    pub lost: AtomicU64,
    pub pass_errors: AtomicU64,
    /// Turns whose reconcile stopped VMs because the node's clock said it was fenced.
    pub fences: AtomicU64,
    /// Moves the stand-in executors carried out.
    pub moves: AtomicU64,
    /// Turns that took longer than a renewal period (vireod warns about them).
    pub slow_turns: AtomicU64,
}

impl Stats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

pub(crate) fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub type Store = Counted<EtcdStore>;

/// The node's loop, until its task is aborted (a crash).
pub(crate) async fn run(
    record: NodeRecord,
    store: Store,
    lease_store: Store,
    lease_rt: tokio::runtime::Handle,
    running: Running,
    stats: Arc<Stats>,
) {
    let timing = Timing::default();
    let t0 = Instant::now();
    let mut controller = Controller::new(timing)
        .with_quarantine()
        .among_first(&record.name, CONTROLLERS);
    let mut agent =
        NodeAgent::new(store.clone(), record, timing).renew_in_a_task(t0, lease_store, lease_rt);
    let mut turn: u64 = 0;
    loop {
        let turn_start = t0.elapsed();
        let r = agent.step(turn_start).await;
        if !r.stop.is_empty() && agent.fenced(t0.elapsed()) {
            bump(&stats.fences, 1);
        }
        {
            let mut vms = lock(&running);
            for vm in &r.stop {
                vms.remove(vm);
            }
            // The stand-in VMM starts at once.
            for (vm, token) in &r.start {
                vms.insert(vm.clone(), *token);
            }
        }
        if turn.is_multiple_of(2) && !agent.fenced(t0.elapsed()) {
            match controller.step(&store, t0.elapsed()).await {
                Ok(pass) => {
                    bump(&stats.passes, 1);
                    bump(&stats.applied, pass.applied.len() as u64);
                    bump(&stats.lost, pass.lost as u64);
                }
                Err(e) => {
                    bump(&stats.pass_errors, 1);
                    warn!(node = agent.name(), error = %e, "failover controller pass failed");
                }
            }
        }
        turn += 1;
        if t0.elapsed().saturating_sub(turn_start) > timing.renew_every {
            bump(&stats.slow_turns, 1);
        }
        tokio::time::sleep(TURN).await;
    }
}
