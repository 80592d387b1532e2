//! An incoming migration's check of the guest's shape: the destination runs the VM
//! from its own configuration, and the source's (from its Hello) may only confirm it.
//! What the guest sees must be the same on both sides — memory size, vCPUs, CPU
//! features, the device list (kind, id, order, and what each device tells the guest:
//! read-only, queues, serial number, size, MAC) — or the guest would find its hardware
//! changed under it. What only the host sees (paths, taps, console and serial files,
//! rate limits, polling, hugepages) is the destination's business and is not compared.
//!
//! Virtio features and queue sizes follow from the compared fields and this build's
//! devices; restoring the devices' state checks them again (`DeviceManager::restore`:
//! device types, queue counts, acknowledged features within the offered ones).

use api::config::{OutputConfig, VmConfig};
use migration::protocol::{CpuidLeaf, GuestShape};

/// The first field where the source's guest differs from the destination's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: source {source_value}, destination {destination_value}")]
pub struct Mismatch {
    pub field: String,
    pub source_value: String,
    pub destination_value: String,
}

fn differ(
    field: impl Into<String>,
    source: impl std::fmt::Display,
    destination: impl std::fmt::Display,
) -> Mismatch {
    Mismatch {
        field: field.into(),
        source_value: source.to_string(),
        destination_value: destination.to_string(),
    }
}

/// One side's guest: its configuration and what the configuration does not say.
pub struct Side<'a> {
    pub config: &'a VmConfig,
    pub shape: &'a GuestShape,
}

/// Compares the guest the source runs with the one the destination would run.
pub fn same_guest(source: &Side<'_>, destination: &Side<'_>) -> Result<(), Mismatch> {
    let (s, d) = (source.config, destination.config);
    if s.cpus.boot != d.cpus.boot {
        return Err(differ("cpus.boot", s.cpus.boot, d.cpus.boot));
    }
    if s.cpus.topology() != d.cpus.topology() {
        let show = |t: api::config::CpuTopology| format!("{}:{}:{}", t.sockets, t.cores, t.threads);
        return Err(differ(
            "cpus.topology",
            show(s.cpus.topology()),
            show(d.cpus.topology()),
        ));
    }
    // The guest's NUMA nodes (not where the host puts them: host_node is the
    // destination's own business).
    let guest_nodes = |c: &VmConfig| -> Vec<String> {
        c.numa
            .iter()
            .map(|n| {
                let distances: Vec<String> = (0..c.numa.len() as u32)
                    .map(|to| api::numa::distance(&c.numa, n.id, to).to_string())
                    .collect();
                format!(
                    "node {} cpus {:?} memory {} distances {}",
                    n.id,
                    n.cpus,
                    n.memory,
                    distances.join(",")
                )
            })
            .collect()
    };
    let (sn, dn) = (guest_nodes(s), guest_nodes(d));
    if sn != dn {
        let show = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join("; ")
            }
        };
        return Err(differ("numa", show(&sn), show(&dn)));
    }
    if s.memory.size != d.memory.size {
        return Err(differ("memory.size", s.memory.size, d.memory.size));
    }
    if s.memory.hotplug_size != d.memory.hotplug_size {
        let show = |h: Option<u64>| h.map_or("none".to_string(), |h| h.to_string());
        return Err(differ(
            "memory.hotplug_size",
            show(s.memory.hotplug_size),
            show(d.memory.hotplug_size),
        ));
    }
    cpuid(&source.shape.cpuid, &destination.shape.cpuid)?;
    devices(s, d)?;
    for (i, (a, b)) in s.disks.iter().zip(&d.disks).enumerate() {
        if a.readonly != b.readonly {
            return Err(differ(
                format!("disks[{i}].readonly"),
                a.readonly,
                b.readonly,
            ));
        }
        if a.num_queues != b.num_queues {
            return Err(differ(
                format!("disks[{i}].num_queues"),
                a.num_queues,
                b.num_queues,
            ));
        }
        let serial = |c: &api::config::DiskConfig| c.serial.clone().unwrap_or_default();
        if serial(a) != serial(b) {
            return Err(differ(
                format!("disks[{i}].serial"),
                format!("{:?}", serial(a)),
                format!("{:?}", serial(b)),
            ));
        }
    }
    sizes(&source.shape.disk_sizes, &destination.shape.disk_sizes)?;
    for (i, (a, b)) in s.nets.iter().zip(&d.nets).enumerate() {
        if a.mac != b.mac {
            let mac = |m: &Option<net::MacAddr>| m.map_or("none".to_string(), |m| m.to_string());
            return Err(differ(format!("nets[{i}].mac"), mac(&a.mac), mac(&b.mac)));
        }
    }
    Ok(())
}

