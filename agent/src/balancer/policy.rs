//! The balancer's decisions, pure and deterministic (no VM, no clock): what each
//! Dynamic Memory VM should have, given what it has, what its guest uses and the
//! host's budget; and how a target maps onto a VMM's virtio-mem and balloon.
//!
//! Every VM's demand is `used × (1 + buffer)`, rounded up to the 2 MiB block and
//! clamped to [minimum, maximum] (without statistics: what it has). Then:
//! - the host has room (the VMs' wants fit in the budget): each VM below its demand
//!   grows to it; one above keeps what it has (no churn);
//! - the host is short: memory above demand is taken back first, the lowest weight
//!   first; if that is not enough every VM is brought to its demand and the budget
//!   is shared out: each VM gets its minimum, the rest goes by weight (water-filling:
//!   a VM never gets more than its demand; what it cannot take goes to the others).
//!
//! Targets are never below minimum nor above maximum, whatever the budget.

use api::config::{HOTPLUG_BLOCK_SIZE, MIN_MEMORY};

/// The unit of every target: virtio-mem's block.
pub const BLOCK: u64 = HOTPLUG_BLOCK_SIZE;

fn round_up(v: u64) -> u64 {
    v.div_ceil(BLOCK).saturating_mul(BLOCK)
}

fn round_down(v: u64) -> u64 {
    v - v % BLOCK
}

/// One Dynamic Memory VM as the balancer sees it in one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmView {
    pub name: String,
    pub minimum: u64,
    pub maximum: u64,
    /// Percent above use.
    pub buffer: u32,
    pub weight: u32,
    /// What it has now (boot + plugged - ballooned).
    pub assigned: u64,
    /// What its guest uses (total - available), none before it reported.
    pub used: Option<u64>,
}

/// Why a VM's target is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// The host has room: the VM gets what it wants (its demand, or keeps more).
    Room,
    /// The host is short: memory above its demand is taken back.
    AboveDemand,
    /// The host is short even at every VM's demand: shared out by weight.
    Pressure,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Room => "room",
            Why::AboveDemand => "above-demand",
            Why::Pressure => "pressure",
        }
    }
}

/// What one VM should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub name: String,
    pub demand: u64,
    pub target: u64,
    pub why: Why,
}

/// `used × (1 + buffer)`, in blocks, within [minimum, maximum].
pub fn demand(v: &VmView) -> u64 {
    let raw = match v.used {
        Some(u) => {
            let d = u128::from(u) * (100 + u128::from(v.buffer)) / 100;
            u64::try_from(d).unwrap_or(u64::MAX)
        }
        None => v.assigned,
    };
    round_up(raw).clamp(v.minimum, v.maximum.max(v.minimum))
}

/// What each VM of `vms` should have within `budget` bytes for all of them (in the
/// order of `vms`).
pub fn decide(vms: &[VmView], budget: u64) -> Vec<Decision> {
    let budget = round_down(budget);
    let max_of = |v: &VmView| v.maximum.max(v.minimum);
    let demands: Vec<u64> = vms.iter().map(demand).collect();
    let current: Vec<u64> = vms
        .iter()
        .map(|v| round_down(v.assigned).clamp(v.minimum, max_of(v)))
        .collect();
    let mut targets: Vec<u64> = demands
        .iter()
        .zip(&current)
        .map(|(&d, &c)| d.max(c))
        .collect();
    let mut why = Why::Room;
    if total(&targets) > budget {
        let need = total(&targets) - budget;
        let surplus = total(&targets).saturating_sub(total(&demands));
        if surplus >= need {
            why = Why::AboveDemand;
            let mut need = need;
            for i in by_weight(vms) {
                if need == 0 {
                    break;
                }
                let take = round_up(need).min(targets[i] - demands[i]);
                targets[i] -= take;
                need = need.saturating_sub(take);
            }
        } else {
            why = Why::Pressure;
            targets = share_by_weight(vms, &demands, budget);
        }
    }
    vms.iter()
        .enumerate()
        .map(|(i, v)| Decision {
            name: v.name.clone(),
            demand: demands[i],
            target: targets[i],
            why: if targets[i] < current[i] || why == Why::Pressure {
                why
            } else {
                Why::Room
            },
        })
        .collect()
}

