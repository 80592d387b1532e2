//! virtio-balloon: pages the guest gives (inflate, free page reporting) leave the VMM's
//! RSS, pages it takes back (deflate) read zero (the host dropped them), statistics
//! arrive, and a snapshot keeps the target. The guest is the test guest's own balloon
//! driver (`test=balloon`).

use std::path::Path;
use std::time::{Duration, Instant};

use vireo_e2e::mobility::{migrate_to_new_vmm, restore};
use vireo_e2e::{api, wait_for_socket, Vireo};

const T: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

fn counters(sock: &Path) -> serde_json::Value {
    let (s, body) = api(sock, "GET", "vm.counters", None);
    assert_eq!(s, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["balloon0"].clone()
}

fn resize(sock: &Path, bytes: u64) -> (u16, String) {
    api(
        sock,
        "PUT",
        "vm.resize",
        Some(&format!(r#"{{"desired_balloon":{bytes}}}"#)),
    )
}

/// Waits for `line` to appear in `serial_of()` after byte offset `from`; returns where
/// it ends.
fn wait_line(serial_of: impl Fn() -> String, line: &str, from: usize) -> usize {
    let start = Instant::now();
    loop {
        let s = serial_of();
        if let Some(at) = s.get(from..).and_then(|t| t.find(line)) {
            return from + at + line.len();
        }
        assert!(start.elapsed() < T, "no {line:?} after offset {from}:\n{s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn inflating_returns_memory_to_the_host_and_deflated_pages_come_back_zeroed() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let vm = Vireo::guest(
        "test=balloon touch_mib=256 report_mib=64",
        &[
            "--memory",
            "size=1G",
            "--balloon",
            "size=0,free_page_reporting=on,deflate_on_oom=on",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    )
    .spawn();
    wait_for_socket(&sock, T);
    let pid = vm.child.as_ref().unwrap().id();
    let serial = || vm.serial_text();
    let at = wait_line(serial, "balloon actual=0 target=0", 0);
    // Free page reporting: the 64 MiB the guest touched and then reported are gone.
    assert_eq!(counters(&sock)["reported_bytes"], 64 * MIB);
    let ready = rss(pid);
    assert!(
        ready < 256 * MIB + 40 * MIB,
        "RSS {} MiB: 256 MiB pool + overhead, the reported 64 MiB given back",
        ready / MIB
    );

    // Inflate by 128 MiB: the VMM's RSS falls by about that much.
    assert_eq!(resize(&sock, 128 * MIB).0, 204);
    let at = wait_line(serial, "balloon actual=32768 target=32768", at);
    let inflated = rss(pid);
    assert!(
        inflated + 120 * MIB <= ready,
        "RSS {} MiB after inflating 128 MiB, {} MiB before",
        inflated / MIB,
        ready / MIB
    );
    let c = counters(&sock);
    assert_eq!(c["inflated_pages"], 32768);
    assert_eq!(c["actual_bytes"], 128 * MIB);
    assert_eq!(c["refused_pages"], 0);

    // Statistics: the guest's free memory is its pool less the balloon.
    let start = Instant::now();
    while counters(&sock)["free_memory"] != 128 * MIB {
        assert!(
            start.elapsed() < T,
            "no fresh statistics: {}",
            counters(&sock)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(counters(&sock)["total_memory"].as_u64().unwrap() > 1000 * MIB);

    // Deflate to nothing: every page the guest takes back reads zero.
    assert_eq!(resize(&sock, 0).0, 204);
    let end = wait_line(serial, "balloon actual=0 target=0", at);
    let text = serial();
    let mut pages = 0;
    for l in text[at..end]
        .lines()
        .filter(|l| l.starts_with("balloon deflated"))
    {
        let n: Vec<u64> = l
            .split_whitespace()
            .filter_map(|f| f.split_once('=')?.1.parse().ok())
            .collect();
        assert_eq!(n[0], n[1], "a deflated page kept its old content: {l}");
        pages += n[0];
    }
    assert_eq!(pages, 32768);
    assert_eq!(counters(&sock)["deflated_pages"], 32768);
    assert!(
        rss(pid) + 8 * MIB >= ready,
        "the guest touched its pages again"
    );
}

#[test]
fn a_snapshot_keeps_the_balloon_target_and_the_restored_guest_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let vm = Vireo::guest(
        "test=balloon touch_mib=128",
        &[
            "--memory",
            "size=512M",
            "--balloon",
            "size=32M",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    )
    .spawn();
    wait_for_socket(&sock, T);
    let serial = || vm.serial_text();
    // The target given at start (32 MiB = 8192 pages).
    wait_line(serial, "balloon actual=8192 target=8192", 0);
    assert_eq!(resize(&sock, 64 * MIB).0, 204);
    wait_line(serial, "balloon actual=16384 target=16384", 0);
    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 204);
    let snap = dir.path().join("snap");
    let url = format!(r#"{{"destination_url":"file://{}"}}"#, snap.display());
    let (s, body) = api(&sock, "PUT", "vm.snapshot", Some(&url));
    assert_eq!(s, 204, "{body}");
    assert_eq!(api(&sock, "PUT", "vm.shutdown", None).0, 204);
    assert_eq!(vm.wait(T).status.code(), Some(0));

    let rsock = dir.path().join("restored.sock");
    let rserial = dir.path().join("restored.log");
    let mut restored = restore(&snap, &rserial, Some(&rsock));
    wait_for_socket(&rsock, T);
    let c = counters(&rsock);
    assert_eq!(c["target_bytes"], 64 * MIB, "{c}");
    assert_eq!(c["actual_bytes"], 64 * MIB, "{c}");
    // The guest goes on where it was: it follows a new target.
    assert_eq!(resize(&rsock, 0).0, 204);
    let text = || std::fs::read_to_string(&rserial).unwrap_or_default();
    wait_line(text, "balloon actual=0 target=0", 0);
    assert!(!text().contains("balloon ready"), "the guest started over");
    restored.kill().unwrap();
    restored.wait().unwrap();
}

#[test]
fn resize_requests_a_vm_cannot_take_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let with = Vireo::guest(
        "test=balloon touch_mib=16",
        &[
            "--memory",
            "size=256M",
            "--balloon",
            "size=0",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    )
    .spawn();
    wait_for_socket(&sock, T);
    let (s, body) = resize(&sock, 512 * MIB);
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("exceeds the VM's memory"), "{body}");
    let (s, body) = api(
        &sock,
        "PUT",
        "vm.resize",
        Some(r#"{"desired_balloon":"lots"}"#),
    );
    assert_eq!(s, 400, "{body}");
    drop(with);

    let sock2 = dir.path().join("plain.sock");
    let _without = Vireo::guest("test=counter", &["--api-socket", sock2.to_str().unwrap()]).spawn();
    wait_for_socket(&sock2, T);
    let (s, body) = resize(&sock2, MIB);
    assert_eq!(s, 409, "{body}");
    assert!(body.contains("no balloon"), "{body}");
}

/// A VM with every memory feature at once (4 vCPUs as 2 sockets, two NUMA nodes with
/// node 0 bound to host node 0, a balloon holding 32 MiB) live-migrates: at the
/// destination the balloon's target and size are what they were, the guest follows a
/// new target without starting over, and node 0's memory is bound again.
#[test]
fn numa_balloon_and_topology_survive_a_live_migration() {
    let dir = tempfile::tempdir().unwrap();
    let src_sock = dir.path().join("src.sock");
    let src = Vireo::guest(
        "test=balloon touch_mib=64",
        &[
            "--cpus",
            "boot=4,topology=2:2:1",
            "--memory",
            "size=512M",
            "--numa",
            "node=0,cpus=0-1,memory=256M,host_node=0",
            "--numa",
            "node=1,cpus=2-3,memory=256M,distances=0@25",
            "--balloon",
            "size=32M",
            "--api-socket",
            src_sock.to_str().unwrap(),
        ],
    )
    .spawn();
    wait_for_socket(&src_sock, T);
    wait_line(|| src.serial_text(), "balloon actual=8192 target=8192", 0);

    let dst = migrate_to_new_vmm(&src_sock, src, dir.path());
    let dst_sock = dst.sock.clone();
    let c = counters(&dst_sock);
    assert_eq!(c["target_bytes"], 32 * MIB, "{c}");
    assert_eq!(c["actual_bytes"], 32 * MIB, "{c}");
    assert_eq!(resize(&dst_sock, 0).0, 204);
    let text = || dst.serial_text();
    wait_line(text, "balloon actual=0 target=0", 0);
    assert!(!text().contains("balloon ready"), "the guest started over");
    let pid = dst.child.as_ref().unwrap().id();
    let numa_maps = std::fs::read_to_string(format!("/proc/{pid}/numa_maps")).unwrap();
    assert_eq!(
        numa_maps
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("bind:0"))
            .count(),
        1,
        "{numa_maps}"
    );
    assert_eq!(api(&dst_sock, "PUT", "vm.shutdown", None).0, 204);
    let out = dst.wait();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
