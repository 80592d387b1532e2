//! Saving clustered VMs on `SimStore` (etcd's semantics): a save commits only while
//! its owner still owns the VM under the token it read (a failover or a move that came
//! first makes it lose, writing nothing), a saved VM is placed nowhere by the failover
//! controller when its node dies, a bulk start resumes it through placement, a failed
//! resume makes it saved again, a discard turns it off cluster-wide, and a bulk save
//! asks each running VM's owner.

use std::time::Duration;

use cluster::bulk::{self, BulkRequest, Selection};
use cluster::failover::{define_vm, Controller};
use cluster::keys::{
    self, BulkOp, MoveReason, MoveRecord, MoveState, NodeRecord, NodeState, OwnerRecord, Priority,
    Resources, SaveState, SavedRecord, Unowned, VmDefinition,
};
use cluster::membership::Timing;
use cluster::placement::Decision;
use cluster::saved::{self, SaveError};
use cluster::store::LeaseId;
use cluster::{ClusterStore, SimStore};

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

async fn join(s: &SimStore, node: &str) -> LeaseId {
    let lease = s.lease_grant(Duration::from_secs(2)).await.unwrap();
    let rec = NodeRecord {
        name: node.into(),
        version: "t".into(),
        capacity: Resources {
            memory_mib: 64 * 1024,
            vcpus: 8,
        },
        cpu_features: vec![],
        cpuid: None,
        state: NodeState::Up,
        peer_url: Some(format!("https://{node}:7443")),
    };
    s.put(&keys::node_key(node), keys::encode(&rec), lease)
        .await
        .unwrap();
    lease
}

/// Defines `vm` run by `node` (holding `lease`).
async fn put_vm(s: &SimStore, vm: &str, node: &str, lease: LeaseId) {
    let def = VmDefinition {
        name: vm.into(),
        priority: Priority::High,
        needs: Resources {
            memory_mib: 256,
            vcpus: 1,
        },
        preferred_owners: vec![],
        possible_owners: vec![],
        anti_affinity: None,
        config: serde_json::Value::Null,
        cpu_features: None,
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

async fn owner(s: &SimStore, vm: &str) -> (OwnerRecord, i64) {
    let kv = s.get(&keys::owner_key(vm)).await.unwrap().unwrap();
    (keys::decode(&kv.value).unwrap(), kv.mod_revision)
}

async fn saved_record(s: &SimStore, vm: &str) -> Option<SavedRecord> {
    s.get(&keys::saved_key(vm))
        .await
        .unwrap()
        .map(|kv| keys::decode(&kv.value).unwrap())
}

/// One controller pass at `t` (+200 ms) with `keep`'s lease renewed.
async fn pass(c: &mut Controller, s: &SimStore, t: &mut Duration, keep: LeaseId) -> Vec<Decision> {
    *t += Duration::from_millis(200);
    s.advance_to(*t);
    s.lease_keepalive(keep).await.unwrap();
    c.step(s, *t).await.unwrap().applied
}

fn names(v: &[&str]) -> Selection {
    Selection::Names(v.iter().map(|s| s.to_string()).collect())
}

fn request(op: BulkOp, selection: Selection) -> BulkRequest {
    BulkRequest {
        op,
        selection,
        to: None,
        force: false,
        concurrency: 1,
    }
}

#[test]
fn a_saved_vm_is_not_failed_over_and_a_start_resumes_it_on_another_node() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a").await;
        let b = join(&s, "b").await;
        put_vm(&s, "web", "a", a).await;
        let (_, token) = owner(&s, "web").await;

        // Only its owner saves it.
        let e = saved::prepare(&s, "web", "b").await.unwrap_err();
        assert!(matches!(e, SaveError::NotOwned { .. }), "{e}");
        let g = saved::prepare(&s, "web", "a").await.unwrap();
        assert_eq!((g.token, g.lease), (token, a));
        saved::commit(&s, &g).await.unwrap();
        assert_eq!(
            owner(&s, "web").await.0,
            OwnerRecord::Unowned(Unowned::Saved)
        );
        let rec = saved_record(&s, "web").await.unwrap();
        assert_eq!(
            (rec.state, rec.node.as_str(), rec.token),
            (SaveState::Saved, "a", token)
        );
        // A second commit of the same save loses: the ownership moved on.
        assert!(matches!(
            saved::commit(&s, &g).await,
            Err(SaveError::Raced(_))
        ));

        // Node a dies: its lease expires; the controller places nothing.
        let mut c = Controller::new(Timing::default());
        let mut t = Duration::ZERO;
        for _ in 0..30 {
            let applied = pass(&mut c, &s, &mut t, b).await;
            assert!(applied.is_empty(), "the saved VM was placed: {applied:?}");
        }
        assert!(s.get(&keys::node_key("a")).await.unwrap().is_none());
        assert_eq!(
            owner(&s, "web").await.0,
            OwnerRecord::Unowned(Unowned::Saved)
        );
        // A bulk stop skips it (nothing runs); a bulk save skips it (saved already).
        let (rec, _) = bulk::request(&s, &request(BulkOp::Stop, names(&["web"])))
            .await
            .unwrap();
        assert!(
            rec.vms.is_empty() && rec.skipped[0].1.contains("saved"),
            "{rec:?}"
        );
        let (rec, _) = bulk::request(&s, &request(BulkOp::Save, names(&["web"])))
            .await
            .unwrap();
        assert!(
            rec.vms.is_empty() && rec.skipped[0].1.contains("saved"),
            "{rec:?}"
        );

        // A start: pending, then placed on b with a newer token; the saved record
        // stays until b's resume ran.
        let (rec, _) = bulk::request(&s, &request(BulkOp::Start, names(&["web"])))
            .await
            .unwrap();
        assert_eq!(rec.vms, ["web"]);
        let applied = pass(&mut c, &s, &mut t, b).await;
        assert_eq!(
            applied,
            [Decision::Place {
                vm: "web".into(),
                node: "b".into()
            }]
        );
        let (o, token_b) = owner(&s, "web").await;
        assert_eq!(
            o,
            OwnerRecord::Node {
                node: "b".into(),
                lease: b
            }
        );
        assert!(token_b > token);
        let (rec, rev) = saved::saved_of(&s, "web").await.unwrap().unwrap();
        assert_eq!(rec.node, "a");
        // The resume fails: saved again (its state stays for the next start).
        assert!(saved::resume_failed(&s, "web", token_b, "b").await.unwrap());
        assert_eq!(
            owner(&s, "web").await.0,
            OwnerRecord::Unowned(Unowned::Saved)
        );
        assert!(saved::saved_of(&s, "web").await.unwrap().is_some());

        // Started again and resumed: the record is spent (only under that token).
        bulk::request(&s, &request(BulkOp::Start, names(&["web"])))
            .await
            .unwrap();
        pass(&mut c, &s, &mut t, b).await;
        let (_, token_b2) = owner(&s, "web").await;
        assert!(!saved::spent(&s, "web", token_b, rev).await.unwrap());
        assert!(saved::spent(&s, "web", token_b2, rev).await.unwrap());
        assert!(saved_record(&s, "web").await.is_none());
        // Running on b, it is not saved: nothing to discard.
        assert!(matches!(
            saved::discard(&s, "web").await,
            Err(SaveError::WrongState { .. })
        ));
    });
}

