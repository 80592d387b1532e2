//! The failover controller: finds VMs whose owner is dead, waits the dead margin on its
//! own clock, plans with [`crate::placement`] and writes each decision as a
//! compare-and-swap on the VM's ownership key (up to [`BATCH`] decisions in one
//! transaction, all or none).
//!
//! An owner (node, lease) is dead when `vireo/nodes/NODE` is no longer attached to that
//! lease (the lease expired, or the node joined again with a new one). Every transaction
//! that takes a VM from a dead owner checks exactly that *in the store*, together with
//! the ownership key's revision, so a controller acting on a stale snapshot changes
//! nothing. Any live node may run the controller; the transactions decide. vireod
//! runs its passes on the first [`CONTROLLERS`] live nodes by name
//! ([`Controller::among_first`]), and a pass reads the cluster again only once the
//! store's revision moved.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tracing::{info, warn};

use crate::admin::{self, DepartureWatch};
use crate::keys::{
    self, ClusterEvent, NodeAdmin, NodeRecord, NodeState, OwnerRecord, Priority, Unowned,
    VmDefinition,
};
use crate::membership::Timing;
use crate::placement::{self, Decision, NodeView, Reason, VmView};
use crate::store::{
    ClusterStore, CmpOp, Compare, KeyValue, LeaseId, Op, Revision, StoreResult, Txn,
};

/// One view of the cluster, read from the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Live nodes: name → (record, lease).
    pub nodes: BTreeMap<String, (NodeRecord, LeaseId)>,
    pub vms: BTreeMap<String, VmDefinition>,
    /// VM → (ownership, the key's revision).
    pub owners: BTreeMap<String, (OwnerRecord, Revision)>,
    /// Node → (its admin record, the key's revision). A live node's record state is
    /// the admin state when that is not `up` (draining, paused, quarantined).
    pub admin: BTreeMap<String, (NodeAdmin, Revision)>,
    /// Each live node's state as it registered it (before an admin state overrides
    /// it): what it is again when its admin record says `up` or goes.
    registered: BTreeMap<String, NodeState>,
}

impl Snapshot {
    /// Reads nodes, VMs and owners.
    pub async fn read<S: ClusterStore>(store: &S) -> StoreResult<Snapshot> {
        Ok(Self::read_at(store).await?.0)
    }

    /// [`Snapshot::read`], and the revision of its first read: while the store's
    /// revision is still that one, nothing in it changed.
    pub async fn read_at<S: ClusterStore>(store: &S) -> StoreResult<(Snapshot, Revision)> {
        let (nodes, read_at) = store.get_prefix(keys::NODES).await?;
        let (vms, _) = store.get_prefix(keys::VMS).await?;
        let (owners, _) = store.get_prefix(keys::OWNERS).await?;
        let (admin, _) = store.get_prefix(keys::ADMIN).await?;
        Ok((Self::decode(nodes, vms, owners, admin), read_at))
    }

    /// The four prefixes read at one revision (the first read's), and that revision:
    /// the cluster exactly as it was then. A revision compacted meanwhile is
    /// [`crate::StoreError::Refused`]: read again.
    pub async fn read_consistent<S: ClusterStore>(store: &S) -> StoreResult<(Snapshot, Revision)> {
        let (nodes, at) = store.get_prefix_at(keys::NODES, 0).await?;
        let (vms, _) = store.get_prefix_at(keys::VMS, at).await?;
        let (owners, _) = store.get_prefix_at(keys::OWNERS, at).await?;
        let (admin, _) = store.get_prefix_at(keys::ADMIN, at).await?;
        Ok((Self::decode(nodes, vms, owners, admin), at))
    }

