//! The clustered VMs of a scale run: a fixed mix of priorities and sizes, and a
//! configuration shaped like the one vireod stores (a kernel, one disk, one NIC), so
//! records have a realistic size in etcd.

use cluster::keys::{Priority, Resources, VmDefinition};

/// Priorities by VM index: 10% High, 40% Medium, 40% Low, 10% No Auto Start.
fn priority(i: usize) -> Priority {
    match i % 10 {
        0 => Priority::High,
        1..=4 => Priority::Medium,
        5..=8 => Priority::Low,
        _ => Priority::NoAutoStart,
    }
}

/// Sizes by VM index (MiB, vCPUs): mean 3.4 GiB and 2.6 vCPUs.
fn needs(i: usize) -> Resources {
    let (memory_mib, vcpus) = [(1024, 1), (2048, 2), (2048, 2), (4096, 4), (8192, 4)][i % 5];
    Resources { memory_mib, vcpus }
}

/// What each node offers: enough for its share of `vms` VMs of the mix with 45% to
/// spare (so the cluster survives the loss of a node, and drains find room).
pub fn node_capacity(nodes: usize, vms: usize) -> Resources {
    let total = (0..vms).fold(Resources::default(), |acc, i| acc.add(&needs(i)));
    let per = |x: u64| (x * 100 / 55).div_ceil(nodes.max(1) as u64);
    Resources {
        memory_mib: per(total.memory_mib).max(8192),
        vcpus: u32::try_from(per(u64::from(total.vcpus)).max(8)).unwrap_or(u32::MAX),
    }
}

/// The VM name of index `i`.
pub fn vm_name(i: usize) -> String {
    format!("vm-{i:05}")
}

/// VM `i` of the mix: every 20th in the anti-affinity class "db".
pub fn vm(i: usize) -> VmDefinition {
    let name = vm_name(i);
    let n = needs(i);
    let config = serde_json::json!({
        "config": {
            "payload": {
                "kernel": "/var/lib/vireo/kernels/vmlinux-6.6",
                "initramfs": null,
                "cmdline": "console=hvc0 root=/dev/vda1 rw quiet",
            },
            "cpus": {"boot": n.vcpus, "max": n.vcpus},
            "memory": {"size": n.memory_mib << 20, "hugepages": false, "overcommit": false},
            "disks": [{
                "path": format!("/srv/vireo/shared/disks/{name}.vhdx"),
                "readonly": false,
                "direct": true,
                "fencing_token": null,
            }],
            "serial": {"mode": "file", "path": format!("/var/lib/vireo/vms/{name}/serial.log")},
            "console": {"mode": "off"},
            "rng": true,
            "nets": [{
                "tap": format!("vt{i:05}"),
                "mac": format!("52:54:00:{:02x}:{:02x}:{:02x}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff),
                "switch": "prod",
            }],
        },
        "priority": "normal",
        "restart": "on-failure",
        "max_restarts": 3,
    });
    VmDefinition {
        name,
        priority: priority(i),
        needs: n,
        preferred_owners: vec![],
        possible_owners: vec![],
        anti_affinity: (i % 20 == 7).then(|| "db".to_string()),
        config,
        cpu_features: None,
    }
}
