//! Virtual NUMA: which vCPUs and how much memory each guest node has, where its memory
//! lives on the host, and the distances between nodes (ACPI SRAT and SLIT).
//!
//! `--numa node=0,cpus=0-15,memory=512G[,host_node=0][,distances=1@20:2@30]`, once per
//! node. Nodes own consecutive guest RAM in node order (a node may straddle the 32-bit
//! PCI hole); every vCPU belongs to exactly one node; the nodes' memory adds up to the
//! VM's.

use serde::{Deserialize, Serialize};

use crate::config::{parse_size, ConfigError};

/// One guest NUMA node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NumaNode {
    /// Proximity domain, 0..nodes (each once).
    pub id: u32,
    /// vCPU indices (0-based, in `cpus.boot` order; not APIC IDs).
    pub cpus: Vec<u8>,
    /// Bytes of guest RAM on this node (a multiple of 2 MiB; JSON may say `"512M"`).
    #[serde(deserialize_with = "crate::json::size::de")]
    pub memory: u64,
    /// The host node whose memory backs it (bound with mbind); none: the host decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_node: Option<u32>,
    /// Distances to other nodes (SLIT); 10 to itself, 20 to others unless given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub distances: Vec<NumaDistance>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NumaDistance {
    pub node: u32,
    pub distance: u8,
}

/// Local distance (ACPI: a node to itself is 10).
pub const LOCAL_DISTANCE: u8 = 10;
/// Distance between nodes when none is given.
pub const REMOTE_DISTANCE: u8 = 20;
/// Node memory granularity.
pub const NODE_ALIGN: u64 = 2 << 20;
/// Most guest nodes.
pub const MAX_NODES: usize = 64;

const F: &str = "--numa";

fn bad(key: &str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::BadValue {
        flag: F,
        key: key.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

/// `0-3:8:10-11` → [0, 1, 2, 3, 8, 10, 11].
fn parse_cpu_list(v: &str) -> Result<Vec<u8>, ConfigError> {
    let mut out = Vec::new();
    for part in v.split(':') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let (Ok(a), Ok(b)) = (a.parse::<u8>(), b.parse::<u8>()) else {
            return Err(bad("cpus", v, "expected vCPU indices such as 0-3:8"));
        };
        if a > b {
            return Err(bad("cpus", v, format!("range {a}-{b} runs backwards")));
        }
        out.extend(a..=b);
    }
    Ok(out)
}

/// One `--numa` flag.
pub fn parse_numa(s: &str) -> Result<NumaNode, ConfigError> {
    let mut id = None;
    let mut cpus = None;
    let mut memory = None;
    let mut host_node = None;
    let mut distances = Vec::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(ConfigError::NotKeyValue {
                flag: F,
                item: item.into(),
            });
        };
        match k {
            "node" => id = Some(v.parse().map_err(|_| bad(k, v, "expected a node number"))?),
            "cpus" => cpus = Some(parse_cpu_list(v)?),
            "memory" => {
                memory =
                    Some(parse_size(v).ok_or_else(|| bad(k, v, "expected a size such as 512M"))?)
            }
            "host_node" => {
                host_node = Some(
                    v.parse()
                        .map_err(|_| bad(k, v, "expected a host node number"))?,
                )
            }
            "distances" => {
                for d in v.split(':') {
                    let parsed = d
                        .split_once('@')
                        .and_then(|(n, dist)| Some((n.parse().ok()?, dist.parse().ok()?)));
                    let Some((node, distance)) = parsed else {
                        return Err(bad(k, v, "expected NODE@DISTANCE[:NODE@DISTANCE...]"));
                    };
                    distances.push(NumaDistance { node, distance });
                }
            }
            _ => {
                return Err(ConfigError::UnknownKey {
                    flag: F,
                    key: k.into(),
                })
            }
        }
    }
    Ok(NumaNode {
        id: id.ok_or(ConfigError::Missing {
            flag: F,
            key: "node",
        })?,
        cpus: cpus.ok_or(ConfigError::Missing {
            flag: F,
            key: "cpus",
        })?,
        memory: memory.ok_or(ConfigError::Missing {
            flag: F,
            key: "memory",
        })?,
        host_node,
        distances,
    })
}