    /// A part of the cluster, read key by key: the records (and admin records) of
    /// `nodes` and the ownership records of `vms` — what one drain move checks, at the
    /// cost of a few single-key reads instead of every VM's records. Each key is read
    /// as it is now (not all at one revision): a decision made from it is guarded by
    /// its transaction's comparisons.
    pub async fn read_some<S: ClusterStore>(
        store: &S,
        nodes: &[&str],
        vms: &[&str],
    ) -> StoreResult<Snapshot> {
        let mut snap = Snapshot::default();
        for node in nodes {
            for key in [keys::admin_key(node), keys::node_key(node)] {
                if let Some(kv) = store.get(&key).await? {
                    snap.apply_put(&kv);
                }
            }
        }
        for vm in vms {
            if let Some(kv) = store.get(&keys::owner_key(vm)).await? {
                snap.apply_put(&kv);
            }
        }
        Ok(snap)
    }

    /// The snapshot of these records (each prefix's keys); a record that does not
    /// parse is left out, logged.
    pub fn decode(
        nodes: Vec<KeyValue>,
        vms: Vec<KeyValue>,
        owners: Vec<KeyValue>,
        admin: Vec<KeyValue>,
    ) -> Snapshot {
        let mut snap = Snapshot::default();
        for kv in nodes.into_iter().chain(vms).chain(owners).chain(admin) {
            snap.apply_put(&kv);
        }
        snap
    }

    /// One record as written (`kv`): its entry replaced, or removed when the value
    /// does not parse (logged). Keys outside the four prefixes are ignored. A node's
    /// state is its admin record's when that is not `up`, whichever came first.
    pub fn apply_put(&mut self, kv: &KeyValue) {
        let key = kv.key.as_str();
        if let Some(name) = keys::name_of(keys::NODES, key) {
            match keys::decode::<NodeRecord>(&kv.value) {
                Some(mut r) => {
                    self.registered.insert(name.to_string(), r.state);
                    if let Some((a, _)) = self.admin.get(name) {
                        if a.state != NodeState::Up {
                            r.state = a.state;
                        }
                    }
                    self.nodes.insert(name.to_string(), (r, kv.lease));
                }
                None => {
                    warn!(key, "ignoring a node record that does not parse");
                    self.remove_node(name);
                }
            }
        } else if let Some(name) = keys::name_of(keys::ADMIN, key) {
            match keys::decode::<NodeAdmin>(&kv.value) {
                Some(a) => {
                    let own = self.registered.get(name).copied();
                    if let (Some((r, _)), Some(own)) = (self.nodes.get_mut(name), own) {
                        r.state = if a.state == NodeState::Up {
                            own
                        } else {
                            a.state
                        };
                    }
                    self.admin.insert(name.to_string(), (a, kv.mod_revision));
                }
                None => {
                    warn!(key, "ignoring a node admin record that does not parse");
                    self.remove_admin(name);
                }
            }
        } else if let Some(name) = keys::name_of(keys::VMS, key) {
            match keys::decode::<VmDefinition>(&kv.value) {
                Some(d) => {
                    self.vms.insert(name.to_string(), d);
                }
                None => {
                    warn!(key, "ignoring a VM definition that does not parse");
                    self.vms.remove(name);
                }
            }
        } else if let Some(name) = keys::name_of(keys::OWNERS, key) {
            match keys::decode::<OwnerRecord>(&kv.value) {
                Some(o) => {
                    self.owners.insert(name.to_string(), (o, kv.mod_revision));
                }
                None => {
                    warn!(key, "ignoring an ownership record that does not parse");
                    self.owners.remove(name);
                }
            }
        }
    }

    /// One key deleted. Keys outside the four prefixes are ignored.
    pub fn apply_delete(&mut self, key: &str) {
        if let Some(name) = keys::name_of(keys::NODES, key) {
            self.remove_node(name);
        } else if let Some(name) = keys::name_of(keys::ADMIN, key) {
            self.remove_admin(name);
        } else if let Some(name) = keys::name_of(keys::VMS, key) {
            self.vms.remove(name);
        } else if let Some(name) = keys::name_of(keys::OWNERS, key) {
            self.owners.remove(name);
        }
    }

