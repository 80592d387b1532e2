//! Virtual NUMA: the guest finds its nodes (which CPUs, which memory, how far apart) in
//! the SRAT and SLIT; a node bound to a host node has its memory placed there by the
//! kernel (mbind, seen in /proc/PID/numa_maps), also after a snapshot is restored in a
//! fresh VMM. This host has one NUMA node: binding to node 0 is what can be checked here.

use std::time::Duration;

use vireo_e2e::mobility::restore;
use vireo_e2e::{api, assert_guest_ok, serial_line, wait_for_socket, Vireo};

const T: Duration = Duration::from_secs(60);

#[test]
fn the_guest_finds_its_nodes_cpus_memory_and_distances_in_the_srat_and_slit() {
    // Node 1 straddles the 32-bit PCI hole (RAM below 3 GiB, then above 4 GiB); node 2's
    // vCPUs are not contiguous; distances are given one way and hold both ways.
    let (out, serial) = Vireo::guest(
        "test=numa",
        &[
            "--cpus",
            "boot=6,topology=3:2:1",
            "--memory",
            "size=5G",
            "--numa",
            "node=0,cpus=0-1,memory=2G,distances=1@21:2@31",
            "--numa",
            "node=1,cpus=2:4,memory=2G,distances=2@15",
            "--numa",
            "node=2,cpus=3:5,memory=1G",
        ],
    )
    .run(T);
    assert_guest_ok(&out, &serial);
    assert_eq!(serial_line(&serial, "numa nodes="), "numa nodes=3");
    // APIC IDs: 3 sockets x 2 cores -> socket s, core c has ID 2s + c... with 2 cores a
    // socket takes 1 bit: vCPU i has APIC ID (i / 2) << 1 | i % 2 = i.
    assert_eq!(
        serial_line(&serial, "numa node=0 "),
        "numa node=0 apics=0,1 mib=2048 ranges=1"
    );
    assert_eq!(
        serial_line(&serial, "numa node=1 "),
        "numa node=1 apics=2,4 mib=2048 ranges=2"
    );
    assert_eq!(
        serial_line(&serial, "numa node=2 "),
        "numa node=2 apics=3,5 mib=1024 ranges=1"
    );
    assert_eq!(
        serial_line(&serial, "numa slit node=0"),
        "numa slit node=0 distances=10,21,31"
    );
    assert_eq!(
        serial_line(&serial, "numa slit node=1"),
        "numa slit node=1 distances=21,10,15"
    );
    assert_eq!(
        serial_line(&serial, "numa slit node=2"),
        "numa slit node=2 distances=31,15,10"
    );

    // Without --numa there is no SRAT: one node, as before.
    let (out, serial) = Vireo::guest("test=numa", &[]).run(T);
    assert_guest_ok(&out, &serial);
    assert!(serial.contains("numa srat none"), "{serial}");
}

/// The mappings of `pid` whose memory policy is `bind:0`, as (start, size in bytes).
fn bound_to_node0(pid: u32) -> Vec<(u64, u64)> {
    let numa_maps = std::fs::read_to_string(format!("/proc/{pid}/numa_maps")).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    numa_maps
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("bind:0"))
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().next()?, 16).ok())
        .map(|start| {
            let size = maps
                .lines()
                .find_map(|m| {
                    let (range, _) = m.split_once(' ')?;
                    let (a, b) = range.split_once('-')?;
                    let (a, b) = (
                        u64::from_str_radix(a, 16).ok()?,
                        u64::from_str_radix(b, 16).ok()?,
                    );
                    (a == start).then_some(b - a)
                })
                .unwrap_or(0);
            (start, size)
        })
        .collect()
}

#[test]
fn a_node_bound_to_a_host_node_lives_there_also_after_a_restore() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let numa = [
        "--numa",
        "node=0,cpus=0,memory=256M,host_node=0",
        "--numa",
        "node=1,cpus=1,memory=256M",
    ];
    let mut args = vec![
        "--cpus",
        "boot=2",
        "--memory",
        "size=512M",
        "--api-socket",
        sock.to_str().unwrap(),
    ];
    args.extend(numa);
    let vm = Vireo::guest("test=counter period_ms=20", &args).spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("tick 2 ", T);
    let pid = vm.child.as_ref().unwrap().id();
    // Node 0's 256 MiB (guest RAM from 0) is bound to host node 0; node 1's is not.
    assert_eq!(
        bound_to_node0(pid).iter().map(|m| m.1).collect::<Vec<_>>(),
        vec![256 << 20],
        "{}",
        std::fs::read_to_string(format!("/proc/{pid}/numa_maps")).unwrap()
    );

    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 204);
    let snap = dir.path().join("snap");
    let url = format!(r#"{{"destination_url":"file://{}"}}"#, snap.display());
    let (s, body) = api(&sock, "PUT", "vm.snapshot", Some(&url));
    assert_eq!(s, 204, "{body}");
    let config = std::fs::read_to_string(snap.join("config.json")).unwrap_or_default();
    let last_tick = vm
        .serial_text()
        .lines()
        .filter(|l| l.starts_with("tick "))
        .count();
    assert_eq!(api(&sock, "PUT", "vm.shutdown", None).0, 204);
    assert_eq!(vm.wait(T).status.code(), Some(0));

    let serial = dir.path().join("restored.log");
    let mut restored = restore(&snap, &serial, None);
    let start = std::time::Instant::now();
    let text = loop {
        let t = std::fs::read_to_string(&serial).unwrap_or_default();
        if t.lines().filter(|l| l.starts_with("tick ")).count() >= 2 {
            break t;
        }
        assert!(
            start.elapsed() < T,
            "the restored guest does not tick: {t}\n{config}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !text.contains("counter tsc_khz"),
        "the guest started over: {text}"
    );
    assert!(last_tick > 0);
    assert_eq!(
        bound_to_node0(restored.id())
            .iter()
            .map(|m| m.1)
            .collect::<Vec<_>>(),
        vec![256 << 20]
    );
    restored.kill().unwrap();
    restored.wait().unwrap();
}
