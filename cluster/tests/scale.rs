//! The cluster at (small) scale: node agents of `vireo_e2e::cluster_fleet` (the real
//! `NodeAgent` and `Controller` on vireod's cadence, stand-in VMs) on a real 3-member
//! etcd — a crash and a drain at 8 nodes and 200 VMs; a prefix read larger than one
//! gRPC message; and, on `SimStore`, that an idle cluster's agents and controllers
//! read no record again (the scale bench's figures: docs/benchmarks-cluster.md).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::failover::{define_vm, Controller};
use cluster::keys::{self, NodeRecord, NodeState, OwnerRecord, Priority, Unowned};
use cluster::membership::{NodeAgent, Timing};
use cluster::placement::Decision;
use cluster::{ClusterStore, EtcdSecurity, EtcdStore, SimStore};
use futures_util::FutureExt;
use vireo_e2e::cluster_fleet::counted::Counted;
use vireo_e2e::cluster_fleet::counted::Counters;
use vireo_e2e::cluster_fleet::{mix, Fleet};
use vireo_e2e::etcd::{have_etcd, EtcdCluster};
use vireo_e2e::skip_or_fail_under_ci;

/// How long the test's own etcd requests may take: a node's store gives up after
/// 400 ms (shorter than a lease renewal period), which a loaded CI machine's etcd
/// overruns now and then; the test's writes and reads are not what is measured.
const PATIENT: Duration = Duration::from_secs(5);

/// Polls `done` every 20 ms for up to `limit`; whether it came true.
async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_every_auto_start_vm_runs_once_and_a_drain_empties_its_node() {
    if !have_etcd() {
        skip_or_fail_under_ci("etcd is not installed (scripts/setup installs it)");
        return;
    }
    const NODES: usize = 8;
    const VMS: usize = 200;
    let etcd = EtcdCluster::start(3);
    let mut fleet = Fleet::start(etcd.endpoints(), NODES, mix::node_capacity(NODES, VMS))
        .await
        .unwrap();
    let store =
        EtcdStore::connect_with_timeout(&etcd.endpoints(), &EtcdSecurity::Insecure, PATIENT)
            .await
            .unwrap();
    for i in 0..VMS {
        define_vm(&store, &mix::vm(i), true).await.unwrap();
    }
    let placed = |f: &Fleet| {
        let p = f.placement();
        p.len() == VMS && p.values().all(|n| n.len() == 1)
    };
    assert!(
        eventually(Duration::from_secs(60), || placed(&fleet)).await,
        "not every VM runs once: {:?}",
        fleet.placement().len()
    );

    // A crash: node 3's loop, renewals and VMs stop at once.
    let victim = 3;
    let on = fleet.running_on(victim);
    assert!(!on.is_empty());
    let priority = |vm: &str| mix::vm(vm[3..].parse().unwrap()).priority;
    let (off, auto): (Vec<String>, Vec<String>) = on
        .into_iter()
        .partition(|vm| priority(vm) == Priority::NoAutoStart);
    assert!(!auto.is_empty(), "the mix gives every node auto-start VMs");
    fleet.kill(victim);
    let moved = |f: &Fleet| {
        let p = f.placement();
        auto.iter()
            .all(|vm| p.get(vm).is_some_and(|n| n.len() == 1))
    };
    assert!(
        eventually(Duration::from_secs(30), || moved(&fleet)).await,
        "the crashed node's VMs did not all run again elsewhere"
    );
    let p = fleet.placement();
    assert!(
        p.values()
            .all(|n| n.len() == 1 && n[0] != Fleet::name(victim)),
        "a VM runs twice, or on the dead node: {p:?}"
    );
    for vm in &off {
        assert!(!p.contains_key(vm), "{vm} (No Auto Start) runs again");
        let kv = store.get(&keys::owner_key(vm)).await.unwrap();
        assert_eq!(
            kv.and_then(|kv| keys::decode::<OwnerRecord>(&kv.value)),
            Some(OwnerRecord::Unowned(Unowned::Off)),
            "{vm}"
        );
    }
    assert_eq!(p.len(), VMS - off.len());

    // A drain of node 5: moved one by one by its (stand-in) executor, then paused.
    let drained = 5;
    let on = fleet.running_on(drained);
    assert!(!on.is_empty());
    let plan = cluster::drain::drain(&store, &Fleet::name(drained), false, 4)
        .await
        .unwrap();
    assert_eq!(plan.moves.len(), on.len());
    let mut paused = false;
    let t0 = Instant::now();
    while !paused && t0.elapsed() < Duration::from_secs(60) {
        let (a, _) = cluster::admin::read(&store, &Fleet::name(drained))
            .await
            .unwrap();
        paused = a.state == NodeState::Paused;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(paused, "the drained node was not paused");
    assert!(
        eventually(Duration::from_secs(10), || fleet
            .running_on(drained)
            .is_empty())
        .await
    );
    let p = fleet.placement();
    for vm in &on {
        let nodes = p.get(vm).cloned().unwrap_or_default();
        assert!(
            nodes.len() == 1 && nodes[0] != Fleet::name(drained),
            "{vm} runs on {nodes:?} after the drain"
        );
    }
    let moves = cluster::drain::read_moves(&store).await.unwrap();
    assert!(on.iter().all(|vm| moves
        .get(vm)
        .is_some_and(|(m, _)| m.state == keys::MoveState::Moved)));
}

/// More than gRPC's 4 MiB in one prefix: the read is paged, whole and in key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_read_larger_than_a_grpc_message_comes_whole() {
    if !have_etcd() {
        skip_or_fail_under_ci("etcd is not installed (scripts/setup installs it)");
        return;
    }
    let etcd = EtcdCluster::start(3);
    let store =
        EtcdStore::connect_with_timeout(&etcd.endpoints(), &EtcdSecurity::Insecure, PATIENT)
            .await
            .unwrap();
    const N: usize = 2300; // × 2 KiB: 4.5 MiB, three pages
                           // Written 100 keys per transaction.
    let mut last = 0;
    let keys: Vec<usize> = (0..N).collect();
    for chunk in keys.chunks(100) {
        let txn = cluster::store::Txn {
            then: chunk
                .iter()
                .map(|i| cluster::store::Op::Put {
                    key: format!("big/{i:05}"),
                    value: vec![b'a' + (i % 26) as u8; 2048],
                    lease: 0,
                })
                .collect(),
            ..Default::default()
        };
        last = store.txn(txn).await.unwrap().revision;
    }
    // Keys just past the prefix's range are not part of it.
    for key in ["big0", "bif/z"] {
        let put = cluster::store::Op::Put {
            key: key.into(),
            value: b"x".to_vec(),
            lease: 0,
        };
        let txn = cluster::store::Txn {
            then: vec![put],
            ..Default::default()
        };
        store.txn(txn).await.unwrap();
    }
    let (kvs, revision) = store.get_prefix("big/").await.unwrap();
    assert_eq!(kvs.len(), N);
    assert!(revision >= last + 2);
    for (i, kv) in kvs.iter().enumerate() {
        assert_eq!(kv.key, format!("big/{i:05}"));
        assert_eq!(kv.value, vec![b'a' + (i % 26) as u8; 2048]);
    }
}