    fn remove_node(&mut self, name: &str) {
        self.nodes.remove(name);
        self.registered.remove(name);
    }

    /// A node's admin record gone: its state is the one it registered again.
    fn remove_admin(&mut self, name: &str) {
        self.admin.remove(name);
        let own = self.registered.get(name).copied();
        if let (Some((r, _)), Some(own)) = (self.nodes.get_mut(name), own) {
            r.state = own;
        }
    }

    /// Whether the incarnation (node, lease) is alive.
    pub fn alive(&self, node: &str, lease: LeaseId) -> bool {
        self.nodes.get(node).is_some_and(|(_, l)| *l == lease)
    }
}

pub(crate) fn view(d: &VmDefinition) -> VmView {
    VmView {
        name: d.name.clone(),
        priority: d.priority,
        needs: d.needs,
        preferred_owners: d.preferred_owners.clone(),
        possible_owners: d.possible_owners.clone(),
        anti_affinity: d.anti_affinity.clone(),
    }
}

/// What one controller pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Decisions whose transaction succeeded, in order.
    pub applied: Vec<Decision>,
    /// Decisions a concurrent change made void: those of the first batch that lost
    /// (the pass ends there, and the next plans again).
    pub lost: usize,
}

/// How many nodes run failover passes when each names itself
/// ([`Controller::among_first`]): the first ones by name among the live nodes. More
/// than one, so that one whose passes stall (fenced, store errors, a stalled runtime)
/// leaves others; not every node: each pass of each node read every VM and planned
/// all of them, and every decision was raced by every node (64 nodes placing 4,000
/// VMs: 64 × 4,000 transactions, of which 63 × 4,000 lost).
pub const CONTROLLERS: usize = 3;

/// Decisions written per transaction. Each takes up to three comparisons, and etcd
/// refuses a transaction with more than 128 of a kind (`--max-txn-ops`); one
/// transaction per decision made placing 4,000 VMs take 8,000 round trips.
pub const BATCH: usize = 32;

/// The priority a decision serves: its VM's, or for a preemption the VM it makes
/// room for.
fn priority_of(snap: &Snapshot, d: &Decision) -> Option<Priority> {
    let vm = match d {
        Decision::Place { vm, .. } | Decision::StayOff { vm } | Decision::Wait { vm } => vm,
        Decision::Preempt { for_vm, .. } => for_vm,
    };
    snap.vms.get(vm).map(|def| def.priority)
}

/// The plan in transactions: runs of consecutive decisions of one `class` (the plan
/// is in priority order), each at most `max` long. A higher priority's VMs are owned
/// (and their fencing tokens taken) in a transaction before any lower one's: High
/// first holds across batching.
fn batches<K: PartialEq>(
    plan: &[Decision],
    class: impl Fn(&Decision) -> K,
    max: usize,
) -> Vec<&[Decision]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=plan.len() {
        let split = i == plan.len() || i - start == max || class(&plan[i]) != class(&plan[start]);
        if split {
            out.push(&plan[start..i]);
            start = i;
        }
    }
    out
}

/// One decision's part of a transaction.
struct Write {
    when: Vec<Compare>,
    put: Op,
    event: ClusterEvent,
}

/// The failover controller of one node.
pub struct Controller {
    timing: Timing,
    /// Dead incarnations and when this controller first saw them dead (own clock).
    dead_since: HashMap<(String, LeaseId), Duration>,
    /// With quarantine: the incarnations seen alive, to record ungraceful departures.
    departures: Option<DepartureWatch>,
    /// The last snapshot and the store revision it was read at: a pass reads again only
    /// once the store changed (every node runs a pass every 200 ms; reading every VM
    /// each time was O(nodes × VMs) per pass).
    last: Option<(Revision, Snapshot)>,
    /// Passes run only while this node is among the first `n` live nodes by name.
    among_first: Option<(String, usize)>,
    /// Not among them at this store revision: nothing to do until it moves.
    standby_at: Option<Revision>,
}

