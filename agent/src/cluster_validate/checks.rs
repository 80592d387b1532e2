//! The report's checks over the nodes' facts: reachability, KVM, versions, shared
//! storage, clock skew, certificates, etcd's members, and N+1 capacity.

use std::collections::{BTreeMap, BTreeSet};

use cluster::failover::Snapshot;
use cluster::keys::Priority;
use cluster::placement::{self, Decision, NodeView, Reason, VmView};

use super::{
    answered, check, Check, NodeFacts, Status, CERT_WARN_DAYS, KVM_CAPS, SKEW_FAIL_MS, SKEW_WARN_MS,
};

/// Each node answered the coordinator; each reached every other node's listener.
pub(super) fn reachability(nodes: &BTreeMap<String, Result<NodeFacts, String>>) -> Vec<Check> {
    let mut out = Vec::new();
    for (n, f) in nodes {
        match f {
            Err(e) => out.push(check(
                "reachability",
                Some(n),
                Status::Fail,
                format!("the coordinator cannot ask {n}: {e}"),
            )),
            Ok(f) => {
                let failed: Vec<String> = f
                    .peers
                    .iter()
                    .filter_map(|p| p.error.as_ref().map(|e| format!("{} ({e})", p.node)))
                    .collect();
                let rtts: Vec<String> = f
                    .peers
                    .iter()
                    .filter_map(|p| p.rtt_ms.map(|r| format!("{} {r:.1} ms", p.node)))
                    .collect();
                if failed.is_empty() {
                    out.push(check(
                        "reachability",
                        Some(n),
                        Status::Pass,
                        format!("reaches every peer listener: {}", rtts.join(", ")),
                    ));
                } else {
                    out.push(check(
                        "reachability",
                        Some(n),
                        Status::Fail,
                        format!("{n} cannot reach {}", failed.join(", ")),
                    ));
                }
            }
        }
    }
    out
}

pub(super) fn kvm_checks(nodes: &BTreeMap<String, Result<NodeFacts, String>>) -> Vec<Check> {
    answered(nodes)
        .map(|(n, f)| {
            let k = &f.kvm;
            if !k.present {
                check(
                    "kvm",
                    Some(n),
                    Status::Fail,
                    k.error.clone().unwrap_or_else(|| "no KVM".into()),
                )
            } else if k.api_version != Some(12) {
                check(
                    "kvm",
                    Some(n),
                    Status::Fail,
                    format!("KVM API version {:?}, vireo needs 12", k.api_version),
                )
            } else if !k.missing_caps.is_empty() {
                check(
                    "kvm",
                    Some(n),
                    Status::Fail,
                    format!("KVM lacks {}", k.missing_caps.join(", ")),
                )
            } else {
                check(
                    "kvm",
                    Some(n),
                    Status::Pass,
                    format!("KVM API 12 with {}", KVM_CAPS.map(|(_, n)| n).join(", ")),
                )
            }
        })
        .collect()
}

pub(super) fn version_checks(nodes: &BTreeMap<String, Result<NodeFacts, String>>) -> Vec<Check> {
    let mut by: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (n, f) in answered(nodes) {
        by.entry(&f.version).or_default().push(n);
    }
    if by.len() <= 1 {
        let v = by.keys().next().copied().unwrap_or("?");
        return vec![check(
            "version",
            None,
            Status::Pass,
            format!("every node runs vireo {v}"),
        )];
    }
    // The version most nodes run is the reference; the others fail, naming both.
    let (common, _) = by
        .iter()
        .max_by_key(|(v, ns)| (ns.len(), std::cmp::Reverse(**v)))
        .map(|(v, ns)| (*v, ns.clone()))
        .unwrap_or(("?", vec![]));
    let mut out = Vec::new();
    for (v, ns) in &by {
        for n in ns {
            if *v == common {
                out.push(check(
                    "version",
                    Some(n),
                    Status::Pass,
                    format!("vireo {v}"),
                ));
            } else {
                out.push(check(
                    "version",
                    Some(n),
                    Status::Fail,
                    format!("{n} runs vireo {v}, the others {common}"),
                ));
            }
        }
    }
    out
}

