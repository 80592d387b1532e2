//! The key layout in the store and the records stored under it (JSON). See README.md.
//!
//! | key | value | lease |
//! |---|---|---|
//! | `vireo/nodes/NODE` | [`NodeRecord`] | the node's lease: the key vanishes when it expires |
//! | `vireo/vms/VM` | [`VmDefinition`] | none |
//! | `vireo/owners/VM` | [`OwnerRecord`]; its `mod_revision` is the VM's fencing token | none: it outlives a dead owner, which is how the failover controller finds orphans |
//! | `vireo/events/REVISION-N` | [`ClusterEvent`]: the Nth decision of the transaction that committed at REVISION | none |
//! | `vireo/admin/NODE` | [`NodeAdmin`]: administrative state (draining, paused, quarantined) and ungraceful departures | none: it outlives the node's lease |
//! | `vireo/moves/VM` | [`MoveRecord`]: a drain's, fail-back's or bulk request's live migration of the VM | none |
//! | `vireo/requests/ID` | [`BulkRecord`]: a bulk request (migrate, start, stop a selection) | none |
//! | `vireo/saved/VM` | [`SavedRecord`]: a save asked of the VM's owner (bulk save), or the VM's saved state on the cluster's shared storage (`crate::saved`) | none |
//! | `vireo/intake/NODE` | [`Intake`]: the moves arriving at NODE as last admitted; every move's start into NODE rewrites it (compare-and-swap), so two sources cannot both take its last slot | none |

use serde::{Deserialize, Serialize};

use crate::store::LeaseId;

pub const NODES: &str = "vireo/nodes/";
pub const VMS: &str = "vireo/vms/";
pub const OWNERS: &str = "vireo/owners/";
pub const EVENTS: &str = "vireo/events/";
pub const ADMIN: &str = "vireo/admin/";
pub const MOVES: &str = "vireo/moves/";
pub const REQUESTS: &str = "vireo/requests/";
pub const INTAKE: &str = "vireo/intake/";
pub const SAVED: &str = "vireo/saved/";
/// Every key of the cluster is under it.
pub const ROOT: &str = "vireo/";

pub fn node_key(node: &str) -> String {
    format!("{NODES}{node}")
}
pub fn vm_key(vm: &str) -> String {
    format!("{VMS}{vm}")
}
pub fn owner_key(vm: &str) -> String {
    format!("{OWNERS}{vm}")
}
/// Event `i` of the transaction that committed at `revision`.
pub fn event_key(revision: i64, i: usize) -> String {
    format!("{EVENTS}{revision:020}-{i:03}")
}
pub fn admin_key(node: &str) -> String {
    format!("{ADMIN}{node}")
}
pub fn move_key(vm: &str) -> String {
    format!("{MOVES}{vm}")
}
pub fn request_key(id: &str) -> String {
    format!("{REQUESTS}{id}")
}
pub fn intake_key(node: &str) -> String {
    format!("{INTAKE}{node}")
}
pub fn saved_key(vm: &str) -> String {
    format!("{SAVED}{vm}")
}

/// The name a key holds under `prefix` (`vireo/nodes/a` → `a`).
pub fn name_of<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    key.strip_prefix(prefix).filter(|n| !n.is_empty())
}

/// What a node can hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub memory_mib: u64,
    pub vcpus: u32,
}

impl Resources {
    pub fn fits_in(&self, free: &Resources) -> bool {
        self.memory_mib <= free.memory_mib && self.vcpus <= free.vcpus
    }
    pub fn add(&self, o: &Resources) -> Resources {
        Resources {
            memory_mib: self.memory_mib + o.memory_mib,
            vcpus: self.vcpus + o.vcpus,
        }
    }
    pub fn sub(&self, o: &Resources) -> Resources {
        Resources {
            memory_mib: self.memory_mib.saturating_sub(o.memory_mib),
            vcpus: self.vcpus.saturating_sub(o.vcpus),
        }
    }
}

/// A node's administrative state. A node whose key is gone is down; `Down` is what
/// status reports then, never a stored state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Up,
    Paused,
    Draining,
    Quarantined,
    Down,
}

impl NodeState {
    /// Whether the node takes VMs that fail over.
    pub fn accepts_vms(self) -> bool {
        self == NodeState::Up
    }
}