fn invalid(msg: String) -> ConfigError {
    ConfigError::Invalid(msg)
}

/// Checks the nodes against the VM: ids 0..n each once, every vCPU on exactly one node,
/// memory in 2 MiB steps adding up to the VM's, distances to existing other nodes within
/// 11..=254 (ACPI: 10 is local, 255 unreachable).
pub fn validate(nodes: &[NumaNode], vcpus: u8, memory: u64) -> Result<(), ConfigError> {
    if nodes.is_empty() {
        return Ok(());
    }
    if nodes.len() > MAX_NODES {
        return Err(invalid(format!(
            "numa: at most {MAX_NODES} nodes, got {}",
            nodes.len()
        )));
    }
    for (i, n) in sorted(nodes).iter().enumerate() {
        if n.id != i as u32 {
            return Err(invalid(format!(
                "numa: nodes must be numbered 0..{} each once; node {i} is missing or repeated",
                nodes.len()
            )));
        }
    }
    let mut owner = vec![None; usize::from(vcpus)];
    for n in nodes {
        if n.memory == 0 || !n.memory.is_multiple_of(NODE_ALIGN) {
            return Err(invalid(format!(
                "numa: node {} memory must be a non-zero multiple of 2M, got {} bytes",
                n.id, n.memory
            )));
        }
        if n.cpus.is_empty() {
            return Err(invalid(format!("numa: node {} has no vCPUs", n.id)));
        }
        for &c in &n.cpus {
            let Some(slot) = owner.get_mut(usize::from(c)) else {
                return Err(invalid(format!(
                    "numa: node {} names vCPU {c}; the VM has vCPUs 0..{}",
                    n.id,
                    vcpus.saturating_sub(1)
                )));
            };
            if let Some(other) = slot.replace(n.id) {
                return Err(invalid(format!(
                    "numa: vCPU {c} is on node {other} and node {}",
                    n.id
                )));
            }
        }
        for d in &n.distances {
            if d.node == n.id || usize::try_from(d.node).map_or(true, |i| i >= nodes.len()) {
                return Err(invalid(format!(
                    "numa: node {} gives a distance to node {}, which is itself or does not exist",
                    n.id, d.node
                )));
            }
            if !(11..=254).contains(&d.distance) {
                return Err(invalid(format!(
                    "numa: distance {} from node {} to {} must be 11..=254",
                    d.distance, n.id, d.node
                )));
            }
        }
    }
    if let Some(c) = owner.iter().position(Option::is_none) {
        return Err(invalid(format!("numa: vCPU {c} is on no node")));
    }
    let total: u64 = nodes.iter().map(|n| n.memory).sum();
    if total != memory {
        return Err(invalid(format!(
            "numa: the nodes' memory adds up to {} MiB; the VM has {} MiB",
            total >> 20,
            memory >> 20
        )));
    }
    Ok(())
}

fn sorted(nodes: &[NumaNode]) -> Vec<&NumaNode> {
    let mut v: Vec<&NumaNode> = nodes.iter().collect();
    v.sort_by_key(|n| n.id);
    v
}

/// The distance from node `a` to node `b` (SLIT): 10 to itself, the configured value
/// (either direction's, `a`'s first), else 20.
pub fn distance(nodes: &[NumaNode], a: u32, b: u32) -> u8 {
    if a == b {
        return LOCAL_DISTANCE;
    }
    let given = |from: u32, to: u32| {
        nodes
            .iter()
            .find(|n| n.id == from)
            .and_then(|n| n.distances.iter().find(|d| d.node == to))
            .map(|d| d.distance)
    };
    given(a, b)
        .or_else(|| given(b, a))
        .unwrap_or(REMOTE_DISTANCE)
}

