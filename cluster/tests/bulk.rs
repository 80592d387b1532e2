//! Bulk requests and the cluster-wide migration queue on `SimStore` (etcd's semantics):
//! what a selection selects, what is refused and then writes nothing, where `auto`
//! sends VMs, in which order and how many moves start per source and destination, and
//! what a cancel cancels.

use std::collections::BTreeMap;
use std::time::Duration;

use cluster::bulk::{self, BulkError, BulkRequest, Selection, Selector};
use cluster::drain;
use cluster::failover::define_vm;
use cluster::keys::{
    self, BulkOp, MoveReason, MoveRecord, MoveState, NodeRecord, NodeState, OwnerRecord, Priority,
    Resources, Unowned, VmDefinition,
};
use cluster::store::{LeaseId, Revision};
use cluster::{ClusterStore, SimStore};

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Registers `node` (with a peer URL) with room for `vcpus` 1-vCPU VMs.
async fn join(s: &SimStore, node: &str, vcpus: u32) -> LeaseId {
    join_with_cpu(s, node, vcpus, None).await
}

/// [`join`], the node publishing CPU fingerprint `cpuid`.
async fn join_with_cpu(s: &SimStore, node: &str, vcpus: u32, cpuid: Option<&str>) -> LeaseId {
    let lease = s.lease_grant(Duration::from_secs(2)).await.unwrap();
    let rec = NodeRecord {
        name: node.into(),
        version: "t".into(),
        capacity: Resources {
            memory_mib: 64 * 1024,
            vcpus,
        },
        cpu_features: vec![],
        cpuid: cpuid.map(String::from),
        state: NodeState::Up,
        peer_url: Some(format!("https://{node}:7443")),
    };
    s.put(&keys::node_key(node), keys::encode(&rec), lease)
        .await
        .unwrap();
    lease
}

struct Vm<'a> {
    name: &'a str,
    priority: Priority,
    only: &'a [&'a str],
    class: Option<&'a str>,
}

fn vm(name: &str, priority: Priority) -> Vm<'_> {
    Vm {
        name,
        priority,
        only: &[],
        class: None,
    }
}

/// Defines the VM and makes `node` (holding `lease`) its owner (`None`: off).
async fn put_vm(s: &SimStore, v: Vm<'_>, owner: Option<(&str, LeaseId)>) {
    let def = VmDefinition {
        name: v.name.into(),
        priority: v.priority,
        needs: Resources {
            memory_mib: 256,
            vcpus: 1,
        },
        preferred_owners: vec![],
        possible_owners: v.only.iter().map(|n| n.to_string()).collect(),
        anti_affinity: v.class.map(String::from),
        config: serde_json::Value::Null,
        cpu_features: None,
    };
    define_vm(s, &def, false).await.unwrap();
    if let Some((node, lease)) = owner {
        let o = OwnerRecord::Node {
            node: node.into(),
            lease,
        };
        s.put(&keys::owner_key(v.name), keys::encode(&o), 0)
            .await
            .unwrap();
    }
}

fn migrate(selection: Selection, to: &str, force: bool, concurrency: u32) -> BulkRequest {
    BulkRequest {
        op: BulkOp::Migrate,
        selection,
        to: Some(to.into()),
        force,
        concurrency,
    }
}

fn sel(text: &str) -> Selection {
    Selection::Selector(Selector::parse(text).unwrap())
}

fn names(v: &[&str]) -> Selection {
    Selection::Names(v.iter().map(|s| s.to_string()).collect())
}

async fn moves(s: &SimStore) -> BTreeMap<String, (MoveRecord, Revision)> {
    drain::read_moves(s).await.unwrap()
}

async fn owner(s: &SimStore, vm: &str) -> OwnerRecord {
    keys::decode(&s.get(&keys::owner_key(vm)).await.unwrap().unwrap().value).unwrap()
}

fn vms(v: Vec<(MoveRecord, Revision)>) -> Vec<String> {
    v.into_iter().map(|(m, _)| m.vm).collect()
}

