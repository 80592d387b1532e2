//! Drain, resume, fail-back and quarantine decisions on `SimStore` (etcd's semantics,
//! simulated clock): what is written, what is refused, in which order moves start,
//! and that a flapping node is quarantined and gets no VMs until released.

use std::time::Duration;

use cluster::drain::{self, AdminError};
use cluster::failover::{define_vm, Controller};
use cluster::hooked::{HookedStore, Hooks};
use cluster::keys::{
    self, MoveReason, MoveRecord, MoveState, NodeRecord, NodeState, OwnerRecord, Priority,
    Resources, VmDefinition,
};
use cluster::membership::Timing;
use cluster::placement::Decision;
use cluster::store::LeaseId;
use cluster::{ClusterStore, SimStore};

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Registers `node` (with a peer URL unless `peerless`) on a new lease.
async fn join(s: &SimStore, node: &str, peerless: bool) -> LeaseId {
    join_with_cpu(s, node, peerless, None).await
}

/// [`join`], the node publishing CPU fingerprint `cpuid`.
async fn join_with_cpu(s: &SimStore, node: &str, peerless: bool, cpuid: Option<&str>) -> LeaseId {
    let lease = s.lease_grant(Duration::from_secs(2)).await.unwrap();
    let rec = NodeRecord {
        name: node.into(),
        version: "t".into(),
        capacity: Resources {
            memory_mib: 1024,
            vcpus: 8,
        },
        cpu_features: vec![],
        cpuid: cpuid.map(String::from),
        state: NodeState::Up,
        peer_url: (!peerless).then(|| format!("https://{node}:7443")),
    };
    s.put(&keys::node_key(node), keys::encode(&rec), lease)
        .await
        .unwrap();
    lease
}

/// Defines `vm` and makes `node` (holding `lease`) its owner.
async fn owned(s: &SimStore, vm: &str, p: Priority, node: &str, lease: LeaseId, only: &[&str]) {
    owned_masked(s, vm, p, node, lease, only, None).await
}

/// [`owned`], the VM in processor compatibility mode with the CPU feature set `mask`.
async fn owned_masked(
    s: &SimStore,
    vm: &str,
    p: Priority,
    node: &str,
    lease: LeaseId,
    only: &[&str],
    mask: Option<&str>,
) {
    let def = VmDefinition {
        name: vm.into(),
        priority: p,
        needs: Resources {
            memory_mib: 256,
            vcpus: 1,
        },
        preferred_owners: vec![],
        possible_owners: only.iter().map(|n| n.to_string()).collect(),
        anti_affinity: None,
        config: serde_json::Value::Null,
        cpu_features: mask.map(String::from),
    };
    define_vm(s, &def, false).await.unwrap();
    let o = OwnerRecord::Node {
        node: node.into(),
        lease,
    };
    s.put(&keys::owner_key(vm), keys::encode(&o), 0)
        .await
        .unwrap();
}

async fn moves(s: &SimStore) -> Vec<MoveRecord> {
    drain::read_moves(s)
        .await
        .unwrap()
        .into_values()
        .map(|(m, _)| m)
        .collect()
}

async fn state(s: &SimStore, node: &str) -> NodeState {
    cluster::admin::read(s, node).await.unwrap().0.state
}

