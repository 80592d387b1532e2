//! virtio-mem: the guest plugs blocks of the hotplug region as `vm.resize`'s
//! `desired_ram` asks, every page of a plugged block keeps what the guest wrote (also
//! across a snapshot and a live migration), unplugged blocks leave the VMM's RSS and
//! read zero. The guest is the test guest's own virtio-mem driver (`test=virtio-mem`).

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
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["mem0"].clone()
}

fn info(sock: &Path) -> serde_json::Value {
    let (s, body) = api(sock, "GET", "vm.info", None);
    assert_eq!(s, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn resize(sock: &Path, bytes: u64) -> (u16, String) {
    api(
        sock,
        "PUT",
        "vm.resize",
        Some(&format!(r#"{{"desired_ram":{bytes}}}"#)),
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

fn hotplug_vm(sock: &Path) -> vireo_e2e::Running {
    hotplug_vm_with(sock, "test=virtio-mem")
}

fn hotplug_vm_with(sock: &Path, cmdline: &str) -> vireo_e2e::Running {
    let vm = Vireo::guest(
        cmdline,
        &[
            "--memory",
            "size=256M,hotplug_size=512M",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    )
    .spawn();
    wait_for_socket(sock, T);
    vm
}

#[test]
fn the_guest_plugs_what_desired_ram_asks_and_unplugged_blocks_leave_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let vm = hotplug_vm(&sock);
    let pid = vm.child.as_ref().unwrap().id();
    let serial = || vm.serial_text();
    // The region lies at 4 GiB (RAM is below 3 GiB), is not RAM in the e820 map, and
    // nothing is plugged or asked for at start.
    wait_line(
        serial,
        "virtio-mem config block=2097152 addr=0x100000000 region=536870912 \
         usable=536870912 plugged=0 requested=0 in_e820=0",
        0,
    );
    // What the device must refuse, it refuses.
    wait_line(
        serial,
        "virtio-mem checks beyond_nack=1 unplug_error=1 unaligned_error=1 outside_error=1 \
         state_unplugged=1",
        0,
    );
    let at = wait_line(serial, "virtio-mem plugged=0 device=0", 0);
    let before = rss(pid);
    let i = info(&sock);
    assert_eq!(i["memory_actual_size"], 256 * MIB, "{i}");
    assert_eq!(i["memory_plugged_size"], 0, "{i}");

    // 256 MiB more: 128 blocks plugged, every page written and read back.
    let (s, body) = resize(&sock, 512 * MIB);
    assert_eq!(s, 204, "{body}");
    let at = wait_line(serial, "virtio-mem plugged=128 device=128 verified=128", at);
    let plugged = rss(pid);
    assert!(
        plugged >= before + 250 * MIB,
        "RSS {} MiB after the guest wrote 256 MiB of plugged blocks, {} MiB before",
        plugged / MIB,
        before / MIB
    );
    let i = info(&sock);
    assert_eq!(i["memory_actual_size"], 512 * MIB, "{i}");
    assert_eq!(i["memory_plugged_size"], 256 * MIB, "{i}");
    assert_eq!(i["memory_requested_size"], 256 * MIB, "{i}");
    let c = counters(&sock);
    assert_eq!(c["plugged_bytes"], 256 * MIB, "{c}");

    // Down to 64 MiB: the guest unplugs 96 blocks, which read zero and leave the RSS.
    assert_eq!(resize(&sock, 320 * MIB).0, 204);
    wait_line(
        serial,
        "virtio-mem plugged=32 device=32 verified=32 unplugged=96 zeroed=96",
        at,
    );
    let after = rss(pid);
    assert!(
        after + 180 * MIB <= plugged,
        "RSS {} MiB after unplugging 192 MiB, {} MiB before",
        after / MIB,
        plugged / MIB
    );
    let c = counters(&sock);
    assert_eq!(c["plugged_bytes"], 64 * MIB, "{c}");
    assert_eq!(c["discarded_bytes"], 192 * MIB, "{c}");
    assert_eq!(info(&sock)["memory_actual_size"], 320 * MIB);
}

#[test]
fn desired_ram_the_hotplug_region_cannot_give_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let vm = hotplug_vm(&sock);
    wait_line(|| vm.serial_text(), "virtio-mem plugged=0", 0);
    for (bytes, says) in [
        (256 * MIB + MIB, "multiple of the 2 MiB block"),
        (1024 * MIB, "at most 768 MiB"),
        (128 * MIB, "the boot memory (256 MiB)"),
    ] {
        let (s, body) = resize(&sock, bytes);
        assert_eq!(s, 400, "{body}");
        assert!(body.contains(says), "{says:?} not in {body}");
        assert_eq!(body.trim().lines().count(), 1, "{body}");
    }
    let (s, body) = api(
        &sock,
        "PUT",
        "vm.resize",
        Some(r#"{"desired_ram":1,"desired_balloon":1}"#),
    );
    assert_eq!(s, 400, "{body}");
    assert!(
        body.contains("one of desired_balloon and desired_ram"),
        "{body}"
    );
    drop(vm);

    let sock2 = dir.path().join("plain.sock");
    let _without = Vireo::guest("test=counter", &["--api-socket", sock2.to_str().unwrap()]).spawn();
    wait_for_socket(&sock2, T);
    let (s, body) = resize(&sock2, 1024 * MIB);
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("needs a hotplug region"), "{body}");
    assert!(info(&sock2).get("memory_plugged_size").is_none());
}

#[test]
fn a_snapshot_keeps_the_plugged_blocks_and_their_contents() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let vm = hotplug_vm(&sock);
    let serial = || vm.serial_text();
    wait_line(serial, "virtio-mem plugged=0", 0);
    assert_eq!(resize(&sock, 320 * MIB).0, 204);
    wait_line(serial, "virtio-mem plugged=32 device=32 verified=32", 0);
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
    assert_eq!(c["plugged_bytes"], 64 * MIB, "{c}");
    assert_eq!(c["requested_bytes"], 64 * MIB, "{c}");
    // Two more blocks: the guest plugs them and reads back all 34, the 32 it wrote
    // before the snapshot included.
    assert_eq!(resize(&rsock, 324 * MIB).0, 204);
    let text = || std::fs::read_to_string(&rserial).unwrap_or_default();
    wait_line(text, "virtio-mem plugged=34 device=34 verified=34", 0);
    assert!(
        !text().contains("virtio-mem config"),
        "the guest started over"
    );
    restored.kill().unwrap();
    restored.wait().unwrap();
}

#[test]
fn a_live_migration_keeps_the_plugged_blocks_and_their_contents() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("src.sock");
    let src = hotplug_vm(&sock);
    wait_line(|| src.serial_text(), "virtio-mem plugged=0", 0);
    assert_eq!(resize(&sock, 384 * MIB).0, 204);
    wait_line(
        || src.serial_text(),
        "virtio-mem plugged=64 device=64 verified=64",
        0,
    );
    // Some unplugged after being written: the destination must not see them plugged.
    assert_eq!(resize(&sock, 320 * MIB).0, 204);
    wait_line(
        || src.serial_text(),
        "virtio-mem plugged=32 device=32 verified=32 unplugged=32 zeroed=32",
        0,
    );

    let dst = migrate_to_new_vmm(&sock, src, dir.path());
    let c = counters(&dst.sock);
    assert_eq!(c["plugged_bytes"], 64 * MIB, "{c}");
    assert_eq!(resize(&dst.sock, 328 * MIB).0, 204);
    wait_line(
        || dst.serial_text(),
        "virtio-mem plugged=36 device=36 verified=36",
        0,
    );
    assert!(
        !dst.serial_text().contains("virtio-mem config"),
        "the guest started over"
    );
}

/// The guest writes plugged blocks while the migration copies memory (it plugs and
/// fills one block every 25 ms): only the dirty log of the hotplug region carries those
/// writes over, and at the destination every page of every block reads back.
#[test]
fn blocks_written_during_a_live_migration_arrive_through_the_dirty_log() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("src.sock");
    let src = hotplug_vm_with(&sock, "test=virtio-mem plug_delay_ms=25");
    wait_line(|| src.serial_text(), "virtio-mem plugged=0", 0);
    // 128 blocks at 25 ms each: about 3 s of writing, which the migration falls into.
    assert_eq!(resize(&sock, 512 * MIB).0, 204);
    let start = Instant::now();
    while counters(&sock)["plugged_bytes"].as_u64().unwrap() < 8 * MIB {
        assert!(start.elapsed() < T, "the guest does not plug");
        std::thread::sleep(Duration::from_millis(5));
    }
    let dst = migrate_to_new_vmm(&sock, src, dir.path());
    let during = counters(&dst.sock)["plugged_bytes"].as_u64().unwrap();
    assert!(
        during < 256 * MIB,
        "the guest had plugged everything before the switch-over ({} MiB): no writes \
         during the migration were tested",
        during / MIB
    );
    wait_line(
        || dst.serial_text(),
        "virtio-mem plugged=128 device=128 verified=128",
        0,
    );
}

/// A reboot builds the VM again: the blocks are gone, the host's request is not, and
/// the new guest plugs up to it.
#[test]
fn a_reboot_keeps_the_requested_size() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let vm = hotplug_vm(&sock);
    let serial = || vm.serial_text();
    wait_line(serial, "virtio-mem plugged=0", 0);
    assert_eq!(resize(&sock, 320 * MIB).0, 204);
    wait_line(serial, "virtio-mem plugged=32 device=32 verified=32", 0);
    let (s, body) = api(&sock, "PUT", "vm.reboot", None);
    assert_eq!(s, 204, "{body}");
    // The rebooted VM writes its serial output anew.
    let at = wait_line(serial, "plugged=0 requested=67108864 in_e820=0", 0);
    wait_line(serial, "virtio-mem plugged=32 device=32 verified=32", at);
    assert_eq!(info(&sock)["memory_plugged_size"], 64 * MIB);
}