fn total(t: &[u64]) -> u64 {
    t.iter().fold(0u64, |a, &b| a.saturating_add(b))
}

/// Indices of `vms`, lowest weight first (then by name): who gives back first.
fn by_weight(vms: &[VmView]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..vms.len()).collect();
    idx.sort_by(|&a, &b| (vms[a].weight, &vms[a].name).cmp(&(vms[b].weight, &vms[b].name)));
    idx
}

/// Every VM its minimum, then `budget` - minimums by weight, none above its demand.
fn share_by_weight(vms: &[VmView], demands: &[u64], budget: u64) -> Vec<u64> {
    let mut alloc: Vec<u64> = vms.iter().map(|v| v.minimum).collect();
    let mins = alloc.iter().fold(0u64, |a, &b| a.saturating_add(b));
    let mut left = budget.saturating_sub(mins);
    let room = |i: usize, alloc: &[u64]| demands[i].saturating_sub(alloc[i]);
    let mut active: Vec<usize> = (0..vms.len())
        .filter(|&i| room(i, alloc.as_slice()) > 0)
        .collect();
    while left >= BLOCK && !active.is_empty() {
        let weights: Vec<u128> = active.iter().map(|&i| u128::from(vms[i].weight)).collect();
        let total: u128 = weights.iter().sum();
        // Weight 0 VMs share only what the others cannot take.
        let (weights, total) = if total == 0 {
            (vec![1; active.len()], active.len() as u128)
        } else {
            (weights, total)
        };
        let mut given = 0u64;
        for (k, &i) in active.iter().enumerate() {
            let share = u64::try_from(u128::from(left) * weights[k] / total).unwrap_or(u64::MAX);
            let give = round_down(share).min(room(i, alloc.as_slice()));
            alloc[i] += give;
            given += give;
        }
        if given == 0 {
            // Shares below a block: one block to the heaviest (then first by name).
            let Some(&i) = active.iter().max_by(|&&a, &&b| {
                (vms[a].weight, std::cmp::Reverse(&vms[a].name))
                    .cmp(&(vms[b].weight, std::cmp::Reverse(&vms[b].name)))
            }) else {
                break;
            };
            let give = BLOCK.min(room(i, alloc.as_slice()));
            alloc[i] += give;
            given = give;
        }
        left = left.saturating_sub(given);
        active.retain(|&i| room(i, alloc.as_slice()) > 0);
    }
    alloc
}

/// A VMM's memory devices: boot RAM, the hotplug region, whether it has a balloon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Devices {
    pub boot: u64,
    pub hotplug: Option<u64>,
    pub balloon: bool,
}

/// What to ask a VMM (`vm.resize`) for a target: each field only for a device it has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub desired_ram: Option<u64>,
    pub desired_balloon: Option<u64>,
}

/// A target the VM's devices cannot reach.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("{target} MiB is above the VM's maximum of {max} MiB{how}")]
    AboveMaximum {
        target: u64,
        max: u64,
        how: &'static str,
    },
    #[error("{target} MiB is below the VM's minimum of {min} MiB{how}")]
    BelowMinimum {
        target: u64,
        min: u64,
        how: &'static str,
    },
    #[error("{0} bytes is not a multiple of the 2 MiB block")]
    NotBlocks(u64),
}

impl Devices {
    /// The smallest and largest memory these devices can give the guest: the
    /// balloon can take boot memory back down to 16 MiB, the hotplug region adds.
    pub fn range(&self) -> (u64, u64) {
        let lo = if self.balloon {
            MIN_MEMORY.min(self.boot)
        } else {
            self.boot
        };
        (lo, self.boot.saturating_add(self.hotplug.unwrap_or(0)))
    }

