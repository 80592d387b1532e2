//! virtio-blk end to end: the guest writes and reads seeded patterns through our device
//! (driven by the virtio-drivers crate); the host checks the bytes in the image.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use vireo_e2e::pattern;
use vireo_e2e::{assert_guest_ok, serial_line, Vireo};

const T: Duration = Duration::from_secs(60);

fn raw_disk(dir: &Path, size: u64) -> std::path::PathBuf {
    let p = dir.join("disk.raw");
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn disk_arg(p: &Path, extra: &str) -> String {
    format!("path={}{extra}", p.display())
}

/// Checks `sectors` sectors from `offset` of a raw image against the pattern.
fn assert_pattern(image: &Path, seed: u64, offset: u64, sectors: u64) {
    let f = std::fs::File::open(image).unwrap();
    let mut buf = vec![0u8; pattern::SECTOR_SIZE];
    let mut want = vec![0u8; pattern::SECTOR_SIZE];
    for lba in offset..offset + sectors {
        f.read_exact_at(&mut buf, lba * pattern::SECTOR_SIZE as u64)
            .unwrap();
        pattern::fill_sector(seed, lba, &mut want);
        assert!(buf == want, "sector {lba} of {} differs", image.display());
    }
}

#[test]
fn guest_writes_pattern_host_reads_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path(), 64 << 20);
    let (seed, offset, sectors) = (7u64, 100u64, 5000u64);
    let (out, serial) = Vireo::guest(
        &format!("test=blk-write seed={seed} sectors={sectors} offset={offset}"),
        &["--disk", &disk_arg(&disk, "")],
    )
    .run(T);
    assert_guest_ok(&out, &serial);
    let line = serial_line(&serial, "blk capacity=");
    assert_eq!(
        line,
        format!(
            "blk capacity={} wrote={sectors} crc32={:08x}",
            (64 << 20) / 512,
            pattern::expected_crc32(seed, offset, sectors)
        )
    );
    assert_pattern(&disk, seed, offset, sectors);
    // Nothing outside the range was touched.
    let f = std::fs::File::open(&disk).unwrap();
    let mut b = vec![0u8; 512];
    f.read_exact_at(&mut b, (offset - 1) * 512).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    f.read_exact_at(&mut b, (offset + sectors) * 512).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn guest_reads_pattern_host_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path(), 16 << 20);
    let (seed, offset, sectors) = (99u64, 3u64, 3000u64);
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let mut buf = vec![0u8; 512];
    for lba in offset..offset + sectors {
        pattern::fill_sector(seed, lba, &mut buf);
        f.write_all_at(&buf, lba * 512).unwrap();
    }
    drop(f);
    let (out, serial) = Vireo::guest(
        &format!("test=blk-read seed={seed} sectors={sectors} offset={offset}"),
        &["--disk", &disk_arg(&disk, ",readonly=on")],
    )
    .run(T);
    assert_guest_ok(&out, &serial);
    assert!(serial.contains("mismatches=0"), "{serial}");

    // And a wrong seed is caught (the check can fail).
    let (_, serial) = Vireo::guest(
        &format!("test=blk-read seed={} sectors=10 offset={offset}", seed + 1),
        &["--disk", &disk_arg(&disk, ",readonly=on")],
    )
    .run(T);
    assert!(serial.contains("result fail"), "{serial}");
}

#[test]
fn readonly_disk_refuses_writes_and_stays_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path(), 1 << 20);
    std::fs::write(&disk, vec![0xa5u8; 1 << 20]).unwrap();
    let (out, serial) =
        Vireo::guest("test=blk-ro", &["--disk", &disk_arg(&disk, ",readonly=on")]).run(T);
    assert_guest_ok(&out, &serial);
    assert!(serial.contains("readonly=1"), "{serial}");
    assert!(serial.contains("write=refused"), "{serial}");
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0xa5));
}

#[test]
fn write_to_a_range_beyond_the_disk_fails_in_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path(), 1 << 20);
    let (out, serial) = Vireo::guest(
        "test=blk-write seed=1 sectors=16 offset=2040",
        &["--disk", &disk_arg(&disk, "")],
    )
    .run(T);
    assert!(serial.contains("result fail"), "{serial}");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        std::fs::metadata(&disk).unwrap().len(),
        1 << 20,
        "no growth"
    );
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn vhdx_disk_written_by_the_guest_passes_both_checkers_and_reads_back() {
    vhdx_guest_roundtrip("");
}

