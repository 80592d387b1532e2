//! A cluster node's part of drains and fail-backs (`cluster::drain`): it carries out
//! the moves whose source it is, as live migrations over the vireod-to-vireod path
//! (mutual TLS to the destination's peer listener), and receives the moves whose
//! destination it is.
//!
//! Source, per move (High first, a bounded number at once per source and per
//! destination, see `cluster::drain::next_moves`):
//! 1. checks it still owns the VM, then in one transaction rewrites its ownership
//!    record unchanged — the VM's fencing token grows —, marks the move migrating and
//!    takes a slot of the destination (`cluster::intake`: none free, or another source
//!    took it meanwhile, and the move stays queued);
//! 2. live-migrates the VM to the destination's vireod;
//! 3. committed: moves the ownership to the destination (compare-and-swap on the
//!    record's revision and the destination's lease); not committed: the VM runs here
//!    again, still owned here, and the move is failed with the migration's error.
//!
//! Destination ([`IncomingGuard`]): a clustered VM is admitted only for a migrating
//! move to this node from the peer host that sends it; its disks get the grown token
//! and its VMM this node's write lease, renewed while it arrives. Once the ownership
//! names this node the node loop adopts the running VM instead of starting it; a VM
//! that arrived for a move that then failed is killed and removed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster::drain::{self, MovesView};
use cluster::failover::Snapshot;
use cluster::keys::{self, MoveRecord, MoveState, NodeState, OwnerRecord};
use cluster::store::{CmpOp, Compare, Op, Revision, Txn};
use cluster::{ClusterStore, EtcdStore};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};
use vireo_util::sync::lock;

use crate::cluster_lease::{monotonic_ns, MonotonicBase};
use crate::model::{MigrateRequest, MigrationState, VmDefinition};
use crate::supervisor::{IncomingGuard, Supervisor};
use crate::AgentError;

/// How often the source follows its migrations' progress.
const TICK: Duration = Duration::from_millis(200);

/// How long the executor waits for a change of the moves (or an execution ending)
/// before it looks again anyway: what changes no move record (the node loop starting,
/// a VM arriving) is seen within this.
const IDLE: Duration = Duration::from_secs(1);

/// What the node loop, the move executor and the incoming guard share.
#[derive(Default)]
pub struct MoveShared {
    /// VMs arriving by a move (admitted, not adopted yet): under this node's lease.
    incoming: Mutex<BTreeSet<String>>,
    /// The moves this node runs as their source.
    outgoing: Mutex<BTreeSet<String>>,
    /// The node's fencing deadline, once its loop runs.
    deadline: Mutex<Option<(MonotonicBase, watch::Receiver<Option<Duration>>)>>,
    /// The VMs under the node's lease, as the node loop last published them.
    owned: Mutex<Vec<String>>,
    /// The write-lease pusher's list.
    leased: Mutex<Option<watch::Sender<Vec<String>>>>,
    /// VMs that left by a migration whose ownership did not follow: the node loop
    /// forgets them as running (it starts them again while it owns them).
    lost: Mutex<BTreeSet<String>>,
    /// VMs this node is saving (`cluster_save`): their VMMs ending is the save's.
    pub(crate) saving: Mutex<BTreeSet<String>>,
}

pub type Shared = Arc<MoveShared>;

impl MoveShared {
    /// The node loop's clock and deadlines, and the pusher's list.
    pub fn attach(
        &self,
        clock: MonotonicBase,
        deadlines: watch::Receiver<Option<Duration>>,
        leased: watch::Sender<Vec<String>>,
    ) {
        *lock(&self.deadline) = Some((clock, deadlines));
        *lock(&self.leased) = Some(leased);
    }

    /// The node's fencing deadline on `CLOCK_MONOTONIC`, if still ahead.
    fn deadline_ns(&self) -> Option<u64> {
        let d = lock(&self.deadline);
        let (clock, rx) = d.as_ref()?;
        let at = (*rx.borrow())?;
        Some(clock.at(at)).filter(|ns| *ns > monotonic_ns())
    }

    /// Tells the pusher the VMs under the lease: `owned` (the node loop's) and those
    /// arriving.
    pub fn publish(&self, owned: Option<Vec<String>>) {
        if let Some(o) = owned {
            *lock(&self.owned) = o;
        }
        let mut all: BTreeSet<String> = lock(&self.owned).iter().cloned().collect();
        all.extend(lock(&self.incoming).iter().cloned());
        let all: Vec<String> = all.into_iter().collect();
        if let Some(tx) = lock(&self.leased).as_ref() {
            tx.send_if_modified(|l| {
                let changed = *l != all;
                *l = all;
                changed
            });
        }
    }

