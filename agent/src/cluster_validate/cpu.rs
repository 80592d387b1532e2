//! The validation report's CPU checks: the feature names each node registered, the
//! CPUID fingerprint groups live moves stay within, and the processor compatibility
//! sets of VMs against the nodes' features (with the cluster's common set).

use std::collections::{BTreeMap, BTreeSet};

use cluster::failover::Snapshot;
use vireo_util::cpu_features::CpuFeatures;

use super::{check, Check, Status};

/// Nodes grouped by CPU fingerprint (the CPUID their VMMs give guests): live moves go
/// only within a group, so each node is told how many others it can live-migrate to.
pub(super) fn fingerprint_checks(snap: &Snapshot) -> Vec<Check> {
    let mut groups: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for (n, (r, _)) in &snap.nodes {
        if let Some(f) = r.cpuid.as_deref() {
            groups.entry(f).or_default().push(n);
        }
    }
    snap.nodes
        .iter()
        .map(|(n, (r, _))| match r.cpuid.as_deref() {
            None => check(
                "cpu-fingerprint",
                Some(n),
                Status::Warn,
                "published no CPU fingerprint (no /dev/kvm, or an older vireod): its live moves are not matched".into(),
            ),
            Some(f) => {
                let peers = groups.get(f).map_or(0, |g| g.len() - 1);
                let others = snap.nodes.len() - 1;
                if peers == others {
                    check("cpu-fingerprint", Some(n), Status::Pass, "the same CPUID as every other node".into())
                } else {
                    check(
                        "cpu-fingerprint",
                        Some(n),
                        Status::Warn,
                        format!(
                            "the same CPUID as {peers} of the {others} other nodes: its VMs live-migrate (drain, bulk moves) only to those; {} CPU groups in the cluster",
                            groups.len()
                        ),
                    )
                }
            }
        })
        .collect()
}

/// The CPU feature names each node registered, against the union of all nodes'.
pub(super) fn feature_checks(snap: &Snapshot) -> Vec<Check> {
    let sets: BTreeMap<&String, BTreeSet<&String>> = snap
        .nodes
        .iter()
        .map(|(n, (r, _))| (n, r.cpu_features.iter().collect()))
        .collect();
    let all: BTreeSet<&String> = sets.values().flatten().copied().collect();
    let common: BTreeSet<&String> = sets
        .values()
        .fold(None::<BTreeSet<&String>>, |acc, s| {
            Some(match acc {
                None => s.clone(),
                Some(a) => a.intersection(s).copied().collect(),
            })
        })
        .unwrap_or_default();
    sets.iter()
        .map(|(n, s)| {
            let missing: Vec<&str> = all.difference(s).map(|f| f.as_str()).collect();
            if s.is_empty() {
                check("cpu-features", Some(n), Status::Warn, "registered no CPU features".into())
            } else if missing.is_empty() {
                check("cpu-features", Some(n), Status::Pass, format!("{} features, all common to the cluster ({})", s.len(), common.len()))
            } else {
                check(
                    "cpu-features",
                    Some(n),
                    Status::Warn,
                    format!(
                        "lacks {} that other nodes have: a VM started elsewhere may use them and not run here after a live migration",
                        missing.join(" ")
                    ),
                )
            }
        })
        .collect()
}

/// The cluster's common CPU feature set (what `vm define --cluster --cpu-compat` gives
/// a VM now), and each VM in processor compatibility mode whose set has features a
/// live node lacks: it cannot live-migrate there (define it again to take the current
/// common set).
pub(super) fn compatibility_checks(snap: &Snapshot) -> Vec<Check> {
    let sets: BTreeMap<&String, CpuFeatures> = snap
        .nodes
        .iter()
        .filter_map(|(n, (r, _))| Some((n, CpuFeatures::parse(r.cpuid.as_deref()?).ok()?)))
        .collect();
    let mut out = vec![match CpuFeatures::common(sets.values()) {
        Some(common) => check(
            "cpu-common-set",
            None,
            Status::Pass,
            format!(
                "the CPU features all {} nodes with a fingerprint have (a --cpu-compat VM gets these): {common}",
                sets.len()
            ),
        ),
        None => check(
            "cpu-common-set",
            None,
            Status::Warn,
            "no node published a CPU fingerprint: processor compatibility mode cannot be used".into(),
        ),
    }];
    for (vm, def) in &snap.vms {
        let Some(mask) = def.cpu_features.as_deref() else {
            continue;
        };
        let Ok(mask) = CpuFeatures::parse(mask) else {
            out.push(check(
                "cpu-compat",
                None,
                Status::Fail,
                format!("{vm}: its CPU feature set does not parse"),
            ));
            continue;
        };
        for (n, set) in &sets {
            let lacks = set.lacks(&mask);
            if !lacks.is_empty() {
                let what: Vec<String> = lacks.iter().map(ToString::to_string).collect();
                out.push(check(
                    "cpu-compat",
                    Some(n),
                    Status::Warn,
                    format!(
                        "{vm}'s processor compatibility set has features {n} lacks ({}): it cannot live-migrate to {n}; define it again with --cpu-compat for the current common set",
                        what.join(", ")
                    ),
                ));
            }
        }
    }
    out
}
