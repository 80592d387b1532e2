//! vireod as a cluster node (`--cluster-etcd`, `--node-name`): joins the cluster on
//! etcd, runs the VMs this node owns (each disk carrying the VM's fencing token), kills
//! them when the node's own clock says it is fenced, and runs the failover controller.
//! The cluster logic itself is the `cluster` crate's; this module only connects it to
//! the supervisor and the REST API.

use std::sync::Arc;
use std::time::Duration;

use cluster::failover::Controller;
use cluster::inventory::View;
use cluster::keys::{self, NodeRecord, NodeState, Priority, Resources};
use cluster::membership::{NodeAgent, Timing};
use cluster::{ClusterStore, EtcdStore};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::cluster_lease::{self, MonotonicBase};
use crate::model::VmDefinition;
use crate::supervisor::Supervisor;

/// The agent loop's period; the controller runs every other turn.
const TURN: Duration = Duration::from_millis(100);

/// Every this many turns the node looks for saves bulk requests asked of it.
const SAVE_REQUESTS_EVERY: u64 = 5;

/// This node's view of the cluster, for the API.
#[derive(Clone)]
pub struct ClusterNode {
    pub store: EtcdStore,
    /// The cluster's inventory, kept by a watch (`cluster::inventory`): what lists
    /// answer from.
    pub view: View,
    pub lease: Arc<LeaseRuntime>,
    pub node: String,
    pub sup: Arc<Supervisor>,
    /// Where this node's peer listener is (`https://ADDR`, from `--listen`): other
    /// nodes migrate VMs here through it (a drain's moves). None: it receives none.
    pub peer_url: Option<String>,
    /// What the node loop shares with the moves (`cluster_moves`).
    pub moves: crate::cluster_moves::Shared,
    /// vCPUs offered to clustered VMs (`--cluster-vcpus`; None: the host's CPUs).
    pub vcpus: Option<u32>,
    /// How much of the cluster's history the store keeps (`--cluster-keep-events`,
    /// `--cluster-keep-finished-days`); the first live node by name prunes the rest.
    pub retention: cluster::history::Retention,
}

/// `PUT /api/v1/cluster/vms/{name}`: a clustered VM.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusteredVmRequest {
    /// The VM as `PUT /api/v1/vms/{name}` takes it.
    pub definition: VmDefinition,
    pub priority: Priority,
    #[serde(default)]
    pub preferred_owners: Vec<String>,
    #[serde(default)]
    pub possible_owners: Vec<String>,
    #[serde(default)]
    pub anti_affinity: Option<String>,
    /// Processor compatibility mode: its vCPUs get only the CPU features every live
    /// node has now (with its configuration's `cpus.features`, if any), so that it can
    /// live-migrate between nodes of different CPU generations.
    #[serde(default)]
    pub cpu_compat: bool,
    /// Start it now (default true).
    #[serde(default = "yes")]
    pub start: bool,
}

fn yes() -> bool {
    true
}

/// `--cluster-etcd`'s endpoints as URLs (`HOST:PORT` gets `https://`, or `http://`
/// when etcd is reached in clear).
pub fn endpoints(arg: &str, security: &cluster::EtcdSecurity) -> Result<Vec<String>, String> {
    let scheme = match security {
        cluster::EtcdSecurity::Tls(_) => "https",
        cluster::EtcdSecurity::Insecure => "http",
    };
    let eps: Vec<String> = arg
        .split(',')
        .filter(|e| !e.is_empty())
        .map(|e| {
            if e.contains("://") {
                e.to_string()
            } else {
                format!("{scheme}://{e}")
            }
        })
        .collect();
    if eps.is_empty() {
        return Err("--cluster-etcd: no endpoint given".into());
    }
    Ok(eps)
}

/// Connects to etcd and registers nothing yet (the loop joins).
pub async fn connect(
    endpoints: &str,
    security: &cluster::EtcdSecurity,
) -> Result<EtcdStore, String> {
    EtcdStore::connect(&self::endpoints(endpoints, security)?, security)
        .await
        .map_err(|e| format!("--cluster-etcd {endpoints}: {e}"))
}