    /// Whether `vm` arrived by a move and waits for adoption (forgotten by the call).
    pub fn take_incoming(&self, vm: &str) -> bool {
        lock(&self.incoming).remove(vm)
    }

    /// Whether this node is moving `vm` away: its VMM ending is the move's, not a
    /// crash to restart from.
    pub fn moving_out(&self, vm: &str) -> bool {
        lock(&self.outgoing).contains(vm)
    }

    /// The VMs that left without their ownership (see `lost`), forgotten by the call.
    pub fn take_lost(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.lost)).into_iter().collect()
    }
}

/// The destination's check (see the module doc).
pub struct Guard {
    pub store: EtcdStore,
    pub node: String,
    pub shared: Shared,
}

/// How often the destination reads the store before it refuses a move for want of an
/// answer: a read is safe to repeat, and a move refused for one slow answer (a loaded
/// host, an etcd election) fails the whole drain's step.
const GUARD_READS: usize = 3;

impl Guard {
    /// `key`, read up to [`GUARD_READS`] times while the store does not answer.
    async fn read(
        &self,
        key: &str,
    ) -> Result<Option<cluster::store::KeyValue>, cluster::StoreError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.store.get(key).await {
                Err(cluster::StoreError::Unavailable(why)) if tries < GUARD_READS => {
                    warn!(key, error = %why, "cluster store slow to answer an arriving VM's check; asking again");
                }
                r => return r,
            }
        }
    }

    async fn check(
        &self,
        name: &str,
        def: &mut VmDefinition,
        from_peer: Option<&str>,
    ) -> Result<(), AgentError> {
        let refuse = |m: String| Err(AgentError::BadMigration(m));
        let unavailable =
            |e: cluster::StoreError| AgentError::BadMigration(format!("cluster store: {e}"));
        let defined = self
            .read(&keys::vm_key(name))
            .await
            .map_err(unavailable)?
            .is_some();
        let tokened = def.config.disks.iter().any(|d| d.fencing_token.is_some())
            || def.config.write_lease.is_some();
        if !defined && !tokened {
            return Ok(());
        }
        let Some(peer) = from_peer else {
            return refuse(format!(
                "{name} is a clustered VM: it arrives only from a peer node, by a move"
            ));
        };
        let mv = self
            .read(&keys::move_key(name))
            .await
            .map_err(unavailable)?
            .and_then(|kv| keys::decode::<MoveRecord>(&kv.value));
        match &mv {
            Some(m) if m.state == MoveState::Migrating && m.to == self.node && m.from == peer => {}
            _ => {
                return refuse(format!(
                    "{name} is a clustered VM and no move of it from {peer} to {} is in progress",
                    self.node
                ))
            }
        }
        let owner = self
            .read(&keys::owner_key(name))
            .await
            .map_err(unavailable)?;
        let token = match owner
            .as_ref()
            .and_then(|kv| Some((keys::decode::<OwnerRecord>(&kv.value)?, kv.mod_revision)))
        {
            Some((OwnerRecord::Node { node, .. }, rev)) if node == peer => rev,
            _ => return refuse(format!("{name}: {peer} does not own it")),
        };
        let Some(deadline) = self.shared.deadline_ns() else {
            return refuse(format!("{}: fenced (no cluster lease now)", self.node));
        };
        let token =
            u64::try_from(token).map_err(|_| AgentError::BadMigration("bad token".into()))?;
        for d in &mut def.config.disks {
            d.fencing_token = Some(token);
        }
        def.config.write_lease = Some(api::WriteLease {
            deadline_monotonic_ns: deadline,
        });
        lock(&self.shared.incoming).insert(name.to_string());
        self.shared.publish(None);
        info!(
            vm = name,
            from = peer,
            token,
            "admitting a clustered VM moved here"
        );
        Ok(())
    }
}

impl IncomingGuard for Guard {
    fn admit<'a>(
        &'a self,
        name: &'a str,
        def: &'a mut VmDefinition,
        from_peer: Option<&'a str>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), AgentError>> + Send + 'a>>
    {
        Box::pin(self.check(name, def, from_peer))
    }
}

