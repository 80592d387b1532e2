//! Three cluster nodes as three hosts: each vireod (and its VMMs) and one member of a
//! 3-member etcd run in their own network namespace, joined by veth pairs on a bridge
//! in a fourth ("the switch"); the shared storage is a directory all of them see.
//! Clustered VMs run the test guest's `replica-writer` with `resume`: it writes
//! seeded, numbered blocks, prints each completed one, and on a new host continues
//! after the highest number on the disk. The disk's bytes are checked against that
//! model (`vireo_e2e::seqdisk`): every completed write is there, and no write of a
//! stale owner came after a newer one.
//!
//! Root only (namespaces). The tests of this file run one at a time: each keeps two
//! guests busy writing, and etcd must keep its leases on a 2-core machine.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pki::{tls_args, Pki};
use common::{Daemon, T};
use serde_json::json;
use vireo_e2e::etcd::{EtcdCluster, EtcdTlsFiles};
use vireo_e2e::netns::{is_root, BridgedHosts, NetNs};
use vireo_e2e::seqdisk;

const BLOCKS: u64 = 64;
const NODES: [&str; 3] = ["a", "b", "c"];

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn ip(i: usize) -> String {
    format!("10.213.7.{}", i + 1)
}

/// A running cluster: etcd, the three vireods, the shared directory.
struct Cluster {
    nodes: Vec<Daemon>,
    etcd: EtcdCluster,
    shared: tempfile::TempDir,
    hosts: BridgedHosts,
    /// The host identities (each node's certificate names it).
    _pki: Pki,
}

/// Where node `i`'s peer listener is: drains migrate VMs between nodes through it.
fn peer_addr(i: usize) -> String {
    format!("{}:7443", ip(i))
}

impl Cluster {
    fn start() -> Self {
        Self::start_with(|_| vec![])
    }

    /// [`Cluster::start`] with more vireod flags for node `i`.
    fn start_with(extra: impl Fn(usize) -> Vec<String>) -> Self {
        Self::start_custom(extra, |_, shared| shared.to_path_buf(), |_| vec![])
    }