/// What keeps the node's lease runs on a thread and runtime of its own, with its own
/// etcd connection: the renewals and the VMMs' write leases. vireod's runtime can stall
/// for longer than the fencing window (its workers waiting on the inventory's SQLite
/// commits on a busy disk, seen as 1.5 s gaps in every task's log), and a renewal
/// held up that long fences the node for nothing.
pub struct LeaseRuntime {
    pub handle: tokio::runtime::Handle,
    pub store: EtcdStore,
}

/// The lease thread's real-time priority (SCHED_RR): above every normal process, as
/// corosync runs its membership protocol. It needs a few milliseconds of CPU per
/// renewal, and on a host whose CPUs are saturated a normal thread can wait longer
/// than the whole fencing window for one (seen: 1.4 s with a 2-core machine's load at
/// 7). Without the privilege (not root) it stays a normal thread, said in the log.
const LEASE_THREAD_RR_PRIORITY: i32 = 10;

fn realtime_priority() {
    let param = libc::sched_param {
        sched_priority: LEASE_THREAD_RR_PRIORITY,
    };
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid param we own.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &param) };
    if r != 0 {
        warn!(
            error = %std::io::Error::last_os_error(),
            "the cluster lease thread runs without real-time priority: under CPU saturation its renewals can miss the fencing window"
        );
    }
}

impl LeaseRuntime {
    pub async fn start(endpoints: &str, security: &cluster::EtcdSecurity) -> Result<Self, String> {
        let eps = self::endpoints(endpoints, security)?;
        let security = security.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("cluster-lease".into())
            .spawn(move || {
                realtime_priority();
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(format!("cluster lease runtime: {e}")));
                        return;
                    }
                };
                let store = rt
                    .block_on(EtcdStore::connect(&eps, &security))
                    .map_err(|e| format!("--cluster-etcd (lease connection): {e}"));
                let _ = tx.send(store.map(|store| LeaseRuntime {
                    handle: rt.handle().clone(),
                    store,
                }));
                rt.block_on(std::future::pending::<()>());
            })
            .map_err(|e| format!("cluster lease thread: {e}"))?;
        rx.await
            .map_err(|_| "cluster lease thread ended".to_string())?
    }
}

impl ClusterNode {
    /// The node's record: its capacity is the host's (vireod's host info).
    fn record(&self) -> NodeRecord {
        let host = self.sup.host_info();
        NodeRecord {
            name: self.node.clone(),
            version: host.version,
            capacity: Resources {
                memory_mib: host.memory_total_bytes >> 20,
                vcpus: self
                    .vcpus
                    .unwrap_or_else(|| u32::try_from(host.cpus).unwrap_or(u32::MAX)),
            },
            cpu_features: crate::procfs::cpu_flags(),
            cpuid: crate::host_cpu::fingerprint(),
            state: NodeState::Up,
            peer_url: self.peer_url.clone(),
        }
    }

    /// Kills every local VM that is a clustered VM: whatever ran before this vireod
    /// joined belongs to an incarnation whose lease is gone.
    async fn kill_leftovers(&self) {
        let Ok((vms, _)) = self.store.get_prefix(keys::VMS).await else {
            return;
        };
        for kv in vms {
            let Some(name) = keys::name_of(keys::VMS, &kv.key) else {
                continue;
            };
            if self.sup.get(name).is_ok_and(|s| s.pid.is_some()) {
                warn!(
                    vm = name,
                    "killing a clustered VM left from before this node joined"
                );
                let _ = self.sup.kill(name).await;
            }
        }
    }