#[test]
fn vhdx_disk_with_direct_io_written_by_the_guest_reads_back() {
    vhdx_guest_roundtrip(",direct=on");
}

/// The guest writes a pattern across a block boundary of a new VHDX (opened
/// with `extra` options), both checkers pass, qemu-img reads the pattern, and
/// the guest reads it back read-only.
fn vhdx_guest_roundtrip(extra: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    let img_s = img.to_str().unwrap();
    let vireo_img = vireo_e2e::bin("vireo-img");
    run(
        vireo_img.to_str().unwrap(),
        &["create", "-f", "vhdx", img_s, "256M"],
    );
    // Spans the first 32 MiB block boundary (65536 sectors) and starts mid-block.
    let (seed, offset, sectors) = (4242u64, 60_000u64, 20_000u64);
    let (out, serial) = Vireo::guest(
        &format!("test=blk-write seed={seed} sectors={sectors} offset={offset}"),
        &["--disk", &disk_arg(&img, extra)],
    )
    .run(T);
    assert_guest_ok(&out, &serial);
    run(vireo_img.to_str().unwrap(), &["check", img_s]);
    run("qemu-img", &["check", "-f", "vhdx", img_s]);
    let raw = dir.path().join("back.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vhdx",
            "-O",
            "raw",
            img_s,
            raw.to_str().unwrap(),
        ],
    );
    assert_pattern(&raw, seed, offset, sectors);

    // The guest reads it back through our VHDX backend, read-only.
    let (out, serial) = Vireo::guest(
        &format!("test=blk-read seed={seed} sectors={sectors} offset={offset}"),
        &["--disk", &disk_arg(&img, &format!(",readonly=on{extra}"))],
    )
    .run(T);
    assert_guest_ok(&out, &serial);
}

#[test]
fn guest_reads_a_vhdx_made_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path(), 64 << 20);
    let (seed, offset, sectors) = (5u64, 1u64, 9000u64);
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    let mut buf = vec![0u8; 512];
    for lba in offset..offset + sectors {
        pattern::fill_sector(seed, lba, &mut buf);
        f.write_all_at(&buf, lba * 512).unwrap();
    }
    drop(f);
    let img = dir.path().join("q.vhdx");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let (out, serial) = Vireo::guest(
        &format!("test=blk-read seed={seed} sectors={sectors} offset={offset}"),
        &["--disk", &disk_arg(&img, "")],
    )
    .run(T);
    assert_guest_ok(&out, &serial);
    run("qemu-img", &["check", "-f", "vhdx", img.to_str().unwrap()]);
}

#[test]
fn malformed_vhdx_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bad.vhdx");
    let vireo_img = vireo_e2e::bin("vireo-img");
    run(
        vireo_img.to_str().unwrap(),
        &["create", "-f", "vhdx", img.to_str().unwrap(), "64M"],
    );
    // Corrupt both headers' bytes (CRC mismatch) but keep the file identifier.
    let mut bytes = std::fs::read(&img).unwrap();
    for off in [64 * 1024 + 100, 128 * 1024 + 100] {
        bytes[off] ^= 0xff;
    }
    std::fs::write(&img, &bytes).unwrap();
    let (out, _) = Vireo::guest("test=boot", &["--disk", &disk_arg(&img, "")]).run(T);
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.vhdx"), "error names the image: {err}");
    assert!(std::fs::read(&img).unwrap() == bytes, "image unchanged");
}

#[test]
fn virtio_console_carries_output_and_input() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let mut child = std::process::Command::new(vireo_e2e::bin("vireo"))
        .arg("--kernel")
        .arg(vireo_e2e::guest())
        .args(["--cmdline", "test=console ms=5000", "--console", "tty"])
        .arg("--serial")
        .arg(format!("file={}", serial.display()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello guest, from the host\n")
        .unwrap();
    let out = vireo_e2e::wait_with_timeout(child, T);
    let serial = std::fs::read_to_string(&serial).unwrap();
    assert_guest_ok(&out, &serial);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "vireo-guest: hello through virtio-console\n",
        "console output goes to stdout, serial to its file"
    );
    assert!(
        serial.contains("console got=hello guest, from the host"),
        "{serial}"
    );
}