fn record(name: &str) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        version: "test".into(),
        capacity: mix::node_capacity(3, 30),
        cpu_features: vec![],
        cpuid: None,
        state: NodeState::Up,
        peer_url: None,
    }
}

/// Runs a future that never waits (everything on `SimStore` completes at once).
fn now<F: std::future::Future>(f: F) -> F::Output {
    f.now_or_never().expect("the simulated store never waits")
}

type SimNode = (
    NodeAgent<Counted<SimStore>>,
    Controller,
    BTreeMap<String, i64>,
);

/// One 100 ms turn of every node: its agent's step (stand-in VMs) and a controller
/// pass. Returns the placements each node's pass applied.
fn turn(sim: &SimStore, t: &mut Duration, nodes: &mut [SimNode]) -> Vec<usize> {
    *t += Duration::from_millis(100);
    sim.advance_to(*t);
    let mut applied = Vec::new();
    for (agent, controller, running) in nodes.iter_mut() {
        let r = now(agent.step(*t));
        for vm in r.stop {
            running.remove(&vm);
        }
        running.extend(r.start);
        let store = agent.store().clone();
        let pass = now(controller.step(&store, *t)).unwrap();
        let placed = pass
            .applied
            .iter()
            .filter(|d| matches!(d, Decision::Place { .. }));
        applied.push(placed.count());
    }
    applied
}

fn sim_nodes(
    sim: &SimStore,
    counters: &Arc<Counters>,
    n: usize,
    first: Option<usize>,
) -> Vec<SimNode> {
    let timing = Timing::default();
    (0..n)
        .map(|i| {
            let client = Counted {
                inner: sim.client(),
                counters: counters.clone(),
            };
            let name = format!("n{i}");
            let controller = match first {
                Some(k) => Controller::new(timing).among_first(&name, k),
                None => Controller::new(timing),
            };
            (
                NodeAgent::new(client, record(&name), timing),
                controller,
                BTreeMap::new(),
            )
        })
        .collect()
}