#[test]
fn a_save_loses_to_a_failover_or_a_move_that_came_first_and_writes_nothing() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a").await;
        let b = join(&s, "b").await;
        put_vm(&s, "web", "a", a).await;
        put_vm(&s, "db", "a", a).await;

        // web: prepared on a; a's lease ends and the controller fails it over to b
        // before the snapshot is complete.
        let g = saved::prepare(&s, "web", "a").await.unwrap();
        let mut c = Controller::new(Timing::default());
        let mut t = Duration::ZERO;
        s.lease_revoke(a).await.unwrap();
        while owner(&s, "web").await.0
            == (OwnerRecord::Node {
                node: "a".into(),
                lease: a,
            })
        {
            pass(&mut c, &s, &mut t, b).await;
            assert!(t < Duration::from_secs(30), "never failed over");
        }
        let before = s.revision();
        assert!(matches!(
            saved::commit(&s, &g).await,
            Err(SaveError::Raced(_))
        ));
        assert_eq!(s.revision(), before, "a lost save wrote something");
        assert!(saved_record(&s, "web").await.is_none());
        assert!(matches!(owner(&s, "web").await.0, OwnerRecord::Node { node, .. } if node == "b"));

        // db (now on b): a move queued after the save was prepared makes it lose too;
        // one queued before refuses the save at once.
        let (o, token) = owner(&s, "db").await;
        assert!(matches!(o, OwnerRecord::Node { ref node, .. } if node == "b"));
        let g = saved::prepare(&s, "db", "b").await.unwrap();
        let m = MoveRecord {
            vm: "db".into(),
            from: "b".into(),
            to: "a".into(),
            priority: Priority::High,
            reason: MoveReason::Bulk,
            drain_of: String::new(),
            request: None,
            state: MoveState::Queued,
            concurrency: 1,
            token_before: Some(token),
            token_after: None,
            error: None,
            started_ms: None,
            finished_ms: None,
        };
        s.put(&keys::move_key("db"), keys::encode(&m), 0)
            .await
            .unwrap();
        assert!(matches!(
            saved::commit(&s, &g).await,
            Err(SaveError::Raced(_))
        ));
        assert!(matches!(
            saved::prepare(&s, "db", "b").await,
            Err(SaveError::Moving(_))
        ));
        assert_eq!(owner(&s, "db").await.1, token);
    });
}