    /// [`Cluster::start_with`], node `i`'s storage root `root(i, shared)` instead of
    /// the shared directory, and vireod run by `wrapper(i)`.
    fn start_custom(
        extra: impl Fn(usize) -> Vec<String>,
        root: impl Fn(usize, &Path) -> PathBuf,
        wrapper: impl Fn(usize) -> Vec<String>,
    ) -> Self {
        let addresses: Vec<String> = (0..NODES.len()).map(ip).collect();
        let hosts = BridgedHosts::new("c2", &addresses);
        let members: Vec<(String, Arc<NetNs>)> = hosts
            .hosts
            .iter()
            .enumerate()
            .map(|(i, ns)| (ip(i), ns.clone()))
            .collect();
        // Each host's identity names its address too: etcd's members present it as
        // servers and peers, and the nodes dial them by address.
        let pki = Pki::new();
        let ids: Vec<_> = NODES
            .iter()
            .enumerate()
            .map(|(i, name)| pki.host_with_sans(name, &[&ip(i)]))
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
        let shared = tempfile::tempdir().unwrap();
        let eps = etcd.endpoints_arg();
        let nodes: Vec<Daemon> = NODES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut args = common::cluster_node_args(&eps, name, &root(i, shared.path()));
                args.extend(tls_args(&ids[i]));
                args.extend(["--listen".to_string(), peer_addr(i)]);
                let extra = extra(i);
                // Room for four 1-vCPU VMs on one node of this 2-CPU machine, unless
                // the test says otherwise.
                if !extra.iter().any(|a| a == "--cluster-vcpus") {
                    args.extend(["--cluster-vcpus".to_string(), "8".to_string()]);
                }
                for peer in NODES.iter().filter(|p| *p != name) {
                    args.extend(["--peer".to_string(), peer.to_string()]);
                }
                args.extend(extra);
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                let wrap = wrapper(i);
                let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
                Daemon::start_in_netns_wrapped(&refs, hosts.hosts[i].clone(), &wrap)
            })
            .collect();
        let c = Cluster {
            nodes,
            etcd,
            shared,
            hosts,
            _pki: pki,
        };
        c.wait("three nodes in the cluster", || c.members() == 3);
        c
    }

    /// The node that owns `vm`, as node b reads the cluster (None: unreadable now).
    fn owner(&self, vm: &str) -> Option<String> {
        let (status, body) = self.nodes[1].api("GET", "/api/v1/cluster", None);
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        if status != 200 {
            return None;
        }
        v["vms"]
            .as_array()?
            .iter()
            .find(|x| x["name"] == vm)
            .and_then(|x| x["owner"]["node"].as_str().map(String::from))
    }

    /// How many nodes node b sees (0 while it cannot reach etcd: an election).
    fn members(&self) -> usize {
        let (status, body) = self.nodes[1].api("GET", "/api/v1/cluster", None);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if status != 200 {
            return 0;
        }
        v["nodes"].as_array().map_or(0, |n| n.len())
    }

    fn logs(&self) -> String {
        let (_, status) = self.nodes[1].api("GET", "/api/v1/cluster", None);
        let mut s = format!("cluster status (from b): {status}\n");
        for (i, d) in self.nodes.iter().enumerate() {
            let log = d.log();
            let tail: Vec<&str> = log
                .lines()
                .rev()
                .filter(|l| !l.contains("lease renewed"))
                .take(60)
                .collect();
            s += &format!("--- {} ---\n", NODES[i]);
            for l in tail.into_iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s + &self.etcd.logs()
    }

    fn wait(&self, what: &str, mut ok: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ok() {
            assert!(
                start.elapsed() < T,
                "{what} never happened:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Defines a clustered replica-writer VM preferring node a; returns its disk.
    fn define(&self, vm: &str, priority: &str) -> PathBuf {
        self.define_with(vm, priority, &[])
    }

    /// [`Cluster::define`] with more `vm define` flags.
    fn define_with(&self, vm: &str, priority: &str, extra: &[&str]) -> PathBuf {
        self.define_on(vm, priority, "a", extra)
    }

    /// A clustered replica-writer VM preferring node `owner`; returns its disk.
    fn define_on(&self, vm: &str, priority: &str, owner: &str, extra: &[&str]) -> PathBuf {
        let disk = self.shared.path().join(format!("{vm}.raw"));
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(BLOCKS * seqdisk::BLOCK as u64)
            .unwrap();
        let cfg = json!({
            "payload": {"kernel": vireo_e2e::guest(),
                        "cmdline": format!("test=replica-writer blocks={BLOCKS} resume")},
            "memory": {"size": 32u64 << 20},
            "disks": [{"path": disk, "format": "raw"}],
        });
        let file = self.shared.path().join(format!("{vm}.json"));
        std::fs::write(&file, cfg.to_string()).unwrap();
        let out = self.nodes[0].ctl_ok(
            &[
                "vm",
                "define",
                vm,
                "--file",
                file.to_str().unwrap(),
                "--cluster",
                "--priority",
                priority,
                "--preferred-owner",
                owner,
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
        );
        let shown = if priority == "off" {
            "no_auto_start"
        } else {
            priority
        };
        assert!(out.contains(shown), "{out}");
        disk
    }

    /// Whether node `i` runs `vm`.
    fn runs(&self, i: usize, vm: &str) -> bool {
        let d = &self.nodes[i];
        d.child.is_some() && !d.absent(vm) && d.vm(vm)["state"] == "Running"
    }

    /// The node other than `not` that runs `vm`, once one does.
    fn runner(&self, vm: &str, not: usize) -> usize {
        let mut found = None;
        self.wait(&format!("{vm} running on another node"), || {
            found = (0..NODES.len()).find(|&i| i != not && self.runs(i, vm));
            found.is_some()
        });
        found.unwrap()
    }

    /// The guest's completed writes on node `i` (its serial file: readable also after
    /// the node died).
    fn reported(&self, i: usize, vm: &str) -> Vec<u64> {
        seqdisk::reported(&self.nodes[i].serial(vm))
    }

    /// Waits until `vm`'s guest on node `i` has completed `n` more writes than `from`.
    fn wait_writes(&self, i: usize, vm: &str, from: u64, n: u64) {
        self.wait(&format!("{vm} writing on {}", NODES[i]), || {
            self.reported(i, vm).last().is_some_and(|l| *l >= from + n)
        });
    }
}

fn token(disk: &Path) -> u64 {
    let mut name = disk.file_name().unwrap().to_os_string();
    name.push(".fence");
    let text = std::fs::read_to_string(disk.with_file_name(name)).unwrap_or_default();
    text.trim()
        .strip_prefix("token=")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: signals to processes this test's vireods started.
    unsafe { libc::kill(pid, sig) };
}

/// After a failover of `vm` from node `from` (whose guest completed `last` writes) to
/// node `to`: the new guest resumed at `last` (or the one write in flight), so every
/// completed write was on the disk, and it goes on writing; paused, its disk holds one
/// writer's sequence. `to` started the VM once: a second start would have lost the
/// guest's state (and its VMM truncates the serial file), which only a self-fencing
/// of `to`, said in its log, may explain.
fn assert_carried_on(c: &Cluster, vm: &str, disk: &Path, last: u64, to: usize) {
    let node = &c.nodes[to];
    // One read of the serial file for both numbers: a restarted VMM starts a new one.
    let mut serial = String::new();
    c.wait(
        &format!("{vm} resumed and writing on {}", NODES[to]),
        || {
            serial = node.serial(vm);
            let resumed = seqdisk::resumed(&serial);
            let reported = seqdisk::reported(&serial);
            resumed
                .first()
                .is_some_and(|r| reported.last().is_some_and(|l| *l >= r + 20))
        },
    );
    let resumed = seqdisk::resumed(&serial)[0];
    let reported = seqdisk::reported(&serial);
    let log = node.log();
    let starts = starts(&log, vm);
    if starts == 1 {
        assert!(
            (last..=last + 1).contains(&resumed),
            "{vm}: the guest had completed {last} writes, the disk held {resumed}"
        );
    } else {
        assert!(
            log.contains("self-fencing"),
            "{vm} started {starts} times on {} without its fencing itself:\n{log}\n{}",
            NODES[to],
            c.logs()
        );
        assert!(
            resumed >= last,
            "{vm}: the guest had completed {last} writes, the disk held {resumed}"
        );
    }
    assert_eq!(
        reported[0],
        resumed + 1,
        "{vm}: did not continue the sequence; {}'s log:\n{log}\n{}",
        NODES[to],
        c.logs()
    );
    node.ok("PUT", &format!("/api/v1/vms/{vm}/pause"), None);
    let on_disk = seqdisk::single_writer(&seqdisk::seeds(disk, BLOCKS))
        .unwrap_or_else(|e| panic!("{vm}: {e}"));
    let last_new = *c.reported(to, vm).last().unwrap();
    assert!(
        (last_new..=last_new + 1).contains(&on_disk),
        "{vm}: disk holds {on_disk}, the guest completed {last_new}"
    );
    node.ok("PUT", &format!("/api/v1/vms/{vm}/resume"), None);
}

/// How often a vireod's `log` says it started clustered VM `vm`.
fn starts(log: &str, vm: &str) -> usize {
    let quoted = format!("\"{vm}\"");
    log.lines()
        .filter(|l| l.contains("clustered VM started") && l.contains(&quoted))
        .count()
}

fn skip() -> bool {
    if !is_root() {
        vireo_e2e::skip_or_fail_under_ci("needs root (network namespaces)");
        return true;
    }
    false
}

/// Starts the cluster with `hi` (High) and `lo` (Low) running and writing on node a.
fn cluster_with_two_vms_on_a() -> (Cluster, [PathBuf; 2]) {
    let c = Cluster::start();
    let disks = [c.define("hi", "high"), c.define("lo", "low")];
    c.wait("hi and lo running on a", || {
        c.runs(0, "hi") && c.runs(0, "lo")
    });
    c.wait_writes(0, "hi", 0, 50);
    c.wait_writes(0, "lo", 0, 50);
    (c, disks)
}

#[test]
fn a_host_killed_its_vms_run_on_another_high_first_and_every_completed_write_is_kept() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (mut c, disks) = cluster_with_two_vms_on_a();
    let before = [token(&disks[0]), token(&disks[1])];
    assert!(
        before[0] > 0 && before[1] > 0,
        "no fencing tokens: {before:?}"
    );

    // Host a dies: its vireod and its VMMs, kill -9.
    let pids = [c.nodes[0].pid("hi").unwrap(), c.nodes[0].pid("lo").unwrap()];
    c.nodes[0].kill9();
    for pid in pids {
        kill(pid, libc::SIGKILL);
        common::wait_dead(pid, T);
    }
    let last = [
        *c.reported(0, "hi").last().unwrap(),
        *c.reported(0, "lo").last().unwrap(),
    ];

    let to = [c.runner("hi", 0), c.runner("lo", 0)];
    let after = [token(&disks[0]), token(&disks[1])];
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "tokens did not grow: {before:?} -> {after:?}"
    );
    // High first: the controller placed hi before lo (tokens are store revisions).
    assert!(after[0] < after[1], "lo was placed before hi: {after:?}");
    assert_carried_on(&c, "hi", &disks[0], last[0], to[0]);
    assert_carried_on(&c, "lo", &disks[1], last[1], to[1]);
    // The cluster's event log tells it: each VM placed from a on its new node, with
    // the fencing token its disk carries, hi's before lo's (newest first).
    let out = c.nodes[to[0]].ctl_ok(&["-o", "json", "cluster", "events", "--limit", "20"]);
    let events: serde_json::Value = serde_json::from_str(&out).unwrap();
    let failover_of = |vm: &str| {
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .position(|e| e["vm"] == vm && e["from"] == "a")
            .map(|i| events["events"][i].clone())
            .unwrap_or_else(|| panic!("no failover event of {vm}: {out}"))
    };
    for (k, vm) in ["hi", "lo"].iter().enumerate() {
        let e = failover_of(vm);
        assert_eq!(e["action"], "placed", "{e}");
        assert_eq!(e["to"], NODES[to[k]], "{e}");
        assert_eq!(e["revision"].as_u64(), Some(after[k]), "{e}");
        assert!(e["at_ms"].as_u64().is_some(), "{e}");
    }
    let table = c.nodes[to[0]].ctl_ok(&["cluster", "events"]);
    let (hi_line, lo_line) = (
        table.lines().position(|l| l.contains(" hi ")),
        table.lines().position(|l| l.contains(" lo ")),
    );
    assert!(
        lo_line.is_some() && hi_line > lo_line,
        "hi's event is older than lo's, listed after it:\n{table}"
    );
}

#[test]
fn a_partitioned_host_stops_its_vms_before_another_starts_them() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (c, disks) = cluster_with_two_vms_on_a();
    let pids = [c.nodes[0].pid("hi").unwrap(), c.nodes[0].pid("lo").unwrap()];

    // Host a's link goes down; its vireod and VMMs live on.
    c.hosts.link(0, false);
    let to = [c.runner("hi", 0), c.runner("lo", 0)];
    // a fenced itself: its VMMs are gone (it killed them; nobody else could).
    for pid in pids {
        common::wait_dead(pid, T);
    }
    // a's guests stopped before the new ones read the disk: every write a completed
    // (all of them, to its end) was on the disk the new guest resumed from.
    for (k, vm) in ["hi", "lo"].iter().enumerate() {
        let last = *c.reported(0, vm).last().unwrap();
        assert_carried_on(&c, vm, &disks[k], last, to[k]);
    }
    // Healed: a joins again and runs nothing of the moved VMs.
    c.hosts.link(0, true);
    c.wait("a back in the cluster", || c.members() == 3);
    for vm in ["hi", "lo"] {
        assert!(!c.runs(0, vm), "{vm} runs on a again");
    }
}

#[test]
fn a_frozen_host_woken_after_its_lease_cannot_write() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (c, disks) = cluster_with_two_vms_on_a();
    let vireod = c.nodes[0].child.as_ref().unwrap().id() as i32;
    let pids = [c.nodes[0].pid("hi").unwrap(), c.nodes[0].pid("lo").unwrap()];

    // Host a freezes: vireod and VMMs (SIGSTOP), until the others own the VMs. (They
    // cannot start them yet: the frozen VMMs still hold the images' locks.)
    kill(vireod, libc::SIGSTOP);
    for pid in pids {
        kill(pid, libc::SIGSTOP);
    }
    // Frozen once every thread is: until then a loaded host lets the guests write on.
    for pid in [vireod].into_iter().chain(pids) {
        common::wait_stopped(pid, T);
    }
    // What the frozen guests completed is on the disks now (the serial output may
    // still sit in the VMM's buffer; the disk is what counts).
    let at_stop = |k: usize| {
        seqdisk::single_writer(&seqdisk::seeds(&disks[k], BLOCKS)).unwrap_or_else(|e| panic!("{e}"))
    };
    let last = [at_stop(0), at_stop(1)];
    c.wait("hi and lo owned by another node", || {
        ["hi", "lo"]
            .iter()
            .all(|vm| c.owner(vm).is_some_and(|o| o != "a"))
    });
    // The stale VMMs wake first, with their vireod still frozen: nobody kills them.
    for pid in pids {
        kill(pid, libc::SIGCONT);
    }
    // Each refuses its guest's writes on its own clock and pauses (or its guest gives
    // up and it ends).
    for (k, vm) in ["hi", "lo"].iter().enumerate() {
        c.wait(&format!("stale {vm} stopped"), || {
            !common::alive(pids[k]) || vmm_paused(&c.nodes[0], vm)
        });
        // At most the one write in flight at the stop (its check had passed) landed.
        let stale = c.reported(0, vm);
        let now = at_stop(k);
        assert!(
            now <= last[k] + 1 && stale.iter().all(|n| *n <= last[k] + 1),
            "{vm}: the frozen host's guest wrote after waking: disk {} then {now}, reported {:?}",
            last[k],
            stale.iter().rev().take(3).collect::<Vec<_>>()
        );
    }
    // vireod wakes, fenced: it kills them; the new owners start the VMs, which carry on
    // from the last write a's guests completed.
    kill(vireod, libc::SIGCONT);
    for pid in pids {
        common::wait_dead(pid, T);
    }
    let to = [c.runner("hi", 0), c.runner("lo", 0)];
    for (k, vm) in ["hi", "lo"].iter().enumerate() {
        assert_carried_on(&c, vm, &disks[k], last[k], to[k]);
    }
}

/// Whether `vm`'s VMM on `d` says it paused (its own API, not vireod's: vireod may be
/// frozen).
fn vmm_paused(d: &Daemon, vm: &str) -> bool {
    let Some(sock) = vmm_socket(d, vm) else {
        return false;
    };
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) else {
        return false;
    };
    use std::io::{Read, Write};
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let req = "GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.contains("\"Paused\"") && resp.contains("write lease expired")
}

