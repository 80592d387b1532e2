//! `--only cluster-failover`: host loss → its VMs running elsewhere, on real hosts
//! (issue 13's first figure, "goal ≤ 10 s, p99 over ≥ 20 runs").
//!
//! Three hosts as network namespaces on one bridge, each with a vireod and one member
//! of a 3-member etcd over mutual TLS (the host's identity from `vireoctl pki`); three
//! clustered VMs (High, Medium, Low) running the test guest's `replica-writer` on raw
//! disks in a directory every host sees, each in its own VMM. A round kills the host
//! that runs the High VM — its vireod, then every VMM it started, SIGKILL, as a power
//! loss would — and from that instant polls a surviving node's linearizable
//! `GET /api/v1/cluster` and the new owners' `GET /api/v1/vms/NAME` every 20 ms:
//!
//! - *gone*: the dead node is no longer listed (its lease expired, its key deleted);
//! - *placed*: the VM's owner record names another node (a controller's transaction);
//! - *running*: that node's vireod reports the VM `Running` (its VMM started, fenced
//!   by the new token, the guest booting);
//! - *writing*: the guest there printed that it resumed its sequence from the disk
//!   and completed a write after it (the service is back).
//!
//! Every poll also counts the nodes reporting each VM `Running`: more than one is a
//! double run (printed; none is expected). The killed vireod is then started again (a
//! fresh state directory, the same name and identity); a node that its crashes put in
//! quarantine (three ungraceful departures within the hour) is released, as an
//! operator would, and the next round waits for three `up` nodes, every VM running and
//! 2 s of quiet.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vireo_e2e::etcd::{EtcdCluster, EtcdTlsFiles};
use vireo_e2e::netns::{BridgedHosts, NetNs};
use vireo_e2e::seqdisk;
use vireo_e2e::vireod_host::{Identity, Pki, VireodHost};

const NODES: [&str; 3] = ["fo-a", "fo-b", "fo-c"];
const VMS: [(&str, &str); 3] = [("hi", "high"), ("med", "medium"), ("lo", "low")];
const BLOCKS: u64 = 64;
const POLL: Duration = Duration::from_millis(20);
/// A round that takes longer has failed (printed, counted, not in the figures).
const ROUND_LIMIT: Duration = Duration::from_secs(60);

fn ip(i: usize) -> String {
    format!("10.214.9.{}", i + 1)
}

/// The three hosts, their etcd, identities and vireods, and the shared directory.
struct Lab {
    hosts: BridgedHosts,
    etcd: EtcdCluster,
    ids: Vec<Identity>,
    shared: tempfile::TempDir,
    nodes: Vec<Option<VireodHost>>,
    _pki: Pki,
}

impl Lab {
    fn start() -> Self {
        let addresses: Vec<String> = (0..NODES.len()).map(ip).collect();
        let hosts = BridgedHosts::new("fo", &addresses);
        let pki = Pki::new();
        let ids: Vec<Identity> = NODES
            .iter()
            .enumerate()
            .map(|(i, name)| pki.host_with_sans(name, &[&ip(i)]))
            .collect();
        let members: Vec<(String, Arc<NetNs>)> = hosts
            .hosts
            .iter()
            .enumerate()
            .map(|(i, ns)| (ip(i), ns.clone()))
            .collect();
        let etcd = EtcdCluster::start_in_namespaces_tls(
            &members,
            EtcdTlsFiles {
                ca: ids[0].ca.clone(),
                members: ids
                    .iter()
                    .map(|id| (id.cert.clone(), id.key.clone()))
                    .collect(),
            },
        );
        let shared = tempfile::Builder::new()
            .prefix("fo-shared")
            .tempdir()
            .expect("tempdir");
        let mut lab = Lab {
            hosts,
            etcd,
            ids,
            shared,
            nodes: (0..NODES.len()).map(|_| None).collect(),
            _pki: pki,
        };
        for i in 0..NODES.len() {
            lab.nodes[i] = Some(lab.start_node(i));
        }
        lab
    }

    fn start_node(&self, i: usize) -> VireodHost {
        let mut args = self.ids[i].args();
        args.extend(
            [
                "--cluster-etcd",
                &self.etcd.endpoints_arg(),
                "--node-name",
                NODES[i],
                "--storage-root",
                &self.shared.path().display().to_string(),
                "--listen",
                &format!("{}:7443", ip(i)),
                // Room for the three 1-vCPU VMs on any one node of a 2-CPU machine.
                "--cluster-vcpus",
                "8",
            ]
            .map(String::from),
        );
        for peer in NODES.iter().filter(|p| **p != NODES[i]) {
            args.extend(["--peer".to_string(), peer.to_string()]);
        }
        VireodHost::start_in(Some(&self.hosts.hosts[i]), &args)
    }