/// The source side: starts this node's queued moves and ends its drain.
pub struct Executor {
    pub store: EtcdStore,
    /// Every move, kept by a watch: a pass runs when one changes (or an execution
    /// ends), not on a timer that reads them all.
    pub moves: MovesView,
    /// Wakes the executor when one of its executions ended (its slot is free).
    pub wake: Notify,
    pub node: String,
    pub sup: Arc<Supervisor>,
    pub shared: Shared,
    /// When this vireod started carrying out moves (ms since the epoch).
    pub since_ms: u64,
    /// When the pass last did its housekeeping (abandoned sources, failed arrivals):
    /// it reads the store, and passes run on every change of any move, so it runs at
    /// most once per [`IDLE`].
    pub housekept: Mutex<Option<std::time::Instant>>,
}

impl Executor {
    pub async fn run(self: Arc<Self>) {
        let mut changes = self.moves.changes();
        loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        // The view's task ended (vireod stops): no busy loop meanwhile.
                        tokio::time::sleep(IDLE).await;
                    }
                }
                () = self.wake.notified() => {}
                () = tokio::time::sleep(IDLE) => {}
            }
            if self.shared.deadline_ns().is_none() {
                continue;
            }
            let Some(moves) = self.moves.with(|t| t.moves.clone()) else {
                continue;
            };
            if let Err(e) = self.tick(&moves).await {
                warn!(error = %e, "cluster moves: pass failed");
            }
        }
    }

    async fn tick(
        self: &Arc<Self>,
        moves: &BTreeMap<String, (MoveRecord, Revision)>,
    ) -> Result<(), cluster::StoreError> {
        for (vm, (m, rev)) in moves {
            // Migrating from here since before this vireod started: it restarted
            // during the move, which nobody follows any more.
            let before_me = m.started_ms.is_none_or(|t| t < self.since_ms);
            if m.from == self.node && m.state == MoveState::Migrating && before_me {
                let mut m = m.clone();
                m.state = MoveState::Failed;
                m.error = Some("interrupted: the source's vireod restarted during the move".into());
                m.finished_ms = Some(keys::now_ms());
                self.store
                    .txn(Txn {
                        when: vec![Compare::ModRevision {
                            key: keys::move_key(vm),
                            op: CmpOp::Equal,
                            revision: *rev,
                        }],
                        then: vec![Op::Put {
                            key: keys::move_key(vm),
                            value: keys::encode(&m),
                            lease: 0,
                        }],
                        otherwise: vec![],
                    })
                    .await?;
            }
        }
        let housekeeping = {
            let mut last = lock(&self.housekept);
            let due = last.is_none_or(|t| t.elapsed() >= IDLE);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        if housekeeping {
            self.fail_abandoned(moves).await?;
        }
        let running = lock(&self.shared.outgoing).clone();
        for (m, rev) in moves_to_start(moves, &self.node, &running) {
            lock(&self.shared.outgoing).insert(m.vm.clone());
            let me = self.clone();
            tokio::spawn(async move {
                let vm = m.vm.clone();
                me.execute(m, rev).await;
                lock(&me.shared.outgoing).remove(&vm);
                me.wake.notify_one();
            });
        }
        self.end_drain(moves).await?;
        if housekeeping {
            self.forget_failed_arrivals().await?;
        }
        Ok(())
    }

    /// Fails the unfinished moves of sources that left the cluster (`drain::abandoned`):
    /// they would hold their destinations' slots for ever. Read only while another
    /// node's move is unfinished.
    async fn fail_abandoned(
        &self,
        moves: &BTreeMap<String, (MoveRecord, Revision)>,
    ) -> Result<(), cluster::StoreError> {
        let others = moves
            .values()
            .any(|(m, _)| m.from != self.node && !m.state.finished());
        if !others {
            return Ok(());
        }
        let (nodes, _) = self.store.get_prefix(keys::NODES).await?;
        let live: BTreeSet<String> = nodes
            .iter()
            .filter_map(|kv| keys::name_of(keys::NODES, &kv.key).map(String::from))
            .collect();
        for (m, rev) in drain::abandoned(moves, &live) {
            warn!(vm = %m.vm, from = %m.from, "the source of an unfinished move left the cluster: failing the move");
            let why = format!(
                "its source {} left the cluster (its lease ended) before the move ended",
                m.from
            );
            record_failed(&self.store, m, rev, why).await;
        }
        Ok(())
    }

    /// A draining node none of whose drain's moves is unfinished is paused.
    async fn end_drain(
        &self,
        moves: &BTreeMap<String, (MoveRecord, Revision)>,
    ) -> Result<(), cluster::StoreError> {
        // A drain with moves has its records; one without any was paused at once.
        if !moves.values().any(|(m, _)| m.drain_of == self.node) {
            return Ok(());
        }
        let (mut admin, rev) = cluster::admin::read(&self.store, &self.node).await?;
        // Not draining, or its moves are still being written.
        if admin.state != NodeState::Draining || admin.drain.as_ref().is_some_and(|d| d.queueing) {
            return Ok(());
        }
        let unfinished = moves
            .values()
            .any(|(m, _)| m.drain_of == self.node && !m.state.finished());
        if unfinished {
            return Ok(());
        }
        admin.state = NodeState::Paused;
        if cluster::admin::write_if(&self.store, &self.node, &admin, rev, vec![]).await? {
            info!(node = %self.node, "drained: node paused");
        }
        Ok(())
    }

    /// A VM admitted for a move that did not end here (failed, or its ownership did
    /// not move), or whose ownership moved here and away again before the node loop
    /// adopted it (a bulk stop right after a bulk move): killed and removed, it must
    /// not run unowned nor twice.
    async fn forget_failed_arrivals(&self) -> Result<(), cluster::StoreError> {
        let arriving: Vec<String> = lock(&self.shared.incoming).iter().cloned().collect();
        for vm in arriving {
            // Read now, after the VM was admitted (an older read may predate its move).
            let m = self
                .store
                .get(&keys::move_key(&vm))
                .await?
                .and_then(|kv| keys::decode::<MoveRecord>(&kv.value))
                .filter(|m| m.to == self.node);
            let still = match m.map(|m| m.state) {
                // The source has not moved the ownership yet (or is writing it).
                Some(MoveState::Migrating) => true,
                // Moved: the ownership came here; kept only while it stays.
                Some(MoveState::Moved) => self
                    .store
                    .get(&keys::owner_key(&vm))
                    .await?
                    .and_then(|kv| keys::decode::<OwnerRecord>(&kv.value))
                    .is_some_and(
                        |o| matches!(o, OwnerRecord::Node { node, .. } if node == self.node),
                    ),
                _ => false,
            };
            if still && self.sup.get(&vm).is_ok() {
                continue;
            }
            lock(&self.shared.incoming).remove(&vm);
            self.shared.publish(None);
            if self.sup.get(&vm).is_ok() {
                warn!(vm, "a VM that arrived for a move that failed, or that this node no longer owns: removing it");
                let _ = self.sup.kill(&vm).await;
                let _ = self.sup.delete(&vm);
            }
        }
        Ok(())
    }

    async fn fail(&self, m: MoveRecord, known: Revision, why: String) {
        warn!(vm = %m.vm, to = %m.to, error = %why, "move failed; the VM stays here");
        record_failed(&self.store, m, known, why).await;
    }

    async fn execute(&self, mut m: MoveRecord, move_rev: Revision) {
        // The few records this move checks, not the whole cluster (a drain of 64
        // VMs read every VM's records 64 times).
        let snap = match Snapshot::read_some(&self.store, &[&self.node, &m.to], &[&m.vm]).await {
            Ok(s) => s,
            // Nothing done yet: the move stays queued, the next pass tries it again.
            Err(e) => {
                warn!(vm = %m.vm, error = %e, "cluster store: the move waits for the next pass");
                return;
            }
        };
        let Some((_, my_lease)) = snap.nodes.get(&self.node) else {
            return self
                .fail(m, move_rev, "this node is not in the cluster".into())
                .await;
        };
        let (owner, token_before) = match snap.owners.get(&m.vm) {
            Some((o @ OwnerRecord::Node { node, lease }, rev))
                if *node == self.node && lease == my_lease =>
            {
                (o.clone(), *rev)
            }
            _ => {
                return self
                    .fail(m, move_rev, "not owned by this node".into())
                    .await
            }
        };
        let to = m.to.clone();
        let dest = match snap.nodes.get(&to) {
            Some((r, lease)) if r.state == NodeState::Up => match &r.peer_url {
                Some(url) => (url.clone(), *lease),
                None => {
                    return self
                        .fail(m, move_rev, format!("{to} has no peer URL"))
                        .await
                }
            },
            Some((r, _)) => {
                return self
                    .fail(m, move_rev, format!("{to} is {:?}, not up", r.state))
                    .await
            }
            None => {
                return self
                    .fail(m, move_rev, format!("{to} is not in the cluster"))
                    .await
            }
        };
        // A slot at the destination (its limit on moves arriving at once), taken in
        // the same transaction: none free, the move stays queued for a later pass.
        let slot = match cluster::intake::reserve(&self.store, &m).await {
            Ok(Some(slot)) => slot,
            Ok(None) => {
                debug!(vm = %m.vm, to = %m.to, "destination takes no more moves now: the move waits");
                return;
            }
            Err(e) => {
                warn!(vm = %m.vm, error = %e, "cluster store: the move waits for the next pass");
                return;
            }
        };
        let slot_rev = slot.revision;
        // The token grows before the VM moves: the destination's disks get the new one.
        m.state = MoveState::Migrating;
        m.token_before = Some(token_before);
        m.started_ms = Some(keys::now_ms());
        let okey = keys::owner_key(&m.vm);
        let bumped = self
            .store
            .txn(Txn {
                when: vec![
                    Compare::ModRevision {
                        key: okey.clone(),
                        op: CmpOp::Equal,
                        revision: token_before,
                    },
                    Compare::ModRevision {
                        key: keys::move_key(&m.vm),
                        op: CmpOp::Equal,
                        revision: move_rev,
                    },
                    Compare::Lease {
                        key: keys::node_key(&self.node),
                        op: CmpOp::Equal,
                        lease: *my_lease,
                    },
                    slot.compare,
                ],
                then: vec![
                    Op::Put {
                        key: okey.clone(),
                        value: keys::encode(&owner),
                        lease: 0,
                    },
                    Op::Put {
                        key: keys::move_key(&m.vm),
                        value: keys::encode(&m),
                        lease: 0,
                    },
                    slot.put,
                ],
                otherwise: vec![],
            })
            .await;
        let token = match bumped {
            Ok(o) if o.succeeded => o.revision,
            Ok(_) => {
                // Another source took the destination's slot meanwhile: not started,
                // still queued.
                if cluster::intake::moved(&self.store, &m.to, slot_rev)
                    .await
                    .unwrap_or(true)
                {
                    debug!(vm = %m.vm, to = %m.to, "another move took the destination's slot: the move waits");
                    return;
                }
                return self
                    .fail(m, move_rev, "the VM's ownership changed".into())
                    .await;
            }
            // No answer: the transaction may have committed. Landed, the move goes on
            // under its token; not, nothing was written and the move stays queued.
            Err(e) => match landed(&self.store, &m).await {
                Ok(Some(token)) => token,
                Ok(None) => {
                    warn!(vm = %m.vm, error = %e, "cluster store: the move waits for the next pass");
                    return;
                }
                Err(_) => return self.fail(m, move_rev, format!("cluster store: {e}")).await,
            },
        };
        info!(vm = %m.vm, to = %m.to, token, "moving a clustered VM");
        let req = MigrateRequest {
            destination_agent: Some(dest.0.clone()),
            destination_name: Some(m.to.clone()),
            ..Default::default()
        };
        let rec = match self.sup.migrate(&m.vm, req) {
            Ok(r) => r,
            Err(e) => return self.fail(m, token, crate::error_chain(&e)).await,
        };
        let end = loop {
            tokio::time::sleep(TICK).await;
            match self.sup.migration(&rec.id) {
                Ok(r) if r.state.finished() => break Ok(r),
                Ok(_) => {}
                Err(e) => break Err(crate::error_chain(&e)),
            }
        };
        let end = match end {
            Ok(r) => r,
            Err(e) => return self.fail(m, token, e).await,
        };
        if end.state != MigrationState::Completed {
            let why = end
                .error
                .unwrap_or_else(|| format!("migration {:?}", end.state));
            return self
                .fail(m, token, format!("migration {}: {why}", rec.id))
                .await;
        }
        // Committed: the destination runs it; ownership follows.
        let to = OwnerRecord::Node {
            node: m.to.clone(),
            lease: dest.1,
        };
        let moved = self
            .store
            .txn(Txn {
                when: vec![
                    Compare::ModRevision {
                        key: okey.clone(),
                        op: CmpOp::Equal,
                        revision: token,
                    },
                    Compare::Lease {
                        key: keys::node_key(&m.to),
                        op: CmpOp::Equal,
                        lease: dest.1,
                    },
                ],
                then: vec![Op::Put {
                    key: okey,
                    value: keys::encode(&to),
                    lease: 0,
                }],
                otherwise: vec![],
            })
            .await;
        match moved {
            Ok(o) if o.succeeded => {
                m.state = MoveState::Moved;
                m.token_after = Some(token);
                m.finished_ms = Some(keys::now_ms());
                info!(vm = %m.vm, to = %m.to, token = o.revision, "clustered VM moved");
                if let Err(e) = self
                    .store
                    .put(&keys::move_key(&m.vm), keys::encode(&m), 0)
                    .await
                {
                    warn!(vm = %m.vm, error = %e, "cannot record the move");
                }
            }
            // The VM left this host, but the cluster still names this node (or no one
            // it chose): the destination drops its copy, and whoever owns the VM
            // starts it (this node's loop, when it is this node).
            Ok(_) => {
                lock(&self.shared.lost).insert(m.vm.clone());
                self.fail(
                    m,
                    token,
                    "migrated, but the ownership changed meanwhile: the destination drops its copy"
                        .into(),
                )
                .await
            }
            Err(e) => {
                lock(&self.shared.lost).insert(m.vm.clone());
                self.fail(m, token, format!("migrated, but cluster store: {e}"))
                    .await
            }
        }
    }
}

