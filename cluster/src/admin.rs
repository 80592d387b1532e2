//! Node quarantine (Hyper-V's): a node that leaves the cluster ungracefully — its
//! lease expired or it joined again with a new one, without leaving first — three times
//! within an hour is `quarantined`: it gets no VMs (placement takes only `up` nodes)
//! until `vireoctl node release`. The departures are recorded in the node's
//! `vireo/admin/NODE` record, once per incarnation (lease), whichever controller saw
//! it first: every controller tries, a compare-and-swap on the record decides.

use std::collections::BTreeMap;
use std::time::Duration;

use tracing::{info, warn};

use crate::keys::{self, Departure, NodeAdmin, NodeState};
use crate::store::{ClusterStore, CmpOp, Compare, LeaseId, Op, Revision, StoreResult, Txn};

/// Departures within [`QUARANTINE_WINDOW`] that quarantine a node.
pub const QUARANTINE_AFTER: usize = 3;
/// How far back departures count.
pub const QUARANTINE_WINDOW: Duration = Duration::from_secs(3600);

/// Records that incarnation `lease` of a node departed at `at_ms`: drops departures
/// older than the window and quarantines the node at the third within it. Returns
/// whether the record changed (the same lease counts once).
pub fn record_departure(admin: &mut NodeAdmin, lease: LeaseId, at_ms: u64) -> bool {
    if admin.left == Some(lease) || admin.departures.iter().any(|d| d.lease == lease) {
        return false;
    }
    let window = u64::try_from(QUARANTINE_WINDOW.as_millis()).unwrap_or(u64::MAX);
    admin
        .departures
        .retain(|d| d.at_ms.saturating_add(window) > at_ms);
    admin.departures.push(Departure { lease, at_ms });
    if admin.departures.len() >= QUARANTINE_AFTER {
        admin.state = NodeState::Quarantined;
    }
    true
}

/// `node release`: the node is `up` again and its departures are forgotten. Refused
/// (false) for a node that is not quarantined.
pub fn release(admin: &mut NodeAdmin) -> bool {
    if admin.state != NodeState::Quarantined {
        return false;
    }
    admin.state = NodeState::Up;
    admin.departures.clear();
    true
}

/// A node's admin record and its revision (0: none yet).
pub async fn read<S: ClusterStore>(store: &S, node: &str) -> StoreResult<(NodeAdmin, Revision)> {
    Ok(match store.get(&keys::admin_key(node)).await? {
        Some(kv) => match keys::decode::<NodeAdmin>(&kv.value) {
            Some(a) => (a, kv.mod_revision),
            None => {
                warn!(key = %kv.key, "a node admin record does not parse: treated as none");
                (NodeAdmin::default(), kv.mod_revision)
            }
        },
        None => (NodeAdmin::default(), 0),
    })
}

/// Writes `admin` if the record is still at `revision`; false when it changed.
pub async fn write_if<S: ClusterStore>(
    store: &S,
    node: &str,
    admin: &NodeAdmin,
    revision: Revision,
    also: Vec<Op>,
) -> StoreResult<bool> {
    let key = keys::admin_key(node);
    let mut then = vec![Op::Put {
        key: key.clone(),
        value: keys::encode(admin),
        lease: 0,
    }];
    then.extend(also);
    let outcome = store
        .txn(Txn {
            when: vec![Compare::ModRevision {
                key,
                op: CmpOp::Equal,
                revision,
            }],
            then,
            otherwise: vec![],
        })
        .await?;
    Ok(outcome.succeeded)
}