    /// Starts `vm` here with `token` on every disk and a write lease ending at
    /// `deadline_ns` (`CLOCK_MONOTONIC`).
    async fn start_owned(&self, vm: &str, token: i64, deadline_ns: u64) -> Result<(), String> {
        let revision = token;
        let kv = self
            .store
            .get(&keys::vm_key(vm))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{vm}: no definition in the cluster"))?;
        let def: keys::VmDefinition =
            keys::decode(&kv.value).ok_or_else(|| format!("{vm}: definition does not parse"))?;
        let mut local: VmDefinition = serde_json::from_value(def.config)
            .map_err(|e| format!("{vm}: the cluster's VM config does not parse: {e}"))?;
        let token = u64::try_from(token).map_err(|_| format!("{vm}: bad token {token}"))?;
        for d in &mut local.config.disks {
            d.fencing_token = Some(token);
        }
        local.config.write_lease = Some(api::WriteLease {
            deadline_monotonic_ns: deadline_ns,
        });
        // Saved: it resumes from its state on the shared storage.
        let saved = crate::cluster_save::saved_record(&self.store, vm).await?;
        if self.sup.get(vm).is_ok() {
            // A definition from an earlier ownership: replace it (its token is old).
            let _ = self.sup.kill(vm).await;
            self.sup.delete(vm).map_err(|e| e.to_string())?;
        }
        self.sup.define(vm, local).map_err(|e| e.to_string())?;
        if let Some(record) = saved {
            return crate::cluster_save::resume_here(self, vm, revision, record).await;
        }
        self.sup.start(vm).await.map_err(|e| e.to_string())?;
        info!(vm, token, "clustered VM started");
        Ok(())
    }

    /// Has clustered VMs arrive here only by a move (see `cluster_moves`) and starts
    /// the executor of this node's outgoing moves.
    pub fn start_moves(&self) {
        self.sup
            .set_incoming_guard(Arc::new(crate::cluster_moves::Guard {
                store: self.store.clone(),
                node: self.node.clone(),
                shared: self.moves.clone(),
            }));
        self.sup
            .set_cluster_saves(Arc::new(crate::cluster_save::Saves {
                store: self.store.clone(),
                node: self.node.clone(),
                shared: self.moves.clone(),
            }));
        let executor = Arc::new(crate::cluster_moves::Executor {
            store: self.store.clone(),
            moves: cluster::drain::MovesView::start(self.store.clone()),
            wake: Default::default(),
            node: self.node.clone(),
            sup: self.sup.clone(),
            shared: self.moves.clone(),
            since_ms: cluster::keys::now_ms(),
            housekept: Default::default(),
        });
        tokio::spawn(executor.run());
    }

    /// Leaves the cluster when vireod is asked to stop: the clustered VMs running here
    /// are stopped (all at once, each as `vm stop` does: asked, killed after the stop
    /// timeout), then the node leaves gracefully — its lease revoked, so that the
    /// other nodes start the VMs at once, and marked, so that its departure does not
    /// count towards quarantine.
    async fn leave(&self, agent: &mut NodeAgent<EtcdStore>) {
        let running: Vec<String> = agent.running().keys().cloned().collect();
        info!(
            vms = running.len(),
            "leaving the cluster: stopping this node's clustered VMs"
        );
        let mut stops = tokio::task::JoinSet::new();
        for vm in running {
            let sup = self.sup.clone();
            stops.spawn(async move {
                if !sup.get(&vm).is_ok_and(|s| s.pid.is_some()) {
                    return;
                }
                if let Err(e) = sup.stop(&vm, None).await {
                    warn!(vm, error = %e, "cannot stop a clustered VM: killing it");
                    let _ = sup.kill(&vm).await;
                }
            });
        }
        while stops.join_next().await.is_some() {}
        match agent.leave_gracefully().await {
            Ok(()) => info!(node = %self.node, "left the cluster"),
            Err(e) => {
                warn!(node = %self.node, error = %e, "leaving the cluster failed: its lease expires instead")
            }
        }
    }

