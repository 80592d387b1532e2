//! The store contract on a real 3-member etcd (and the same contract on `SimStore`), and
//! self-fencing against a real etcd: a node cut off from the cluster stops its VMs before
//! another node is allowed to take them.

use std::time::{Duration, Instant};

use cluster::failover::{define_vm, Controller};
use cluster::keys::{self, NodeRecord, NodeState, OwnerRecord, Priority, Resources, VmDefinition};
use cluster::membership::{NodeAgent, Timing};
use cluster::placement::Decision;
use cluster::store::{CmpOp, Compare, Op, Txn, WatchEvent};
use cluster::{ClusterStore, EtcdSecurity, EtcdStore, SimStore, StoreError};
use vireo_e2e::etcd::EtcdCluster;

/// What both stores must do alike.
async fn contract<S: ClusterStore>(s: &S, expire: impl Fn()) {
    let mut watch = s.watch_prefix("t/", 0).await.unwrap();
    let r1 = s.put("t/a", b"1".to_vec(), 0).await.unwrap();
    let a = s.get("t/a").await.unwrap().unwrap();
    assert_eq!(
        (a.value.as_slice(), a.mod_revision, a.lease),
        (&b"1"[..], r1, 0)
    );
    assert!(s.get("t/missing").await.unwrap().is_none());

    // CAS on mod_revision: a stale revision changes nothing.
    let stale = Txn {
        when: vec![Compare::ModRevision {
            key: "t/a".into(),
            op: CmpOp::Equal,
            revision: r1 - 1,
        }],
        then: vec![Op::Put {
            key: "t/a".into(),
            value: b"stale".to_vec(),
            lease: 0,
        }],
        otherwise: vec![],
    };
    assert!(!s.txn(stale).await.unwrap().succeeded);
    let fresh = Txn {
        when: vec![Compare::ModRevision {
            key: "t/a".into(),
            op: CmpOp::Equal,
            revision: r1,
        }],
        then: vec![Op::Put {
            key: "t/a".into(),
            value: b"2".to_vec(),
            lease: 0,
        }],
        otherwise: vec![],
    };
    let out = s.txn(fresh).await.unwrap();
    assert!(out.succeeded);
    let a = s.get("t/a").await.unwrap().unwrap();
    assert_eq!(
        (a.value.as_slice(), a.mod_revision),
        (&b"2"[..], out.revision)
    );
    // Revision 0 means "absent": create-if-missing.
    let create = |v: &[u8]| Txn {
        when: vec![Compare::ModRevision {
            key: "t/new".into(),
            op: CmpOp::Equal,
            revision: 0,
        }],
        then: vec![Op::Put {
            key: "t/new".into(),
            value: v.to_vec(),
            lease: 0,
        }],
        otherwise: vec![],
    };
    assert!(s.txn(create(b"x")).await.unwrap().succeeded);
    assert!(!s.txn(create(b"y")).await.unwrap().succeeded);

    // Leases: a key on a lease; a missing key compares as lease 0.
    let lease = s.lease_grant(Duration::from_secs(2)).await.unwrap();
    s.put("t/node", b"n".to_vec(), lease).await.unwrap();
    assert_eq!(s.get("t/node").await.unwrap().unwrap().lease, lease);
    let on_lease = |op, l| Txn {
        when: vec![Compare::Lease {
            key: "t/node".into(),
            op,
            lease: l,
        }],
        then: vec![],
        otherwise: vec![],
    };
    assert!(
        s.txn(on_lease(CmpOp::Equal, lease))
            .await
            .unwrap()
            .succeeded
    );
    assert!(
        !s.txn(on_lease(CmpOp::NotEqual, lease))
            .await
            .unwrap()
            .succeeded
    );
    assert!(s.lease_keepalive(lease).await.is_ok());

    // Expiry deletes the key; the watch sees it; keepalive then says the lease is gone.
    expire();
    assert!(s.get("t/node").await.unwrap().is_none());
    assert!(
        s.txn(on_lease(CmpOp::NotEqual, lease))
            .await
            .unwrap()
            .succeeded
    );
    assert!(matches!(
        s.lease_keepalive(lease).await,
        Err(StoreError::LeaseGone(_))
    ));
    // And on every later try: etcd's client opens a new keepalive stream for it, whose
    // first answer already says so (a healed node must rejoin, not retry forever).
    for _ in 0..2 {
        let again = s.lease_keepalive(lease).await;
        assert!(
            matches!(again, Err(StoreError::LeaseGone(_))),
            "an expired lease renewed again: {again:?}"
        );
    }
    // A lease revoked before it was ever renewed here is gone too.
    let revoked = s.lease_grant(Duration::from_secs(2)).await.unwrap();
    s.lease_revoke(revoked).await.unwrap();
    let after_revoke = s.lease_keepalive(revoked).await;
    assert!(
        matches!(after_revoke, Err(StoreError::LeaseGone(_))),
        "a revoked lease renewed: {after_revoke:?}"
    );
    assert!(matches!(
        s.put("t/late", b"z".to_vec(), lease).await,
        Err(StoreError::LeaseGone(_))
    ));

    let mut seen = Vec::new();
    while seen.len() < 5 {
        match watch.next().await.unwrap() {
            WatchEvent::Put(kv) => seen.push(format!("put {}", kv.key)),
            WatchEvent::Delete { key, .. } => seen.push(format!("delete {key}")),
        }
    }
    assert_eq!(
        seen,
        [
            "put t/a",
            "put t/a",
            "put t/new",
            "put t/node",
            "delete t/node"
        ]
    );

    let (all, _) = s.get_prefix("t/").await.unwrap();
    let names: Vec<&str> = all.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(names, ["t/a", "t/new"]);
    assert!(s.delete("t/a").await.unwrap());
    assert!(!s.delete("t/a").await.unwrap());
}

