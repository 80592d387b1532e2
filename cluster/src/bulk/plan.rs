//! Deciding a bulk request on a snapshot of the cluster, writing nothing: which VMs
//! move where, start, stop or save, and which are skipped or have no place.

use std::collections::BTreeMap;

use crate::drain;
use crate::failover::{view, Snapshot};
use crate::keys::{
    BulkOp, MoveReason, MoveRecord, OwnerRecord, Priority, SaveState, Unowned, VmDefinition,
};
use crate::placement::{self, Decision, Reason, VmView};
use crate::store::Revision;

use super::{BulkError, BulkPlan, BulkRequest};

/// The node that runs `vm` now (its owner, alive).
pub(super) fn running_on<'a>(snap: &'a Snapshot, vm: &str) -> Option<&'a str> {
    match snap.owners.get(vm) {
        Some((OwnerRecord::Node { node, lease }, _)) if snap.alive(node, *lease) => {
            Some(node.as_str())
        }
        _ => None,
    }
}

fn needs(def: &VmDefinition) -> String {
    format!(
        "needs {} MiB and {} vCPUs",
        def.needs.memory_mib, def.needs.vcpus
    )
}

/// Decides `req` on `snap` (`moves`: the records under `vireo/moves/`; `saved`: the
/// VMs with a record under `vireo/saved/`), writing nothing.
pub fn plan(
    snap: &Snapshot,
    moves: &BTreeMap<String, (MoveRecord, Revision)>,
    saved: &BTreeMap<String, SaveState>,
    req: &BulkRequest,
    id: &str,
) -> Result<BulkPlan, BulkError> {
    let selected = req.selection.select(snap)?;
    let plan = match req.op {
        BulkOp::Migrate => plan_migrate(snap, moves, req, id, &selected)?,
        BulkOp::Start => plan_start(snap, &selected),
        BulkOp::Stop => plan_stop(snap, moves, &selected),
        BulkOp::Save => {
            let (saves, skipped) = crate::saved::plan_requests(snap, moves, saved, &selected, id);
            BulkPlan {
                saves,
                skipped,
                ..BulkPlan::default()
            }
        }
    };
    if !plan.no_place.is_empty() && !req.force {
        return Err(BulkError::NoPlace {
            op: op_name(req.op),
            no_place: plan.no_place,
        });
    }
    Ok(plan)
}

fn op_name(op: BulkOp) -> &'static str {
    match op {
        BulkOp::Migrate => "migrate",
        BulkOp::Start => "start",
        BulkOp::Stop => "stop",
        BulkOp::Save => "save",
    }
}

fn plan_migrate(
    snap: &Snapshot,
    moves: &BTreeMap<String, (MoveRecord, Revision)>,
    req: &BulkRequest,
    id: &str,
    selected: &[String],
) -> Result<BulkPlan, BulkError> {
    let to = req.to.as_deref().ok_or(BulkError::NoDestination)?;
    let named = (to != "auto").then_some(to);
    if let Some(n) = named {
        if !snap.nodes.contains_key(n) {
            return Err(BulkError::UnknownNode(n.to_string()));
        }
    }
    let mut plan = BulkPlan::default();
    let mut to_place: Vec<(VmView, Reason)> = Vec::new();
    let mut from: BTreeMap<String, String> = BTreeMap::new();
    for vm in selected {
        let Some(def) = snap.vms.get(vm) else {
            continue;
        };
        let Some(source) = running_on(snap, vm) else {
            plan.skipped.push((
                vm.clone(),
                "not running: only a running VM migrates live".into(),
            ));
            continue;
        };
        if named == Some(source) {
            plan.skipped
                .push((vm.clone(), format!("already on {source}")));
            continue;
        }
        if moves.get(vm).is_some_and(|(m, _)| !m.state.finished()) {
            plan.no_place
                .push((vm.clone(), "another move of it is unfinished".into()));
            continue;
        }
        let mut v = view(def);
        // An empty list would mean every node: name them, so that narrowing it below
        // can leave none.
        if v.possible_owners.is_empty() {
            v.possible_owners = snap.nodes.keys().cloned().collect();
        }
        if named.is_none() {
            // Anywhere but where it runs.
            v.possible_owners.retain(|n| n != source);
            if v.possible_owners.is_empty() {
                plan.no_place.push((
                    vm.clone(),
                    format!("no node other than {source} is among its possible owners"),
                ));
                continue;
            }
            // Only nodes whose VMMs give it the CPU features it has on its node (a
            // named node that does not is refused below, with that reason).
            v.possible_owners
                .retain(|n| drain::cpu_compatible(snap, def, source, n));
            if v.possible_owners.is_empty() {
                plan.no_place.push((
                    vm.clone(),
                    format!("no other node gives it the CPU features it has on {source}"),
                ));
                continue;
            }
        } else {
            v.possible_owners
                .retain(|n| n == source || drain::cpu_compatible(snap, def, source, n));
        }
        from.insert(vm.clone(), source.to_string());
        to_place.push((v, Reason::Start));
    }
    let mut nodes = drain::targets(snap, "");
    if let Some(n) = named {
        nodes.retain(|v| v.name == n);
    }
    let target_state = named.and_then(|n| snap.nodes.get(n)).map(|(r, _)| r);
    for d in placement::plan_without_preemption(&nodes, &to_place) {
        match d {
            Decision::Place { vm, node } => {
                let Some(source) = from.get(&vm) else {
                    continue;
                };
                let priority = snap.vms.get(&vm).map_or(Priority::Low, |d| d.priority);
                let pm = drain::PlannedMove {
                    vm,
                    to: node,
                    priority,
                };
                let mut m = drain::queued(&pm, source, MoveReason::Bulk, "", req.concurrency);
                m.request = Some(id.to_string());
                plan.moves.push(m);
            }
            Decision::Wait { vm } | Decision::StayOff { vm } | Decision::Preempt { vm, .. } => {
                let Some(def) = snap.vms.get(&vm) else {
                    continue;
                };
                let why = match (named, target_state) {
                    (Some(n), Some(r)) if !r.state.accepts_vms() => {
                        format!("{n} is {:?}, not up", r.state).to_lowercase()
                    }
                    (Some(n), Some(r)) if r.peer_url.is_none() => {
                        format!("{n} has no peer URL (--listen): it receives no live migration")
                    }
                    (Some(n), _)
                        if !def.possible_owners.is_empty()
                            && !def.possible_owners.iter().any(|p| p == n) =>
                    {
                        format!("{n} is not among its possible owners")
                    }
                    (Some(n), _)
                        if from
                            .get(&vm)
                            .is_some_and(|src| !drain::cpu_compatible(snap, def, src, n)) =>
                    {
                        format!(
                            "{n}'s CPU features differ from those of {}: a live migration needs the same",
                            from.get(&vm).map_or("its node", String::as_str)
                        )
                    }
                    (Some(n), _) => format!("{}: {n} has not that much free", needs(def)),
                    (None, _) => format!(
                        "{} on another up node with a peer URL and the same CPU features among its possible owners",
                        needs(def)
                    ),
                };
                plan.no_place.push((vm, why));
            }
        }
    }
    plan.no_place.sort();
    Ok(plan)
}