/// The moves `node` starts now, `running` being those its executions carry out. One
/// of them is not started again, even while the record read still shows it queued
/// (its execution has not written yet: a slow store); two executions of one move had
/// the loser record it failed over the winner's migration, and the destination
/// dropped the arriving VM. It still counts for the priority order and the
/// concurrency: Low waits while High moves.
fn moves_to_start(
    moves: &BTreeMap<String, (MoveRecord, Revision)>,
    node: &str,
    running: &BTreeSet<String>,
) -> Vec<(MoveRecord, Revision)> {
    drain::next_moves(moves, node, running.len())
        .into_iter()
        .filter(|(m, _)| !running.contains(&m.vm))
        .collect()
}

/// Records `m` as failed, if the record is still this execution's: the one it read
/// (`known`, its revision), or its own Migrating write (same source and start) that
/// landed although the store's answer was lost. A record another execution or node
/// changed since is left as it is: a failure written over a move that goes on has the
/// destination drop the VM it is receiving.
/// Whether the transaction that started move `m` (its record `Migrating`, with this
/// start time) committed although its answer was lost: the revision it committed at
/// (the VM's new fencing token), or `None` when the record is not that write.
async fn landed<S: ClusterStore>(
    store: &S,
    m: &MoveRecord,
) -> Result<Option<Revision>, cluster::StoreError> {
    let found = store.get(&keys::move_key(&m.vm)).await?;
    Ok(found.and_then(|kv| {
        keys::decode::<MoveRecord>(&kv.value)
            .filter(|r| {
                r.state == MoveState::Migrating
                    && r.from == m.from
                    && r.started_ms == m.started_ms
                    && r.token_before == m.token_before
            })
            .map(|_| kv.mod_revision)
    }))
}