/// `vireo/nodes/NODE`: a node's registration, attached to its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub version: String,
    pub capacity: Resources,
    #[serde(default)]
    pub cpu_features: Vec<String>,
    /// The CPU features the node's VMMs give guests, as a live migration compares
    /// them (`migration::protocol::cpuid_fingerprint`); live moves go only between
    /// nodes with the same. None: not known (an older node), not restricted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpuid: Option<String>,
    pub state: NodeState,
    /// Where the node's peer API listens (`https://host:port`), if it has one.
    #[serde(default)]
    pub peer_url: Option<String>,
}

/// A clustered VM's failover priority (Hyper-V's High/Medium/Low/No Auto Start).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Never started by failover: stays off when its node dies.
    NoAutoStart,
    Low,
    Medium,
    High,
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "high" => Ok(Priority::High),
            "medium" => Ok(Priority::Medium),
            "low" => Ok(Priority::Low),
            "no-auto-start" | "no_auto_start" => Ok(Priority::NoAutoStart),
            other => Err(format!(
                "priority {other:?}: expected high, medium, low or no-auto-start"
            )),
        }
    }
}

/// `vireo/vms/VM`: a clustered VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDefinition {
    pub name: String,
    pub priority: Priority,
    pub needs: Resources,
    /// Nodes to prefer, best first.
    #[serde(default)]
    pub preferred_owners: Vec<String>,
    /// Nodes allowed to run it; empty: every node.
    #[serde(default)]
    pub possible_owners: Vec<String>,
    /// VMs of one class are spread over nodes when possible (soft).
    #[serde(default)]
    pub anti_affinity: Option<String>,
    /// The VM's configuration as the node agent runs it (opaque to the cluster).
    #[serde(default)]
    pub config: serde_json::Value,
    /// The processor compatibility set its vCPUs are masked to (a CPU fingerprint,
    /// `vireo_util::cpu_features`; the configuration's `cpus.features`): a live move
    /// needs a node whose features give the same within it. None: the host's features,
    /// and a live move needs a node with the same fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_features: Option<String>,
}

/// Why a VM has no owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unowned {
    /// Wants to run: placed when a node has room.
    Pending,
    /// Stopped to make room for a higher priority; placed again when there is room.
    Preempted,
    /// Off (No Auto Start after its node died, or stopped by an operator).
    Off,
    /// Saved: its memory and device state are on the cluster's shared storage
    /// (`vireo/saved/VM`, [`SaveState::Saved`]); nothing runs it, failover leaves it
    /// alone, and a start resumes it where it was on whichever node it is placed.
    Saved,
}

/// `vireo/owners/VM`: who runs the VM. The key's `mod_revision` is the fencing token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerRecord {
    /// Runs on `node`'s incarnation holding `lease`.
    Node {
        node: String,
        lease: LeaseId,
    },
    Unowned(Unowned),
}

/// `vireo/events/SEQ`: what the failover controller decided, for status and audits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterEvent {
    pub vm: String,
    pub action: String,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
    /// When the controller decided it (wall clock, ms since the epoch; absent in
    /// events of older vireods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
}

/// One ungraceful departure of a node: the incarnation (lease) that vanished without
/// the node leaving, and when a controller saw it gone (wall clock, ms since the epoch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Departure {
    pub lease: LeaseId,
    pub at_ms: u64,
}

/// A drain in progress or done: what `node drain` decided.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainInfo {
    pub started_ms: u64,
    /// VMs with no place that `--force` left running on the node (and those whose
    /// move could not be queued: see `queueing`).
    #[serde(default)]
    pub left: Vec<String>,
    /// The drain's moves are still being written: more than fit one transaction
    /// ([`crate::drain::MOVES_PER_TXN`]). The node is not paused before they all are,
    /// however many of them already finished.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub queueing: bool,
    /// The node's vireod asked for it as it stopped (drain on shutdown): when it
    /// comes back, the node resumes by itself and its VMs fail back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_shutdown: bool,
}

/// `vireo/admin/NODE`: what an operator (drain, resume, release) or the quarantine
/// decided about a node. No record: `up`, no departures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAdmin {
    /// `up`, `draining`, `paused` or `quarantined`.
    pub state: NodeState,
    /// Ungraceful departures within the quarantine window, oldest first.
    #[serde(default)]
    pub departures: Vec<Departure>,
    /// The last drain (kept after it ends, for status and fail-back).
    #[serde(default)]
    pub drain: Option<DrainInfo>,
    /// The incarnation (lease) that last left the cluster gracefully (vireod stopped
    /// by its operator, its clustered VMs stopped first): its end is no departure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left: Option<LeaseId>,
}