#[test]
fn a_drain_with_a_vm_that_has_no_place_is_refused_with_its_name_and_writes_nothing() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a", false).await;
        join(&s, "b", false).await;
        // c cannot receive live migrations: no peer URL.
        join(&s, "c", true).await;
        owned(&s, "web", Priority::High, "a", a, &[]).await;
        owned(&s, "pinned", Priority::Low, "a", a, &["a"]).await;
        owned(&s, "only-c", Priority::Low, "a", a, &["a", "c"]).await;
        let before = s.revision();
        let e = drain::drain(&s, "a", false, 2).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, AdminError::NoPlace { .. }), "{e}");
        assert!(msg.contains("pinned") && msg.contains("only-c"), "{msg}");
        assert!(!msg.contains("web ("), "{msg}");
        assert_eq!(s.revision(), before, "a refused drain wrote something");
        assert_eq!(state(&s, "a").await, NodeState::Up);

        // Forced: web moves to b, the others stay and are reported.
        let plan = drain::drain(&s, "a", true, 2).await.unwrap();
        assert_eq!(plan.moves.len(), 1);
        assert_eq!(
            (plan.moves[0].vm.as_str(), plan.moves[0].to.as_str()),
            ("web", "b")
        );
        let (admin, _) = cluster::admin::read(&s, "a").await.unwrap();
        assert_eq!(admin.state, NodeState::Draining);
        assert_eq!(admin.drain.unwrap().left, ["only-c", "pinned"]);
        let m = moves(&s).await;
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].state, m[0].reason),
            (MoveState::Queued, MoveReason::Drain)
        );
        // A draining node is not drained again, and no one else drains an unknown node.
        assert!(matches!(
            drain::drain(&s, "a", true, 2).await,
            Err(AdminError::WrongState { .. })
        ));
        assert!(matches!(
            drain::drain(&s, "zz", false, 2).await,
            Err(AdminError::UnknownNode(_))
        ));
    });
}

/// Live moves go only between nodes whose VMMs give guests the same CPU features: a
/// drain places every VM on the node with a's fingerprint, not on the emptier one
/// with another, and is refused (naming the reason) once that node is full; a node
/// that published no fingerprint restricts nothing.
#[test]
fn a_drain_moves_vms_only_to_nodes_with_the_same_cpu_features() {
    block(async {
        let s = SimStore::new();
        let a = join_with_cpu(&s, "a", false, Some("1.0:x")).await;
        join_with_cpu(&s, "b", false, Some("1.0:x")).await;
        // c has more room (it runs nothing) but other CPU features.
        join_with_cpu(&s, "c", false, Some("1.0:y")).await;
        for vm in ["v1", "v2", "v3"] {
            owned(&s, vm, Priority::Medium, "a", a, &[]).await;
        }
        let plan = drain::drain(&s, "a", false, 2).await.unwrap();
        assert!(plan.moves.iter().all(|m| m.to == "b"), "{:?}", plan.moves);
        assert_eq!(plan.moves.len(), 3);

        // b (1024 MiB) cannot take five 256 MiB VMs: the last has no place with a's
        // CPU features although c has room.
        let s = SimStore::new();
        let a = join_with_cpu(&s, "a", false, Some("1.0:x")).await;
        join_with_cpu(&s, "b", false, Some("1.0:x")).await;
        join_with_cpu(&s, "c", false, Some("1.0:y")).await;
        for vm in ["v1", "v2", "v3", "v4", "v5"] {
            owned(&s, vm, Priority::Medium, "a", a, &[]).await;
        }
        let e = drain::drain(&s, "a", false, 2).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, AdminError::NoPlace { .. }), "{msg}");
        assert!(msg.contains("same CPU features"), "{msg}");

        // A node without a fingerprint (an older vireod) takes them.
        let s = SimStore::new();
        let a = join_with_cpu(&s, "a", false, Some("1.0:x")).await;
        join_with_cpu(&s, "d", false, None).await;
        owned(&s, "v1", Priority::Medium, "a", a, &[]).await;
        let plan = drain::drain(&s, "a", false, 2).await.unwrap();
        assert_eq!(plan.moves[0].to, "d");
    });
}

/// Fingerprints of two CPU generations: both with the x86-64 baseline; the newer with
/// AVX (leaf 1 ecx 28) and AVX-512F (leaf 7.0 ebx 16) besides.
const OLD_CPU: &str = "1.0:0000000000000000000000010700a371,7.0:00000000000000010000000000000000,80000001.0:00000000000000000000000020100800";
const NEW_CPU: &str = "1.0:0000000000000000100000010700a371,7.0:00000000000100010000000000000000,80000001.0:00000000000000000000000020100800";