pub(super) fn storage_checks(
    me: &str,
    nodes: &BTreeMap<String, Result<NodeFacts, String>>,
    written: &BTreeSet<String>,
    content: &str,
) -> Vec<Check> {
    // The cluster's roots: those most nodes have. A node lacking one fails; a root
    // only a few nodes have is theirs alone (VMs stored there cannot move): a warning.
    let answered_n = answered(nodes).count();
    let mut count: BTreeMap<&String, usize> = BTreeMap::new();
    for (_, f) in answered(nodes) {
        for r in &f.storage_roots {
            *count.entry(r).or_default() += 1;
        }
    }
    let cluster: BTreeSet<&String> = count
        .iter()
        .filter(|(_, c)| **c * 2 > answered_n)
        .map(|(r, _)| *r)
        .collect();
    let mut out = Vec::new();
    for (n, f) in answered(nodes) {
        let mine: BTreeSet<&String> = f.storage_roots.iter().collect();
        let missing: Vec<&str> = cluster.difference(&mine).map(|r| r.as_str()).collect();
        let own: Vec<&str> = mine.difference(&cluster).map(|r| r.as_str()).collect();
        if !missing.is_empty() {
            out.push(check(
                "storage-roots",
                Some(n),
                Status::Fail,
                format!(
                    "{n} has no storage root {} (the other nodes have)",
                    missing.join(", ")
                ),
            ));
        } else if !own.is_empty() {
            out.push(check(
                "storage-roots",
                Some(n),
                Status::Warn,
                format!(
                    "{n} alone has {}: VMs stored there cannot move",
                    own.join(", ")
                ),
            ));
        } else {
            out.push(check(
                "storage-roots",
                Some(n),
                Status::Pass,
                format!("the cluster's roots: {}", f.storage_roots.join(", ")),
            ));
        }
        let mut bad = Vec::new();
        for root in written {
            match f.probe.iter().find(|p| p.root == *root) {
                None => bad.push(format!("{root}: not a storage root of {n}")),
                Some(p) => match (&p.content, &p.error) {
                    (Some(c), _) if c == content => {}
                    (Some(_), _) => {
                        bad.push(format!("{root}: the probe file holds other content on {n}"))
                    }
                    (None, Some(e)) => bad.push(format!("{root}: {e}")),
                    (None, None) => bad.push(format!(
                        "{root}: {me}'s probe file is not there on {n} (not the same storage)"
                    )),
                },
            }
        }
        if bad.is_empty() {
            out.push(check(
                "shared-storage",
                Some(n),
                Status::Pass,
                format!("read {me}'s probe file back from every root"),
            ));
        } else {
            out.push(check(
                "shared-storage",
                Some(n),
                Status::Fail,
                bad.join("; "),
            ));
        }
    }
    out
}

pub(super) fn skew_checks(skew: &BTreeMap<String, (f64, f64)>) -> Vec<Check> {
    skew.iter()
        .map(|(n, (s, bound))| {
            let detail = format!("{s:+.0} ms against the coordinator (± {bound:.0} ms)");
            let status = if s.abs() - bound > SKEW_FAIL_MS {
                Status::Fail
            } else if s.abs() - bound > SKEW_WARN_MS {
                Status::Warn
            } else {
                Status::Pass
            };
            check("clock-skew", Some(n), status, detail)
        })
        .collect()
}

pub(super) fn cert_checks(
    nodes: &BTreeMap<String, Result<NodeFacts, String>>,
    now_ms: u64,
) -> Vec<Check> {
    answered(nodes)
        .map(|(n, f)| match f.cert_not_after_ms {
            None => check(
                "certificate",
                Some(n),
                Status::Warn,
                "no host certificate".into(),
            ),
            Some(t) if t <= now_ms => check(
                "certificate",
                Some(n),
                Status::Fail,
                format!(
                    "{n}'s certificate expired {} days ago",
                    (now_ms - t) / 86_400_000
                ),
            ),
            Some(t) => {
                let days = (t - now_ms) / 86_400_000;
                let status = if days < CERT_WARN_DAYS {
                    Status::Warn
                } else {
                    Status::Pass
                };
                check(
                    "certificate",
                    Some(n),
                    status,
                    format!("expires in {days} days"),
                )
            }
        })
        .collect()
}