/// Marks incarnation `lease` of `node` as leaving gracefully (before the node revokes
/// it): controllers that see it gone do not count a departure. Retries a lost race
/// with another writer of the record a few times; false if it never won.
pub async fn record_graceful_leave<S: ClusterStore>(
    store: &S,
    node: &str,
    lease: LeaseId,
) -> StoreResult<bool> {
    for _ in 0..3 {
        let (mut admin, rev) = read(store, node).await?;
        admin.left = Some(lease);
        if write_if(store, node, &admin, rev, vec![]).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Which incarnations of which nodes a controller has seen alive, to notice the ones
/// that vanish.
#[derive(Debug, Default)]
pub struct DepartureWatch {
    seen: BTreeMap<String, LeaseId>,
}

impl DepartureWatch {
    /// The incarnations seen alive before and gone (or replaced by a new lease) in
    /// `alive` now; remembers `alive` for the next call.
    pub fn observe(&mut self, alive: &BTreeMap<String, LeaseId>) -> Vec<(String, LeaseId)> {
        let gone = self
            .seen
            .iter()
            .filter(|(node, lease)| alive.get(*node) != Some(lease))
            .map(|(n, l)| (n.clone(), *l))
            .collect();
        self.seen = alive.clone();
        gone
    }
}

/// Records each departure in its node's admin record (retrying a lost race a few
/// times: another controller recording the same lease makes it a no-op).
pub async fn record_departures<S: ClusterStore>(
    store: &S,
    gone: &[(String, LeaseId)],
    at_ms: u64,
) -> StoreResult<()> {
    for (node, lease) in gone {
        for _ in 0..3 {
            let (mut admin, rev) = read(store, node).await?;
            if !record_departure(&mut admin, *lease, at_ms) {
                break;
            }
            if write_if(store, node, &admin, rev, vec![]).await? {
                warn!(
                    node,
                    lease = format_args!("{lease:#x}"),
                    departures = admin.departures.len(),
                    "node left the cluster ungracefully"
                );
                if admin.state == NodeState::Quarantined {
                    info!(
                        node,
                        "node quarantined: it gets no VMs until `vireoctl node release`"
                    );
                }
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    #[test]
    fn a_graceful_leave_is_no_departure() {
        let mut a = NodeAdmin {
            left: Some(7),
            ..NodeAdmin::default()
        };
        assert!(!record_departure(&mut a, 7, 0));
        assert!(a.departures.is_empty());
        assert!(record_departure(&mut a, 8, MIN));
        assert_eq!(a.departures.len(), 1);
    }

    #[test]
    fn three_departures_within_an_hour_quarantine_the_node() {
        let mut a = NodeAdmin::default();
        assert!(record_departure(&mut a, 1, 0));
        assert!(record_departure(&mut a, 2, 10 * MIN));
        assert_eq!(a.state, NodeState::Up);
        // The same incarnation counts once (every controller reports it).
        assert!(!record_departure(&mut a, 2, 11 * MIN));
        assert_eq!(a.departures.len(), 2);
        assert!(record_departure(&mut a, 3, 59 * MIN));
        assert_eq!(a.state, NodeState::Quarantined);
    }

    #[test]
    fn departures_older_than_the_window_do_not_count() {
        let mut a = NodeAdmin::default();
        record_departure(&mut a, 1, 0);
        record_departure(&mut a, 2, 30 * MIN);
        // The first is an hour old now: two within the window.
        record_departure(&mut a, 3, 60 * MIN);
        assert_eq!(a.state, NodeState::Up);
        assert_eq!(
            a.departures.iter().map(|d| d.lease).collect::<Vec<_>>(),
            [2, 3]
        );
        record_departure(&mut a, 4, 61 * MIN);
        assert_eq!(a.state, NodeState::Quarantined);
    }

    #[test]
    fn release_makes_a_quarantined_node_up_with_a_clean_slate() {
        let mut a = NodeAdmin::default();
        assert!(!release(&mut a), "an up node is not released");
        for l in 1..=3 {
            record_departure(&mut a, l, l as u64 * MIN);
        }
        assert!(release(&mut a));
        assert_eq!(a.state, NodeState::Up);
        assert!(a.departures.is_empty());
        // It takes three new departures to quarantine it again.
        record_departure(&mut a, 4, 5 * MIN);
        record_departure(&mut a, 5, 6 * MIN);
        assert_eq!(a.state, NodeState::Up);
    }

    #[test]
    fn a_vanished_or_replaced_lease_is_a_departure_once() {
        let mut w = DepartureWatch::default();
        let alive = |v: &[(&str, LeaseId)]| {
            v.iter()
                .map(|(n, l)| (n.to_string(), *l))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(w.observe(&alive(&[("a", 1), ("b", 2)])).is_empty());
        // a's lease expired; b joined again with a new lease before anyone looked.
        assert_eq!(
            w.observe(&alive(&[("b", 3)])),
            [("a".to_string(), 1), ("b".to_string(), 2)]
        );
        assert!(w.observe(&alive(&[("b", 3), ("a", 4)])).is_empty());
    }
}