/// Processor compatibility: a VM masked to the two generations' common set moves from
/// the newer node to the older one; a VM with its host's features does not (no node
/// with the same), nor does one whose set has AVX (the older node lacks it). The
/// refusal names the two and the reason; forced, only the masked VM moves.
#[test]
fn a_vm_in_processor_compatibility_mode_moves_to_a_node_of_another_cpu_generation() {
    use vireo_util::cpu_features::CpuFeatures;
    block(async {
        let s = SimStore::new();
        let a = join_with_cpu(&s, "a", false, Some(NEW_CPU)).await;
        join_with_cpu(&s, "b", false, Some(OLD_CPU)).await;
        let common = CpuFeatures::common([
            &CpuFeatures::parse(NEW_CPU).unwrap(),
            &CpuFeatures::parse(OLD_CPU).unwrap(),
        ])
        .unwrap()
        .to_string();
        assert_eq!(common, OLD_CPU, "the older node's set is the common one");
        owned_masked(&s, "compat", Priority::High, "a", a, &[], Some(&common)).await;
        owned(&s, "native", Priority::High, "a", a, &[]).await;
        owned_masked(&s, "avx", Priority::High, "a", a, &[], Some(NEW_CPU)).await;

        let e = drain::drain(&s, "a", false, 2).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, AdminError::NoPlace { .. }), "{msg}");
        assert!(
            msg.contains("native (") && msg.contains("avx (") && !msg.contains("compat ("),
            "{msg}"
        );
        assert!(msg.contains("CPU features"), "{msg}");

        let plan = drain::drain(&s, "a", true, 2).await.unwrap();
        let moved: Vec<(&str, &str)> = plan
            .moves
            .iter()
            .map(|m| (m.vm.as_str(), m.to.as_str()))
            .collect();
        assert_eq!(moved, [("compat", "b")]);
        let (admin, _) = cluster::admin::read(&s, "a").await.unwrap();
        assert_eq!(admin.drain.unwrap().left, ["avx", "native"]);
    });
}

#[test]
fn moves_start_high_first_within_the_concurrency_and_lower_ones_wait() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a", false).await;
        join(&s, "b", false).await;
        join(&s, "c", false).await;
        owned(&s, "h1", Priority::High, "a", a, &[]).await;
        owned(&s, "h2", Priority::High, "a", a, &[]).await;
        owned(&s, "h3", Priority::High, "a", a, &[]).await;
        owned(&s, "l1", Priority::Low, "a", a, &[]).await;
        drain::drain(&s, "a", false, 2).await.unwrap();
        let mut all = drain::read_moves(&s).await.unwrap();
        let names =
            |v: Vec<(MoveRecord, i64)>| v.into_iter().map(|(m, _)| m.vm).collect::<Vec<_>>();
        // Two at once, High only.
        assert_eq!(names(drain::next_moves(&all, "a", 0)), ["h1", "h2"]);
        assert_eq!(names(drain::next_moves(&all, "a", 1)), ["h1"]);
        assert!(drain::next_moves(&all, "a", 2).is_empty());
        assert!(drain::next_moves(&all, "b", 0).is_empty(), "b is no source");
        // h1, h2 done: h3 alone, l1 still waits for it (High first).
        for vm in ["h1", "h2"] {
            all.get_mut(vm).unwrap().0.state = MoveState::Moved;
        }
        assert_eq!(names(drain::next_moves(&all, "a", 0)), ["h3"]);
        all.get_mut("h3").unwrap().0.state = MoveState::Migrating;
        assert!(drain::next_moves(&all, "a", 1).is_empty());
        all.get_mut("h3").unwrap().0.state = MoveState::Failed;
        assert_eq!(names(drain::next_moves(&all, "a", 0)), ["l1"]);
    });
}

