//! What `GET .../replication` answers ([`ReplicationStatus`]): one VM's loop, or every
//! VM's.

use serde::Serialize;

use super::{lock, Job, Replications};

/// What `GET .../replication` answers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicationStatus {
    pub vm: String,
    pub to: String,
    pub server_name: String,
    pub interval_ms: u64,
    pub paused: bool,
    /// Recovery points the replica keeps.
    pub history: u32,
    /// Seconds at least between kept points other than the latest (0: every point).
    pub history_spacing_s: u64,
    /// "starting", "replicating", "paused", "retrying", or "failed-over-elsewhere"
    /// (the replica host started the VM from a recovery point: no loop runs, the VM
    /// does not start here).
    pub state: String,
    /// The replica host the VM was failed over to (unplanned), by its certificate name.
    pub failed_over_to: Option<String>,
    /// Why replication paused by itself (e.g. "replica full: ..."); None after a
    /// pause asked for, or once resumed.
    pub paused_reason: Option<String>,
    /// The bandwidth limit (Mbit/s), if any.
    pub bandwidth_mbit: Option<f64>,
    /// Every byte this loop wrote to the replica's connections (TLS included): what
    /// the limit counts.
    pub wire_bytes_sent: u64,
    pub last_point: Option<u64>,
    /// When the replica acknowledged the point (committed, verified, synced).
    pub last_point_at_ms: Option<u64>,
    /// When the cut of that point was asked of the VMM: every guest write completed
    /// before it is in the point (None when the point is an older cut than the
    /// round's own, after a torn cut).
    pub last_point_cut_at_ms: Option<u64>,
    pub rounds: u64,
    pub failed_rounds: u64,
    pub base_bytes_sent: u64,
    /// Bytes of the disks the initial copy sent before compression: the blocks that
    /// differed at the replica (a resync by block hashes).
    pub base_differing_bytes: u64,
    pub segment_bytes_sent: u64,
    pub segments_sent: u64,
    /// How long the last cut held the guest's writes (µs), and the longest since
    /// replication started here.
    pub last_cut_held_us: Option<u64>,
    pub max_cut_held_us: u64,
    pub last_error: Option<String>,
    /// Bytes of segments each disk's change log may hold.
    pub log_budget: u64,
    /// A change log is over its budget: it keeps a region bitmap, and the next round
    /// that reaches the replica catches up from it (no recovery point until then).
    pub log_degraded: bool,
    /// Catch-ups from the region maps completed, their bytes on the wire (compressed)
    /// and the bytes of the disks they sent (the maps' regions).
    pub catch_ups: u64,
    pub catch_up_bytes_sent: u64,
    pub catch_up_region_bytes: u64,
}

impl Job {
    /// The status with the live byte count.
    pub(super) fn snapshot(&self) -> ReplicationStatus {
        let mut st = lock(&self.status).clone();
        st.wire_bytes_sent = self.throttle.written();
        st
    }
}

impl Replications {
    /// VM `name`'s replication: its loop's status, or that it was failed over
    /// elsewhere (unplanned).
    pub fn status(&self, name: &str) -> Option<ReplicationStatus> {
        let job = lock(&self.jobs).get(name).map(Job::snapshot);
        job.or_else(|| self.failed_over_status(name))
    }

    pub fn list(&self) -> Vec<ReplicationStatus> {
        let mut all: Vec<ReplicationStatus> =
            lock(&self.jobs).values().map(Job::snapshot).collect();
        all.extend(self.failed_over_list());
        all.sort_by(|a, b| a.vm.cmp(&b.vm));
        all
    }
}