fn vmm_socket(d: &Daemon, vm: &str) -> Option<PathBuf> {
    let sock = d.run_dir.join("vms").join(vm).join("api.sock");
    sock.exists().then_some(sock)
}

#[test]
fn killing_the_etcd_leader_mid_lease_moves_no_vm() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (mut c, disks) = cluster_with_two_vms_on_a();
    let before = [token(&disks[0]), token(&disks[1])];
    let pids = [c.nodes[0].pid("hi").unwrap(), c.nodes[0].pid("lo").unwrap()];
    let leader = c.etcd.leader();
    eprintln!(
        "killing etcd member m{leader} at {:?} (since the epoch)",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)
    );
    c.etcd.kill(leader);
    // A new leader is elected among the other two (the old one's leases carry over,
    // extended: etcd issue 9888).
    let new_leader = c.etcd.leader();
    assert_ne!(new_leader, leader);
    // Well past a lease's life (TTL 2 s, dead margin 1 s) with the new leader, then
    // with the old member back: a false failover would have happened by then.
    let settle = || {
        let until = Instant::now() + Duration::from_secs(6);
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    settle();
    c.etcd.restart(leader);
    settle();
    // Nothing moved (same owner, same tokens) and nothing restarted: the same VMMs
    // ran all along (no node fenced itself during the election).
    for (vm, pid) in ["hi", "lo"].iter().zip(pids) {
        assert!(
            common::alive(pid) && c.nodes[0].pid(vm) == Some(pid),
            "{vm} was restarted (pid {pid} -> {:?}):\n{}",
            c.nodes[0].pid(vm),
            c.logs()
        );
    }
    let now = *c.reported(0, "hi").last().unwrap();
    c.wait_writes(0, "hi", now, 50);
    for (d, name) in c.nodes.iter().zip(NODES) {
        assert!(
            !d.log().contains("self-fencing"),
            "{name} fenced itself during the election:\n{}",
            c.logs()
        );
    }
    for vm in ["hi", "lo"] {
        // None is "b cannot read the cluster now" (a loaded host), not "moved".
        let mut owner = None;
        c.wait(&format!("{vm}'s owner readable"), || {
            owner = c.owner(vm);
            owner.is_some()
        });
        assert_eq!(owner.as_deref(), Some("a"), "{vm} moved:\n{}", c.logs());
        assert!(c.runs(0, vm));
        for (node, name) in c.nodes.iter().zip(NODES).skip(1) {
            assert!(node.absent(vm), "{vm} defined on {name}");
        }
    }
    assert_eq!(
        [token(&disks[0]), token(&disks[1])],
        before,
        "tokens changed"
    );
}

/// Follows `vm`'s serial file on node `i` until stopped, keeping the longest content
/// read: the file goes with the VM when it migrates away (its source forgets it), and
/// its last lines are what the guest printed before it moved.
struct SerialFollower {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<String>,
}

impl SerialFollower {
    fn start(d: &Daemon, vm: &str) -> Self {
        let path = d.state_dir.join("vms").join(vm).join("serial.log");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut longest = String::new();
            while !flag.load(std::sync::atomic::Ordering::Acquire) {
                if let Ok(s) = std::fs::read_to_string(&path) {
                    if s.len() >= longest.len() {
                        longest = s;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            longest
        });
        SerialFollower { stop, thread }
    }

    fn finish(self) -> String {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.join().unwrap()
    }
}

/// `vm`'s drain or fail-back move as node `i` reports it in `node`'s status.
fn move_of(c: &Cluster, node: &str, vm: &str) -> serde_json::Value {
    let v = node_status(c, node);
    v["moves"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["vm"] == vm)
        .cloned()
        .unwrap_or_else(|| panic!("no move of {vm} in {v}"))
}

/// For each of `vms`: how often each node's log says it started it.
fn starts_everywhere(c: &Cluster, vms: &[&str]) -> Vec<Vec<usize>> {
    vms.iter()
        .map(|vm| c.nodes.iter().map(|d| starts(&d.log(), vm)).collect())
        .collect()
}

/// A drain that would leave a VM without a place is refused with its name and changes
/// nothing (the node stays up, no move is queued, the VM keeps its VMM); with --force
/// the others move, that VM stays on the node and is reported, and the node is paused
/// once the moves are done. (Issue 13: the refusal and --force had only SimStore
/// tests.)
#[test]
fn a_drain_refused_for_a_vm_without_a_place_changes_nothing_and_force_leaves_it() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start();
    c.define("free", "high");
    c.define_with("pinned", "low", &["--possible-owner", "a"]);
    let vms = ["free", "pinned"];
    c.wait("both VMs running on a", || {
        vms.iter().all(|vm| c.runs(0, vm))
    });
    let pids: Vec<i32> = vms.iter().map(|vm| c.nodes[0].pid(vm).unwrap()).collect();

