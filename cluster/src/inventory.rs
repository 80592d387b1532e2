//! The cluster's inventory (nodes, VM definitions, owners, admin records) as a
//! watch-maintained view (`view::View<Inventory>`: a consistent read of the four
//! prefixes at one revision, then one watch of every cluster key, `vireo/`), and the
//! list `GET /api/v1/cluster` answers from it.
//!
//! Who may use it for what (docs/cluster.md, "The inventory view"): a list answers
//! from it and says its revision; a caller that must see what is committed now (or its
//! own write) first waits until the view reaches etcd's current revision (one
//! count-only read, [`View::catch_up`]) or the revision of its write
//! ([`View::wait_for`]). Decisions are still made by transactions whose comparisons
//! check the store itself.

use serde::Serialize;

use crate::failover::Snapshot;
use crate::keys::{self, NodeState, OwnerRecord, Priority, Resources, Unowned};
use crate::store::{ClusterStore, Revision, StoreResult, WatchEvent};
use crate::view::{apply_batch, Followed};
pub use crate::view::{ViewError, ViewStats};

/// The inventory view of a node (and of the scale bench's measured vireod).
pub type View = crate::view::View<Inventory>;

/// The inventory at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    pub snapshot: Snapshot,
    /// The store revision the snapshot is exactly.
    pub revision: Revision,
}

impl Followed for Inventory {
    const PREFIX: &'static str = keys::ROOT;

    async fn read<S: ClusterStore>(store: &S) -> StoreResult<Self> {
        let (snapshot, revision) = Snapshot::read_consistent(store).await?;
        Ok(Inventory { snapshot, revision })
    }

    fn revision(&self) -> Revision {
        self.revision
    }

    fn apply(&mut self, batch: &[WatchEvent]) -> bool {
        let snapshot = &mut self.snapshot;
        apply_batch(&mut self.revision, batch, |event| match event {
            WatchEvent::Put(kv) => snapshot.apply_put(kv),
            WatchEvent::Delete { key, .. } => snapshot.apply_delete(key),
        })
    }
}

/// One node of a list (`GET /api/v1/cluster`).
#[derive(Debug, Serialize)]
pub struct NodeRow<'a> {
    pub name: &'a str,
    pub state: NodeState,
    pub capacity: Resources,
    pub version: &'a str,
}

/// Who runs a VM, as listed.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum OwnerRow<'a> {
    Node { node: &'a str, alive: bool },
    Unowned(Unowned),
}

/// One clustered VM of a list.
#[derive(Debug, Serialize)]
pub struct VmRow<'a> {
    pub name: &'a str,
    pub priority: Priority,
    /// `None` (null): no ownership record.
    pub owner: Option<OwnerRow<'a>>,
    pub fencing_token: Option<Revision>,
}

/// The list of nodes and VMs `vireoctl cluster status` shows, at `revision`.
#[derive(Debug, Serialize)]
pub struct ClusterList<'a> {
    pub revision: Revision,
    pub nodes: Vec<NodeRow<'a>>,
    pub vms: Vec<VmRow<'a>>,
}

