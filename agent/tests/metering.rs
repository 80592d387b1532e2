//! Metering numbers match what the guest did.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, T};
use serde_json::{json, Value};

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
