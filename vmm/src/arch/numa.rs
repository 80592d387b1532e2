//! Virtual NUMA: the SRAT (which vCPUs and which guest memory belong to which node) and
//! the SLIT (distances between nodes), and binding each node's memory to its host node.
//!
//! acpi_tables' SRAT has no x86 Processor Local APIC Affinity structure, so the SRAT is
//! laid out here (ACPI 6.5, 5.2.16); the SLIT comes from acpi_tables.

use acpi_tables::slit::SLIT;
use acpi_tables::Aml;
use api::numa::{self, NumaNode};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use devices::virtio::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"VIREO ";
const OEM_TABLE_ID: [u8; 8] = *b"VIREOVM ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: [u8; 4] = *b"VIRE";
const CREATOR_REVISION: u32 = 1;
const SRAT_REVISION: u8 = 3;
const ENABLED: u32 = 1;

/// The node a vCPU index belongs to.
fn node_of(nodes: &[NumaNode], vcpu: usize) -> u32 {
    nodes
        .iter()
        .find(|n| n.cpus.iter().any(|&c| usize::from(c) == vcpu))
        .map_or(0, |n| n.id)
}

/// The SRAT: a Processor Local APIC Affinity structure per vCPU (`apic_ids` in vCPU
/// order) and a Memory Affinity structure per node range (`ranges`: node, base, length).
pub fn srat(nodes: &[NumaNode], apic_ids: &[u8], ranges: &[(u32, u64, u64)]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(b"SRAT");
    t.extend_from_slice(&0u32.to_le_bytes()); // length, below
    t.push(SRAT_REVISION);
    t.push(0); // checksum, below
    t.extend_from_slice(&OEM_ID);
    t.extend_from_slice(&OEM_TABLE_ID);
    t.extend_from_slice(&OEM_REVISION.to_le_bytes());
    t.extend_from_slice(&CREATOR_ID);
    t.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
    t.extend_from_slice(&1u32.to_le_bytes()); // reserved, 1 for compatibility
    t.extend_from_slice(&0u64.to_le_bytes()); // reserved
    for (vcpu, &apic) in apic_ids.iter().enumerate() {
        let domain = node_of(nodes, vcpu).to_le_bytes();
        t.extend_from_slice(&[0, 16, domain[0], apic]);
        t.extend_from_slice(&ENABLED.to_le_bytes());
        t.push(0); // local SAPIC EID
        t.extend_from_slice(&domain[1..4]);
        t.extend_from_slice(&0u32.to_le_bytes()); // clock domain
    }
    for &(node, base, len) in ranges {
        t.extend_from_slice(&[1, 40]);
        t.extend_from_slice(&node.to_le_bytes());
        t.extend_from_slice(&[0, 0]);
        t.extend_from_slice(&base.to_le_bytes());
        t.extend_from_slice(&len.to_le_bytes());
        t.extend_from_slice(&0u32.to_le_bytes());
        t.extend_from_slice(&ENABLED.to_le_bytes());
        t.extend_from_slice(&0u64.to_le_bytes());
    }
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    let sum = t.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    t[9] = 0u8.wrapping_sub(sum);
    t
}

/// The SLIT: 10 on the diagonal, [`numa::distance`] between nodes.
pub fn slit(nodes: &[NumaNode]) -> Vec<u8> {
    let n = nodes.len();
    let mut s = SLIT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, n as u32);
    for a in 0..n {
        for b in a + 1..n {
            s.set_distance(a, b, numa::distance(nodes, a as u32, b as u32));
        }
    }
    let mut v = Vec::new();
    s.to_aml_bytes(&mut v);
    v
}

#[derive(Debug, thiserror::Error)]
pub enum NumaError {
    #[error("guest memory of NUMA node {node} at {addr:#x} is not mapped")]
    Unmapped { node: u32, addr: u64 },
    #[error("host node {host_node} does not exist here (this host's nodes: 0..{nodes})")]
    NoHostNode { host_node: u32, nodes: usize },
    #[error("cannot bind NUMA node {node}'s memory to host node {host_node}: {source}")]
    Bind {
        node: u32,
        host_node: u32,
        #[source]
        source: std::io::Error,
    },
}