    /// A live node's vireod other than `not`.
    fn observer(&self, not: Option<usize>) -> &VireodHost {
        (0..NODES.len())
            .filter(|&i| Some(i) != not)
            .find_map(|i| self.nodes[i].as_ref())
            .expect("a live node")
    }

    /// The cluster as a live node other than `not` lists it (linearizable).
    fn list(&self, not: Option<usize>) -> Option<Value> {
        let (status, v) = self.observer(not).api("GET", "cluster", None);
        (status == 200).then_some(v)
    }

    fn define(&self) {
        for (vm, priority) in VMS {
            let disk = self.shared.path().join(format!("{vm}.raw"));
            std::fs::File::create(&disk)
                .and_then(|f| f.set_len(BLOCKS * seqdisk::BLOCK as u64))
                .expect("disk");
            let body = json!({
                "definition": {"config": {
                    "payload": {"kernel": vireo_e2e::guest(),
                                "cmdline": format!("test=replica-writer blocks={BLOCKS} resume")},
                    "memory": {"size": 32u64 << 20},
                    "disks": [{"path": disk, "format": "raw"}],
                }},
                "priority": priority,
                "preferred_owners": [NODES[0]],
            });
            self.observer(None)
                .ok("PUT", &format!("cluster/vms/{vm}"), Some(&body));
        }
    }