#[tokio::test]
async fn the_simulated_store_keeps_the_store_contract() {
    let sim = SimStore::new();
    let clock = sim.clone();
    contract(&sim, move || {
        clock.advance_to(clock.now() + Duration::from_secs(3))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_keeps_the_store_contract() {
    let etcd = EtcdCluster::start(3);
    // The contract is what the store does, not how fast: its requests may wait up to
    // 5 s (a node's store gives up after 400 ms, which a loaded CI machine's etcd
    // overruns now and then).
    let store = EtcdStore::connect_with_timeout(
        &etcd.endpoints(),
        &EtcdSecurity::Insecure,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let probe = store.clone();
    contract(&store, move || {
        // Real time: wait until etcd expired the lease (a 2 s TTL; generous bound).
        let deadline = Instant::now() + Duration::from_secs(30);
        let rt = tokio::runtime::Handle::current();
        loop {
            let gone = tokio::task::block_in_place(|| rt.block_on(probe.get("t/node")))
                .unwrap()
                .is_none();
            if gone {
                return;
            }
            assert!(Instant::now() < deadline, "etcd never expired the lease");
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await;
}

/// A node's store (requests bounded at 400 ms) reads on while the member it uses is
/// frozen: the read that member leaves unanswered is asked of another member, and the
/// caller sees the answer, not the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_the_member_in_use_leaves_unanswered_is_asked_of_another() {
    let etcd = EtcdCluster::start(3);
    // The store uses its first endpoint first: a follower, so that freezing it leaves
    // the leader and a quorum.
    let leader = etcd.leader();
    let follower = (leader + 1) % 3;
    let all = etcd.endpoints();
    let mut endpoints = vec![all[follower].clone()];
    endpoints.extend((0..3).filter(|&i| i != follower).map(|i| all[i].clone()));
    let writer =
        EtcdStore::connect_with_timeout(&all, &EtcdSecurity::Insecure, Duration::from_secs(5))
            .await
            .unwrap();
    writer.put("t/a", b"1".to_vec(), 0).await.unwrap();
    writer.put("t/b", b"2".to_vec(), 0).await.unwrap();
    let store = EtcdStore::connect(&endpoints, &EtcdSecurity::Insecure)
        .await
        .unwrap();
    assert_eq!(store.get("t/a").await.unwrap().unwrap().value, b"1");

    etcd.freeze(follower);
    let read = store.get("t/b").await;
    let prefix = store.get_prefix("t/").await;
    etcd.thaw(follower);
    assert_eq!(read.unwrap().unwrap().value, b"2");
    let (kvs, _) = prefix.unwrap();
    assert_eq!(kvs.len(), 2);
}

fn node(name: &str) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        capacity: Resources {
            memory_mib: 4096,
            vcpus: 4,
        },
        cpu_features: vec![],
        cpuid: None,
        state: NodeState::Up,
        peer_url: None,
    }
}

/// Node A talks to one etcd member only; that member dies, the other two keep quorum.
/// A must stop its VM (self-fencing on its own clock) before B's controller may place
/// it, and B's placement must carry a newer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_etcd_fences_itself_before_its_vm_moves() {
    let mut etcd = EtcdCluster::start(3);
    let eps = etcd.endpoints();
    let timing = Timing::default();
    let store_a = EtcdStore::connect(&eps[..1], &EtcdSecurity::Insecure)
        .await
        .unwrap();
    let store_b = EtcdStore::connect(&eps[1..], &EtcdSecurity::Insecure)
        .await
        .unwrap();
    let vm = VmDefinition {
        name: "web".into(),
        priority: Priority::High,
        needs: Resources {
            memory_mib: 512,
            vcpus: 1,
        },
        preferred_owners: vec!["a".into()],
        possible_owners: vec![],
        anti_affinity: None,
        config: serde_json::Value::Null,
        cpu_features: None,
    };
    let t0 = Instant::now();
    let clock = move || t0.elapsed();
    let mut a = NodeAgent::new(store_a.clone(), node("a"), timing);
    let mut b = NodeAgent::new(store_b.clone(), node("b"), timing);
    let mut ctl_b = Controller::new(timing);
    a.step(clock()).await;
    b.step(clock()).await;
    define_vm(&store_b, &vm, true).await.unwrap();

    // Placement: on a (preferred), with a's token.
    let deadline = Instant::now() + Duration::from_secs(30);
    let token_a = loop {
        ctl_b.step(&store_b, clock()).await.unwrap();
        let r = a.step(clock()).await;
        b.step(clock()).await;
        if let Some((_, t)) = r.start.iter().find(|(v, _)| v == "web") {
            break *t;
        }
        assert!(Instant::now() < deadline, "web was never placed on a");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    etcd.kill(0);
    let cut = clock();
    let mut a_fenced_at = None;
    let mut moved = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while moved.is_none() {
        // Each node's loop, on its own (here: the same) monotonic clock.
        let ra = a.step(clock()).await;
        if ra.stop.iter().any(|v| v == "web") {
            a_fenced_at.get_or_insert(clock());
        }
        b.step(clock()).await;
        if let Ok(pass) = ctl_b.step(&store_b, clock()).await {
            if pass
                .applied
                .iter()
                .any(|d| matches!(d, Decision::Place { vm, node } if vm == "web" && node == "b"))
            {
                moved = Some(clock());
            }
        }
        assert!(Instant::now() < deadline, "web never moved to b");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fenced = a_fenced_at.expect("a never stopped web although cut off");
    let moved = moved.unwrap();
    assert!(
        fenced < moved,
        "a fenced at {fenced:?}, but b took web at {moved:?} (cut at {cut:?})"
    );
    assert!(a.fenced(clock()));
    // b runs it now, with a newer fencing token.
    let owner = store_b.get(&keys::owner_key("web")).await.unwrap().unwrap();
    assert!(owner.mod_revision > token_a);
    match keys::decode::<OwnerRecord>(&owner.value).unwrap() {
        OwnerRecord::Node { node, .. } => assert_eq!(node, "b"),
        other => panic!("owner of web: {other:?}"),
    }
    let rb = b.step(clock()).await;
    assert_eq!(rb.start, vec![("web".to_string(), owner.mod_revision)]);
}