/// x runs on b (holding `lease`) and node a is paused: its drain ended.
async fn x_on_b_and_a_paused(s: &SimStore, lease: LeaseId) {
    let o = OwnerRecord::Node {
        node: "b".into(),
        lease,
    };
    s.put(&keys::owner_key("x"), keys::encode(&o), 0)
        .await
        .unwrap();
    let (mut admin, rev) = cluster::admin::read(s, "a").await.unwrap();
    admin.state = NodeState::Paused;
    assert!(cluster::admin::write_if(s, "a", &admin, rev, vec![])
        .await
        .unwrap());
}

/// h1 (High), l1 and l2 (Low), owned by node a (holding `lease`).
async fn own_h1_l1_l2(s: &SimStore, lease: LeaseId) {
    owned(s, "h1", Priority::High, "a", lease, &[]).await;
    owned(s, "l1", Priority::Low, "a", lease, &[]).await;
    owned(s, "l2", Priority::Low, "a", lease, &[]).await;
}

#[test]
fn a_cancelled_drain_fails_its_queued_moves_lets_the_migrating_one_finish_and_the_node_is_up() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a", false).await;
        join(&s, "b", false).await;
        own_h1_l1_l2(&s, a).await;
        // Only a draining node's drain is cancelled.
        assert!(matches!(
            drain::cancel(&s, "a").await,
            Err(AdminError::WrongState { .. })
        ));
        drain::drain(&s, "a", false, 1).await.unwrap();
        // h1 migrates (its source wrote so); l1, l2 wait behind it.
        let all = drain::read_moves(&s).await.unwrap();
        let mut h1 = all["h1"].0.clone();
        h1.state = MoveState::Migrating;
        s.put(&keys::move_key("h1"), keys::encode(&h1), 0)
            .await
            .unwrap();

        let mut cancelled = drain::cancel(&s, "a").await.unwrap();
        cancelled.sort();
        assert_eq!(cancelled, ["l1", "l2"]);
        assert_eq!(state(&s, "a").await, NodeState::Up);
        for m in moves(&s).await {
            match m.vm.as_str() {
                "h1" => assert_eq!(m.state, MoveState::Migrating),
                _ => {
                    assert_eq!(m.state, MoveState::Failed, "{m:?}");
                    assert!(m.error.as_deref().unwrap().starts_with("cancelled"));
                    assert!(m.finished_ms.is_some());
                }
            }
        }
        // Nothing more starts from a: no queued move is left.
        let all = drain::read_moves(&s).await.unwrap();
        assert!(drain::next_moves(&all, "a", 0).is_empty());
        // An up node's drain cannot be cancelled again; it can be drained again
        // once h1's move has finished.
        assert!(matches!(
            drain::cancel(&s, "a").await,
            Err(AdminError::WrongState { .. })
        ));
    });
}

/// Before its first transaction, starts `vm`'s queued move (as its source's executor
/// would between the cancel's read and its write).
struct StartsAMove {
    store: SimStore,
    vm: &'static str,
    armed: std::sync::atomic::AtomicBool,
}

impl Hooks for StartsAMove {
    async fn before_txn(&self, _: &cluster::store::Txn) -> cluster::store::StoreResult<()> {
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let all = drain::read_moves(&self.store).await?;
            let mut m = all[self.vm].0.clone();
            m.state = MoveState::Migrating;
            self.store
                .put(&keys::move_key(self.vm), keys::encode(&m), 0)
                .await?;
        }
        Ok(())
    }
}

#[test]
fn a_cancel_racing_a_move_that_starts_reads_again_and_cancels_the_rest() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a", false).await;
        join(&s, "b", false).await;
        own_h1_l1_l2(&s, a).await;
        drain::drain(&s, "a", false, 1).await.unwrap();
        // h1's move starts after the cancel read the moves, before it writes: its
        // first transaction loses; it reads again and cancels what is still queued.
        let racing = HookedStore {
            inner: s.clone(),
            hook: StartsAMove {
                store: s.clone(),
                vm: "h1",
                armed: true.into(),
            },
        };
        let mut cancelled = drain::cancel(&racing, "a").await.unwrap();
        cancelled.sort();
        assert_eq!(cancelled, ["l1", "l2"]);
        assert_eq!(state(&s, "a").await, NodeState::Up);
        let all = drain::read_moves(&s).await.unwrap();
        assert_eq!(all["h1"].0.state, MoveState::Migrating);
        assert!(drain::next_moves(&all, "a", 0).is_empty());
    });
}