    /// Waits (up to `limit`) until every node is listed `up` and every VM runs on
    /// its owner; false if it did not happen.
    fn settled(&self, limit: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Some(list) = self.list(None) {
                let up = nodes_listed(&list)
                    .iter()
                    .filter(|(_, state)| state == "up")
                    .count();
                let running = VMS.iter().all(|(vm, _)| {
                    owner(&list, vm)
                        .and_then(|o| node_index(&o))
                        .and_then(|i| self.nodes[i].as_ref())
                        .is_some_and(|d| vm_running(d, vm))
                });
                if up == NODES.len() && running {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Starts node `i` again and releases it from quarantine if its crashes put it
    /// there; whether it was released.
    fn restart(&mut self, i: usize) -> bool {
        self.nodes[i] = Some(self.start_node(i));
        let t0 = Instant::now();
        while t0.elapsed() < ROUND_LIMIT {
            let (status, v) =
                self.observer(Some(i))
                    .api("GET", &format!("cluster/nodes/{}", NODES[i]), None);
            match (status, v["state"].as_str()) {
                (200, Some("quarantined")) => {
                    self.observer(Some(i)).ok(
                        "POST",
                        &format!("cluster/nodes/{}/release", NODES[i]),
                        None,
                    );
                    return true;
                }
                (200, Some("up")) => return false,
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        false
    }
}

fn nodes_listed(list: &Value) -> Vec<(String, String)> {
    list["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    (
                        n["name"].as_str().unwrap_or_default().to_string(),
                        n["state"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The node `vm`'s owner record names, if any.
fn owner(list: &Value, vm: &str) -> Option<String> {
    list["vms"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == vm)
        .and_then(|v| v["owner"]["node"].as_str().map(String::from))
}

fn node_index(name: &str) -> Option<usize> {
    NODES.iter().position(|n| *n == name)
}

fn vm_running(d: &VireodHost, vm: &str) -> bool {
    let (status, v) = d.api("GET", &format!("vms/{vm}"), None);
    status == 200 && v["state"] == "Running"
}

/// Whether `vm`'s guest on `d` resumed its sequence and completed a write since (the
/// VMM starts a new serial file).
fn guest_writing(d: &VireodHost, vm: &str) -> bool {
    let serial = std::fs::read_to_string(d.serial_path(vm)).unwrap_or_default();
    let resumed = seqdisk::resumed(&serial);
    let reported = seqdisk::reported(&serial);
    resumed
        .first()
        .is_some_and(|r| reported.last().is_some_and(|l| l > r))
}

/// One VM's times in one round, from the kill (ms).
#[derive(Clone, Debug, Default)]
struct VmTimes {
    vm: &'static str,
    priority: &'static str,
    placed: Option<f64>,
    running: Option<f64>,
    /// The guest on the new node resumed its sequence and completed a write.
    writing: Option<f64>,
}

/// One round: the victim, when it was no longer listed, and each of its VMs' times.
struct Round {
    victim: usize,
    gone: Option<f64>,
    vms: Vec<VmTimes>,
    double_runs: usize,
    released: bool,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Kills the node running the High VM and follows its VMs until each runs elsewhere.
fn round(lab: &mut Lab) -> Option<Round> {
    let list = lab.list(None)?;
    let victim = owner(&list, "hi").and_then(|o| node_index(&o))?;
    let mut times: Vec<VmTimes> = VMS
        .iter()
        .filter(|(vm, _)| owner(&list, vm).as_deref() == Some(NODES[victim]))
        .map(|&(vm, priority)| VmTimes {
            vm,
            priority,
            ..Default::default()
        })
        .collect();
    let t0 = Instant::now();
    // A power loss: the vireod, then every VMM it started (VireodHost's drop).
    drop(lab.nodes[victim].take());
    let mut gone = None;
    let mut double_runs = 0;
    while t0.elapsed() < ROUND_LIMIT && times.iter().any(|t| t.writing.is_none()) {
        std::thread::sleep(POLL);
        let Some(list) = lab.list(Some(victim)) else {
            continue;
        };
        let at = ms(t0.elapsed());
        if gone.is_none() && !nodes_listed(&list).iter().any(|(n, _)| n == NODES[victim]) {
            gone = Some(at);
        }
        for t in times.iter_mut().filter(|t| t.writing.is_none()) {
            let Some(to) = owner(&list, t.vm).and_then(|o| node_index(&o)) else {
                continue;
            };
            let Some(node) = lab.nodes[to].as_ref().filter(|_| to != victim) else {
                continue;
            };
            t.placed.get_or_insert(at);
            if t.running.is_none() && vm_running(node, t.vm) {
                t.running = Some(ms(t0.elapsed()));
            }
            if t.running.is_some() && guest_writing(node, t.vm) {
                t.writing = Some(ms(t0.elapsed()));
            }
        }
        for (vm, _) in VMS {
            let runs = lab
                .nodes
                .iter()
                .flatten()
                .filter(|d| vm_running(d, vm))
                .count();
            if runs > 1 {
                double_runs += 1;
            }
        }
    }
    let released = lab.restart(victim);
    Some(Round {
        victim,
        gone,
        vms: times,
        double_runs,
        released,
    })
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    super::percentile(&mut v, p)
}

fn summary(v: &[f64]) -> String {
    if v.is_empty() {
        return "– (none)".into();
    }
    format!(
        "{} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0}",
        v.len(),
        percentile(v, 0.0),
        percentile(v, 0.5),
        percentile(v, 0.9),
        percentile(v, 0.99),
        percentile(v, 1.0)
    )
}

pub fn table(rounds: usize) {
    println!("### Failover cluster: host loss → its VMs running elsewhere (3 real hosts, {rounds} rounds)\n");
    println!("Load average at the start: {}", loadavg());
    let timing = cluster::membership::Timing::default();
    println!("Lease and failover timing (defaults): {timing:?}\n");
    let mut lab = Lab::start();
    lab.define();
    assert!(
        lab.settled(ROUND_LIMIT),
        "the three VMs never ran: {:?}",
        lab.list(None)
    );
    println!("| round | killed | gone (ms) | VM | priority | placed (ms) | running (ms) | writing (ms) |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut done = Vec::new();
    let mut failed = 0;
    let mut releases = 0;
    let mut double_runs = 0;
    for r in 0..rounds {
        std::thread::sleep(Duration::from_secs(2));
        let Some(round) = round(&mut lab) else {
            println!("| {r} | – | – | the cluster could not be read before the kill | | | |");
            failed += 1;
            continue;
        };
        let f = |v: Option<f64>| v.map_or("–".to_string(), |x| format!("{x:.0}"));
        for t in &round.vms {
            println!(
                "| {r} | {} | {} | {} | {} | {} | {} | {} |",
                NODES[round.victim],
                f(round.gone),
                t.vm,
                t.priority,
                f(t.placed),
                f(t.running),
                f(t.writing)
            );
        }
        if round.vms.iter().any(|t| t.writing.is_none()) {
            failed += 1;
        }
        releases += usize::from(round.released);
        double_runs += round.double_runs;
        done.push(round);
        if !lab.settled(ROUND_LIMIT) {
            println!("\nThe cluster did not settle after round {r}: stopping.\n");
            break;
        }
    }
    println!();
    println!("| from the kill (ms) | n | min | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    let gone: Vec<f64> = done.iter().filter_map(|r| r.gone).collect();
    println!("| dead node no longer listed | {} |", summary(&gone));
    for (_, priority) in VMS {
        let of = |pick: fn(&VmTimes) -> Option<f64>| -> Vec<f64> {
            done.iter()
                .flat_map(|r| r.vms.iter())
                .filter(|t| t.priority == priority)
                .filter_map(pick)
                .collect()
        };
        println!("| {priority}: placed | {} |", summary(&of(|t| t.placed)));
        println!("| {priority}: running | {} |", summary(&of(|t| t.running)));
        println!(
            "| {priority}: guest writing again | {} |",
            summary(&of(|t| t.writing))
        );
    }
    println!();
    println!(
        "Rounds: {} measured, {failed} failed (a VM not writing again elsewhere within {} s); quarantine releases: {releases}; polls that saw a VM running on two nodes: {double_runs}.\n",
        done.len(),
        ROUND_LIMIT.as_secs()
    );
    println!("Load average at the end: {}\n", loadavg());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}
