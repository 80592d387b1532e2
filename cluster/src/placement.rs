//! Where VMs go: pure functions over a snapshot of the cluster, no store, no clock.
//!
//! VMs to place are taken High, then Medium, then Low (then by name, so every node
//! computes the same plan); a No Auto Start VM whose node died stays off. A VM goes to
//! a node that is up, among its possible owners (if it names any), with room for its
//! memory and vCPUs; among those its preferred owners first (in their order), then the
//! node with the fewest VMs of its anti-affinity class, then the most free memory.
//! When no node has room, VMs of a strictly lower priority are preempted on the node
//! where that frees enough room by stopping the fewest, lowest-priority VMs.

use crate::keys::{NodeState, Priority, Resources};

/// A VM as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmView {
    pub name: String,
    pub priority: Priority,
    pub needs: Resources,
    pub preferred_owners: Vec<String>,
    pub possible_owners: Vec<String>,
    pub anti_affinity: Option<String>,
}

/// A node as placement sees it, with the VMs it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub state: NodeState,
    pub capacity: Resources,
    pub running: Vec<VmView>,
}

impl NodeView {
    fn used(&self) -> Resources {
        self.running
            .iter()
            .fold(Resources::default(), |acc, vm| acc.add(&vm.needs))
    }

    fn free(&self) -> Resources {
        self.capacity.sub(&self.used())
    }
}

/// Why a VM needs placing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Its owner died: failover (No Auto Start VMs stay off).
    Failover,
    /// Asked to run (started, or preempted earlier): placed whatever its priority.
    Start,
}

/// One decision of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run `vm` on `node`.
    Place { vm: String, node: String },
    /// Stop `vm` (running on `node`) to make room for `for_vm`.
    Preempt {
        vm: String,
        node: String,
        for_vm: String,
    },
    /// A No Auto Start VM whose node died: stays off.
    StayOff { vm: String },
    /// No node can take it now: stays pending.
    Wait { vm: String },
}

fn allowed(vm: &VmView, node: &NodeView) -> bool {
    node.state.accepts_vms()
        && (vm.possible_owners.is_empty() || vm.possible_owners.contains(&node.name))
}

/// Lower is better: (preferred rank, anti-affinity conflicts, less free memory, name).
/// `free` is what the node has free (kept by the plan, not summed again per VM: that
/// made a plan O(VMs × nodes × VMs per node)).
fn score<'a>(vm: &VmView, node: &'a NodeView, free: &Resources) -> (usize, usize, u64, &'a str) {
    let rank = vm
        .preferred_owners
        .iter()
        .position(|n| n == &node.name)
        .unwrap_or(usize::MAX);
    let conflicts = match &vm.anti_affinity {
        Some(class) => node
            .running
            .iter()
            .filter(|r| r.anti_affinity.as_ref() == Some(class))
            .count(),
        None => 0,
    };
    (
        rank,
        conflicts,
        u64::MAX - free.memory_mib,
        node.name.as_str(),
    )
}

/// The victims on `node` that free room for `vm`: lowest priority first, then largest
/// first; `None` when even all lower-priority VMs are not enough.
fn victims(vm: &VmView, node: &NodeView) -> Option<Vec<VmView>> {
    let mut lower: Vec<&VmView> = node
        .running
        .iter()
        .filter(|r| r.priority < vm.priority)
        .collect();
    lower.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then(b.needs.memory_mib.cmp(&a.needs.memory_mib))
            .then(a.name.cmp(&b.name))
    });
    let mut free = node.free();
    let mut chosen = Vec::new();
    for r in lower {
        if vm.needs.fits_in(&free) {
            break;
        }
        free = free.add(&r.needs);
        chosen.push(r.clone());
    }
    vm.needs.fits_in(&free).then_some(chosen)
}

/// Plans where `to_place` go on `nodes`. Deterministic: the same snapshot gives the
/// same plan on every node.
pub fn plan(nodes: &[NodeView], to_place: &[(VmView, Reason)]) -> Vec<Decision> {
    plan_with(nodes, to_place, true)
}