/// Guest-physical ranges of each node, in node order: consecutive stretches of `ram`
/// (the VM's RAM ranges in address order), `memory` bytes per node.
pub fn node_ranges(nodes: &[NumaNode], ram: &[(u64, u64)]) -> Vec<(u32, u64, u64)> {
    let mut out = Vec::new();
    let mut ranges = ram.iter().copied();
    let mut current = ranges.next();
    for n in sorted(nodes) {
        let mut want = n.memory;
        while want > 0 {
            let Some((start, len)) = current else {
                return out;
            };
            let take = want.min(len);
            out.push((n.id, start, take));
            want -= take;
            current = if take == len {
                ranges.next()
            } else {
                Some((start + take, len - take))
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(s: &str) -> NumaNode {
        parse_numa(s).unwrap()
    }

    #[test]
    fn a_node_parses_with_ranges_host_node_and_distances() {
        let n = node("node=1,cpus=0-2:5,memory=1G,host_node=0,distances=0@25");
        assert_eq!(n.id, 1);
        assert_eq!(n.cpus, vec![0, 1, 2, 5]);
        assert_eq!(n.memory, 1 << 30);
        assert_eq!(n.host_node, Some(0));
        assert_eq!(
            n.distances,
            vec![NumaDistance {
                node: 0,
                distance: 25
            }]
        );
        assert!(parse_numa("node=0,cpus=3-1,memory=1G").is_err());
        assert!(parse_numa("node=0,memory=1G").is_err());
        assert!(parse_numa("node=0,cpus=0,memory=1G,distances=1-20").is_err());
    }

    #[test]
    fn nodes_must_cover_every_vcpu_once_and_all_memory() {
        let two = [
            node("node=0,cpus=0-1,memory=1G"),
            node("node=1,cpus=2-3,memory=1G"),
        ];
        validate(&two, 4, 2 << 30).unwrap();
        let e = |r: Result<(), ConfigError>| r.unwrap_err().to_string();
        assert!(e(validate(&two, 5, 2 << 30)).contains("vCPU 4 is on no node"));
        assert!(e(validate(&two, 4, 3 << 30)).contains("adds up to 2048 MiB"));
        assert!(e(validate(&two, 3, 2 << 30)).contains("names vCPU 3"));
        let twice = [
            node("node=0,cpus=0-1,memory=1G"),
            node("node=1,cpus=1-3,memory=1G"),
        ];
        assert!(e(validate(&twice, 4, 2 << 30)).contains("vCPU 1 is on node 0 and node 1"));
        let gap = [
            node("node=0,cpus=0-1,memory=1G"),
            node("node=2,cpus=2-3,memory=1G"),
        ];
        assert!(e(validate(&gap, 4, 2 << 30)).contains("numbered 0..2"));
        let odd = [node("node=0,cpus=0-3,memory=3M")];
        assert!(e(validate(&odd, 4, 3 << 20)).contains("multiple of 2M"));
        let far = [
            node("node=0,cpus=0-1,memory=1G,distances=1@255"),
            node("node=1,cpus=2-3,memory=1G"),
        ];
        assert!(e(validate(&far, 4, 2 << 30)).contains("11..=254"));
    }

    #[test]
    fn nodes_take_consecutive_ram_across_the_pci_hole() {
        let nodes = [
            node("node=0,cpus=0,memory=2G"),
            node("node=1,cpus=1,memory=2G"),
        ];
        // 4 GiB: 3 GiB below the hole, 1 GiB above 4 GiB.
        let ram = [(0, 3 << 30), (4 << 30, 1 << 30)];
        assert_eq!(
            node_ranges(&nodes, &ram),
            vec![
                (0, 0, 2 << 30),
                (1, 2 << 30, 1 << 30),
                (1, 4 << 30, 1 << 30)
            ]
        );
        assert_eq!(distance(&nodes, 0, 1), REMOTE_DISTANCE);
        let nodes = [
            node("node=0,cpus=0,memory=2G"),
            node("node=1,cpus=1,memory=2G,distances=0@31"),
        ];
        assert_eq!((distance(&nodes, 0, 1), distance(&nodes, 1, 0)), (31, 31));
        assert_eq!(distance(&nodes, 1, 1), LOCAL_DISTANCE);
    }
}