/// The list of `snap`, read at `revision`.
pub fn list(snap: &Snapshot, revision: Revision) -> ClusterList<'_> {
    let nodes = snap
        .nodes
        .iter()
        .map(|(name, (r, _))| NodeRow {
            name,
            state: r.state,
            capacity: r.capacity,
            version: &r.version,
        })
        .collect();
    let vms = snap
        .vms
        .iter()
        .map(|(name, d)| {
            let (owner, token) = match snap.owners.get(name) {
                Some((OwnerRecord::Node { node, lease }, rev)) => (
                    Some(OwnerRow::Node {
                        node,
                        alive: snap.alive(node, *lease),
                    }),
                    Some(*rev),
                ),
                Some((OwnerRecord::Unowned(u), rev)) => (Some(OwnerRow::Unowned(*u)), Some(*rev)),
                None => (None, None),
            };
            VmRow {
                name,
                priority: d.priority,
                owner,
                fencing_token: token,
            }
        })
        .collect();
    ClusterList {
        revision,
        nodes,
        vms,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::failover::define_vm;
    use crate::hooked::{HookedStore, Hooks};
    use crate::keys::{NodeAdmin, NodeRecord, VmDefinition};
    use crate::store::{KeyValue, LeaseId, StoreResult, Txn, Watch};
    use crate::SimStore;

    const WAIT: Duration = Duration::from_secs(20);

    fn vm(name: &str) -> VmDefinition {
        VmDefinition {
            name: name.into(),
            priority: Priority::Medium,
            needs: Resources {
                memory_mib: 512,
                vcpus: 1,
            },
            preferred_owners: vec![],
            possible_owners: vec![],
            anti_affinity: None,
            config: serde_json::json!({"kernel": name}),
            cpu_features: None,
        }
    }

    fn node(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            version: "t".into(),
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

    fn admin(state: NodeState) -> NodeAdmin {
        NodeAdmin {
            state,
            ..NodeAdmin::default()
        }
    }

    /// The store's inventory now, read directly.
    async fn direct(store: &SimStore) -> Inventory {
        let (snapshot, revision) = Snapshot::read_consistent(store).await.unwrap();
        Inventory { snapshot, revision }
    }

    /// A watch of every cluster key, and what it delivered so far in batches.
    fn drain(watch: &mut Watch) -> Vec<Vec<WatchEvent>> {
        let mut out = Vec::new();
        while let Ok(b) = watch.events.try_recv() {
            out.push(b);
        }
        out
    }

    /// The number of [`write_step`]s.
    const STEPS: usize = 11;

    /// One write of every kind the view applies.
    async fn write_step(s: &SimStore, step: usize, lease: LeaseId) {
        let put = |key: String, value: Vec<u8>| async move {
            s.put(&key, value, 0).await.unwrap();
        };
        match step {
            0 => {
                define_vm(s, &vm("v1"), true).await.unwrap();
            }
            1 => {
                define_vm(s, &vm("v2"), false).await.unwrap();
            }
            // Draining overrides the node's state; `up` gives it back.
            2 => {
                put(
                    keys::admin_key("a"),
                    keys::encode(&admin(NodeState::Draining)),
                )
                .await
            }
            3 => put(keys::admin_key("a"), keys::encode(&admin(NodeState::Up))).await,
            4 => {
                put(
                    keys::admin_key("a"),
                    keys::encode(&admin(NodeState::Paused)),
                )
                .await
            }
            5 => {
                s.delete(&keys::admin_key("a")).await.unwrap();
            }
            // An event outside the inventory moves only the revision.
            6 => put(keys::event_key(1, 0), b"{}".to_vec()).await,
            // A record that does not parse is left out, as a read leaves it out.
            7 => put(keys::vm_key("v2"), b"not json".to_vec()).await,
            8 => put(keys::vm_key("v2"), keys::encode(&vm("v2"))).await,
            9 => {
                let delete = |key| crate::store::Op::Delete { key };
                s.txn(Txn {
                    when: vec![],
                    then: vec![delete(keys::vm_key("v1")), delete(keys::owner_key("v1"))],
                    otherwise: vec![],
                })
                .await
                .unwrap();
            }
            // The node's lease ends: its key goes.
            _ => s.lease_revoke(lease).await.unwrap(),
        }
    }

    #[tokio::test]
    async fn applied_batches_equal_a_fresh_read_after_every_write_and_the_revision_only_grows() {
        let store = SimStore::new();
        let lease = store.lease_grant(Duration::from_secs(5)).await.unwrap();
        store
            .put(&keys::node_key("a"), keys::encode(&node("a")), lease)
            .await
            .unwrap();
        let mut inv = direct(&store).await;
        let mut watch = store
            .watch_prefix(keys::ROOT, inv.revision + 1)
            .await
            .unwrap();
        let mut last = inv.revision;
        // Each step writes, then the view applies what the watch delivered.
        for step in 0..STEPS {
            write_step(&store, step, lease).await;
            let batches = drain(&mut watch);
            assert!(!batches.is_empty());
            for b in &batches {
                inv.apply(b);
            }
            assert!(inv.revision > last, "the revision grows");
            last = inv.revision;
            assert_eq!(inv, direct(&store).await);
        }
        // A batch replayed (already in the view) changes nothing, the revision stays.
        define_vm(&store, &vm("v3"), true).await.unwrap();
        let batches = drain(&mut watch);
        for b in &batches {
            inv.apply(b);
        }
        let before = inv.clone();
        for b in &batches {
            assert!(!inv.apply(b));
        }
        assert_eq!(inv, before);
        assert_eq!(inv, direct(&store).await);
    }

    #[tokio::test]
    async fn a_transaction_arrives_as_one_batch() {
        let store = SimStore::new();
        let mut watch = store.watch_prefix(keys::ROOT, 0).await.unwrap();
        let ops = (0..5)
            .map(|i| crate::store::Op::Put {
                key: keys::vm_key(&format!("v{i}")),
                value: keys::encode(&vm(&format!("v{i}"))),
                lease: 0,
            })
            .collect();
        store
            .txn(Txn {
                when: vec![],
                then: ops,
                otherwise: vec![],
            })
            .await
            .unwrap();
        let batches = drain(&mut watch);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].len(), 5);
    }

    /// Before each of its first `races` watches, a write: the watch's start revision
    /// is gone (the simulated store keeps no history, as a compacted etcd), so the
    /// view must read again.
    #[derive(Clone)]
    struct Races {
        store: SimStore,
        left: Arc<AtomicUsize>,
    }

    impl Hooks for Races {
        async fn before_watch(&self) -> StoreResult<()> {
            let left = self.left.load(Ordering::SeqCst);
            if left > 0 {
                self.left.store(left - 1, Ordering::SeqCst);
                define_vm(&self.store, &vm(&format!("raced{left}")), true).await?;
            }
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_whose_start_is_gone_makes_the_view_read_again() {
        let store = SimStore::new();
        define_vm(&store, &vm("v1"), true).await.unwrap();
        let races = Arc::new(AtomicUsize::new(2));
        let racing = HookedStore {
            inner: store.clone(),
            hook: Races {
                store: store.clone(),
                left: races.clone(),
            },
        };
        let view = View::start(racing);
        let waited = std::time::Instant::now();
        while races.load(Ordering::SeqCst) > 0 || view.stats().lists < 3 {
            assert!(waited.elapsed() < WAIT, "the view did not read again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        view.catch_up(&store, WAIT).await.unwrap();
        let stats = view.stats();
        assert_eq!(stats.lists, 3, "two watches refused, three reads");
        let inv = view.get().unwrap();
        assert_eq!(inv, direct(&store).await);
        assert!(inv.snapshot.vms.contains_key("raced1"));
        assert!(inv.snapshot.vms.contains_key("raced2"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_view_follows_writes_and_reads_again_after_its_watch_ended() {
        let store = SimStore::new();
        let client = store.client();
        let view = View::start(client.clone());
        view.catch_up(&store, WAIT).await.unwrap();
        let mut seen = Vec::new();
        for i in 0..20 {
            let at = define_vm(&store, &vm(&format!("v{i}")), true)
                .await
                .unwrap();
            // Read-your-writes: waiting for the write's revision shows it.
            view.wait_for(at, WAIT).await.unwrap();
            let has = view
                .with(|inv| inv.snapshot.vms.contains_key(&format!("v{i}")))
                .unwrap();
            assert!(has);
            seen.push(view.revision().unwrap());
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(view.stats().lists, 1, "followed, not read again");
        // Cut off: the watch ends; writes meanwhile are found by the next read.
        client.set_reachable(false);
        for i in 20..25 {
            define_vm(&store, &vm(&format!("v{i}")), true)
                .await
                .unwrap();
        }
        store.delete(&keys::vm_key("v3")).await.unwrap();
        client.set_reachable(true);
        view.catch_up(&store, WAIT).await.unwrap();
        assert_eq!(view.stats().lists, 2);
        assert_eq!(view.get().unwrap(), direct(&store).await);
        assert!(view.revision().unwrap() >= *seen.last().unwrap());
    }

    #[tokio::test]
    async fn a_view_not_at_a_revision_says_where_it_is() {
        let store = SimStore::new();
        define_vm(&store, &vm("v1"), true).await.unwrap();
        let view = View::start(store.clone());
        let at = view.catch_up(&store, WAIT).await.unwrap();
        match view.wait_for(at + 10, Duration::from_millis(50)).await {
            Err(ViewError::Behind { at: a, wanted }) => {
                assert_eq!((a, wanted), (at, at + 10));
            }
            other => panic!("expected Behind, got {other:?}"),
        }
    }

    #[test]
    fn a_list_shows_owners_and_tokens_as_the_api_did() {
        let mut snap = Snapshot::default();
        let kv = |key: String, value: Vec<u8>, rev: Revision, lease: LeaseId| KeyValue {
            key,
            value,
            mod_revision: rev,
            create_revision: rev,
            lease,
        };
        snap.apply_put(&kv(keys::node_key("a"), keys::encode(&node("a")), 2, 7));
        for (i, name) in ["x", "y", "z"].iter().enumerate() {
            snap.apply_put(&kv(keys::vm_key(name), keys::encode(&vm(name)), 3, 0));
            let owner = match i {
                0 => OwnerRecord::Node {
                    node: "a".into(),
                    lease: 7,
                },
                1 => OwnerRecord::Node {
                    node: "a".into(),
                    lease: 6,
                },
                _ => OwnerRecord::Unowned(Unowned::Off),
            };
            snap.apply_put(&kv(
                keys::owner_key(name),
                keys::encode(&owner),
                10 + i as i64,
                0,
            ));
        }
        snap.apply_put(&kv(keys::vm_key("zz"), keys::encode(&vm("zz")), 4, 0));
        let v = serde_json::to_value(list(&snap, 12)).unwrap();
        assert_eq!(v["revision"], 12);
        assert_eq!(v["nodes"][0]["name"], "a");
        assert_eq!(v["nodes"][0]["state"], "up");
        assert_eq!(
            v["vms"][0]["owner"],
            serde_json::json!({"node": "a", "alive": true})
        );
        assert_eq!(v["vms"][0]["fencing_token"], 10);
        assert_eq!(
            v["vms"][1]["owner"],
            serde_json::json!({"node": "a", "alive": false})
        );
        assert_eq!(v["vms"][2]["owner"], "off");
        assert_eq!(v["vms"][3]["name"], "zz");
        assert_eq!(v["vms"][3]["owner"], serde_json::Value::Null);
        assert_eq!(v["vms"][3]["fencing_token"], serde_json::Value::Null);
    }
}