/// [`plan`] without preemption (a drain moves VMs only where they fit as things are).
pub fn plan_without_preemption(nodes: &[NodeView], to_place: &[(VmView, Reason)]) -> Vec<Decision> {
    plan_with(nodes, to_place, false)
}

fn plan_with(nodes: &[NodeView], to_place: &[(VmView, Reason)], preempt: bool) -> Vec<Decision> {
    let mut nodes: Vec<NodeView> = nodes.to_vec();
    let mut free: Vec<Resources> = nodes.iter().map(NodeView::free).collect();
    let mut order: Vec<&(VmView, Reason)> = to_place.iter().collect();
    order.sort_by(|(a, _), (b, _)| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
    let mut out = Vec::new();
    for (vm, reason) in order {
        if vm.priority == Priority::NoAutoStart && *reason == Reason::Failover {
            out.push(Decision::StayOff {
                vm: vm.name.clone(),
            });
            continue;
        }
        let best = nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| allowed(vm, n) && vm.needs.fits_in(&free[*i]))
            .min_by_key(|(i, n)| score(vm, n, &free[*i]))
            .map(|(i, _)| i);
        if let Some(i) = best {
            nodes[i].running.push(vm.clone());
            free[i] = free[i].sub(&vm.needs);
            out.push(Decision::Place {
                vm: vm.name.clone(),
                node: nodes[i].name.clone(),
            });
            continue;
        }
        // Preemption: the node where the fewest victims (then the best score) suffice.
        let candidate = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| preempt && allowed(vm, n))
            .filter_map(|(i, n)| victims(vm, n).map(|v| (i, v)))
            .min_by_key(|(i, v)| (v.len(), score(vm, &nodes[*i], &free[*i])));
        match candidate {
            Some((i, victims)) => {
                let node = &mut nodes[i];
                for v in &victims {
                    node.running.retain(|r| r.name != v.name);
                    out.push(Decision::Preempt {
                        vm: v.name.clone(),
                        node: node.name.clone(),
                        for_vm: vm.name.clone(),
                    });
                }
                node.running.push(vm.clone());
                free[i] = node.free();
                out.push(Decision::Place {
                    vm: vm.name.clone(),
                    node: node.name.clone(),
                });
            }
            None => out.push(Decision::Wait {
                vm: vm.name.clone(),
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, priority: Priority, mem: u64) -> VmView {
        VmView {
            name: name.into(),
            priority,
            needs: Resources {
                memory_mib: mem,
                vcpus: 1,
            },
            preferred_owners: vec![],
            possible_owners: vec![],
            anti_affinity: None,
        }
    }

    fn node(name: &str, mem: u64, running: Vec<VmView>) -> NodeView {
        NodeView {
            name: name.into(),
            state: NodeState::Up,
            capacity: Resources {
                memory_mib: mem,
                vcpus: 16,
            },
            running,
        }
    }

    fn failover(vms: Vec<VmView>) -> Vec<(VmView, Reason)> {
        vms.into_iter().map(|v| (v, Reason::Failover)).collect()
    }

    fn place(vm: &str, node: &str) -> Decision {
        Decision::Place {
            vm: vm.into(),
            node: node.into(),
        }
    }

    #[test]
    fn high_is_placed_before_medium_before_low_and_takes_the_only_room() {
        let nodes = [node("b", 1024, vec![])];
        let plan = plan(
            &nodes,
            &failover(vec![
                vm("low", Priority::Low, 1024),
                vm("med", Priority::Medium, 1024),
                vm("high", Priority::High, 1024),
            ]),
        );
        assert_eq!(
            plan,
            vec![
                place("high", "b"),
                Decision::Wait { vm: "med".into() },
                Decision::Wait { vm: "low".into() },
            ]
        );
    }

    #[test]
    fn no_auto_start_stays_off_on_failover_but_starts_when_asked() {
        let nodes = [node("b", 4096, vec![])];
        let off = vm("n", Priority::NoAutoStart, 512);
        assert_eq!(
            plan(&nodes, &[(off.clone(), Reason::Failover)]),
            vec![Decision::StayOff { vm: "n".into() }]
        );
        assert_eq!(plan(&nodes, &[(off, Reason::Start)]), vec![place("n", "b")]);
    }

    #[test]
    fn admission_counts_memory_and_vcpus() {
        let mut small = node("small", 8192, vec![]);
        small.capacity.vcpus = 1;
        let nodes = [small, node("big", 2048, vec![vm("x", Priority::Low, 1024)])];
        let mut wide = vm("wide", Priority::Medium, 512);
        wide.needs.vcpus = 2;
        // "small" has the memory but one vCPU; "big" has 1024 MiB free and the vCPUs.
        assert_eq!(
            plan(&nodes, &failover(vec![wide])),
            vec![place("wide", "big")]
        );
        let huge = vm("huge", Priority::Low, 4096);
        let nodes = [node("a", 2048, vec![])];
        assert_eq!(
            plan(&nodes, &failover(vec![huge])),
            vec![Decision::Wait { vm: "huge".into() }]
        );
    }

    #[test]
    fn preferred_owners_win_in_order_and_possible_owners_restrict() {
        let nodes = [
            node("a", 8192, vec![]),
            node("b", 4096, vec![]),
            node("c", 4096, vec![]),
        ];
        let mut v = vm("v", Priority::High, 512);
        v.preferred_owners = vec!["c".into(), "b".into()];
        assert_eq!(
            plan(&nodes, &failover(vec![v.clone()])),
            vec![place("v", "c")]
        );
        v.possible_owners = vec!["a".into(), "b".into()];
        assert_eq!(plan(&nodes, &failover(vec![v])), vec![place("v", "b")]);
        // Without preferences: the most free memory.
        assert_eq!(
            plan(&nodes, &failover(vec![vm("w", Priority::Low, 512)])),
            vec![place("w", "a")]
        );
    }

    #[test]
    fn anti_affinity_spreads_a_class_when_it_can_and_is_soft_when_it_cannot() {
        let mut db1 = vm("db1", Priority::High, 512);
        db1.anti_affinity = Some("db".into());
        let mut db2 = db1.clone();
        db2.name = "db2".into();
        let nodes = [node("a", 8192, vec![db1.clone()]), node("b", 2048, vec![])];
        // "a" has more free memory but already runs a "db".
        assert_eq!(
            plan(&nodes, &failover(vec![db2.clone()])),
            vec![place("db2", "b")]
        );
        let nodes = [node("a", 8192, vec![db1]), node("b", 256, vec![])];
        assert_eq!(plan(&nodes, &failover(vec![db2])), vec![place("db2", "a")]);
    }

    #[test]
    fn preemption_stops_the_fewest_lowest_priority_vms_never_equal_or_higher() {
        let nodes = [
            node(
                "a",
                2048,
                vec![
                    vm("l1", Priority::Low, 512),
                    vm("m1", Priority::Medium, 1536),
                ],
            ),
            node(
                "b",
                2048,
                vec![vm("l2", Priority::Low, 1024), vm("l3", Priority::Low, 1024)],
            ),
        ];
        let plan1 = plan(&nodes, &failover(vec![vm("h", Priority::High, 1024)]));
        // On "a" it takes l1 and m1 (two victims, one of them Medium); on "b" one Low.
        assert_eq!(
            plan1,
            vec![
                Decision::Preempt {
                    vm: "l2".into(),
                    node: "b".into(),
                    for_vm: "h".into()
                },
                place("h", "b"),
            ]
        );
        // A Medium VM may not preempt Medium or High ones.
        let nodes = [node("a", 1024, vec![vm("m", Priority::Medium, 1024)])];
        assert_eq!(
            plan(&nodes, &failover(vec![vm("m2", Priority::Medium, 512)])),
            vec![Decision::Wait { vm: "m2".into() }]
        );
    }

    #[test]
    fn nodes_that_are_not_up_take_nothing() {
        let mut a = node("a", 8192, vec![]);
        a.state = NodeState::Draining;
        let mut b = node("b", 8192, vec![]);
        b.state = NodeState::Quarantined;
        assert_eq!(
            plan(&[a, b], &failover(vec![vm("v", Priority::High, 512)])),
            vec![Decision::Wait { vm: "v".into() }]
        );
    }
}