async fn record_failed<S: ClusterStore>(
    store: &S,
    mut m: MoveRecord,
    known: Revision,
    why: String,
) {
    let key = keys::move_key(&m.vm);
    let (from, started) = (m.from.clone(), m.started_ms);
    m.state = MoveState::Failed;
    m.error = Some(why);
    m.finished_ms = Some(keys::now_ms());
    let mut rev = known;
    // Twice at most: the record as known, then as found if it is this execution's.
    for _ in 0..2 {
        let written = store
            .txn(Txn {
                when: vec![Compare::ModRevision {
                    key: key.clone(),
                    op: CmpOp::Equal,
                    revision: rev,
                }],
                then: vec![Op::Put {
                    key: key.clone(),
                    value: keys::encode(&m),
                    lease: 0,
                }],
                otherwise: vec![],
            })
            .await;
        match written {
            Ok(o) if o.succeeded => return,
            Ok(_) => {}
            Err(e) => {
                warn!(vm = %m.vm, error = %e, "cannot record the failed move");
                return;
            }
        }
        let found = match store.get(&key).await {
            Ok(Some(kv)) => kv,
            Ok(None) => return,
            Err(e) => {
                warn!(vm = %m.vm, error = %e, "cannot record the failed move");
                return;
            }
        };
        let ours = keys::decode::<MoveRecord>(&found.value).is_some_and(|r| {
            r.state == MoveState::Migrating && r.from == from && r.started_ms == started
        });
        if !ours {
            warn!(vm = %m.vm, "the move's record changed meanwhile: its failure is not recorded over it");
            return;
        }
        rev = found.mod_revision;
    }
}

#[cfg(test)]
#[path = "cluster_moves_tests.rs"]
mod tests;