impl Default for NodeAdmin {
    fn default() -> Self {
        NodeAdmin {
            state: NodeState::Up,
            departures: Vec::new(),
            drain: None,
            left: None,
        }
    }
}

/// Why a VM is moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveReason {
    /// Away from a draining node.
    Drain,
    /// Back to the node a drain moved it from (`node resume --failback`).
    Failback,
    /// A bulk request's (`vireoctl vm migrate --selector ...`): see `request`.
    Bulk,
}

/// Where a move is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveState {
    /// Waits for its source node to start it (higher priorities first, a bounded
    /// number at once).
    Queued,
    /// The live migration runs; the VM is still owned by `from`.
    Migrating,
    /// Committed: the VM runs on `to`, which owns it.
    Moved,
    /// Not moved: the VM stays on `from` (see `error`).
    Failed,
}

impl MoveState {
    pub fn finished(self) -> bool {
        matches!(self, MoveState::Moved | MoveState::Failed)
    }
}

/// `vireo/moves/VM`: one live migration of a clustered VM between nodes, carried out
/// by its source node's vireod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub priority: Priority,
    pub reason: MoveReason,
    /// The node whose drain (or fail-back) this move belongs to ("" for a bulk
    /// request's).
    pub drain_of: String,
    /// The bulk request this move belongs to (`vireo/requests/ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    pub state: MoveState,
    /// How many moves its source node runs at once.
    pub concurrency: u32,
    /// The VM's fencing token before the move and on the destination.
    #[serde(default)]
    pub token_before: Option<i64>,
    #[serde(default)]
    pub token_after: Option<i64>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub started_ms: Option<u64>,
    #[serde(default)]
    pub finished_ms: Option<u64>,
}

/// What a bulk request does to its selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BulkOp {
    /// Live-migrate each VM (a queued move each).
    Migrate,
    /// Run each VM that is off (placement picks its node, as for a new VM).
    Start,
    /// Turn each VM off (its node kills its VMM; it stays off).
    Stop,
    /// Save each VM's state to the cluster's shared storage (its owner saves it).
    Save,
}

/// `vireo/requests/ID`: a bulk request as decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkRecord {
    pub id: String,
    pub op: BulkOp,
    /// The selection as asked: names or a selector.
    pub selection: String,
    /// Migrate: the node asked for, or `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    pub created_ms: u64,
    /// Migrate: moves at once per source and per destination node.
    #[serde(default)]
    pub concurrency: u32,
    /// The VMs acted on (migrate: those given a move).
    #[serde(default)]
    pub vms: Vec<String>,
    /// Selected VMs left alone, and why (already there, not running, ...).
    #[serde(default)]
    pub skipped: Vec<(String, String)>,
    /// Selected VMs without a place that `force` left where they are, and why.
    #[serde(default)]
    pub left: Vec<(String, String)>,
    /// Cancelled: its moves not started then were failed (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_ms: Option<u64>,
}

/// `vireo/intake/NODE`: the VMs whose moves into NODE were started, as the last start
/// wrote them. Only entries whose move is still migrating into NODE count; the others
/// are dropped by the next start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intake {
    pub vms: Vec<String>,
}

/// Where a clustered VM's save is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaveState {
    /// A bulk request asked `node` (the VM's owner then) to save it.
    Requested,
    /// The saved state is complete on the shared storage; the VM's ownership record
    /// says [`Unowned::Saved`] (or pending/owned while a start resumes it).
    Saved,
}

/// `vireo/saved/VM`: a clustered VM's save.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRecord {
    pub vm: String,
    pub state: SaveState,
    /// The node that saves (requested) or saved it.
    pub node: String,
    /// The VM's fencing token on that node when it was asked or saved.
    pub token: i64,
    /// The bulk request that asked for it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    pub at_ms: u64,
}

/// Milliseconds since the Unix epoch (records' wall-clock times).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Encodes a record for the store.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

/// Decodes a record; `None` (and the caller logs) for a value that is not one.
pub fn decode<T: for<'de> Deserialize<'de>>(value: &[u8]) -> Option<T> {
    serde_json::from_slice(value).ok()
}
