//! A fleet of cluster nodes in one process on a real etcd, for the scale bench
//! (`vireo-bench --only cluster-scale`) and `cluster/tests/scale.rs`: each node runs
//! the real `NodeAgent` and failover `Controller` as vireod drives them
//! ([`node`]), with its own etcd connections (one for its loop, one for its lease
//! renewals on the fleet's lease runtime, as vireod's lease thread), and stand-in
//! VMs: what the reconcile says to run is marked running at once, without a VMM. It
//! measures the control plane only.

pub mod counted;
pub mod mix;
mod moves;
pub mod node;

use std::collections::BTreeMap;
use std::sync::Arc;

use cluster::keys::{NodeRecord, NodeState, Resources};
use cluster::{EtcdSecurity, EtcdStore, StoreError};
use tokio::task::JoinHandle;

use counted::{Counted, Counters};
pub use node::Stats;
use node::{lock, Hosts, Running, Store};

/// Why a fleet could not start a node.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("lease runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("lease runtime task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The lease thread's real-time priority in vireod (`cluster_node.rs`).
const LEASE_RR_PRIORITY: i32 = 10;

fn realtime_priority() {
    let param = libc::sched_param {
        sched_priority: LEASE_RR_PRIORITY,
    };
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a param we own.
    // Without the privilege it fails and the thread stays normal, as vireod's does.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &param) };
}

/// One running node: its tasks, aborted (a crash) when it is dropped.
struct NodeHandle {
    running: Running,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// `n` nodes named `node-00`…, each offering `capacity`.
pub struct Fleet {
    endpoints: Vec<String>,
    capacity: Resources,
    nodes: Vec<Option<NodeHandle>>,
    hosts: Hosts,
    pub counters: Arc<Counters>,
    pub stats: Arc<Stats>,
    lease_rt: Option<tokio::runtime::Runtime>,
}

impl Fleet {
    pub fn name(i: usize) -> String {
        format!("node-{i:02}")
    }

    /// Starts `n` nodes on the etcd at `endpoints` (in clear: a bench on loopback).
    /// Call from a multi-threaded tokio runtime.
    pub async fn start(
        endpoints: Vec<String>,
        n: usize,
        capacity: Resources,
    ) -> Result<Fleet, FleetError> {
        let lease_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cluster-lease")
            .on_thread_start(realtime_priority)
            .enable_all()
            .build()?;
        let mut fleet = Fleet {
            endpoints,
            capacity,
            nodes: Vec::new(),
            hosts: Hosts::default(),
            counters: Arc::default(),
            stats: Arc::default(),
            lease_rt: Some(lease_rt),
        };
        for i in 0..n {
            let node = fleet.start_node(i).await?;
            fleet.nodes.push(Some(node));
        }
        Ok(fleet)
    }

    /// A connection whose calls are counted.
    pub async fn connect(&self) -> Result<Store, StoreError> {
        Ok(Counted {
            inner: EtcdStore::connect(&self.endpoints, &EtcdSecurity::Insecure).await?,
            counters: self.counters.clone(),
        })
    }

    async fn start_node(&self, i: usize) -> Result<NodeHandle, FleetError> {
        let Some(lease_rt) = &self.lease_rt else {
            return Err(FleetError::Runtime(std::io::Error::other("stopped")));
        };
        let name = Self::name(i);
        let store = self.connect().await?;
        let (eps, counters) = (self.endpoints.clone(), self.counters.clone());
        // Connected on the lease runtime: its health probes run there too.
        let lease_store = lease_rt
            .spawn(async move {
                EtcdStore::connect(&eps, &EtcdSecurity::Insecure)
                    .await
                    .map(|inner| Counted { inner, counters })
            })
            .await??;
        let record = NodeRecord {
            name: name.clone(),
            version: "bench".into(),
            capacity: self.capacity,
            cpu_features: vec![],
            cpuid: None,
            state: NodeState::Up,
            // Drains move VMs only to nodes that receive migrations.
            peer_url: Some(format!("https://{name}.invalid:7443")),
        };
        let running = Running::default();
        lock(&self.hosts).insert(name.clone(), running.clone());
        let tasks = vec![
            tokio::spawn(node::run(
                record,
                store.clone(),
                lease_store,
                lease_rt.handle().clone(),
                running.clone(),
                self.stats.clone(),
            )),
            tokio::spawn(moves::run(
                store,
                name,
                self.hosts.clone(),
                self.stats.clone(),
            )),
        ];
        Ok(NodeHandle { running, tasks })
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Crashes node `i`: its loop, renewals and stand-in VMs stop at once; its lease
    /// expires in etcd.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i] = None;
        lock(&self.hosts).remove(&Self::name(i));
    }

    /// Starts node `i` again (a new process: a new lease, nothing running).
    pub async fn restart(&mut self, i: usize) -> Result<(), FleetError> {
        self.kill(i);
        let node = self.start_node(i).await?;
        self.nodes[i] = Some(node);
        Ok(())
    }

    /// The VMs live node `i` runs (none when it is down).
    pub fn running_on(&self, i: usize) -> Vec<String> {
        self.nodes[i]
            .as_ref()
            .map(|n| lock(&n.running).keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every VM that runs on a live node → the nodes that run it.
    pub fn placement(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(n) = n else { continue };
            for vm in lock(&n.running).keys() {
                out.entry(vm.clone()).or_default().push(Self::name(i));
            }
        }
        out
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.nodes.clear();
        if let Some(rt) = self.lease_rt.take() {
            rt.shutdown_background();
        }
    }
}