impl Controller {
    pub fn new(timing: Timing) -> Self {
        Controller {
            timing,
            dead_since: HashMap::new(),
            departures: None,
            last: None,
            among_first: None,
            standby_at: None,
        }
    }

    /// Runs passes only while `node` is among the first `n` live nodes by name (see
    /// [`CONTROLLERS`]); the others stand by, reading only the store's revision and,
    /// when it moved, the node records. Without it every pass runs.
    pub fn among_first(mut self, node: &str, n: usize) -> Self {
        self.among_first = Some((node.to_string(), n.max(1)));
        self
    }

    /// Whether this controller runs passes with `live` (sorted) nodes.
    fn designated<'a>(&self, mut live: impl Iterator<Item = &'a str>) -> bool {
        match &self.among_first {
            None => true,
            Some((me, n)) => live.by_ref().take(*n).any(|name| name == me),
        }
    }

    /// Not designated at `revision`: forgets what a pass keeps (dead owners' clocks,
    /// departures seen) — when designated again it starts from what it sees then.
    fn stand_by(&mut self, revision: Revision) -> Pass {
        self.standby_at = Some(revision);
        self.dead_since.clear();
        self.last = None;
        if let Some(w) = &mut self.departures {
            *w = DepartureWatch::default();
        }
        Pass::default()
    }

    /// Also records nodes' ungraceful departures and quarantines flapping nodes
    /// ([`crate::admin`]).
    pub fn with_quarantine(mut self) -> Self {
        self.departures = Some(DepartureWatch::default());
        self
    }

    /// One pass at local monotonic time `now`.
    pub async fn step<S: ClusterStore>(&mut self, store: &S, now: Duration) -> StoreResult<Pass> {
        let current = store.current_revision().await?;
        if self.standby_at == Some(current) {
            return Ok(Pass::default());
        }
        self.standby_at = None;
        let (snap, read_at) = match self.last.take() {
            Some((read_at, snap)) if read_at == current => (snap, read_at),
            _ => {
                if self.among_first.is_some() {
                    let (nodes, _) = store.get_prefix(keys::NODES).await?;
                    let live = nodes
                        .iter()
                        .filter_map(|kv| keys::name_of(keys::NODES, &kv.key));
                    if !self.designated(live) {
                        return Ok(self.stand_by(current));
                    }
                }
                Snapshot::read_at(store).await?
            }
        };
        if !self.designated(snap.nodes.keys().map(String::as_str)) {
            return Ok(self.stand_by(read_at));
        }
        let pass = self.pass(store, &snap, now).await;
        self.last = Some((read_at, snap));
        pass
    }

    async fn pass<S: ClusterStore>(
        &mut self,
        store: &S,
        snap: &Snapshot,
        now: Duration,
    ) -> StoreResult<Pass> {
        if let Some(watch) = &mut self.departures {
            let alive = snap
                .nodes
                .iter()
                .map(|(n, (_, l))| (n.clone(), *l))
                .collect();
            let gone = watch.observe(&alive);
            if !gone.is_empty() {
                if let Err(e) = admin::record_departures(store, &gone, keys::now_ms()).await {
                    warn!(error = %e, "cannot record a node's departure");
                }
            }
        }
        let (nodes, to_place, from) = self.work(snap, now);
        let mut pass = Pass::default();
        if to_place.is_empty() {
            return Ok(pass);
        }
        let plan = placement::plan(&nodes, &to_place);
        for batch in batches(&plan, |d| priority_of(snap, d), BATCH) {
            let writes: Option<Vec<Write>> = batch
                .iter()
                .filter_map(|d| Self::write(snap, &from, d))
                .collect();
            let done = match writes {
                Some(writes) => Self::commit(store, writes).await?,
                None => false,
            };
            if !done {
                // The snapshot is stale (another controller, or a node, changed what
                // it planned on): the rest of the plan would mostly lose too. The
                // next pass plans on a fresh read.
                pass.lost += batch.len();
                break;
            }
            pass.applied.extend_from_slice(batch);
        }
        Ok(pass)
    }

    /// The placement inputs: live nodes with what they run, the VMs to place (dead
    /// owners past the margin, pending and preempted VMs), and where each came from.
    #[allow(clippy::type_complexity)]
    fn work(
        &mut self,
        snap: &Snapshot,
        now: Duration,
    ) -> (
        Vec<NodeView>,
        Vec<(VmView, Reason)>,
        HashMap<String, (String, LeaseId)>,
    ) {
        let mut nodes: BTreeMap<&str, NodeView> = snap
            .nodes
            .iter()
            .map(|(name, (r, _))| {
                (
                    name.as_str(),
                    NodeView {
                        name: name.clone(),
                        state: r.state,
                        capacity: r.capacity,
                        running: vec![],
                    },
                )
            })
            .collect();
        let mut to_place = Vec::new();
        let mut from = HashMap::new();
        let mut still_dead = HashMap::new();
        for (vm, (owner, _)) in &snap.owners {
            let Some(def) = snap.vms.get(vm) else {
                continue;
            };
            match owner {
                OwnerRecord::Node { node, lease } if snap.alive(node, *lease) => {
                    if let Some(n) = nodes.get_mut(node.as_str()) {
                        n.running.push(view(def));
                    }
                }
                OwnerRecord::Node { node, lease } => {
                    let id = (node.clone(), *lease);
                    let since = *self.dead_since.get(&id).unwrap_or(&now);
                    still_dead.insert(id.clone(), since);
                    if now >= since + self.timing.dead_margin {
                        to_place.push((view(def), Reason::Failover));
                        from.insert(vm.clone(), id);
                    }
                }
                OwnerRecord::Unowned(Unowned::Pending | Unowned::Preempted) => {
                    to_place.push((view(def), Reason::Start));
                }
                // Off, or saved (its state on the shared storage): placed nowhere
                // until a start asks for it.
                OwnerRecord::Unowned(Unowned::Off | Unowned::Saved) => {}
            }
        }
        self.dead_since = still_dead;
        (nodes.into_values().collect(), to_place, from)
    }

    /// The write of one decision: its comparisons, the ownership record and the
    /// event. `None` for a decision that writes nothing (wait); `Some(None)` for one
    /// the snapshot cannot back (the plan is stale).
    fn write(
        snap: &Snapshot,
        from: &HashMap<String, (String, LeaseId)>,
        d: &Decision,
    ) -> Option<Option<Write>> {
        let (vm, record, action) = match d {
            Decision::Place { vm, node } => {
                let Some((_, lease)) = snap.nodes.get(node) else {
                    return Some(None);
                };
                let record = OwnerRecord::Node {
                    node: node.clone(),
                    lease: *lease,
                };
                (vm, record, "placed")
            }
            Decision::Preempt { vm, .. } => {
                (vm, OwnerRecord::Unowned(Unowned::Preempted), "preempted")
            }
            Decision::StayOff { vm } => (vm, OwnerRecord::Unowned(Unowned::Off), "stays off"),
            Decision::Wait { .. } => return None,
        };
        let Some((_, revision)) = snap.owners.get(vm) else {
            return Some(None);
        };
        let key = keys::owner_key(vm);
        let mut when = vec![Compare::ModRevision {
            key: key.clone(),
            op: CmpOp::Equal,
            revision: *revision,
        }];
        let prior = from.get(vm);
        if let Some((node, lease)) = prior {
            // The old owner's incarnation must be gone in the store, not just here.
            when.push(Compare::Lease {
                key: keys::node_key(node),
                op: CmpOp::NotEqual,
                lease: *lease,
            });
        }
        if let OwnerRecord::Node { node, lease } = &record {
            // The new owner must still be the incarnation we planned for.
            when.push(Compare::Lease {
                key: keys::node_key(node),
                op: CmpOp::Equal,
                lease: *lease,
            });
        }
        let event = ClusterEvent {
            vm: vm.clone(),
            action: action.to_string(),
            from: prior.map(|(n, _)| n.clone()),
            to: match &record {
                OwnerRecord::Node { node, .. } => Some(node.clone()),
                OwnerRecord::Unowned(_) => None,
            },
            // For people reading the log only: no decision depends on it.
            at_ms: Some(keys::now_ms()),
        };
        Some(Some(Write {
            when,
            put: Op::Put {
                key,
                value: keys::encode(&record),
                lease: 0,
            },
            event,
        }))
    }

    /// Writes `writes` in one transaction: all of them, or none when one's
    /// comparisons fail (a concurrent change). Then records their events.
    async fn commit<S: ClusterStore>(store: &S, writes: Vec<Write>) -> StoreResult<bool> {
        if writes.is_empty() {
            return Ok(true);
        }
        let mut txn = Txn::default();
        let mut events = Vec::with_capacity(writes.len());
        for w in writes {
            txn.when.extend(w.when);
            txn.then.push(w.put);
            events.push(w.event);
        }
        let outcome = store.txn(txn).await?;
        if !outcome.succeeded {
            return Ok(false);
        }
        let mut log = Txn::default();
        for (i, ev) in events.iter().enumerate() {
            info!(vm = %ev.vm, action = %ev.action, from = ?ev.from, to = ?ev.to, token = outcome.revision, "failover");
            log.then.push(Op::Put {
                key: keys::event_key(outcome.revision, i),
                value: keys::encode(ev),
                lease: 0,
            });
        }
        // The event log is for people; losing an entry changes no decision.
        if let Err(e) = store.txn(log).await {
            warn!(error = %e, "cannot record the cluster's events");
        }
        Ok(true)
    }
}