/// The guest's devices in the order the device manager builds them, as (kind, id).
fn device_list(c: &VmConfig) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let ids = c.device_ids();
    for (i, id) in ids.into_iter().enumerate() {
        out.push((if i < c.disks.len() { "disk" } else { "net" }, id));
    }
    if c.guest_agent {
        // Multiport: more queues and the control protocol's state.
        out.push(("console", "console (guest agent)".into()));
    } else if c.console != OutputConfig::Off {
        out.push(("console", "console".into()));
    }
    if c.rng {
        out.push(("rng", "rng".into()));
    }
    // What the guest negotiated with depends on the features offered (and the stats
    // queue's presence moves the reporting queue); the target size is device state.
    if let Some(b) = &c.balloon {
        out.push((
            "balloon",
            format!(
                "balloon (deflate_on_oom={}, free_page_reporting={}, stats={})",
                b.deflate_on_oom,
                b.free_page_reporting,
                b.stats_interval_s > 0
            ),
        ));
    }
    out
}

fn devices(s: &VmConfig, d: &VmConfig) -> Result<(), Mismatch> {
    let (a, b) = (device_list(s), device_list(d));
    let show =
        |x: Option<&(&str, String)>| x.map_or("none".to_string(), |(k, id)| format!("{k} '{id}'"));
    for i in 0..a.len().max(b.len()) {
        if a.get(i) != b.get(i) {
            return Err(differ(
                format!("devices[{i}]"),
                show(a.get(i)),
                show(b.get(i)),
            ));
        }
    }
    Ok(())
}

fn sizes(s: &[u64], d: &[u64]) -> Result<(), Mismatch> {
    if s.len() != d.len() {
        return Err(differ("disk sizes (count)", s.len(), d.len()));
    }
    for (i, (a, b)) in s.iter().zip(d).enumerate() {
        if a != b {
            return Err(differ(format!("disks[{i}].size"), a, b));
        }
    }
    Ok(())
}