#[test]
fn a_bulk_save_asks_each_owner_and_a_discard_turns_a_saved_vm_off() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a").await;
        let b = join(&s, "b").await;
        put_vm(&s, "v1", "a", a).await;
        put_vm(&s, "v2", "b", b).await;
        let off = VmDefinition {
            name: "off".into(),
            priority: Priority::Low,
            needs: Resources {
                memory_mib: 256,
                vcpus: 1,
            },
            preferred_owners: vec![],
            possible_owners: vec![],
            anti_affinity: None,
            config: serde_json::Value::Null,
            cpu_features: None,
        };
        define_vm(&s, &off, false).await.unwrap();

        let (rec, plan) = bulk::request(&s, &request(BulkOp::Save, names(&["v1", "v2", "off"])))
            .await
            .unwrap();
        assert_eq!(rec.vms, ["v1", "v2"]);
        assert_eq!(rec.skipped.len(), 1);
        assert!(
            rec.skipped[0].1.contains("not running"),
            "{:?}",
            rec.skipped
        );
        assert_eq!(plan.saves.len(), 2);
        let asked_a = saved::requested_of(&s, "a").await.unwrap();
        assert_eq!(asked_a.len(), 1);
        assert_eq!(asked_a[0].0.vm, "v1");
        assert_eq!(asked_a[0].0.request.as_deref(), Some(rec.id.as_str()));
        // Asked again: skipped (requested already).
        let (again, _) = bulk::request(&s, &request(BulkOp::Save, names(&["v1"])))
            .await
            .unwrap();
        assert!(again.vms.is_empty(), "{again:?}");

        // a carries v1's out: the commit consumes the request.
        let g = saved::prepare(&s, "v1", "a").await.unwrap();
        assert_eq!(g.saved_revision, asked_a[0].1);
        saved::commit(&s, &g).await.unwrap();
        assert!(saved::requested_of(&s, "a").await.unwrap().is_empty());
        assert_eq!(
            owner(&s, "v1").await.0,
            OwnerRecord::Unowned(Unowned::Saved)
        );
        // b cannot carry v2's out: the request goes, v2 runs on.
        let (_, rev) = saved::requested_of(&s, "b").await.unwrap()[0].clone();
        assert!(saved::drop_request(&s, "v2", rev, "test").await.unwrap());
        assert!(saved_record(&s, "v2").await.is_none());
        assert!(matches!(owner(&s, "v2").await.0, OwnerRecord::Node { .. }));

        // Discard: v1 is off, its record gone; discarding again is refused.
        let rec = saved::discard(&s, "v1").await.unwrap();
        assert_eq!(rec.node, "a");
        assert_eq!(owner(&s, "v1").await.0, OwnerRecord::Unowned(Unowned::Off));
        assert!(saved_record(&s, "v1").await.is_none());
        assert!(matches!(
            saved::discard(&s, "v1").await,
            Err(SaveError::WrongState { .. })
        ));
        assert!(matches!(
            saved::discard(&s, "nope").await,
            Err(SaveError::UnknownVm(_))
        ));
    });
}

#[test]
fn a_drain_of_a_node_whose_vm_was_saved_there_moves_only_what_runs() {
    block(async {
        let s = SimStore::new();
        let a = join(&s, "a").await;
        join(&s, "b").await;
        put_vm(&s, "web", "a", a).await;
        put_vm(&s, "db", "a", a).await;
        let g = saved::prepare(&s, "web", "a").await.unwrap();
        saved::commit(&s, &g).await.unwrap();
        // Only db runs on a: the drain moves it and does not fail on web, which is
        // placed nowhere (and stays saved).
        let plan = cluster::drain::drain(&s, "a", false, 2).await.unwrap();
        let moved: Vec<&str> = plan.moves.iter().map(|m| m.vm.as_str()).collect();
        assert_eq!(moved, ["db"]);
        assert!(plan.no_place.is_empty(), "{:?}", plan.no_place);
        assert_eq!(
            owner(&s, "web").await.0,
            OwnerRecord::Unowned(Unowned::Saved)
        );
        assert!(saved::saved_of(&s, "web").await.unwrap().is_some());
    });
}