#[test]
fn resume_with_failback_moves_back_only_what_the_drain_moved_and_still_runs_there() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a", false).await;
        let b = join(&s, "b", false).await;
        owned(&s, "x", Priority::High, "a", a, &[]).await;
        owned(&s, "y", Priority::Low, "a", a, &[]).await;
        drain::drain(&s, "a", false, 2).await.unwrap();
        // Resume before the drain ended is refused.
        assert!(matches!(
            drain::resume(&s, "a", true, 2).await,
            Err(AdminError::WrongState { .. })
        ));
        // x moved to b; y's move failed (it stayed on a).
        for (vm, st) in [("x", MoveState::Moved), ("y", MoveState::Failed)] {
            let (mut m, _) = drain::read_moves(&s).await.unwrap().remove(vm).unwrap();
            m.state = st;
            s.put(&keys::move_key(vm), keys::encode(&m), 0)
                .await
                .unwrap();
        }
        x_on_b_and_a_paused(&s, b).await;

        let back = drain::resume(&s, "a", true, 2).await.unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!((back[0].vm.as_str(), back[0].to.as_str()), ("x", "a"));
        assert_eq!(state(&s, "a").await, NodeState::Up);
        let m = drain::read_moves(&s).await.unwrap();
        let x = &m["x"].0;
        assert_eq!(
            (x.from.as_str(), x.to.as_str(), x.reason, x.state),
            ("b", "a", MoveReason::Failback, MoveState::Queued)
        );
        assert_eq!(m["y"].0.state, MoveState::Failed, "y was not touched");
    });
}

/// Drain on shutdown: VMs without a place stay (no refusal), the drain is marked as
/// the shutdown's, and only such a drain, once ended, is resumed by the node coming
/// back (with fail-back); an operator's drain is not.
#[test]
fn a_shutdown_drain_forces_is_marked_and_only_it_is_resumed_when_the_node_returns() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a", false).await;
        let b = join(&s, "b", false).await;
        owned(&s, "x", Priority::High, "a", a, &[]).await;
        // Only a may run y: it has no place, and stays.
        owned(&s, "y", Priority::Low, "a", a, &["a"]).await;
        let plan = drain::drain_for_shutdown(&s, "a", 2).await.unwrap();
        assert_eq!(plan.moves.len(), 1);
        assert_eq!(plan.no_place.len(), 1);
        assert_eq!(plan.no_place[0].0, "y");
        let (admin, _) = cluster::admin::read(&s, "a").await.unwrap();
        assert_eq!(admin.state, NodeState::Draining);
        let info = admin.drain.unwrap();
        assert!(info.on_shutdown);
        assert_eq!(info.left, vec!["y".to_string()]);
        // Not ended yet: nothing to resume.
        assert!(drain::resume_after_shutdown(&s, "a", 2)
            .await
            .unwrap()
            .is_none());
        assert_eq!(state(&s, "a").await, NodeState::Draining);

        // x moved to b, the drain ended (a paused), a left and comes back.
        let (mut m, _) = drain::read_moves(&s).await.unwrap().remove("x").unwrap();
        m.state = MoveState::Moved;
        s.put(&keys::move_key("x"), keys::encode(&m), 0)
            .await
            .unwrap();
        x_on_b_and_a_paused(&s, b).await;
        let back = drain::resume_after_shutdown(&s, "a", 2)
            .await
            .unwrap()
            .expect("a shutdown drain that ended is resumed");
        assert_eq!(back.len(), 1);
        assert_eq!((back[0].vm.as_str(), back[0].to.as_str()), ("x", "a"));
        assert_eq!(state(&s, "a").await, NodeState::Up);
        assert_eq!(
            drain::read_moves(&s).await.unwrap()["x"].0.reason,
            MoveReason::Failback
        );
        // Again (a second restart): nothing more.
        assert!(drain::resume_after_shutdown(&s, "a", 2)
            .await
            .unwrap()
            .is_none());

        // An operator's drain, ended: the node stays paused when it comes back.
        let s = SimStore::new();
        let a = join(&s, "a", false).await;
        join(&s, "b", false).await;
        owned(&s, "x", Priority::High, "a", a, &[]).await;
        drain::drain(&s, "a", false, 2).await.unwrap();
        let (mut admin, rev) = cluster::admin::read(&s, "a").await.unwrap();
        assert!(!admin.drain.as_ref().unwrap().on_shutdown);
        admin.state = NodeState::Paused;
        assert!(cluster::admin::write_if(&s, "a", &admin, rev, vec![])
            .await
            .unwrap());
        assert!(drain::resume_after_shutdown(&s, "a", 2)
            .await
            .unwrap()
            .is_none());
        assert_eq!(state(&s, "a").await, NodeState::Paused);
    });
}