fn cpuid(s: &[CpuidLeaf], d: &[CpuidLeaf]) -> Result<(), Mismatch> {
    let name = |l: &CpuidLeaf| format!("cpuid[{:#x}.{}]", l.function, l.index);
    for a in s {
        let Some(b) = d
            .iter()
            .find(|b| (b.function, b.index) == (a.function, a.index))
        else {
            return Err(differ(name(a), "present", "absent"));
        };
        for (reg, x, y) in [
            ("eax", a.eax, b.eax),
            ("ebx", a.ebx, b.ebx),
            ("ecx", a.ecx, b.ecx),
            ("edx", a.edx, b.edx),
        ] {
            if x != y {
                return Err(differ(
                    format!("{}.{reg}", name(a)),
                    format!("{x:#010x}"),
                    format!("{y:#010x}"),
                ));
            }
        }
    }
    if let Some(b) = d.iter().find(|b| {
        !s.iter()
            .any(|a| (a.function, a.index) == (b.function, b.index))
    }) {
        return Err(differ(name(b), "absent", "present"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::config::{DiskConfig, NetConfig};

    fn config() -> VmConfig {
        let mut c: VmConfig = serde_json::from_value(serde_json::json!({
            "payload": {"kernel": "/dst/kernel"},
            "cpus": {"boot": 2},
            "memory": {"size": 536870912},
            "disks": [{"path": "/dst/a.raw"}, {"path": "/dst/b.vhdx", "id": "data"}],
            "nets": [{"tap": "vtap0", "mac": "52:54:00:00:00:01"}],
            "console": {"mode": "file", "file": "/dst/console.log"},
            "rng": true,
        }))
        .unwrap();
        c.serial = OutputConfig::Off;
        c
    }

    fn shape() -> GuestShape {
        GuestShape {
            disk_sizes: vec![64 << 20, 1 << 30],
            cpuid: vec![
                CpuidLeaf {
                    function: 1,
                    ecx: 0x8000_0001,
                    edx: 0xff,
                    ..Default::default()
                },
                CpuidLeaf {
                    function: 7,
                    ebx: 0x10,
                    ..Default::default()
                },
            ],
        }
    }

    /// Compares a changed source with the unchanged destination; the error text.
    fn check(change: impl FnOnce(&mut VmConfig, &mut GuestShape)) -> Result<(), String> {
        let (mut sc, mut ss) = (config(), shape());
        change(&mut sc, &mut ss);
        let (dc, ds) = (config(), shape());
        same_guest(
            &Side {
                config: &sc,
                shape: &ss,
            },
            &Side {
                config: &dc,
                shape: &ds,
            },
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn the_same_guest_passes_and_host_side_settings_are_not_compared() {
        check(|_, _| {}).unwrap();
        check(|c, _| {
            c.payload.kernel = "/etc/shadow".into();
            c.payload.cmdline = Some("init=/bin/sh".into());
            c.disks[0].path = "/dev/sda".into();
            c.disks[0].direct = true;
            c.disks[0].poll_us = 0;
            c.nets[0].tap = "other".into();
            c.console = OutputConfig::File("/etc/cron.d/x".into());
            c.serial = OutputConfig::File("/etc/passwd".into());
            c.memory.hugepages = true;
        })
        .unwrap();
    }

    #[test]
    fn memory_size_differs() {
        assert_eq!(
            check(|c, _| c.memory.size = 1 << 30).unwrap_err(),
            "memory.size: source 1073741824, destination 536870912"
        );
    }

    #[test]
    fn hotplug_size_differs() {
        assert_eq!(
            check(|c, _| c.memory.hotplug_size = Some(1 << 30)).unwrap_err(),
            "memory.hotplug_size: source 1073741824, destination none"
        );
    }

    #[test]
    fn vcpu_count_differs() {
        assert_eq!(
            check(|c, _| c.cpus.boot = 4).unwrap_err(),
            "cpus.boot: source 4, destination 2"
        );
    }

    #[test]
    fn numa_nodes_differ_but_host_placement_may() {
        let nodes = |distance: u8, host: Option<u32>| {
            let mut a = api::numa::parse_numa("node=0,cpus=0,memory=256M").unwrap();
            a.host_node = host;
            let mut b = api::numa::parse_numa("node=1,cpus=1,memory=256M").unwrap();
            b.distances = vec![api::numa::NumaDistance { node: 0, distance }];
            vec![a, b]
        };
        let both = |source: Vec<api::numa::NumaNode>, destination: Vec<api::numa::NumaNode>| {
            let (mut sc, mut dc) = (config(), config());
            sc.numa = source;
            dc.numa = destination;
            let (ss, ds) = (shape(), shape());
            same_guest(
                &Side {
                    config: &sc,
                    shape: &ss,
                },
                &Side {
                    config: &dc,
                    shape: &ds,
                },
            )
            .map_err(|e| e.to_string())
        };
        let e = both(nodes(30, None), nodes(20, None)).unwrap_err();
        assert!(
            e.starts_with("numa: source node 0 cpus [0] memory 268435456 distances 10,30"),
            "{e}"
        );
        both(nodes(20, Some(0)), nodes(20, Some(1))).unwrap();
        assert!(both(nodes(20, None), vec![])
            .unwrap_err()
            .ends_with("destination none"));
    }

    #[test]
    fn vcpu_topology_differs() {
        assert_eq!(
            check(|c, _| {
                c.cpus.topology = Some(api::config::CpuTopology {
                    sockets: 1,
                    cores: 1,
                    threads: 2,
                })
            })
            .unwrap_err(),
            "cpus.topology: source 1:1:2, destination 1:2:1"
        );
    }

    #[test]
    fn a_cpu_feature_differs_or_a_leaf_is_missing() {
        assert_eq!(
            check(|_, s| s.cpuid[1].ebx |= 1 << 5).unwrap_err(),
            "cpuid[0x7.0].ebx: source 0x00000030, destination 0x00000010"
        );
        assert_eq!(
            check(|_, s| {
                s.cpuid.remove(0);
            })
            .unwrap_err(),
            "cpuid[0x1.0]: source absent, destination present"
        );
        assert_eq!(
            check(|_, s| s.cpuid.push(CpuidLeaf {
                function: 0x8000_0001,
                ..Default::default()
            }))
            .unwrap_err(),
            "cpuid[0x80000001.0]: source present, destination absent"
        );
    }

    #[test]
    fn an_extra_or_missing_device_differs_by_position() {
        assert_eq!(
            check(|c, _| c.disks.push(DiskConfig {
                id: Some("extra".into()),
                ..c.disks[0].clone()
            }))
            .unwrap_err(),
            "devices[2]: source disk 'extra', destination net 'net0'"
        );
        assert_eq!(
            check(|c, _| c.rng = false).unwrap_err(),
            "devices[4]: source none, destination rng 'rng'"
        );
        assert_eq!(
            check(|c, _| c.console = OutputConfig::Off).unwrap_err(),
            "devices[3]: source rng 'rng', destination console 'console'"
        );
        assert_eq!(
            check(|c, _| c.nets.push(NetConfig {
                tap: "t1".into(),
                vhost_user: None,
                mac: None,
                id: None,
                switch: None,
                vlan: None,
                guard: None,
                max: None,
            }))
            .unwrap_err(),
            "devices[3]: source net 'net1', destination console 'console'"
        );
    }

    #[test]
    fn a_device_id_or_order_differs() {
        assert_eq!(
            check(|c, _| c.disks[1].id = Some("other".into())).unwrap_err(),
            "devices[1]: source disk 'other', destination disk 'data'"
        );
        assert_eq!(
            check(|c, _| c.disks.swap(0, 1)).unwrap_err(),
            "devices[0]: source disk 'data', destination disk 'disk0'"
        );
    }

    #[test]
    fn what_a_disk_tells_the_guest_differs() {
        assert_eq!(
            check(|c, _| c.disks[0].readonly = true).unwrap_err(),
            "disks[0].readonly: source true, destination false"
        );
        assert_eq!(
            check(|c, _| c.disks[1].num_queues = 4).unwrap_err(),
            "disks[1].num_queues: source 4, destination 1"
        );
        assert_eq!(
            check(|c, _| c.disks[0].serial = Some("SN1".into())).unwrap_err(),
            "disks[0].serial: source \"SN1\", destination \"\""
        );
        assert_eq!(
            check(|_, s| s.disk_sizes[1] = 2 << 30).unwrap_err(),
            "disks[1].size: source 2147483648, destination 1073741824"
        );
        assert_eq!(
            check(|_, s| s.disk_sizes.truncate(1)).unwrap_err(),
            "disk sizes (count): source 1, destination 2"
        );
    }

    #[test]
    fn a_mac_differs() {
        assert_eq!(
            check(|c, _| c.nets[0].mac = Some("52:54:00:00:00:02".parse().unwrap())).unwrap_err(),
            "nets[0].mac: source 52:54:00:00:00:02, destination 52:54:00:00:00:01"
        );
        assert_eq!(
            check(|c, _| c.nets[0].mac = None).unwrap_err(),
            "nets[0].mac: source none, destination 52:54:00:00:00:01"
        );
    }
}