/// `bench <phase> ops=.. iops=.. mbps=..` lines of `test=blk-bench` → (phase, iops, MB/s).
fn bench_phases(serial: &str) -> Vec<(String, f64, f64)> {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("bench "))
        .filter(|l| !l.starts_with("capacity="))
        .map(|l| {
            let mut words = l.split_whitespace();
            let phase = words.next().unwrap_or_default().to_string();
            let field = |name: &str| -> f64 {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {name} in {l}"))
            };
            (phase, field("iops="), field("mbps="))
        })
        .collect()
}

/// The guest measures its own I/O under a disk's limits; each rate must lie in a band
/// around the configured one. Upper bounds: a slow machine can only lower the numbers, an
/// unlimited disk runs ~10x above them here. Lower bounds (half the configured rate) only
/// where the limiter is the binding constraint by that margin (4K phases under an IOPS
/// limit, 1 MiB phases under a bandwidth limit): load cannot halve a rate that far below
/// what the machine does unlimited, while a limiter that throttles too much fails.
#[test]
fn rate_limited_disk_holds_the_guest_to_its_iops_and_bandwidth() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path(), 64 << 20);
    // 200 IOPS: 20 operations per 100 ms. The bucket starts full: +20 ops in 1 s.
    let limit_iops = 200.0;
    let (out, serial) = Vireo::guest(
        "test=blk-bench ms=1000 span_mib=32",
        &[
            "--disk",
            &disk_arg(&disk, ",ops_size=20,ops_refill_time=100"),
        ],
    )
    .run(T);
    assert_guest_ok(&out, &serial);
    let phases = bench_phases(&serial);
    assert_eq!(phases.len(), 4, "{serial}");
    for (phase, iops, _) in &phases {
        assert!(*iops > 0.0, "{phase} made no progress");
        assert!(
            *iops <= limit_iops * 1.25,
            "{phase}: {iops} IOPS over a {limit_iops} IOPS limit"
        );
        if phase.starts_with("rand4k") {
            assert!(
                *iops >= limit_iops * 0.5,
                "{phase}: {iops} IOPS, under half of a {limit_iops} IOPS limit: throttled too much"
            );
        }
    }
    // 8 MiB/s: 819,200 bytes per 100 ms; 4K ops are not held by ops, only by bytes.
    let (out, serial) = Vireo::guest(
        "test=blk-bench ms=1000 span_mib=32",
        &[
            "--disk",
            &disk_arg(&disk, ",bw_size=838861,bw_refill_time=100"),
        ],
    )
    .run(T);
    assert_guest_ok(&out, &serial);
    let limit_mbps = 838_861.0 * 10.0 / 1e6;
    let phases = bench_phases(&serial);
    assert_eq!(phases.len(), 4, "{serial}");
    for (phase, _, mbps) in phases {
        assert!(mbps > 0.0, "{phase} made no progress");
        // One request of up to 1 MiB may pass on a full bucket at the start.
        assert!(
            mbps <= limit_mbps * 1.25 + 1.1,
            "{phase}: {mbps} MB/s over an {limit_mbps} MB/s limit"
        );
        if phase.starts_with("seq1m") {
            assert!(
                mbps >= limit_mbps * 0.5,
                "{phase}: {mbps} MB/s, under half of an {limit_mbps} MB/s limit: throttled too much"
            );
        }
    }
}

/// `vm.counters` of a guest that wrote 16384 sectors (one request after another) and holds.
fn counters_after_writes(poll_us: u32) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path(), 64 << 20);
    let sock = dir.path().join("vm.sock");
    let vm = Vireo::guest(
        "test=blk-write seed=3 sectors=16384 offset=0 hold=1",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--disk",
            &disk_arg(&disk, &format!(",poll_us={poll_us}")),
        ],
    )
    .spawn();
    vireo_e2e::wait_for_socket(&sock, T);
    vm.wait_serial("blk-write holding", T);
    let (s, body) = vireo_e2e::api(&sock, "GET", "vm.counters", None);
    assert_eq!(s, 200, "{body}");
    let c: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_pattern(&disk, 3, 0, 16384);
    c
}