fn running(nodes: &[SimNode]) -> usize {
    nodes.iter().map(|(_, _, r)| r.len()).sum()
}

/// In an idle cluster, node agents follow their watch and controllers check the
/// store's revision: no record is read again until something changes.
#[test]
fn an_idle_cluster_reads_no_record_again_until_something_changes() {
    let sim = SimStore::new();
    let counters = Arc::<Counters>::default();
    let mut nodes = sim_nodes(&sim, &counters, 3, None);
    for i in 0..30 {
        now(define_vm(&sim, &mix::vm(i), true)).unwrap();
    }
    let mut t = Duration::ZERO;
    for _ in 0..20 {
        turn(&sim, &mut t, &mut nodes);
    }
    assert_eq!(running(&nodes), 30, "every VM runs");

    let before = counters.now();
    for _ in 0..20 {
        turn(&sim, &mut t, &mut nodes);
    }
    let idle = counters.now() - before;
    assert_eq!(
        idle.ranges, 0,
        "an idle cluster read records again: {idle:?}"
    );
    assert_eq!(
        idle.revisions,
        20 * 3,
        "one revision check per controller pass (the agents follow a watch)"
    );

    // A change: the next turns read again, and the new VM runs.
    now(define_vm(&sim, &mix::vm(30), true)).unwrap();
    for _ in 0..3 {
        turn(&sim, &mut t, &mut nodes);
    }
    assert!(counters.now().ranges > before.ranges);
    assert_eq!(running(&nodes), 31, "the VM defined later runs");
}

/// With `among_first(node, 2)`, only the first two live nodes place VMs; when
/// one of them dies the third takes its place and its VMs run again.
#[test]
fn only_the_first_live_nodes_run_passes_and_the_next_takes_over_when_one_dies() {
    let sim = SimStore::new();
    let counters = Arc::<Counters>::default();
    let mut nodes = sim_nodes(&sim, &counters, 4, Some(2));
    for i in 0..40 {
        now(define_vm(&sim, &mix::vm(i), true)).unwrap();
    }
    let mut t = Duration::ZERO;
    let mut applied = vec![0; 4];
    for _ in 0..20 {
        for (sum, a) in applied.iter_mut().zip(turn(&sim, &mut t, &mut nodes)) {
            *sum += a;
        }
    }
    assert_eq!(running(&nodes), 40);
    assert_eq!(applied[0] + applied[1], 40, "{applied:?}");
    assert_eq!(applied[2] + applied[3], 0, "{applied:?}");

    // n0 crashes: its lease expires, n2 is among the first two now.
    let (_, _, lost) = nodes.remove(0);
    let off = lost
        .keys()
        .filter(|vm| mix::vm(vm[3..].parse().unwrap()).priority == Priority::NoAutoStart)
        .count();
    let mut applied = vec![0; 3];
    for _ in 0..60 {
        for (sum, a) in applied.iter_mut().zip(turn(&sim, &mut t, &mut nodes)) {
            *sum += a;
        }
    }
    assert_eq!(running(&nodes), 40 - off, "n0's auto-start VMs run again");
    assert!(applied[0] + applied[1] > 0, "{applied:?}");
    assert_eq!(applied[2], 0, "n3 is not among the first two: {applied:?}");
}

