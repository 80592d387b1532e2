//! Metering numbers match what the guest did.

use crate::common;

use std::time::{Duration, Instant};

use common::{Daemon, T};
use serde_json::{json, Value};
use vireo_e2e::netframe::{self, ETHERTYPE};
use vireo_e2e::netns::{is_root, NetNs, PacketSocket};

#[test]
fn disk_bytes_cpu_and_memory_match_what_the_guest_did() {
    let d = Daemon::start(&["--no-autostart"]);
    let disk = d.dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let sectors = 2048u64; // 1 MiB in 16 requests of 64 KiB.
    let def = json!({
        "config": {
            "payload": {"kernel": vireo_e2e::guest(), "cmdline": format!("test=blk-write seed=3 sectors={sectors} hold=1")},
            "memory": {"size": 64u64 << 20},
            "disks": [{"path": disk}],
        },
        "restart": "never",
    });
    d.ok("PUT", "/api/v1/vms/io", Some(&def.to_string()));
    d.ok("PUT", "/api/v1/vms/io/start", None);
    d.wait_serial("io", "blk-write holding", T);
    let start = Instant::now();
    let m = loop {
        let m = d.ok("GET", "/api/v1/vms/io/metrics", None);
        if m["disk_write_bytes"].as_u64() >= Some(sectors * 512) && m["samples"].as_u64() >= Some(3)
        {
            break m;
        }
        assert!(start.elapsed() < T, "metering never saw the writes: {m}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(m["disk_write_bytes"], sectors * 512, "{m}");
    assert_eq!(m["disk_write_ops"], 16, "{m}");
    // The guest spins after its writes: up to one host CPU (less when the host is busy
    // with other tests), never more than its one vCPU plus the VMM's own threads.
    let cpu = m["avg_cpu_percent"].as_f64().unwrap();
    assert!(cpu > 1.0 && cpu < 150.0, "{m}");
    assert!(m["cpu_ns"].as_u64().unwrap() > 0);
    let (min, avg, max) = (
        m["min_memory_bytes"].as_u64().unwrap(),
        m["avg_memory_bytes"].as_u64().unwrap(),
        m["max_memory_bytes"].as_u64().unwrap(),
    );
    assert!(
        min > 1 << 20 && min <= avg && avg <= max && max < 512 << 20,
        "{m}"
    );
    assert_eq!(m["net_rx_bytes"], 0);

    // The same numbers through vireoctl and in Prometheus text.
    let out = d.ctl_ok(&["-o", "json", "vm", "metrics", "io"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["disk_write_bytes"], sectors * 512);
    let (_, prom) = d.api("GET", "/metrics", None);
    assert!(
        prom.contains(&format!(
            "vireo_vm_disk_written_bytes_total{{vm=\"io\"}} {}",
            sectors * 512
        )),
        "{prom}"
    );
    let table = d.ctl_ok(&["vm", "metrics", "io"]);
    assert!(
        table.contains("disk written") && table.contains("1048576 bytes (16 ops)"),
        "{table}"
    );

    // Reset: counting starts afresh (the guest does no more I/O).
    let out = d.ctl_ok(&["-o", "json", "vm", "metrics", "io", "--reset"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["disk_write_bytes"], 0, "{v}");
    std::thread::sleep(Duration::from_millis(400));
    let v = d.ok("GET", "/api/v1/vms/io/metrics", None);
    assert_eq!(v["disk_write_bytes"], 0, "{v}");
    assert!(v["samples"].as_u64().unwrap() >= 1, "{v}");

    // Metering survives the VM's stop (and vireod's restart: it is in SQLite).
    d.ok("PUT", "/api/v1/vms/io/stop", None);
    let after = d.ok("GET", "/api/v1/vms/io/metrics", None);
    assert_eq!(after["since_ms"], v["since_ms"]);
}

#[test]
fn network_bytes_in_and_out_match_what_the_guest_sent_and_received() {
    if !is_root() {
        vireo_e2e::skip_or_fail_under_ci("needs root (network namespaces and taps)");
        return;
    }
    let ns = std::sync::Arc::new(NetNs::new("agent-net"));
    ns.add_tap("vtapa");
    let sock = PacketSocket::open(&ns, "vtapa", ETHERTYPE);
    let d = Daemon::start_in_netns(&["--no-autostart"], ns.clone());
    let (seed, out_n, in_n) = (21u64, 10u32, 25u32);
    let guest_mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let def = json!({
        "config": {
            "payload": {"kernel": vireo_e2e::guest(),
                        "cmdline": format!("test=net send={out_n} recv={in_n} seed={seed} hold=1")},
            "memory": {"size": 64u64 << 20},
            "nets": [{"tap": "vtapa", "mac": "52:54:00:12:34:56"}],
        },
        "restart": "never",
    });
    d.ok("PUT", "/api/v1/vms/web", Some(&def.to_string()));
    d.ok("PUT", "/api/v1/vms/web/start", None);
    // Out: the guest's frames reach the tap.
    let mut out_bytes = 0u64;
    for i in 0..out_n {
        let f = sock
            .recv(T)
            .unwrap_or_else(|| panic!("guest frame {i} never arrived"));
        let (index, ok) = netframe::check(&f, seed).expect("a test frame");
        assert!(index == i && ok, "frame {i}");
        out_bytes += f.len() as u64;
    }
    // In: the host's frames reach the guest.
    let mut in_bytes = 0u64;
    for i in 0..in_n {
        let mut f = vec![0u8; netframe::frame_len(i, netframe::MAX_LEN)];
        netframe::fill(&mut f, guest_mac, [0x52, 0x54, 0, 0, 0, 0xfe], seed + 1, i);
        sock.send(&f);
        in_bytes += f.len() as u64;
    }
    let serial = d.wait_serial("web", "net holding", T);
    assert!(
        serial.contains(&format!("net received={in_n} bytes={in_bytes} ")),
        "{serial}"
    );
    let start = Instant::now();
    let m = loop {
        let m = d.ok("GET", "/api/v1/vms/web/metrics", None);
        if m["net_rx_bytes"].as_u64() >= Some(in_bytes) && m["samples"].as_u64() >= Some(2) {
            break m;
        }
        assert!(start.elapsed() < T, "metering never saw the traffic: {m}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(m["net_rx_bytes"], in_bytes, "{m}");
    assert_eq!(m["net_tx_bytes"], out_bytes, "{m}");
    assert_eq!(m["disk_write_bytes"], 0, "{m}");

    let (_, prom) = d.api("GET", "/metrics", None);
    for line in [
        format!("vireo_vm_network_rx_bytes_total{{vm=\"web\"}} {in_bytes}"),
        format!("vireo_vm_network_tx_bytes_total{{vm=\"web\"}} {out_bytes}"),
    ] {
        assert!(prom.contains(&line), "{line} not in:\n{prom}");
    }
    let table = d.ctl_ok(&["vm", "metrics", "web"]);
    assert!(
        table.contains("network rx/tx")
            && table.contains(&format!("{in_bytes} / {out_bytes} bytes")),
        "{table}"
    );
    d.ok("PUT", "/api/v1/vms/web/stop", None);
}