#[test]
fn queue_polling_serves_back_to_back_requests_and_can_be_turned_off() {
    // The guest submits its next request as soon as one completes: with a poll
    // window the worker finds many of them without going to sleep. The window is 1 s,
    // which the guest's gaps cannot outgrow even on a loaded host (with 1 ms, a CI run
    // beside other VMs found none: the gaps outgrew the window, which then shrank).
    let polled = counters_after_writes(1_000_000);
    let ops = polled["disk0"]["write_ops"].as_u64().unwrap();
    assert!(ops > 0, "{polled}");
    let found = polled["disk0"]["polled"].as_u64().unwrap();
    assert!(found > 0, "polling found no request: {polled}");
    // (How many it finds depends on how promptly the vCPU runs: on a loaded host the
    // guest's gaps outgrow the window, which then shrinks. No lower bound here.)
    let wakeups = polled["disk0"]["wakeups"].as_u64().unwrap();
    let off = counters_after_writes(0);
    assert_eq!(off["disk0"]["polled"].as_u64(), Some(0), "{off}");
    assert_eq!(off["disk0"]["write_ops"].as_u64(), Some(ops), "{off}");
    // Without polling the one-at-a-time guest wakes the worker for every request, and
    // each of its notifications is counted.
    let off_wakeups = off["disk0"]["wakeups"].as_u64().unwrap();
    let notified = off["disk0"]["notifications"].as_u64().unwrap();
    eprintln!(
        "{ops} requests: {wakeups} wake-ups polling ({} notifications), {off_wakeups} \
         without ({notified} notifications)",
        polled["disk0"]["notifications"]
    );
    assert!(
        off_wakeups * 2 > ops,
        "{off_wakeups} wake-ups for {ops} requests: {off}"
    );
    assert!(notified >= off_wakeups, "{off}");
}

/// 32 requests in flight (the guest driver's whole queue, one indirect descriptor each):
/// every phase completes, every completion names a request the guest had in flight and
/// carries an OK status (the guest fails the test otherwise).
#[test]
fn thirty_two_requests_in_flight_complete_in_every_phase() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path(), 64 << 20);
    let (out, serial) = Vireo::guest(
        "test=blk-bench ms=200 span_mib=32 qd=32",
        &["--disk", &disk_arg(&disk, "")],
    )
    .run(T);
    assert_guest_ok(&out, &serial);
    assert!(serial.contains(" qd=32 "), "{serial}");
    let phases = bench_phases(&serial);
    assert_eq!(phases.len(), 4, "{serial}");
    for (phase, iops, _) in &phases {
        assert!(*iops > 0.0, "{phase} made no progress: {serial}");
    }
}

/// The guest driver selects the queue and reads its notify offset before every kick
/// (two common-configuration accesses): the `queue_select` write goes to KVM's
/// coalesced MMIO ring, so a request costs one exit to the VMM, not two (every x86
/// KVM has KVM_CAP_COALESCED_MMIO). Counted by the VMM itself (`vcpus.exits`), over
/// thousands of requests; the data is checked by the guest (it fails on any error).
#[test]
fn a_request_costs_one_exit_to_the_vmm_with_queue_select_coalesced() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path(), 64 << 20);
    let sock = dir.path().join("vm.sock");
    let vm = Vireo::guest(
        "test=blk-bench ms=1000 span_mib=32 qd=1",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--disk",
            &disk_arg(&disk, ""),
        ],
    )
    .spawn();
    vireo_e2e::wait_for_socket(&sock, T);
    vm.wait_serial("bench rand4k-write ", T);
    let (s, body) = vireo_e2e::api(&sock, "GET", "vm.counters", None);
    assert_eq!(s, 200, "{body}");
    let c: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ops = c["disk0"]["read_ops"].as_u64().unwrap() + c["disk0"]["write_ops"].as_u64().unwrap();
    let exits = c["vcpus"]["exits"].as_u64().unwrap();
    assert!(ops > 500, "{c}");
    // Boot and set-up exits are included; without coalescing this is ~2.1.
    assert!(
        (exits as f64) < 1.5 * ops as f64,
        "{exits} exits for {ops} requests: {c}"
    );
    let out = vm.wait(T);
    assert_eq!(out.status.code(), Some(0));
}