fn plan_start(snap: &Snapshot, selected: &[String]) -> BulkPlan {
    let mut plan = BulkPlan::default();
    let mut to_place = Vec::new();
    let mut revs = BTreeMap::new();
    for vm in selected {
        let Some(def) = snap.vms.get(vm) else {
            continue;
        };
        match snap.owners.get(vm) {
            // A saved VM resumes on the node it is placed on (`crate::saved`).
            Some((OwnerRecord::Unowned(Unowned::Off | Unowned::Saved), rev)) => {
                revs.insert(vm.clone(), *rev);
                to_place.push((view(def), Reason::Start));
            }
            Some((OwnerRecord::Unowned(u), _)) => plan.skipped.push((
                vm.clone(),
                format!("already asked to run ({u:?})").to_lowercase(),
            )),
            Some((OwnerRecord::Node { node, lease }, _)) if snap.alive(node, *lease) => {
                plan.skipped.push((vm.clone(), format!("runs on {node}")));
            }
            Some((OwnerRecord::Node { node, .. }, _)) => plan.skipped.push((
                vm.clone(),
                format!("its node {node} is gone: failover places it"),
            )),
            None => plan
                .skipped
                .push((vm.clone(), "no ownership record".into())),
        }
    }
    // As the failover controller will: preempting lower priorities where needed.
    for d in placement::plan(&drain::node_views(snap, "", false), &to_place) {
        match d {
            Decision::Place { vm, .. } => {
                if let Some(rev) = revs.get(&vm) {
                    plan.owners
                        .push((vm, OwnerRecord::Unowned(Unowned::Pending), *rev));
                }
            }
            Decision::Preempt { .. } => {}
            Decision::Wait { vm } | Decision::StayOff { vm } => {
                let why = snap.vms.get(&vm).map_or(String::new(), |d| {
                    format!(
                        "{} on an up node among its possible owners, even preempting lower priorities",
                        needs(d)
                    )
                });
                plan.no_place.push((vm, why));
            }
        }
    }
    plan.owners.sort_by(|a, b| a.0.cmp(&b.0));
    plan
}

fn plan_stop(
    snap: &Snapshot,
    moves: &BTreeMap<String, (MoveRecord, Revision)>,
    selected: &[String],
) -> BulkPlan {
    let mut plan = BulkPlan::default();
    for vm in selected {
        match snap.owners.get(vm) {
            Some((OwnerRecord::Unowned(Unowned::Off), _)) => {
                plan.skipped.push((vm.clone(), "already off".into()));
            }
            Some((OwnerRecord::Unowned(Unowned::Saved), _)) => {
                plan.skipped.push((
                    vm.clone(),
                    "saved: nothing runs (discard its saved state to turn it off)".into(),
                ));
            }
            Some((_, rev)) if moves.get(vm).is_none_or(|(m, _)| m.state.finished()) => {
                plan.owners
                    .push((vm.clone(), OwnerRecord::Unowned(Unowned::Off), *rev));
            }
            Some(_) => plan.no_place.push((
                vm.clone(),
                "a move of it is unfinished: stop it once the move ended".into(),
            )),
            None => plan
                .skipped
                .push((vm.clone(), "no ownership record".into())),
        }
    }
    plan
}