/// One controller pass 200 ms after the last; `keep`'s lease (node b's) is renewed.
async fn step(
    c: &mut Controller,
    s: &SimStore,
    (t, keep): (&mut Duration, LeaseId),
) -> cluster::failover::Pass {
    *t += Duration::from_millis(200);
    s.advance_to(*t);
    s.lease_keepalive(keep).await.unwrap();
    c.step(s, *t).await.unwrap()
}

#[test]
fn a_node_that_departs_three_times_is_quarantined_gets_no_vms_until_released() {
    block(async {
        let s = SimStore::new();
        let timing = Timing::default();
        let mut controller = Controller::new(timing).with_quarantine();
        let b = join(&s, "b", false).await;
        let mut t = Duration::ZERO;
        // a joins and leaves ungracefully (its lease expires) three times.
        for round in 1..=3 {
            join(&s, "a", false).await;
            step(&mut controller, &s, (&mut t, b)).await;
            // No renewal: the lease expires after its TTL.
            for _ in 0..15 {
                step(&mut controller, &s, (&mut t, b)).await;
            }
            let (admin, _) = cluster::admin::read(&s, "a").await.unwrap();
            assert_eq!(admin.departures.len(), round, "round {round}");
            let want = if round < 3 {
                NodeState::Up
            } else {
                NodeState::Quarantined
            };
            assert_eq!(admin.state, want, "round {round}");
        }
        // Back, but quarantined: a new VM that prefers a goes to b.
        join(&s, "a", false).await;
        let def = VmDefinition {
            name: "v".into(),
            priority: Priority::High,
            needs: Resources {
                memory_mib: 256,
                vcpus: 1,
            },
            preferred_owners: vec!["a".into()],
            possible_owners: vec![],
            anti_affinity: None,
            config: serde_json::Value::Null,
            cpu_features: None,
        };
        define_vm(&s, &def, true).await.unwrap();
        let pass = step(&mut controller, &s, (&mut t, b)).await;
        assert_eq!(
            pass.applied,
            [Decision::Place {
                vm: "v".into(),
                node: "b".into()
            }]
        );
        // Released: a is up again with a clean slate, and takes VMs.
        assert!(matches!(
            drain::release(&s, "b").await,
            Err(AdminError::WrongState { .. })
        ));
        drain::release(&s, "a").await.unwrap();
        let (admin, _) = cluster::admin::read(&s, "a").await.unwrap();
        assert_eq!((admin.state, admin.departures.len()), (NodeState::Up, 0));
        let w = VmDefinition {
            name: "w".into(),
            ..def
        };
        define_vm(&s, &w, true).await.unwrap();
        let pass = step(&mut controller, &s, (&mut t, b)).await;
        assert_eq!(
            pass.applied,
            [Decision::Place {
                vm: "w".into(),
                node: "a".into()
            }]
        );
    });
}