#[test]
fn a_selector_selects_by_priority_node_and_class_together_and_unknown_names_are_refused() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a", 8).await;
        let b = join(&s, "b", 8).await;
        put_vm(&s, vm("lo-a", Priority::Low), Some(("a", a))).await;
        put_vm(&s, vm("lo-b", Priority::Low), Some(("b", b))).await;
        put_vm(&s, vm("hi-a", Priority::High), Some(("a", a))).await;
        let web = Vm {
            class: Some("web"),
            ..vm("web-a", Priority::Low)
        };
        put_vm(&s, web, Some(("a", a))).await;
        put_vm(&s, vm("lo-off", Priority::Low), None).await;
        let snap = cluster::failover::Snapshot::read(&s).await.unwrap();
        let select = |t: &str| sel(t).select(&snap).unwrap();
        assert_eq!(select("priority=low"), ["lo-a", "lo-b", "lo-off", "web-a"]);
        assert_eq!(select("priority=low,node=a"), ["lo-a", "web-a"]);
        assert_eq!(select("node=a, class=web"), ["web-a"]);
        assert!(matches!(
            sel("priority=medium").select(&snap),
            Err(BulkError::NoneSelected(_))
        ));
        let e = names(&["lo-a", "nope", "zz"]).select(&snap).unwrap_err();
        assert_eq!(e.to_string(), "no clustered VM named nope, zz");
    });
}

#[test]
fn a_migration_with_a_vm_without_a_place_is_refused_with_its_name_and_writes_nothing() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a", 8).await;
        let b = join(&s, "b", 8).await;
        join(&s, "c", 8).await;
        put_vm(&s, vm("v1", Priority::Low), Some(("a", a))).await;
        let pinned = Vm {
            only: &["a"],
            ..vm("pinned", Priority::Low)
        };
        put_vm(&s, pinned, Some(("a", a))).await;
        put_vm(&s, vm("there", Priority::Low), Some(("b", b))).await;
        put_vm(&s, vm("off", Priority::Low), None).await;
        let req = migrate(sel("priority=low"), "b", false, 1);

        let before = s.revision();
        let e = bulk::request(&s, &req).await.unwrap_err();
        assert!(
            matches!(&e, BulkError::NoPlace { no_place, .. }
            if no_place.len() == 1 && no_place[0].0 == "pinned"
                && no_place[0].1.contains("not among its possible owners")),
            "{e}"
        );
        assert_eq!(s.revision(), before, "a refused request wrote something");
        assert!(moves(&s).await.is_empty());

        // An unknown destination is refused too.
        assert!(matches!(
            bulk::request(&s, &migrate(sel("priority=low"), "zz", true, 1)).await,
            Err(BulkError::UnknownNode(n)) if n == "zz"
        ));
        assert_eq!(s.revision(), before);

        // Forced: v1 moves; pinned stays (left), `there` is on b already and `off`
        // does not run (both skipped).
        let forced = BulkRequest { force: true, ..req };
        let (rec, plan) = bulk::request(&s, &forced).await.unwrap();
        assert_eq!(rec.vms, ["v1"]);
        assert_eq!(rec.left.len(), 1);
        assert_eq!(rec.left[0].0, "pinned");
        let skipped: Vec<&str> = rec.skipped.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(skipped, ["off", "there"]);
        assert_eq!(plan.moves.len(), 1);
        let all = moves(&s).await;
        let (m, _) = &all["v1"];
        assert_eq!(
            (m.from.as_str(), m.to.as_str(), m.state, m.reason),
            ("a", "b", MoveState::Queued, MoveReason::Bulk)
        );
        assert_eq!(m.request.as_deref(), Some(rec.id.as_str()));
        assert_eq!(all.len(), 1);
        // The queue shows it with its request.
        let q = bulk::queue(&s).await.unwrap();
        assert_eq!(q.moves.len(), 1);
        assert_eq!(q.requests.len(), 1);
        assert_eq!(q.requests[0].id, rec.id);
        // v1's move is unfinished: a second request for it has no place.
        let again = bulk::request(&s, &migrate(names(&["v1"]), "c", false, 1)).await;
        assert!(
            matches!(&again, Err(BulkError::NoPlace { no_place, .. }) if no_place[0].1.contains("unfinished")),
            "{again:?}"
        );
    });
}