    /// The node's loop: membership, fencing, running what it owns, failover. Ends
    /// when `stop` turns true, after leaving the cluster ([`ClusterNode::leave`]).
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let timing = Timing::default();
        self.kill_leftovers().await;
        let clock = MonotonicBase::now();
        let t0 = clock.t0;
        let mut agent = NodeAgent::new(self.store.clone(), self.record(), timing).renew_in_a_task(
            t0,
            self.lease.store.clone(),
            self.lease.handle.clone(),
        );
        let leased = cluster_lease::spawn_pusher(
            self.sup.clone(),
            agent.deadlines(),
            clock,
            &self.lease.handle,
        );
        self.moves.attach(clock, agent.deadlines(), leased);
        let mut controller = Controller::new(timing)
            .with_quarantine()
            .among_first(&self.node, cluster::failover::CONTROLLERS);
        let mut pruner = cluster::history::Pruner::new(&self.node, self.retention);
        let mut turn: u64 = 0;
        let mut resumed = false;
        let mut save_requests = std::collections::HashMap::new();
        loop {
            let turn_start = t0.elapsed();
            let r = agent.step(turn_start).await;
            if !resumed && agent.lease().is_some() {
                resumed = crate::cluster_shutdown::resume_after_shutdown(&self).await;
            }
            for vm in &r.stop {
                if self.sup.get(vm).is_err() || self.moves.saving(vm) {
                    // Moved away (a drain's migration): nothing runs here. Saved: the
                    // save ends its VMM.
                    continue;
                }
                warn!(vm, "stopping a clustered VM this node no longer may run");
                if let Err(e) = self.sup.kill(vm).await {
                    warn!(vm, error = %e, "cannot kill");
                }
            }
            // The VMs about to start are under the lease from now: their VMMs take each
            // renewal as soon as they answer, also while the other starts go on.
            publish(&self.moves, &agent);
            for (vm, token) in &r.start {
                // Arrived by a move and running: this node's now, under its lease.
                if self.moves.take_incoming(vm) && self.sup.get(vm).is_ok_and(|s| s.pid.is_some()) {
                    info!(vm, token, "clustered VM adopted after its move");
                    continue;
                }
                // The deadline as late as possible: now, just before the VMM starts.
                let Some(deadline) = agent
                    .fence_deadline()
                    .filter(|_| !agent.fenced(t0.elapsed()))
                else {
                    agent.exited(vm);
                    continue;
                };
                if let Err(e) = self.start_owned(vm, *token, clock.at(deadline)).await {
                    warn!(vm, error = %e, "cannot start a clustered VM");
                    agent.exited(vm);
                }
            }
            publish(&self.moves, &agent);
            for vm in self.moves.take_lost() {
                agent.exited(&vm);
            }
            // A VM that ended by itself is started again while this node owns it.
            for vm in agent.running().keys().cloned().collect::<Vec<_>>() {
                // A VMM that ended handing its VM over (a move) is no crash: until the
                // ownership follows, nothing of it may start here again.
                if self.moves.moving_out(&vm) || self.moves.saving(&vm) {
                    continue;
                }
                if self.sup.get(&vm).is_ok_and(|s| s.pid.is_none()) {
                    agent.exited(&vm);
                }
            }
            self.moves.settle_saving(agent.running());
            if turn.is_multiple_of(SAVE_REQUESTS_EVERY) && !agent.fenced(t0.elapsed()) {
                crate::cluster_save::run_requests(&self, agent.running(), &mut save_requests).await;
            }
            if turn.is_multiple_of(2) && !agent.fenced(t0.elapsed()) {
                if let Err(e) = controller.step(&self.store, t0.elapsed()).await {
                    warn!(error = %e, "failover controller pass failed");
                }
                if let Err(e) = pruner.step(&self.store, t0.elapsed()).await {
                    warn!(error = %e, "pruning the cluster's history failed");
                }
            }
            turn += 1;
            let took = t0.elapsed().saturating_sub(turn_start);
            if took > timing.renew_every {
                warn!(
                    took_ms = took.as_millis(),
                    "a cluster turn took longer than a renewal period"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(TURN) => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
        }
        self.leave(&mut agent).await;
    }
}

/// Tells the write-lease pusher which VMs run (or start) under the node's lease.
fn publish<S>(moves: &crate::cluster_moves::Shared, agent: &NodeAgent<S>)
where
    S: ClusterStore + Clone + Send + Sync + 'static,
{
    moves.publish(Some(agent.running().keys().cloned().collect()));
}