/// How many NUMA nodes this host has (`/sys/devices/system/node/node*`; 1 without).
pub fn host_nodes() -> usize {
    crate::file_broker::run(crate::file_broker::FileOp::ReadHostInfo, count_host_nodes)
}

fn count_host_nodes() -> usize {
    std::fs::read_dir("/sys/devices/system/node")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.strip_prefix("node")
                        .is_some_and(|n| n.parse::<u32>().is_ok())
                })
                .count()
        })
        .unwrap_or(0)
        .max(1)
}

/// Binds each node's guest memory that names a host node to that node (MPOL_BIND):
/// pages the guest touches later are allocated there.
pub fn bind_host_nodes(
    mem: &GuestMemoryMmap,
    nodes: &[NumaNode],
    ranges: &[(u32, u64, u64)],
) -> Result<(), NumaError> {
    let available = host_nodes();
    for &(node, base, len) in ranges {
        let Some(host_node) = nodes
            .iter()
            .find(|n| n.id == node)
            .and_then(|n| n.host_node)
        else {
            continue;
        };
        if host_node as usize >= available {
            return Err(NumaError::NoHostNode {
                host_node,
                nodes: available,
            });
        }
        let addr = mem
            .get_host_address(GuestAddress(base))
            .map_err(|_| NumaError::Unmapped { node, addr: base })?;
        // One bit per host node, as many u64 words as the node number needs.
        let mut mask = vec![0u64; host_node as usize / 64 + 1];
        mask[host_node as usize / 64] |= 1 << (host_node % 64);
        let maxnode = (mask.len() * 64) as u64;
        // SAFETY: mbind only sets the memory policy of [addr, addr + len), a range of
        // our own guest mapping (one RAM range of `mem` holds it: `ranges` are cut from
        // the VM's RAM ranges); `mask` outlives the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                addr as u64,
                len,
                libc::MPOL_BIND,
                mask.as_ptr(),
                maxnode,
                0u32,
            )
        };
        if rc != 0 {
            return Err(NumaError::Bind {
                node,
                host_node,
                source: std::io::Error::last_os_error(),
            });
        }
        tracing::info!(node, host_node, base, len, "NUMA node memory bound");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Vec<NumaNode> {
        vec![
            numa::parse_numa("node=0,cpus=0-1,memory=1G").unwrap(),
            numa::parse_numa("node=1,cpus=2-3,memory=1G,distances=0@31").unwrap(),
        ]
    }

    #[test]
    fn the_srat_gives_each_cpu_and_range_its_node_and_sums_to_zero() {
        let ranges = [(0, 0, 1 << 30), (1, 1 << 30, 1 << 30)];
        let t = srat(&nodes(), &[0, 1, 2, 3], &ranges);
        assert_eq!(&t[0..4], b"SRAT");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(t.len(), 48 + 4 * 16 + 2 * 40);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        // vCPU 2 (APIC 2) on node 1.
        let cpu2 = &t[48 + 2 * 16..48 + 3 * 16];
        assert_eq!(
            (cpu2[0], cpu2[1], cpu2[2], cpu2[3], cpu2[4]),
            (0, 16, 1, 2, 1)
        );
        let mem1 = &t[48 + 4 * 16 + 40..];
        assert_eq!(u32::from_le_bytes(mem1[2..6].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(mem1[8..16].try_into().unwrap()), 1 << 30);
        assert_eq!(
            u64::from_le_bytes(mem1[16..24].try_into().unwrap()),
            1 << 30
        );
    }

    #[test]
    fn the_slit_holds_local_and_configured_distances() {
        let t = slit(&nodes());
        assert_eq!(&t[0..4], b"SLIT");
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(&t[44..48], &[10, 31, 31, 10]);
    }
}