/// A node owning more VMs than etcd takes operations in one transaction (its default
/// `--max-txn-ops` is 128): its drain queues every move (in parts), moves them all and
/// pauses the node only then; a cancel of such a drain fails every queued move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_of_more_than_128_vms_moves_them_all_and_a_cancel_of_one_cancels_them_all() {
    if !have_etcd() {
        skip_or_fail_under_ci("etcd is not installed (scripts/setup installs it)");
        return;
    }
    const VMS: usize = 320;
    let etcd = EtcdCluster::start(3);
    let room = keys::Resources {
        memory_mib: 64 << 20,
        vcpus: 100_000,
    };
    let fleet = Fleet::start(etcd.endpoints(), 2, room).await.unwrap();
    let store =
        EtcdStore::connect_with_timeout(&etcd.endpoints(), &EtcdSecurity::Insecure, PATIENT)
            .await
            .unwrap();
    for i in 0..VMS {
        define_vm(&store, &mix::vm(i), true).await.unwrap();
    }
    let placed = |f: &Fleet| {
        let p = f.placement();
        p.len() == VMS && p.values().all(|n| n.len() == 1)
    };
    assert!(eventually(Duration::from_secs(60), || placed(&fleet)).await);
    // The node with more VMs (at least half of them) is drained first.
    let (ia, ib) = if fleet.running_on(0).len() >= fleet.running_on(1).len() {
        (0, 1)
    } else {
        (1, 0)
    };
    let (a, b) = (Fleet::name(ia), Fleet::name(ib));
    let on = fleet.running_on(ia);
    assert!(on.len() > 128, "node a owns {} VMs", on.len());

    let plan = cluster::drain::drain(&store, &a, false, 16).await.unwrap();
    assert_eq!(plan.moves.len(), on.len());
    assert!(plan.no_place.is_empty());
    let (admin, _) = cluster::admin::read(&store, &a).await.unwrap();
    assert!(!admin.drain.unwrap().queueing, "every part written");
    let moves = cluster::drain::read_moves(&store).await.unwrap();
    assert!(on.iter().all(|vm| moves.contains_key(vm)));
    let mut paused = false;
    let t0 = Instant::now();
    while !paused && t0.elapsed() < Duration::from_secs(120) {
        paused = cluster::admin::read(&store, &a).await.unwrap().0.state == NodeState::Paused;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(paused, "the drained node was not paused");
    let moves = cluster::drain::read_moves(&store).await.unwrap();
    for vm in &on {
        assert_eq!(moves[vm].0.state, keys::MoveState::Moved, "{vm}");
    }
    assert!(eventually(Duration::from_secs(10), || fleet.running_on(ia).is_empty()).await);
    let p = fleet.placement();
    assert!(on
        .iter()
        .all(|vm| p.get(vm).is_some_and(|n| n == &vec![b.clone()])));

    // Back (no fail-back), then a drain of b's VMs, one move at a time, cancelled
    // at once: every move still queued is cancelled, b is up, nothing stays queued.
    cluster::drain::resume(&store, &a, false, 1).await.unwrap();
    let on_b = fleet.running_on(ib);
    assert_eq!(on_b.len(), VMS, "b runs every VM");
    let t_ready = Instant::now();
    let plan = loop {
        match cluster::drain::drain(&store, &b, false, 1).await {
            Ok(p) => break p,
            // a is `up` again in its record: placement may need a moment to see it.
            Err(e) if t_ready.elapsed() < Duration::from_secs(10) => {
                eprintln!("drain of b: {e}; again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("drain of b: {e}"),
        }
    };
    assert_eq!(plan.moves.len(), on_b.len());
    let cancelled = cluster::drain::cancel(&store, &b).await.unwrap();
    let moves = cluster::drain::read_moves(&store).await.unwrap();
    // The executor starts a move as soon as its part of the drain is written (it wakes
    // on the moves' changes), so a few run before the cancel: those, and only those,
    // are not cancelled.
    let started: Vec<&keys::MoveRecord> = moves
        .values()
        .map(|(m, _)| m)
        .filter(|m| m.drain_of == b && !cancelled.contains(&m.vm))
        .collect();
    assert_eq!(cancelled.len() + started.len(), on_b.len());
    assert!(
        started
            .iter()
            .all(|m| matches!(m.state, keys::MoveState::Migrating | keys::MoveState::Moved)),
        "{started:?}"
    );
    assert!(
        cancelled.len() * 2 >= on_b.len(),
        "{} of {} cancelled",
        cancelled.len(),
        on_b.len()
    );
    assert!(moves
        .values()
        .all(|(m, _)| m.drain_of != b || m.state != keys::MoveState::Queued));
    let (admin, _) = cluster::admin::read(&store, &b).await.unwrap();
    assert_eq!(admin.state, NodeState::Up);

    // Both drains' history, pruned on etcd with nothing kept once every move ended
    // (both nodes are up: no fail-back needs a drain's record): no move is left, and
    // the deletions went in parts under etcd's transaction limit.
    let t_end = Instant::now();
    let ended = loop {
        let moves = cluster::drain::read_moves(&store).await.unwrap();
        if moves.values().all(|(m, _)| m.state.finished()) {
            break moves;
        }
        assert!(
            t_end.elapsed() < Duration::from_secs(30),
            "moves still running"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        ended.len() > cluster::drain::MOVES_PER_TXN,
        "{}",
        ended.len()
    );
    let nothing_kept = cluster::history::Retention {
        events: 0,
        finished: Duration::ZERO,
    };
    let pruned = cluster::history::prune(&store, &nothing_kept, keys::now_ms() + 1)
        .await
        .unwrap();
    assert_eq!(pruned.moves, ended.len(), "{pruned:?}");
    assert!(cluster::drain::read_moves(&store).await.unwrap().is_empty());
    let (events, _) = store.get_prefix(keys::EVENTS).await.unwrap();
    assert!(events.is_empty(), "{} events left", events.len());
}