/// Defines a clustered VM (or redefines it; ownership is untouched) and, with `start`,
/// asks the cluster to run it (a new VM is pending until the controller places it).
/// Returns the store revision after its writes: a read at (or after) it shows the VM.
pub async fn define_vm<S: ClusterStore>(
    store: &S,
    def: &VmDefinition,
    start: bool,
) -> StoreResult<Revision> {
    let written = store
        .put(&keys::vm_key(&def.name), keys::encode(def), 0)
        .await?;
    let state = if start {
        Unowned::Pending
    } else {
        Unowned::Off
    };
    // Create the ownership key only if it does not exist.
    let created = store
        .txn(Txn {
            when: vec![Compare::ModRevision {
                key: keys::owner_key(&def.name),
                op: CmpOp::Equal,
                revision: 0,
            }],
            then: vec![Op::Put {
                key: keys::owner_key(&def.name),
                value: keys::encode(&OwnerRecord::Unowned(state)),
                lease: 0,
            }],
            otherwise: vec![],
        })
        .await?;
    // The store's revision once both are written: a read at it shows the VM.
    Ok(written.max(created.revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_never_mix_priorities_and_keep_the_plan_order() {
        let d = |vm: &str| Decision::Wait { vm: vm.into() };
        let plan = [d("h1"), d("h2"), d("h3"), d("m1"), d("l1"), d("l2")];
        let class = |d: &Decision| match d {
            Decision::Wait { vm } => vm.chars().next(),
            _ => None,
        };
        let got: Vec<Vec<String>> = batches(&plan, class, 2)
            .iter()
            .map(|b| {
                b.iter()
                    .map(|d| match d {
                        Decision::Wait { vm } => vm.clone(),
                        _ => String::new(),
                    })
                    .collect()
            })
            .collect();
        assert_eq!(
            got,
            [vec!["h1", "h2"], vec!["h3"], vec!["m1"], vec!["l1", "l2"]]
        );
        assert!(batches(&[], class, 2).is_empty());
    }
}