pub(super) fn etcd_check(members: &[cluster::etcd::MemberHealth]) -> Check {
    let healthy: Vec<&cluster::etcd::MemberHealth> = members
        .iter()
        .filter(|m| m.error.is_none() && m.leader.is_some_and(|l| l != 0))
        .collect();
    let leaders: BTreeSet<u64> = healthy.iter().filter_map(|m| m.leader).collect();
    let quorum = members.len() / 2 + 1;
    let down: Vec<String> = members
        .iter()
        .filter(|m| !healthy.iter().any(|h| h.endpoint == m.endpoint))
        .map(|m| {
            format!(
                "{} ({})",
                m.endpoint,
                m.error.clone().unwrap_or_else(|| "no leader".into())
            )
        })
        .collect();
    let (status, detail) = if healthy.len() < quorum {
        (
            Status::Fail,
            format!(
                "{} of {} members healthy: no quorum; down: {}",
                healthy.len(),
                members.len(),
                down.join(", ")
            ),
        )
    } else if leaders.len() > 1 {
        (
            Status::Fail,
            format!("members name different leaders: {leaders:x?}"),
        )
    } else if !down.is_empty() {
        (
            Status::Warn,
            format!(
                "quorum holds ({} of {}), but down: {}",
                healthy.len(),
                members.len(),
                down.join(", ")
            ),
        )
    } else {
        (
            Status::Pass,
            format!(
                "{} members healthy, one leader ({:x})",
                members.len(),
                leaders.first().copied().unwrap_or(0)
            ),
        )
    };
    check("etcd", None, status, detail)
}

/// The cluster loses its largest node: can every VM that should run (all but No Auto
/// Start) be placed on the others (placement without preemption)?
pub fn n_plus_one(snap: &Snapshot) -> Check {
    let Some((largest, _)) = snap.nodes.iter().max_by_key(|(n, (r, _))| {
        (
            r.capacity.memory_mib,
            r.capacity.vcpus,
            std::cmp::Reverse(n.as_str()),
        )
    }) else {
        return check("n+1", None, Status::Fail, "no node".into());
    };
    let rest: Vec<NodeView> = snap
        .nodes
        .iter()
        .filter(|(n, _)| *n != largest)
        .map(|(n, (r, _))| NodeView {
            name: n.clone(),
            state: cluster::keys::NodeState::Up,
            capacity: r.capacity,
            running: vec![],
        })
        .collect();
    let vms: Vec<(VmView, Reason)> = snap
        .vms
        .values()
        .filter(|d| d.priority != Priority::NoAutoStart)
        .map(|d| {
            (
                VmView {
                    name: d.name.clone(),
                    priority: d.priority,
                    needs: d.needs,
                    preferred_owners: d.preferred_owners.clone(),
                    possible_owners: d.possible_owners.clone(),
                    anti_affinity: d.anti_affinity.clone(),
                },
                Reason::Start,
            )
        })
        .collect();
    let unplaced: Vec<String> = placement::plan_without_preemption(&rest, &vms)
        .into_iter()
        .filter_map(|d| match d {
            Decision::Place { .. } => None,
            Decision::Wait { vm } | Decision::StayOff { vm } | Decision::Preempt { vm, .. } => {
                Some(vm)
            }
        })
        .collect();
    if unplaced.is_empty() {
        check(
            "n+1",
            None,
            Status::Pass,
            format!(
                "without {largest} (the largest node) the others hold all {} auto-start VMs",
                vms.len()
            ),
        )
    } else {
        check(
            "n+1",
            None,
            Status::Fail,
            format!(
                "without {largest} (the largest node) no place for {}",
                unplaced.join(", ")
            ),
        )
    }
}