    /// The `vm.resize` requests that make the guest's memory `target`: above boot
    /// memory virtio-mem plugs (`desired_ram`) and the balloon is empty; below it
    /// the balloon holds the difference and nothing is plugged.
    pub fn plan(&self, target: u64) -> Result<Plan, PlanError> {
        if !target.is_multiple_of(BLOCK) {
            return Err(PlanError::NotBlocks(target));
        }
        let (lo, hi) = self.range();
        if target > hi {
            return Err(PlanError::AboveMaximum {
                target: target >> 20,
                max: hi >> 20,
                how: if self.hotplug.is_none() {
                    " (no hotplug region: --memory ...,hotplug_size=SIZE)"
                } else {
                    " (boot memory + hotplug region)"
                },
            });
        }
        if target < lo {
            return Err(PlanError::BelowMinimum {
                target: target >> 20,
                min: lo >> 20,
                how: if self.balloon {
                    ""
                } else {
                    " (no balloon: --balloon)"
                },
            });
        }
        Ok(if target >= self.boot {
            Plan {
                desired_ram: self.hotplug.map(|_| target),
                desired_balloon: self.balloon.then_some(0),
            }
        } else {
            Plan {
                desired_ram: self.hotplug.map(|_| self.boot),
                desired_balloon: Some(self.boot - target),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    fn vm(name: &str, min: u64, max: u64, assigned: u64, used: Option<u64>) -> VmView {
        VmView {
            name: name.into(),
            minimum: min * M,
            maximum: max * M,
            buffer: 20,
            weight: 5000,
            assigned: assigned * M,
            used: used.map(|u| u * M),
        }
    }

    fn targets(d: &[Decision]) -> Vec<u64> {
        d.iter().map(|d| d.target / M).collect()
    }

    #[test]
    fn demand_is_use_plus_buffer_in_blocks_within_bounds() {
        assert_eq!(demand(&vm("a", 256, 4096, 512, Some(1000))), 1200 * M);
        // 101 MiB × 1.2 = 121.2 MiB: rounded up to the block (122 MiB).
        assert_eq!(demand(&vm("a", 64, 4096, 512, Some(101))), 122 * M);
        assert_eq!(demand(&vm("a", 256, 4096, 512, Some(10))), 256 * M);
        assert_eq!(demand(&vm("a", 256, 1024, 512, Some(4000))), 1024 * M);
        // No statistics yet: what it has.
        assert_eq!(demand(&vm("a", 256, 1024, 512, None)), 512 * M);
        let mut v = vm("a", 256, 8192, 512, Some(1000));
        v.buffer = 100;
        assert_eq!(demand(&v), 2000 * M);
    }

    #[test]
    fn with_room_vms_grow_to_demand_and_keep_surplus() {
        let vms = [
            vm("a", 256, 4096, 512, Some(1000)),
            vm("b", 256, 4096, 2048, Some(100)),
        ];
        let d = decide(&vms, 16 << 30);
        assert_eq!(targets(&d), [1200, 2048]);
        assert!(d.iter().all(|d| d.why == Why::Room));
    }

    #[test]
    fn when_short_memory_above_demand_goes_first() {
        let vms = [
            vm("grow", 256, 4096, 512, Some(1000)),
            vm("idle", 256, 4096, 2048, Some(100)),
        ];
        // Wants: 1200 + 2048 = 3248; budget 2600: 648 MiB come from idle's surplus.
        let d = decide(&vms, 2600 * M);
        assert_eq!(targets(&d), [1200, 1400]);
        assert_eq!(d[1].why, Why::AboveDemand);
        assert_eq!(d[0].why, Why::Room);
    }

    #[test]
    fn under_pressure_higher_weight_keeps_more_never_below_minimum() {
        let mut a = vm("a", 256, 4096, 2048, Some(2000));
        let mut b = vm("b", 256, 4096, 2048, Some(2000));
        a.weight = 8000;
        b.weight = 2000;
        let d = decide(&[a.clone(), b.clone()], 2048 * M);
        let (ta, tb) = (d[0].target / M, d[1].target / M);
        assert!(ta > tb, "{ta} {tb}");
        assert!(ta + tb <= 2048);
        assert!(tb >= 256);
        assert!(d.iter().all(|d| d.why == Why::Pressure));
        // A budget below the minimums: everyone at minimum, nobody below.
        let d = decide(&[a, b], 100 * M);
        assert_eq!(targets(&d), [256, 256]);
    }

    #[test]
    fn weight_zero_gets_only_what_the_others_cannot_take() {
        let mut a = vm("a", 256, 4096, 1024, Some(1000));
        let mut z = vm("z", 256, 4096, 1024, Some(1000));
        a.weight = 1;
        z.weight = 0;
        let d = decide(&[a.clone(), z.clone()], 1800 * M);
        assert_eq!(targets(&d), [1200, 600]);
    }

    #[test]
    fn resize_plans_use_the_devices_there_are() {
        let both = Devices {
            boot: 1024 * M,
            hotplug: Some(1024 * M),
            balloon: true,
        };
        assert_eq!(
            both.plan(1536 * M).unwrap(),
            Plan {
                desired_ram: Some(1536 * M),
                desired_balloon: Some(0)
            }
        );
        assert_eq!(
            both.plan(512 * M).unwrap(),
            Plan {
                desired_ram: Some(1024 * M),
                desired_balloon: Some(512 * M)
            }
        );
        assert!(matches!(
            both.plan(4096 * M),
            Err(PlanError::AboveMaximum { max: 2048, .. })
        ));
        assert!(matches!(both.plan(M), Err(PlanError::NotBlocks(_))));
        let balloon_only = Devices {
            boot: 1024 * M,
            hotplug: None,
            balloon: true,
        };
        let e = balloon_only.plan(1026 * M).unwrap_err().to_string();
        assert!(e.contains("no hotplug region"), "{e}");
        assert_eq!(balloon_only.plan(1024 * M).unwrap().desired_ram, None);
        let plug_only = Devices {
            boot: 1024 * M,
            hotplug: Some(M * 512),
            balloon: false,
        };
        let e = plug_only.plan(512 * M).unwrap_err().to_string();
        assert!(e.contains("no balloon"), "{e}");
        assert_eq!(plug_only.plan(1024 * M).unwrap().desired_balloon, None);
    }

    /// A small deterministic generator (no dependency, same cases every run).
    struct Lcg(u64);
    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// Thousands of random hosts: never below minimum, never above maximum, within
    /// the budget whenever the minimums fit, deterministic, and of two VMs that
    /// differ only in weight the heavier never ends with less.
    #[test]
    fn invariants_over_many_cases() {
        let mut r = Lcg(7);
        for case in 0..5000 {
            let n = 1 + r.below(6) as usize;
            let mut vms: Vec<VmView> = (0..n)
                .map(|i| {
                    let min = 16 + 2 * r.below(256);
                    let max = min + 2 * r.below(2048);
                    let mut v = vm(
                        &format!("vm{i}"),
                        min,
                        max,
                        min + r.below(max - min + 1),
                        (r.below(5) > 0).then(|| r.below(max + 512)),
                    );
                    v.weight = r.below(10_001) as u32;
                    v.buffer = 5 + r.below(100) as u32;
                    v
                })
                .collect();
            // A twin of vm0 with another weight.
            let mut twin = vms[0].clone();
            twin.name = "twin".into();
            twin.weight = r.below(10_001) as u32;
            vms.push(twin);
            let budget = r.below(8192) * M + r.below(M);
            let d = decide(&vms, budget);
            assert_eq!(d, decide(&vms, budget), "case {case}: not deterministic");
            let mins: u64 = vms.iter().map(|v| v.minimum).sum();
            let total: u64 = d.iter().map(|d| d.target).sum();
            for (v, d) in vms.iter().zip(&d) {
                assert!(d.target >= v.minimum, "case {case}: {d:?} below minimum");
                assert!(d.target <= v.maximum, "case {case}: {d:?} above maximum");
                assert_eq!(d.target % BLOCK, 0, "case {case}: {d:?}");
                assert!(d.demand >= v.minimum && d.demand <= v.maximum);
            }
            if mins <= budget {
                assert!(total <= budget, "case {case}: {total} > {budget}");
            }
            let (first, twin) = (&d[0], &d[d.len() - 1]);
            let (w0, wt) = (vms[0].weight, vms[vms.len() - 1].weight);
            if first.why == Why::Pressure {
                if w0 > wt {
                    assert!(first.target >= twin.target, "case {case}: {d:?}");
                } else if wt > w0 {
                    assert!(twin.target >= first.target, "case {case}: {d:?}");
                }
            }
        }
    }
}