/// A bulk migration to a node whose CPU features differ from the VM's node is refused
/// naming both; `auto` picks only among nodes with the same features.
#[test]
fn a_migration_goes_only_to_nodes_with_the_cpu_features_of_the_vms_node() {
    block(async {
        let s = SimStore::new();
        let a = join_with_cpu(&s, "a", 8, Some("1.0:x")).await;
        join_with_cpu(&s, "b", 8, Some("1.0:x")).await;
        join_with_cpu(&s, "c", 64, Some("1.0:y")).await;
        put_vm(&s, vm("v1", Priority::Low), Some(("a", a))).await;
        put_vm(&s, vm("v2", Priority::Low), Some(("a", a))).await;
        let before = s.revision();
        let e = bulk::request(&s, &migrate(names(&["v1"]), "c", false, 1))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, BulkError::NoPlace { no_place, .. }
            if no_place[0].0 == "v1" && no_place[0].1.contains("CPU features differ from those of a")),
            "{e}"
        );
        assert_eq!(s.revision(), before, "a refused request wrote something");
        // c is emptier, but only b has a's features.
        let (_, plan) = bulk::request(&s, &migrate(names(&["v1", "v2"]), "auto", false, 1))
            .await
            .unwrap();
        assert_eq!(plan.moves.len(), 2);
        assert!(plan.moves.iter().all(|m| m.to == "b"), "{:?}", plan.moves);
    });
}

#[test]
fn auto_places_like_failover_never_on_the_vms_own_node_spreading_a_class_within_capacity() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a", 8).await;
        join(&s, "b", 8).await;
        join(&s, "c", 8).await;
        // d has room for one VM only.
        join(&s, "d", 1).await;
        for name in ["w1", "w2"] {
            let w = Vm {
                class: Some("web"),
                only: &["a", "b", "c"],
                ..vm(name, Priority::Medium)
            };
            put_vm(&s, w, Some(("a", a))).await;
        }
        let onlyd = Vm {
            only: &["a", "d"],
            ..vm("d1", Priority::High)
        };
        put_vm(&s, onlyd, Some(("a", a))).await;
        let onlyd2 = Vm {
            only: &["a", "d"],
            ..vm("d2", Priority::Low)
        };
        put_vm(&s, onlyd2, Some(("a", a))).await;
        // Only a may run it: no other place.
        let pinned = Vm {
            only: &["a"],
            ..vm("pinned", Priority::High)
        };
        put_vm(&s, pinned, Some(("a", a))).await;
        // d has room for one of d1, d2: High gets it, d2 has no place.
        let e = bulk::request(&s, &migrate(sel("node=a"), "auto", false, 2))
            .await
            .unwrap_err();
        let BulkError::NoPlace { no_place, .. } = &e else {
            panic!("{e}");
        };
        let without: Vec<&str> = no_place.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(without, ["d2", "pinned"], "{e}");
        bulk::request(&s, &migrate(sel("node=a"), "auto", true, 2))
            .await
            .unwrap();
        let all = moves(&s).await;
        let to = |vm: &str| all[vm].0.to.clone();
        assert_eq!(to("d1"), "d");
        assert!(!all.contains_key("d2") && !all.contains_key("pinned"));
        // The class is spread over b and c, never a.
        let mut web = [to("w1"), to("w2")];
        web.sort();
        assert_eq!(web, ["b", "c"]);
    });
}