    let o = c.nodes[1].ctl(&["node", "drain", "a"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the drain was not refused");
    assert!(stderr.contains("pinned"), "{stderr}\n{}", c.logs());
    let v = node_status(&c, "a");
    assert_eq!(v["state"], "up", "{v}");
    assert!(
        v["moves"].as_array().is_none_or(|m| m.is_empty()),
        "a refused drain queued moves: {v}"
    );
    for (k, vm) in vms.iter().enumerate() {
        assert_eq!(c.nodes[0].pid(vm), Some(pids[k]), "{vm} was touched");
    }

    let out = c.nodes[1].ctl_ok(&["node", "drain", "a", "--force"]);
    assert!(out.contains("free -> "), "{out}");
    assert!(out.contains("pinned stays on a"), "{out}");
    c.wait("a drained and paused", || node_state(&c, "a") == "paused");
    let m = move_of(&c, "a", "free");
    assert_eq!(m["state"], "moved", "{m}\n{}", c.logs());
    assert!(
        !c.runs(0, "free") && (c.runs(1, "free") ^ c.runs(2, "free")),
        "{}",
        c.logs()
    );
    assert_eq!(c.nodes[0].pid("pinned"), Some(pids[1]), "pinned left a");
    assert_eq!(c.owner("pinned").as_deref(), Some("a"));
}

/// `vireoctl node cancel-drain`: a drain of three VMs one at a time, cancelled at
/// once: the node is up again, the moves not started are cancelled and their VMs run
/// on where they were (same VMM), a move that was migrating finishes, and no VM runs
/// twice or is started again.
#[test]
fn a_cancelled_drain_leaves_its_unstarted_vms_running_where_they_are() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start();
    let vms = ["hi", "lo1", "lo2"];
    for (vm, prio) in [("hi", "high"), ("lo1", "low"), ("lo2", "low")] {
        c.define(vm, prio);
    }
    c.wait("every VM running on a", || {
        vms.iter().all(|vm| c.runs(0, vm))
    });
    let pids: Vec<i32> = vms.iter().map(|vm| c.nodes[0].pid(vm).unwrap()).collect();
    let starts_before = starts_everywhere(&c, &vms);
    c.nodes[1].ctl_ok(&["node", "drain", "a", "--concurrency", "1"]);
    let out = c.nodes[1].ctl_ok(&["node", "cancel-drain", "a"]);
    assert!(out.contains("a's drain cancelled; a is up"), "{out}");
    assert_eq!(node_state(&c, "a"), "up");
    // One move at a time, High first: lo2 cannot have started before the cancel.
    assert!(out.contains("lo2"), "{out}\n{}", c.logs());
    c.wait("every move of the drain finished", || {
        vms.iter().all(|vm| {
            ["moved", "failed"].contains(&move_of(&c, "a", vm)["state"].as_str().unwrap_or(""))
        })
    });
    for (k, vm) in vms.iter().enumerate() {
        let m = move_of(&c, "a", vm);
        let cancelled = m["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("cancelled"));
        if cancelled {
            // Never left: the same VMM runs it on a.
            assert_eq!(c.nodes[0].pid(vm), Some(pids[k]), "{vm}: {m}");
        }
        let at: Vec<usize> = (0..NODES.len()).filter(|&i| c.runs(i, vm)).collect();
        assert_eq!(at.len(), 1, "{vm} runs on {at:?}: {m}\n{}", c.logs());
        // Moved or not, nothing of it was started again anywhere.
        let starts: Vec<usize> = c.nodes.iter().map(|d| starts(&d.log(), vm)).collect();
        assert_eq!(starts, starts_before[k], "{vm} was started again: {m}");
    }
}

/// The scheduling policy and priority of the VMM `pid`'s API thread.
fn api_thread_policy(pid: i32) -> Option<(i32, i32)> {
    let tid = agent::vmm_priority::api_thread(pid).ok()??;
    agent::vmm_priority::policy_of(tid).ok()
}

fn node_state(c: &Cluster, node: &str) -> String {
    node_status(c, node)["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Node `node`'s status as b reads it (`GET /api/v1/cluster/nodes/{node}`).
fn node_status(c: &Cluster, node: &str) -> serde_json::Value {
    // A 503 is "b cannot reach etcd now" (a loaded host): read again.
    let mut v = serde_json::Value::Null;
    c.wait(&format!("{node}'s status readable"), || {
        let (status, body) = c.nodes[1].api("GET", &format!("/api/v1/cluster/nodes/{node}"), None);
        v = serde_json::from_str(&body).unwrap_or_default();
        status == 200
    });
    v
}

/// After a live move of `vm` to node `to` (its old VMM `old_pid`; `before`: the guest's
/// serial output on the old node up to the move, `token_before` its disk's token): the
/// old VMM is gone and exactly one node runs the VM; the guest did not start again
/// (no `rw resume`, no new "clustered VM started" on `to`, whose log said it
/// `starts_before[to]` times before: it was adopted) and its writes
/// go on with no number missing across the move; the disk holds one writer's
/// sequence up to the last write reported; the disk's fencing token grew.
fn assert_moved_live(
    c: &Cluster,
    vm: &str,
    disk: &Path,
    (before, old_pid, token_before, starts_before): (&str, i32, u64, &[usize]),
    to: usize,
) {
    common::wait_dead(old_pid, T);
    let runners: Vec<usize> = (0..NODES.len()).filter(|&i| c.runs(i, vm)).collect();
    assert_eq!(
        runners,
        [to],
        "{vm} must run exactly on {}:\n{}",
        NODES[to],
        c.logs()
    );
    let node = &c.nodes[to];
    let mut after = String::new();
    c.wait(&format!("{vm} writing on {}", NODES[to]), || {
        after = node.serial(vm);
        let r = seqdisk::reported(&after);
        r.first()
            .is_some_and(|f| r.last().is_some_and(|l| *l >= f + 20))
    });
    assert!(
        seqdisk::resumed(&after).is_empty() && starts(&node.log(), vm) == starts_before[to],
        "{vm} was started again on {} instead of moved:\n{after}\n{}",
        NODES[to],
        c.logs()
    );
    // No node tried to start it meanwhile (the old one must not take its VMM's end
    // for a crash: only the image lock kept that start from running it twice).
    let quoted = format!("\"{vm}\"");
    for (d, name) in c.nodes.iter().zip(NODES) {
        assert!(
            !d.log()
                .lines()
                .any(|l| l.contains("cannot start a clustered VM") && l.contains(&quoted)),
            "{name} tried to start {vm} during its move:\n{}",
            c.logs()
        );
    }
    // The old host's last line may be cut by the switch-over: it ends on the new one.
    let all = seqdisk::reported(&format!("{before}{after}"));
    let first_after = seqdisk::reported(&after)[0];
    let last_before = *seqdisk::reported(before)
        .last()
        .expect("writes before the move");
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "{vm}: the sequence has a gap or a restart across the move ({last_before} on the old node, {first_after} first on {})",
        NODES[to]
    );
    assert!(
        first_after <= last_before + 2,
        "{vm}: {last_before} then {first_after}"
    );
    node.ok("PUT", &format!("/api/v1/vms/{vm}/pause"), None);
    let on_disk = seqdisk::single_writer(&seqdisk::seeds(disk, BLOCKS))
        .unwrap_or_else(|e| panic!("{vm}: {e}"));
    let last = *c.reported(to, vm).last().unwrap();
    assert!(
        (last..=last + 1).contains(&on_disk),
        "{vm}: disk holds {on_disk}, the guest completed {last}"
    );
    node.ok("PUT", &format!("/api/v1/vms/{vm}/resume"), None);
    let now = token(disk);
    assert!(now > token_before, "{vm}: token {token_before} -> {now}");
}

#[test]
fn draining_a_node_moves_its_vms_high_first_and_resume_with_failback_brings_them_back() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start();
    // Six VMs (the drain): one High, two Medium, three Low.
    let vms = ["hi", "med1", "med2", "lo1", "lo2", "lo3"];
    let rank = |vm: &str| ["hi", "med", "lo"].iter().position(|p| vm.starts_with(p));
    let disks: Vec<PathBuf> = vms
        .iter()
        .map(|vm| {
            let priority = ["high", "medium", "low"][rank(vm).unwrap()];
            c.define(vm, priority)
        })
        .collect();
    c.wait("every VM running on a", || {
        vms.iter().all(|vm| c.runs(0, vm))
    });
    for vm in vms {
        c.wait_writes(0, vm, 0, 30);
    }
    // Each clustered VMM answers its lease renewals at real-time priority.
    for vm in vms {
        c.wait(&format!("{vm}'s API thread at SCHED_RR"), || {
            c.nodes[0].pid(vm).is_some_and(|pid| {
                api_thread_policy(pid)
                    == Some((libc::SCHED_RR, agent::vmm_priority::API_THREAD_RR_PRIORITY))
            })
        });
    }

    // Every VM moves, High first (the refusal of a drain that leaves VMs without a
    // place is `cluster/tests/drain.rs`'s).
    let tokens: Vec<u64> = disks.iter().map(|d| token(d)).collect();
    let pids: Vec<i32> = vms.iter().map(|vm| c.nodes[0].pid(vm).unwrap()).collect();
    let followers: Vec<SerialFollower> = vms
        .iter()
        .map(|vm| SerialFollower::start(&c.nodes[0], vm))
        .collect();
    let starts_before = starts_everywhere(&c, &vms);
    let out = c.nodes[1].ctl_ok(&["node", "drain", "a"]);
    for vm in vms {
        assert!(out.contains(&format!("{vm} -> ")), "{out}");
    }
    c.wait("a drained and paused", || node_state(&c, "a") == "paused");
    let befores: Vec<String> = followers.into_iter().map(SerialFollower::finish).collect();
    let moves: Vec<serde_json::Value> = vms.iter().map(|vm| move_of(&c, "a", vm)).collect();
    for m in &moves {
        assert_eq!(m["state"], "moved", "{m}\n{}", c.logs());
    }
    // By priority: no move started before every move of a higher priority had finished.
    for (j, later) in vms.iter().enumerate() {
        for (k, earlier) in vms.iter().enumerate() {
            if rank(earlier) < rank(later) {
                assert!(
                    moves[j]["started_ms"].as_u64().unwrap()
                        >= moves[k]["finished_ms"].as_u64().unwrap(),
                    "{later} started moving before {earlier} had moved: {moves:?}"
                );
            }
        }
    }
    let mut at = Vec::new();
    for (k, vm) in vms.iter().enumerate() {
        let to = NODES.iter().position(|n| moves[k]["to"] == *n).unwrap();
        assert_ne!(to, 0);
        assert_eq!(c.owner(vm).as_deref(), Some(NODES[to]));
        let st = &starts_before[k];
        assert_moved_live(&c, vm, &disks[k], (&befores[k], pids[k], tokens[k], st), to);
        at.push(to);
    }
    // A paused node takes no VM.
    let (_, body) = c.nodes[1].api("GET", "/api/v1/cluster", None);
    assert!(body.contains("\"paused\""), "{body}");

    // Resume with fail-back: every moved VM comes back to a, live.
    let tokens: Vec<u64> = disks.iter().map(|d| token(d)).collect();
    let pids: Vec<i32> = vms
        .iter()
        .zip(&at)
        .map(|(vm, &i)| c.nodes[i].pid(vm).unwrap())
        .collect();
    let followers: Vec<SerialFollower> = vms
        .iter()
        .zip(&at)
        .map(|(vm, &i)| SerialFollower::start(&c.nodes[i], vm))
        .collect();
    let starts_before = starts_everywhere(&c, &vms);
    let out = c.nodes[2].ctl_ok(&["node", "resume", "a", "--failback"]);
    for vm in vms {
        assert!(out.contains(&format!("{vm} -> a")), "{out}");
    }
    c.wait("every VM back on a", || {
        vms.iter().all(|vm| {
            move_of(&c, "a", vm)["state"] == "moved" && c.owner(vm).as_deref() == Some("a")
        })
    });
    let befores: Vec<String> = followers.into_iter().map(SerialFollower::finish).collect();
    assert_eq!(node_state(&c, "a"), "up");
    for (k, vm) in vms.iter().enumerate() {
        assert_eq!(move_of(&c, "a", vm)["reason"], "failback");
        let st = &starts_before[k];
        assert_moved_live(&c, vm, &disks[k], (&befores[k], pids[k], tokens[k], st), 0);
    }
}

/// The cluster-wide migration queue's moves as node b reports them.
fn queue_moves(c: &Cluster) -> Vec<serde_json::Value> {
    let mut v = serde_json::Value::Null;
    c.wait("the cluster's migration queue readable", || {
        let (status, body) = c.nodes[1].api("GET", "/api/v1/cluster/migrations", None);
        v = serde_json::from_str(&body).unwrap_or_default();
        status == 200
    });
    v["moves"].as_array().cloned().unwrap_or_default()
}

/// `vm`'s move in the cluster-wide queue (None: it has none yet).
fn queued_move(c: &Cluster, vm: &str) -> Option<serde_json::Value> {
    queue_moves(c).into_iter().find(|m| m["vm"] == vm)
}

/// `vireoctl vm migrate hi lo1 lo2 --to b --concurrency 1 --wait` (two VMs on a, one
/// on c): the request is checked (an unknown selector key is refused naming it), its
/// moves run one at a time into b — High first, and never two arriving at b at once,
/// although they come from two sources — each VM ends running on b only, moved live
/// (same guest, numbered writes continuing, its disk one writer's sequence, a grown
/// fencing token), and `migration list --cluster` shows every move with its request.
#[test]
fn a_bulk_migration_moves_a_selection_to_one_node_one_at_a_time_high_first() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start();
    let vms = ["hi", "lo1", "lo2"];
    let from = [0, 0, 2];
    let disks = [
        c.define_on("hi", "high", "a", &[]),
        c.define_on("lo1", "low", "a", &[]),
        c.define_on("lo2", "low", "c", &[]),
    ];
    c.wait("hi and lo1 on a, lo2 on c", || {
        vms.iter().zip(from).all(|(vm, i)| c.runs(i, vm))
    });
    for (vm, i) in vms.iter().zip(from) {
        c.wait_writes(i, vm, 0, 20);
    }
    // Refused before anything is written: an unknown selector key, named.
    let o = c.nodes[1].ctl(&["vm", "migrate", "--selector", "prio=low", "--to", "b"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("\"prio\""),
        "{stderr}"
    );

    let tokens: Vec<u64> = disks.iter().map(|d| token(d)).collect();
    let pids: Vec<i32> = vms
        .iter()
        .zip(from)
        .map(|(vm, i)| c.nodes[i].pid(vm).unwrap())
        .collect();
    let followers: Vec<SerialFollower> = vms
        .iter()
        .zip(from)
        .map(|(vm, i)| SerialFollower::start(&c.nodes[i], vm))
        .collect();
    let starts_before = starts_everywhere(&c, &vms);
    let mut ctl = std::process::Command::new(common::bin("vireoctl"))
        .arg("--socket")
        .arg(&c.nodes[1].socket)
        .args(["vm", "migrate", "hi", "lo1", "lo2", "--to", "b"])
        .args(["--concurrency", "1", "--wait"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.wait("every move of the request finished", || {
        vms.iter().all(|vm| {
            queued_move(&c, vm)
                .is_some_and(|m| ["moved", "failed"].contains(&m["state"].as_str().unwrap_or("")))
        })
    });
    // `--wait` returns once they have.
    c.wait("vireoctl --wait returned", || {
        ctl.try_wait().unwrap().is_some()
    });
    let out = ctl.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    assert!(stdout.contains("hi a -> b (high)"), "{stdout}");
    assert!(stdout.contains("lo2 c -> b (low)"), "{stdout}");
    let befores: Vec<String> = followers.into_iter().map(SerialFollower::finish).collect();
    let moves: Vec<serde_json::Value> = vms.iter().map(|vm| queued_move(&c, vm).unwrap()).collect();
    let request = moves[0]["request"].as_str().unwrap().to_string();
    for m in &moves {
        assert_eq!(m["state"], "moved", "{m}\n{}", c.logs());
        assert_eq!(m["to"], "b");
        assert_eq!(m["reason"], "bulk");
        assert_eq!(m["request"], request.as_str());
    }
    // One at a time into b, High first: each move started after the one before
    // had finished (all nodes share this machine's clock).
    let mut spans: Vec<(u64, u64, &str)> = moves
        .iter()
        .zip(vms)
        .map(|(m, vm)| {
            (
                m["started_ms"].as_u64().unwrap(),
                m["finished_ms"].as_u64().unwrap(),
                vm,
            )
        })
        .collect();
    spans.sort();
    assert_eq!(spans[0].2, "hi", "a Low VM moved before hi: {moves:?}");
    for w in spans.windows(2) {
        assert!(w[1].0 >= w[0].1, "two moves into b at once: {moves:?}");
    }
    for (k, vm) in vms.iter().enumerate() {
        assert_eq!(c.owner(vm).as_deref(), Some("b"));
        let st = &starts_before[k];
        assert_moved_live(&c, vm, &disks[k], (&befores[k], pids[k], tokens[k], st), 1);
    }
    // The queue, as a person reads it.
    let table = c.nodes[0].ctl_ok(&["migration", "list", "--cluster"]);
    for vm in vms {
        let line = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(vm))
            .unwrap_or_else(|| panic!("{vm} not in:\n{table}"));
        assert!(line.contains("moved") && line.contains(&request), "{line}");
    }

    // Followed with a timeout shorter than three moves one after the other: vireoctl
    // stops waiting (exit 124, saying what is unfinished and how to cancel it) and the
    // moves go on without it.
    let o = c.nodes[1].ctl(&[
        "vm",
        "migrate",
        "hi",
        "lo1",
        "lo2",
        "--to",
        "c",
        "--concurrency",
        "1",
        "--wait",
        "--timeout",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(124), "{stderr}");
    assert!(
        stderr.contains("not finished after 1 s")
            && stderr.contains("vireoctl migration cancel --cluster"),
        "{stderr}"
    );
    c.wait("the moves went on after vireoctl stopped waiting", || {
        vms.iter()
            .all(|vm| c.owner(vm).as_deref() == Some("c") && c.runs(2, vm))
    });

    // Bulk stop of the Low VMs: they are off (no VMM anywhere, ownership `off`) and
    // stay off; hi runs on. Bulk start: they run again, with a grown fencing token.
    let low = ["lo1", "lo2"];
    let low_disks = [&disks[1], &disks[2]];
    let before: Vec<u64> = low_disks.iter().map(|d| token(d)).collect();
    c.nodes[0].ctl_ok(&["vm", "stop", "--selector", "priority=low"]);
    let off = |vm: &str| {
        let (_, body) = c.nodes[1].api("GET", "/api/v1/cluster", None);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["name"] == vm && x["owner"] == "off")
    };
    c.wait("lo1 and lo2 off, no VMM anywhere", || {
        low.iter()
            .all(|vm| off(vm) && (0..NODES.len()).all(|i| !c.runs(i, vm)))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        low.iter()
            .all(|vm| off(vm) && (0..NODES.len()).all(|i| !c.runs(i, vm))),
        "a stopped VM started again:\n{}",
        c.logs()
    );
    assert!(c.runs(2, "hi"), "hi was stopped too");
    let started: Vec<usize> = starts_everywhere(&c, &low)
        .iter()
        .map(|s| s.iter().sum())
        .collect();
    c.nodes[0].ctl_ok(&["vm", "start", "--selector", "priority=low"]);
    // vireod logs a start once its VMM is up (after the fencing token is written).
    c.wait("the bulk start logged on the low VMs' nodes", || {
        starts_everywhere(&c, &low)
            .iter()
            .zip(&started)
            .all(|(s, n)| s.iter().sum::<usize>() > *n)
    });
    for (vm, (disk, before)) in low.iter().zip(low_disks.iter().zip(&before)) {
        let i = c.runner(vm, NODES.len());
        c.wait(&format!("{vm}'s fencing token grown"), || {
            token(disk) > *before
        });
        assert_eq!(
            (0..NODES.len()).filter(|&j| c.runs(j, vm)).count(),
            1,
            "{vm} runs on {} and elsewhere",
            NODES[i]
        );
    }

    // A request cancelled as soon as it is queued: one move at a time, so its later
    // moves have not started; those are dropped (failed, "cancelled ...") and their VMs
    // never left (the same VMMs run them); what had started finishes. Either way every
    // VM runs on exactly one node and none was started again.
    c.wait("every VM running", || {
        vms.iter().all(|vm| (0..NODES.len()).any(|i| c.runs(i, vm)))
    });
    let at: Vec<usize> = vms.iter().map(|vm| c.runner(vm, NODES.len())).collect();
    // A node holding at most one of them (three VMs, three nodes): the others move there.
    let to = (0..NODES.len())
        .min_by_key(|&i| at.iter().filter(|&&a| a == i).count())
        .unwrap();
    let moving: Vec<(usize, &str)> = vms
        .iter()
        .zip(&at)
        .filter(|&(_, &a)| a != to)
        .map(|(vm, &a)| (a, *vm))
        .collect();
    assert!(moving.len() >= 2, "{at:?} -> {to}");
    let pids: Vec<i32> = moving
        .iter()
        .map(|&(i, vm)| c.nodes[i].pid(vm).unwrap())
        .collect();
    let starts_before = starts_everywhere(&c, &vms);
    let mut args = vec!["vm", "migrate"];
    args.extend(moving.iter().map(|&(_, vm)| vm));
    args.extend(["--to", NODES[to], "--concurrency", "1"]);
    let out = c.nodes[1].ctl_ok(&args);
    let request = out
        .split_whitespace()
        .nth(1)
        .and_then(|id| id.strip_suffix(':'))
        .unwrap_or_else(|| panic!("no request id in: {out}"))
        .to_string();
    let out = c.nodes[2].ctl_ok(&["migration", "cancel", "--cluster", &request]);
    assert!(
        out.contains(&format!("request {request} cancelled")),
        "{out}"
    );
    c.wait("every move of the cancelled request finished", || {
        moving.iter().all(|(_, vm)| {
            queued_move(&c, vm).is_some_and(|m| {
                m["request"] == request.as_str()
                    && ["moved", "failed"].contains(&m["state"].as_str().unwrap_or(""))
            })
        })
    });
    let mut dropped = 0;
    for (k, &(i, vm)) in moving.iter().enumerate() {
        let m = queued_move(&c, vm).unwrap();
        let cancelled = m["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("cancelled"));
        if cancelled {
            dropped += 1;
            assert!(out.contains(vm), "{vm} dropped but not named: {out}");
            assert_eq!(m["state"], "failed", "{m}");
            assert_eq!(c.nodes[i].pid(vm), Some(pids[k]), "{vm} left: {m}");
            assert_eq!(c.owner(vm).as_deref(), Some(NODES[i]), "{m}");
        } else {
            assert_eq!(m["state"], "moved", "{vm}: {m}\n{}", c.logs());
            assert_eq!(c.owner(vm).as_deref(), Some(NODES[to]), "{m}");
        }
        let on: Vec<usize> = (0..NODES.len()).filter(|&j| c.runs(j, vm)).collect();
        assert_eq!(on.len(), 1, "{vm} runs on {on:?}: {m}\n{}", c.logs());
    }
    // One at a time: the last of the request cannot have started before the cancel.
    assert!(dropped >= 1, "nothing was cancelled: {out}\n{}", c.logs());
    for (k, vm) in vms.iter().enumerate() {
        let starts: Vec<usize> = c.nodes.iter().map(|d| starts(&d.log(), vm)).collect();
        assert_eq!(starts, starts_before[k], "{vm} was started again");
    }
}

/// An update hooks directory (root's, as vireod requires) with hook `update`: it asks
/// its vireod which VMs it has (written to OUT/NODE.vms: the test checks that none
/// runs), appends its node to OUT/order, and with `fail-on NODE` fails on that node.
fn update_hooks() -> (tempfile::TempDir, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt;
    let hooks = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let script = format!(
        "#!/bin/sh\n\
         out={out}\n\
         {ctl} --socket \"$VIREO_SOCKET\" -o json vm list > \"$out/$VIREO_NODE.vms\" || exit 90\n\
         echo \"$VIREO_NODE\" >> \"$out/order\"\n\
         echo \"updating $VIREO_NODE ($*)\"\n\
         if [ \"$1\" = fail-on ] && [ \"$2\" = \"$VIREO_NODE\" ]; then\n\
           echo \"update of $VIREO_NODE failed: no space left on device\" >&2\n\
           exit 3\n\
         fi\n",
        out = out.path().display(),
        ctl = common::bin("vireoctl").display(),
    );
    let hook = hooks.path().join("update");
    std::fs::write(&hook, script).unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    (hooks, out)
}

/// Three VMs, one preferring each node, running and writing there.
fn cluster_for_updates(hooks: &Path) -> (Cluster, Vec<PathBuf>) {
    let h = hooks.display().to_string();
    let c = Cluster::start_with(|_| vec!["--update-hooks".to_string(), h.clone()]);
    let disks: Vec<PathBuf> = UPDATE_VMS
        .iter()
        .map(|(vm, prio, owner)| c.define_on(vm, prio, owner, &[]))
        .collect();
    c.wait("each VM running on its node", || {
        UPDATE_VMS
            .iter()
            .enumerate()
            .all(|(i, (vm, _, _))| c.runs(i, vm))
    });
    for (i, (vm, _, _)) in UPDATE_VMS.iter().enumerate() {
        c.wait_writes(i, vm, 0, 30);
    }
    (c, disks)
}

const UPDATE_VMS: [(&str, &str, &str); 3] = [
    ("va", "high", "a"),
    ("vb", "medium", "b"),
    ("vc", "low", "c"),
];

/// `vm` runs on exactly one node (returned), which started it only once in the whole
/// test (`starts`: it moved, never started again), its guest wrote on past `from`, and
/// its disk holds one writer's sequence up to the last write reported.
fn assert_runs_once(c: &Cluster, vm: &str, disk: &Path, from: u64) -> usize {
    let runners: Vec<usize> = (0..NODES.len()).filter(|&i| c.runs(i, vm)).collect();
    assert_eq!(runners.len(), 1, "{vm} runs on {runners:?}:\n{}", c.logs());
    let at = runners[0];
    let started: usize = c.nodes.iter().map(|d| starts(&d.log(), vm)).sum();
    assert_eq!(
        started,
        1,
        "{vm} was started again, not moved:\n{}",
        c.logs()
    );
    c.wait_writes(at, vm, from, 20);
    let node = &c.nodes[at];
    node.ok("PUT", &format!("/api/v1/vms/{vm}/pause"), None);
    let on_disk = seqdisk::single_writer(&seqdisk::seeds(disk, BLOCKS))
        .unwrap_or_else(|e| panic!("{vm}: {e}"));
    let last = *c.reported(at, vm).last().unwrap();
    assert!(
        (last..=last + 1).contains(&on_disk),
        "{vm}: disk holds {on_disk}, the guest completed {last}"
    );
    node.ok("PUT", &format!("/api/v1/vms/{vm}/resume"), None);
    at
}

fn update_status(c: &Cluster) -> serde_json::Value {
    let out = c.nodes[2].ctl_ok(&["-o", "json", "cluster", "update", "status"]);
    serde_json::from_str(&out).unwrap()
}

/// What each node's hook saw: its vireod's VMs, none of them running.
fn assert_hook_saw_no_vm(out: &Path, node: &str) {
    let text = std::fs::read_to_string(out.join(format!("{node}.vms")))
        .unwrap_or_else(|e| panic!("{node}'s hook did not run: {e}"));
    let vms: serde_json::Value = serde_json::from_str(&text).unwrap();
    let running: Vec<&serde_json::Value> = vms
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| !v["pid"].is_null())
        .collect();
    assert!(
        running.is_empty(),
        "{node}'s hook ran beside VMs: {running:?}"
    );
}

/// The hooks (and where they write), the cluster running [`UPDATE_VMS`], their disks,
/// and the last block each VM reported before any update.
fn cluster_ready_for_updates() -> (
    tempfile::TempDir,
    tempfile::TempDir,
    Cluster,
    Vec<PathBuf>,
    Vec<u64>,
) {
    let (hooks, out) = update_hooks();
    let (c, disks) = cluster_for_updates(hooks.path());
    let before: Vec<u64> = UPDATE_VMS
        .iter()
        .enumerate()
        .map(|(i, (vm, _, _))| *c.reported(i, vm).last().unwrap())
        .collect();
    (hooks, out, c, disks, before)
}

#[test]
fn a_rolling_update_drains_updates_and_brings_back_each_node_in_turn() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (_hooks, out, c, disks, before) = cluster_ready_for_updates();

    // Asked of b, which is itself updated in the run: the run is etcd's, not b's.
    let o = c.nodes[1].ctl(&[
        "cluster",
        "update",
        "--run",
        "update",
        "--arg",
        "x y",
        "--nodes",
        "c,a,b",
        "--timeout",
        "300",
    ]);
    assert!(
        o.status.success(),
        "update failed: {}\n{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout),
        c.logs()
    );

    // Each node's hook ran once, in the order asked, while its node ran no VM.
    let order = std::fs::read_to_string(out.path().join("order")).unwrap();
    assert_eq!(order, "c\na\nb\n");
    for n in NODES {
        assert_hook_saw_no_vm(out.path(), n);
        assert_eq!(node_state(&c, n), "up", "{n} not resumed");
    }
    let run = update_status(&c);
    assert_eq!(run["state"], "succeeded", "{run}");
    for s in run["steps"].as_array().unwrap() {
        assert_eq!(s["phase"], "done", "{run}");
        assert_eq!(s["exit_code"], 0, "{run}");
        assert!(
            s["output_tail"].as_str().unwrap().contains("(x y)"),
            "{run}"
        );
    }
    // Every VM ran throughout, once, and failed back to its node.
    for (k, (vm, _, home)) in UPDATE_VMS.iter().enumerate() {
        let at = assert_runs_once(&c, vm, &disks[k], before[k]);
        assert_eq!(
            NODES[at],
            *home,
            "{vm} did not fail back: {run}\n{}",
            c.logs()
        );
    }
}

#[test]
fn a_failing_hook_stops_the_update_at_its_node() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (_hooks, out, c, disks, before) = cluster_ready_for_updates();

    let o = c.nodes[0].ctl(&[
        "cluster",
        "update",
        "--run",
        "update",
        "--arg",
        "fail-on",
        "--arg",
        "b",
        "--nodes",
        "a,b,c",
        "--timeout",
        "300",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "the update succeeded:\n{stdout}");
    assert!(
        stderr.contains("stopped at b: hook update exited with status 3"),
        "{stderr}\n{stdout}\n{}",
        c.logs()
    );
    assert!(
        stdout.contains("update of b failed: no space left on device"),
        "{stdout}"
    );

    // The run stopped at b: c's hook never ran; b stays paused, its VM elsewhere.
    let order = std::fs::read_to_string(out.path().join("order")).unwrap();
    assert_eq!(order, "a\nb\n");
    assert!(!out.path().join("c.vms").exists(), "c's hook ran");
    let run = update_status(&c);
    assert_eq!(run["state"], "failed", "{run}");
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps[0]["phase"], "done");
    assert_eq!(steps[1]["phase"], "failed");
    assert_eq!(steps[1]["exit_code"], 3);
    assert!(steps[1]["output_tail"]
        .as_str()
        .unwrap()
        .contains("update of b failed: no space left on device"));
    assert_eq!(steps[2]["phase"], "pending");
    assert_eq!(node_state(&c, "a"), "up");
    assert_eq!(node_state(&c, "b"), "paused");
    assert_eq!(node_state(&c, "c"), "up");
    // Every VM runs, once; none on b.
    for (k, (vm, _, _)) in UPDATE_VMS.iter().enumerate() {
        let at = assert_runs_once(&c, vm, &disks[k], before[k]);
        assert_ne!(NODES[at], "b", "{vm} runs on the paused node");
    }
    assert!(
        c.runs(0, "va") && c.runs(2, "vc"),
        "va and vc back home\n{}",
        c.logs()
    );
}

/// `vireoctl cluster validate` from node `i`: its exit status, output and report.
fn validate(c: &Cluster, i: usize) -> (bool, String, serde_json::Value, String) {
    let out = tempfile::tempdir().unwrap();
    let o = c.nodes[i].ctl(&["cluster", "validate", "--out", out.path().to_str().unwrap()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let json = std::fs::read_to_string(out.path().join("report.json"))
        .unwrap_or_else(|e| panic!("no report.json: {e}\n{text}"));
    let html = std::fs::read_to_string(out.path().join("report.html")).unwrap();
    (
        o.status.success(),
        text,
        serde_json::from_str(&json).unwrap(),
        html,
    )
}

fn checks_of<'a>(report: &'a serde_json::Value, name: &str) -> Vec<&'a serde_json::Value> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"] == name)
        .collect()
}

#[test]
fn a_healthy_cluster_passes_validation() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start();
    c.define("web", "high");
    c.wait("web running on a", || c.runs(0, "web"));
    let (ok, text, report, html) = validate(&c, 1);
    let not_pass: Vec<&serde_json::Value> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] != "pass")
        .collect();
    assert!(ok && not_pass.is_empty(), "{text}\n{not_pass:?}");
    assert_eq!(report["status"], "pass");
    // Every check ran, per node where it is a node's.
    for name in [
        "kvm",
        "version",
        "cpu-features",
        "cpu-fingerprint",
        "storage-roots",
        "shared-storage",
        "reachability",
        "clock-skew",
        "certificate",
    ] {
        let nodes: BTreeSet<&str> = checks_of(&report, name)
            .iter()
            .filter_map(|c| c["node"].as_str())
            .collect();
        if name == "version" {
            assert_eq!(checks_of(&report, name).len(), 1, "{report}");
        } else {
            assert_eq!(nodes, BTreeSet::from(NODES), "{name}: {report}");
        }
    }
    for name in ["etcd", "n+1"] {
        assert_eq!(checks_of(&report, name).len(), 1, "{name}: {report}");
    }
    // Each node pinged the two others.
    for n in NODES {
        assert_eq!(
            report["nodes"][n]["Ok"]["peers"].as_array().unwrap().len(),
            2,
            "{report}"
        );
    }
    assert!(
        html.contains("<td>shared-storage</td>") && html.contains("class=\"pass\""),
        "{html}"
    );
    // The probe files were removed.
    let left: Vec<_> = std::fs::read_dir(c.shared.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".vireo-validate-")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn validation_names_a_node_without_the_shared_directory_and_one_with_another_version() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // c's storage root is a directory of its own, at another path; b reports another
    // version (vireod's test hook).
    let elsewhere = tempfile::tempdir().unwrap();
    let c = Cluster::start_custom(
        |_| vec![],
        |i, shared| {
            if i == 2 {
                elsewhere.path().to_path_buf()
            } else {
                shared.to_path_buf()
            }
        },
        |i| {
            if i == 1 {
                vec![
                    "env".into(),
                    "VIREO_TEST_REPORTED_VERSION=9.9.9-test".into(),
                ]
            } else {
                vec![]
            }
        },
    );
    let shared = c.shared.path().display().to_string();
    let (ok, text, report, html) = validate(&c, 0);
    assert!(!ok, "validation passed:\n{text}");
    assert_eq!(report["status"], "fail");
    let fail = |name: &str, node: &str| -> String {
        checks_of(&report, name)
            .iter()
            .find(|c| c["node"] == node)
            .filter(|c| c["status"] == "fail")
            .and_then(|c| c["detail"].as_str())
            .unwrap_or_else(|| panic!("no failed {name} check of {node}: {report}"))
            .to_string()
    };
    let roots = fail("storage-roots", "c");
    assert!(
        roots.contains(&shared) && roots.starts_with("c has no storage root"),
        "{roots}"
    );
    let probe = fail("shared-storage", "c");
    assert!(probe.contains(&shared) && probe.contains("c"), "{probe}");
    let version = fail("version", "b");
    let ours = env!("CARGO_PKG_VERSION");
    assert_eq!(
        version,
        format!("b runs vireo 9.9.9-test, the others {ours}")
    );
    // a and b see the shared directory; a and c report the same version.
    for n in ["a", "b"] {
        for name in ["storage-roots", "shared-storage"] {
            assert!(
                checks_of(&report, name)
                    .iter()
                    .any(|c| c["node"] == n && c["status"] == "pass"),
                "{name} of {n}: {report}"
            );
        }
    }
    assert!(
        text.contains("FAIL version") && text.contains("9.9.9-test"),
        "{text}"
    );
    assert!(html.contains("b runs vireo 9.9.9-test"), "{html}");
}

/// etcd holds every node's VM definitions (disks, kernels, networks): it admits only
/// the hosts of the cluster's CA, and a node reaches it over mutual TLS only.
/// - A host with a certificate of another CA (etcdctl, the etcd project's own client)
///   is refused; so is anyone in clear; the cluster's own identity gets in.
/// - A vireod with a foreign identity never joins: its log says it cannot, and the
///   cluster still has three nodes.
/// - A vireod without an identity, or given `http://` endpoints, refuses to start with
///   one line (`--cluster-etcd-insecure` is the only way to etcd in clear).
#[test]
fn etcd_admits_only_the_cluster_cas_hosts_and_a_node_needs_its_identity() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start();
    let other_ca = Pki::new();
    let stranger = other_ca.host_with_sans("d", &[&ip(0)]);
    let own = c._pki.dir.path().join("a");
    let etcdctl = |ca: &Path, cert: &Path, key: &Path, endpoint: &str| {
        let mut cmd = std::process::Command::new("/usr/bin/etcdctl");
        c.hosts.hosts[0].enter_on_exec(&mut cmd);
        cmd.env("ETCDCTL_API", "3")
            .args(["--endpoints", endpoint, "--command-timeout=3s"])
            .arg("--cacert")
            .arg(ca)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(["get", "--prefix", "vireo/nodes/", "--keys-only"]);
        cmd.output().expect("run etcdctl")
    };
    let https = format!("https://{}:2379", ip(0));
    let mine = etcdctl(
        &own.join("ca.crt"),
        &own.join("host.crt"),
        &own.join("host.key"),
        &https,
    );
    assert!(mine.status.success(), "{mine:?}");
    assert!(String::from_utf8_lossy(&mine.stdout).contains("vireo/nodes/a"));
    // Their own CA trusted on their side; ours refuses their certificate.
    let theirs = etcdctl(&stranger.ca, &stranger.cert, &stranger.key, &https);
    assert!(!theirs.status.success(), "a stranger read etcd: {theirs:?}");
    let clear = etcdctl(
        &own.join("ca.crt"),
        &own.join("host.crt"),
        &own.join("host.key"),
        &format!("http://{}:2379", ip(0)),
    );
    assert!(!clear.status.success(), "etcd answered in clear: {clear:?}");

    // A vireod with the stranger's identity, on host a's network.
    let eps = c.etcd.endpoints_arg();
    let mut args = common::cluster_node_args(&eps, "d", c.shared.path());
    args.extend(tls_args(&stranger));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_in_netns(&refs, c.hosts.hosts[0].clone());
    c.wait("d's failed join", || {
        d.log().contains("cannot join the cluster")
    });
    assert_eq!(c.members(), 3, "{}", c.logs());
    drop(d);

    // A vireod without an identity, and one given etcd in clear: refused at start.
    let dir = tempfile::tempdir().unwrap();
    let http_eps = eps.replace("https://", "http://");
    let id = tls_args(&stranger);
    let cases: [(&str, Vec<String>, &str); 2] = [
        (
            &eps,
            vec![],
            "etcd is reached over mutual TLS with this host's identity",
        ),
        (&http_eps, id, "etcd in clear"),
    ];
    for (endpoints, identity, why) in cases {
        let out = std::process::Command::new(common::bin("vireod"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .args(["--no-cpu-cgroups", "--no-autostart", "--no-jail"])
            .args(["--cluster-etcd", endpoints, "--node-name", "e"])
            .args(&identity)
            .output()
            .expect("run vireod");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(why), "{err}");
    }
}