#[test]
fn moves_start_high_first_and_within_each_sources_and_destinations_limit() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a", 8).await;
        join(&s, "b", 8).await;
        let c = join(&s, "c", 8).await;
        put_vm(&s, vm("a-hi", Priority::High), Some(("a", a))).await;
        put_vm(&s, vm("a-lo1", Priority::Low), Some(("a", a))).await;
        put_vm(&s, vm("a-lo2", Priority::Low), Some(("a", a))).await;
        put_vm(&s, vm("c-lo", Priority::Low), Some(("c", c))).await;
        put_vm(&s, vm("c-med", Priority::Medium), Some(("c", c))).await;
        let (rec, _) = bulk::request(
            &s,
            &migrate(
                names(&["a-hi", "a-lo1", "a-lo2", "c-lo", "c-med"]),
                "b",
                false,
                1,
            ),
        )
        .await
        .unwrap();
        assert_eq!(rec.concurrency, 1);
        let mut all = moves(&s).await;
        // Into b one at a time, High first cluster-wide: only a-hi may start; c's
        // Medium waits although c has nothing running.
        assert_eq!(vms(drain::next_moves(&all, "a", 0)), ["a-hi"]);
        assert!(drain::next_moves(&all, "c", 0).is_empty());
        all.get_mut("a-hi").unwrap().0.state = MoveState::Migrating;
        assert!(drain::next_moves(&all, "a", 1).is_empty());
        assert!(drain::next_moves(&all, "c", 0).is_empty(), "b is full");
        all.get_mut("a-hi").unwrap().0.state = MoveState::Moved;
        // Then c's Medium, before any Low of a or c.
        assert!(drain::next_moves(&all, "a", 0).is_empty());
        assert_eq!(vms(drain::next_moves(&all, "c", 0)), ["c-med"]);
        all.get_mut("c-med").unwrap().0.state = MoveState::Migrating;
        assert!(drain::next_moves(&all, "a", 0).is_empty(), "b is full");
        all.get_mut("c-med").unwrap().0.state = MoveState::Failed;
        // The Lows: one into b at a time, whichever source.
        assert_eq!(vms(drain::next_moves(&all, "a", 0)), ["a-lo1"]);
        assert_eq!(vms(drain::next_moves(&all, "c", 0)), ["c-lo"]);
        all.get_mut("c-lo").unwrap().0.state = MoveState::Migrating;
        assert!(drain::next_moves(&all, "a", 0).is_empty());

        // With a limit of 2 each source runs two at once, and b takes two.
        let s2 = SimStore::new();
        let a = join(&s2, "a", 8).await;
        join(&s2, "b", 8).await;
        join(&s2, "c", 8).await;
        for n in ["v1", "v2", "v3"] {
            put_vm(&s2, vm(n, Priority::Low), Some(("a", a))).await;
        }
        bulk::request(&s2, &migrate(sel("node=a"), "b", false, 2))
            .await
            .unwrap();
        let mut all = moves(&s2).await;
        assert_eq!(vms(drain::next_moves(&all, "a", 0)), ["v1", "v2"]);
        all.get_mut("v1").unwrap().0.state = MoveState::Migrating;
        assert_eq!(vms(drain::next_moves(&all, "a", 1)), ["v2"]);
    });
}

#[test]
fn a_cancel_fails_the_requests_queued_moves_and_lets_a_migrating_one_finish() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a", 8).await;
        join(&s, "b", 8).await;
        for n in ["v1", "v2", "v3"] {
            put_vm(&s, vm(n, Priority::Low), Some(("a", a))).await;
        }
        put_vm(&s, vm("other", Priority::Low), Some(("a", a))).await;
        let (rec, _) = bulk::request(&s, &migrate(names(&["v1", "v2", "v3"]), "b", false, 1))
            .await
            .unwrap();
        let (other, _) = bulk::request(&s, &migrate(names(&["other"]), "b", false, 1))
            .await
            .unwrap();
        assert_ne!(rec.id, other.id);
        // v1 migrates (its source wrote so).
        let mut v1 = moves(&s).await["v1"].0.clone();
        v1.state = MoveState::Migrating;
        s.put(&keys::move_key("v1"), keys::encode(&v1), 0)
            .await
            .unwrap();

        let mut cancelled = bulk::cancel(&s, &rec.id).await.unwrap();
        cancelled.sort();
        assert_eq!(cancelled, ["v2", "v3"]);
        let all = moves(&s).await;
        assert_eq!(all["v1"].0.state, MoveState::Migrating);
        assert_eq!(
            all["other"].0.state,
            MoveState::Queued,
            "another request's move"
        );
        for vm in ["v2", "v3"] {
            let m = &all[vm].0;
            assert_eq!(m.state, MoveState::Failed);
            assert!(
                m.error.as_deref().unwrap().starts_with("cancelled"),
                "{m:?}"
            );
        }
        let q = bulk::queue(&s).await.unwrap();
        let r = q.requests.iter().find(|r| r.id == rec.id).unwrap();
        assert!(r.cancelled_ms.is_some());
        // Nothing of the request starts any more; the other request's move does
        // once v1 is done.
        assert!(drain::next_moves(&all, "a", 0).is_empty());
        let mut all = all;
        all.get_mut("v1").unwrap().0.state = MoveState::Moved;
        assert_eq!(vms(drain::next_moves(&all, "a", 0)), ["other"]);
        assert!(matches!(
            bulk::cancel(&s, "b-0-none").await,
            Err(BulkError::UnknownRequest(_))
        ));
    });
}

#[test]
fn more_moves_than_one_transaction_holds_are_all_queued_and_all_cancelled() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a", 1000).await;
        join(&s, "b", 1000).await;
        for i in 0..250 {
            put_vm(&s, vm(&format!("v{i:03}"), Priority::Low), Some(("a", a))).await;
        }
        let (rec, plan) = bulk::request(&s, &migrate(sel("node=a"), "b", false, 2))
            .await
            .unwrap();
        assert_eq!((rec.vms.len(), plan.moves.len()), (250, 250));
        assert_eq!(moves(&s).await.len(), 250);
        let cancelled = bulk::cancel(&s, &rec.id).await.unwrap();
        assert_eq!(cancelled.len(), 250);
        assert!(moves(&s)
            .await
            .values()
            .all(|(m, _)| m.state == MoveState::Failed));
    });
}

#[test]
fn stop_turns_vms_off_and_start_asks_them_to_run_skipping_those_already_so() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a", 2).await;
        put_vm(&s, vm("r1", Priority::Low), Some(("a", a))).await;
        put_vm(&s, vm("r2", Priority::Low), Some(("a", a))).await;
        put_vm(&s, vm("o1", Priority::Low), None).await;
        let req = |op, sel: Selection| BulkRequest {
            op,
            selection: sel,
            to: None,
            force: false,
            concurrency: 1,
        };
        let (rec, _) = bulk::request(&s, &req(BulkOp::Stop, sel("priority=low")))
            .await
            .unwrap();
        assert_eq!(rec.vms, ["r1", "r2"]);
        assert_eq!(rec.skipped, [("o1".to_string(), "already off".to_string())]);
        for v in ["r1", "r2", "o1"] {
            assert_eq!(owner(&s, v).await, OwnerRecord::Unowned(Unowned::Off));
        }
        // A stop request has no moves to cancel.
        assert!(matches!(
            bulk::cancel(&s, &rec.id).await,
            Err(BulkError::NotCancellable(_))
        ));
        // a has room for two of the three: refused, naming one; forced, two pending.
        let e = bulk::request(&s, &req(BulkOp::Start, sel("priority=low")))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, BulkError::NoPlace { no_place, .. } if no_place.len() == 1),
            "{e}"
        );
        let forced = BulkRequest {
            force: true,
            ..req(BulkOp::Start, sel("priority=low"))
        };
        let (rec, _) = bulk::request(&s, &forced).await.unwrap();
        assert_eq!(rec.vms.len(), 2);
        for v in &rec.vms {
            assert_eq!(owner(&s, v).await, OwnerRecord::Unowned(Unowned::Pending));
        }
    });
}

#[test]
fn the_unfinished_moves_of_a_source_that_left_are_abandoned_and_hold_back_nothing_then() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a", 8).await;
        join(&s, "b", 8).await;
        let c = join(&s, "c", 8).await;
        put_vm(&s, vm("c-hi", Priority::High), Some(("c", c))).await;
        put_vm(&s, vm("a-lo", Priority::Low), Some(("a", a))).await;
        bulk::request(&s, &migrate(names(&["c-hi", "a-lo"]), "b", false, 1))
            .await
            .unwrap();
        let mut all = moves(&s).await;
        // c's High move into b holds back a's Low one...
        assert!(drain::next_moves(&all, "a", 0).is_empty());
        // ...until c is gone (its lease ended): its move is abandoned, failed by any
        // node, and a's starts.
        let live: std::collections::BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        assert_eq!(vms(drain::abandoned(&all, &live)), ["c-hi"]);
        all.get_mut("c-hi").unwrap().0.state = MoveState::Failed;
        assert!(drain::abandoned(&all, &live).is_empty());
        assert_eq!(vms(drain::next_moves(&all, "a", 0)), ["a-lo"]);
    });
}