/// The departures node b's view of `node` records.
fn departures(c: &Cluster, node: &str) -> Option<usize> {
    let (status, body) = c.nodes[1].api("GET", &format!("/api/v1/cluster/nodes/{node}"), None);
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    (status == 200).then(|| v["departures"].as_array().map_or(0, |d| d.len()))
}

/// A node whose vireod is stopped by its operator (SIGTERM) with drain on shutdown
/// off (`--shutdown-drain-timeout-s 0`) leaves the cluster: its clustered VM is
/// stopped there and started on another node, with every completed write kept, and
/// the departure does not count towards quarantine (none recorded after the node is
/// back). A node that crashes (kill -9 of its vireod) three times
/// within the hour is quarantined: a VM preferring it is placed elsewhere until
/// `node release`, after which the node is `up` with no departures.
#[test]
fn a_node_stopped_by_its_operator_leaves_gracefully_and_one_that_crashes_three_times_is_quarantined(
) {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // The test guest does not power off when asked: stopped after 2 s.
    let mut c = Cluster::start_with(|_| {
        ["--stop-timeout-s", "2", "--shutdown-drain-timeout-s", "0"]
            .map(String::from)
            .to_vec()
    });
    let disk = c.define("hi", "high");
    c.wait("hi running on a", || c.runs(0, "hi"));
    c.wait_writes(0, "hi", 0, 30);
    let pid = c.nodes[0].pid("hi").unwrap();

    // Graceful: SIGTERM to a's vireod.
    assert_eq!(c.nodes[0].terminate(T), Some(0), "{}", c.logs());
    common::wait_dead(pid, T);
    let log = c.nodes[0].log();
    assert!(
        log.contains("leaving the cluster: stopping this node's clustered VMs"),
        "{log}"
    );
    assert!(log.contains("left the cluster"), "{log}");
    let last = *c.reported(0, "hi").last().unwrap();
    let to = c.runner("hi", 0);
    assert_carried_on(&c, "hi", &disk, last, to);
    c.nodes[0].spawn();
    c.wait("a back in the cluster", || {
        c.members() == 3 && node_state(&c, "a") == "up"
    });
    // Give the controllers time to see a's old incarnation gone (it was revoked: at
    // once), then check nothing was counted.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(departures(&c, "a"), Some(0), "{}", c.logs());

    // Ungraceful, three times: each crash is one departure; the third quarantines a.
    for n in 1..=3 {
        c.nodes[0].kill9();
        c.wait(&format!("a's crash {n} recorded"), || {
            departures(&c, "a") == Some(n)
        });
        c.nodes[0].spawn();
        c.wait(&format!("a back after crash {n}"), || c.members() == 3);
    }
    c.wait("a quarantined", || node_state(&c, "a") == "quarantined");
    // A VM preferring a goes elsewhere while a is quarantined.
    c.define("lo", "low");
    let elsewhere = c.runner("lo", 0);
    assert_ne!(c.owner("lo").as_deref(), Some("a"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(!c.runs(0, "lo") && c.runs(elsewhere, "lo"));
    let out = c.nodes[1].ctl_ok(&["node", "release", "a"]);
    assert!(out.contains('a'), "{out}");
    c.wait("a up after release", || node_state(&c, "a") == "up");
    assert_eq!(departures(&c, "a"), Some(0));
}

/// Drain on shutdown: SIGTERM to a node's vireod first live-migrates its clustered
/// VMs to the other nodes (no guest restarts, no write lost, High first), then the
/// vireod exits 0. Started again, the node resumes by itself and the VMs fail back
/// to it, live.
#[test]
fn a_node_stopped_by_its_operator_drains_first_and_its_vms_fail_back_when_it_returns() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Cluster::start();
    let vms = ["hi", "lo"];
    let disks = [c.define("hi", "high"), c.define("lo", "low")];
    c.wait("hi and lo running on a", || {
        vms.iter().all(|vm| c.runs(0, vm))
    });
    for vm in vms {
        c.wait_writes(0, vm, 0, 30);
    }
    let tokens: Vec<u64> = disks.iter().map(|d| token(d)).collect();
    let pids: Vec<i32> = vms.iter().map(|vm| c.nodes[0].pid(vm).unwrap()).collect();
    let followers: Vec<SerialFollower> = vms
        .iter()
        .map(|vm| SerialFollower::start(&c.nodes[0], vm))
        .collect();
    let starts_before = starts_everywhere(&c, &vms);

    assert_eq!(c.nodes[0].terminate(T), Some(0), "{}", c.logs());
    let log = c.nodes[0].log();
    assert!(
        log.contains("drain on shutdown: moving this node's clustered VMs away")
            && log.contains("drain on shutdown ended"),
        "{log}"
    );
    let befores: Vec<String> = followers.into_iter().map(SerialFollower::finish).collect();
    let moves: Vec<serde_json::Value> = vms.iter().map(|vm| move_of(&c, "a", vm)).collect();
    for m in &moves {
        assert_eq!(m["state"], "moved", "{m}\n{}", c.logs());
        assert_eq!(m["reason"], "drain", "{m}");
    }
    assert!(
        moves[1]["started_ms"].as_u64().unwrap() >= moves[0]["finished_ms"].as_u64().unwrap(),
        "lo started moving before hi had moved: {moves:?}"
    );
    let mut at = Vec::new();
    for (k, vm) in vms.iter().enumerate() {
        let to = NODES.iter().position(|n| moves[k]["to"] == *n).unwrap();
        assert_ne!(to, 0);
        let st = &starts_before[k];
        assert_moved_live(&c, vm, &disks[k], (&befores[k], pids[k], tokens[k], st), to);
        at.push(to);
    }

    // Back: a resumes by itself and the VMs fail back, live.
    let tokens: Vec<u64> = disks.iter().map(|d| token(d)).collect();
    let pids: Vec<i32> = vms
        .iter()
        .zip(&at)
        .map(|(vm, &i)| c.nodes[i].pid(vm).unwrap())
        .collect();
    let followers: Vec<SerialFollower> = vms
        .iter()
        .zip(&at)
        .map(|(vm, &i)| SerialFollower::start(&c.nodes[i], vm))
        .collect();
    let starts_before = starts_everywhere(&c, &vms);
    c.nodes[0].spawn();
    c.wait("every VM back on a", || {
        vms.iter().all(|vm| {
            let m = move_of(&c, "a", vm);
            m["reason"] == "failback"
                && m["state"] == "moved"
                && c.owner(vm).as_deref() == Some("a")
        })
    });
    let befores: Vec<String> = followers.into_iter().map(SerialFollower::finish).collect();
    assert_eq!(node_state(&c, "a"), "up");
    assert!(
        c.nodes[0]
            .log()
            .contains("back after a drain on shutdown: node up, its VMs failing back"),
        "{}",
        c.logs()
    );
    for (k, vm) in vms.iter().enumerate() {
        let st = &starts_before[k];
        assert_moved_live(&c, vm, &disks[k], (&befores[k], pids[k], tokens[k], st), 0);
    }
    assert_eq!(departures(&c, "a"), Some(0), "{}", c.logs());
}

/// How node b lists `vm`'s owner: a node's name, or why it has none (`pending`,
/// `preempted`, `off`).
fn owner_or_state(c: &Cluster, vm: &str) -> String {
    let (_, body) = c.nodes[1].api("GET", "/api/v1/cluster", None);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let Some(row) = v["vms"]
        .as_array()
        .and_then(|vms| vms.iter().find(|x| x["name"] == vm).cloned())
    else {
        return String::new();
    };
    match &row["owner"] {
        serde_json::Value::String(s) => s.clone(),
        o => o["node"].as_str().unwrap_or_default().to_string(),
    }
}

/// Capacity short: node a (room for 2 vCPUs) runs a High VM and a No Auto Start VM,
/// b and c (room for 1 each) a Low VM each. When a dies, the High VM preempts one Low
/// VM (stopped, `preempted`) and runs in its place with every completed write kept;
/// the No Auto Start VM stays off. When a is back, the preempted Low VM runs again
/// (there is room) from its disk, and the No Auto Start VM is still off.
#[test]
fn a_high_vm_preempts_a_low_one_when_room_is_short_and_it_runs_again_when_room_returns() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let vcpus = |i: usize| if i == 0 { "2" } else { "1" };
    let mut c = Cluster::start_with(|i| vec!["--cluster-vcpus".to_string(), vcpus(i).to_string()]);
    let hi = c.define_on("hi", "high", "a", &[]);
    // Defined to start: it runs now, but is not restarted when its node dies.
    c.define_on("nas", "off", "a", &[]);
    let lo = [
        c.define_on("lo1", "low", "b", &[]),
        c.define_on("lo2", "low", "c", &[]),
    ];
    c.wait("hi and nas on a, lo1 on b, lo2 on c", || {
        c.runs(0, "hi") && c.runs(0, "nas") && c.runs(1, "lo1") && c.runs(2, "lo2")
    });
    c.wait_writes(0, "hi", 0, 30);
    for (i, vm) in [(1, "lo1"), (2, "lo2")] {
        c.wait_writes(i, vm, 0, 30);
    }

    // a dies.
    let pids = [
        c.nodes[0].pid("hi").unwrap(),
        c.nodes[0].pid("nas").unwrap(),
    ];
    c.nodes[0].kill9();
    for pid in pids {
        kill(pid, libc::SIGKILL);
        common::wait_dead(pid, T);
    }
    let last = *c.reported(0, "hi").last().unwrap();
    let to = c.runner("hi", 0);
    // hi took the place of the Low VM that ran there.
    let (victim, kept) = if to == 1 { (0, 1) } else { (1, 0) };
    let victim_vm = ["lo1", "lo2"][victim];
    let kept_vm = ["lo1", "lo2"][kept];
    assert_eq!(owner_or_state(&c, victim_vm), "preempted", "{}", c.logs());
    assert!(!c.runs(to, victim_vm), "{victim_vm} still runs beside hi");
    assert!(
        c.runs(kept + 1, kept_vm),
        "{kept_vm} was stopped too:\n{}",
        c.logs()
    );
    assert_carried_on(&c, "hi", &hi, last, to);
    let victim_last = *c.reported(victim + 1, victim_vm).last().unwrap();
    // No Auto Start: not restarted.
    assert_eq!(owner_or_state(&c, "nas"), "off", "{}", c.logs());
    assert!((1..3).all(|i| !c.runs(i, "nas")));

    // a is back: the preempted VM has room again and runs, from its disk.
    c.nodes[0].spawn();
    let back = c.runner(victim_vm, to);
    assert_eq!(
        back, 0,
        "{victim_vm} should run on a, the only node with room"
    );
    let serial = {
        let mut serial = String::new();
        c.wait(&format!("{victim_vm} resumed and writing on a"), || {
            serial = c.nodes[0].serial(victim_vm);
            let r = seqdisk::resumed(&serial);
            r.first().is_some_and(|f| {
                seqdisk::reported(&serial)
                    .last()
                    .is_some_and(|l| *l >= f + 10)
            })
        });
        serial
    };
    let resumed = seqdisk::resumed(&serial)[0];
    assert!(
        resumed >= victim_last,
        "{victim_vm} completed {victim_last} writes before it was preempted; its disk held {resumed}"
    );
    c.nodes[0].ok("PUT", &format!("/api/v1/vms/{victim_vm}/pause"), None);
    let disk = &lo[victim];
    let on_disk = seqdisk::single_writer(&seqdisk::seeds(disk, BLOCKS))
        .unwrap_or_else(|e| panic!("{victim_vm}: {e}"));
    let last_now = *c.reported(0, victim_vm).last().unwrap();
    assert!((last_now..=last_now + 1).contains(&on_disk));
    c.nodes[0].ok("PUT", &format!("/api/v1/vms/{victim_vm}/resume"), None);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(owner_or_state(&c, "nas"), "off");
    assert!((0..3).all(|i| !c.runs(i, "nas")));
}
