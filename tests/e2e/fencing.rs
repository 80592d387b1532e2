//! Fencing tokens on disks, with real `vireo` processes: a VMM whose token is older than
//! the one recorded beside its disk (`DISK.fence`) refuses the disk before the guest
//! runs, and the disk's bytes stay as they were; a newer token is recorded.

use std::path::Path;
use std::time::Duration;

use vireo_e2e::pattern;
use vireo_e2e::{assert_guest_ok, serial_line, Vireo};

const T: Duration = Duration::from_secs(60);
const SECTORS: u64 = 2000;
const OFFSET: u64 = 64;

fn record(disk: &Path) -> String {
    let mut name = disk.file_name().unwrap().to_os_string();
    name.push(".fence");
    std::fs::read_to_string(disk.with_file_name(name)).unwrap()
}

/// As vireod runs it: confined to the storage root, which holds the kernel too.
fn write_run(disk: &Path, root: &Path, seed: u64, token: u64) -> (std::process::Output, String) {
    let kernel = root.join("guest.elf");
    if !kernel.exists() {
        std::fs::copy(vireo_e2e::guest(), &kernel).unwrap();
    }
    Vireo::payload(
        &kernel,
        None,
        &format!("test=blk-write seed={seed} sectors={SECTORS} offset={OFFSET}"),
        &[
            "--storage-root",
            root.to_str().unwrap(),
            "--disk",
            &format!("path={},format=raw,fencing_token={token}", disk.display()),
        ],
    )
    .run(T)
}

fn assert_written(serial: &str, seed: u64) {
    assert_eq!(
        serial_line(serial, "blk capacity="),
        format!(
            "blk capacity={} wrote={SECTORS} crc32={:08x}",
            (16u64 << 20) / 512,
            pattern::expected_crc32(seed, OFFSET, SECTORS)
        )
    );
}

#[test]
fn a_vmm_with_an_older_fencing_token_refuses_the_disk_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("web.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();

    // The first owner (token 5) runs the VM: the token is recorded.
    let (out, serial) = write_run(&disk, dir.path(), 1, 5);
    assert_guest_ok(&out, &serial);
    assert_written(&serial, 1);
    assert_eq!(record(&disk), format!("token={:020}\n", 5));

    // Failover: the new owner (token 9) runs it and writes other data.
    let (out, serial) = write_run(&disk, dir.path(), 2, 9);
    assert_guest_ok(&out, &serial);
    assert_written(&serial, 2);
    assert_eq!(record(&disk), format!("token={:020}\n", 9));
    let before = std::fs::read(&disk).unwrap();

    // The old owner starts the VM late with its token 5: refused before the guest runs.
    let (out, serial) = write_run(&disk, dir.path(), 3, 5);
    assert!(!out.status.success(), "a stale token ran the VM");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fencing token 5 is older than the 9 recorded"),
        "stderr: {stderr}"
    );
    assert!(!serial.contains("blk capacity="), "the guest ran: {serial}");
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "the stale VMM changed the disk"
    );
    assert_eq!(record(&disk), format!("token={:020}\n", 9));
}

#[test]
fn a_fencing_record_that_is_not_one_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("db.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let rec = dir.path().join("db.raw.fence");
    std::fs::write(&rec, b"token=7 please\n").unwrap();
    let (out, serial) = write_run(&disk, dir.path(), 4, 100);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not a fencing record"),
        "stderr: {stderr}"
    );
    assert!(!serial.contains("blk capacity="), "the guest ran: {serial}");
    assert_eq!(std::fs::read(&rec).unwrap(), b"token=7 please\n");
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0));
}

/// A VMM with a write lease (as vireod starts a clustered VM): frozen (SIGSTOP) past its
/// deadline and woken with nobody to kill it, it writes nothing more — the guest's
/// next write is refused on the VMM's own clock and the VM pauses — and neither a
/// renewal nor a resume brings it back.
#[test]
fn a_vmm_woken_after_its_write_lease_expired_writes_nothing_more() {
    use vireo_e2e::seqdisk;
    const BLOCKS: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("rw.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(BLOCKS * 4096)
        .unwrap();
    let sock = dir.path().join("api.sock");
    let serial = dir.path().join("serial.log");
    let lease = |ns: u64| format!(r#"{{"deadline_monotonic_ns":{ns}}}"#);
    let ahead = || seqdisk::monotonic_ns() + 2_000_000_000;
    let config = serde_json::json!({
        "payload": {"kernel": vireo_e2e::guest(), "cmdline": format!("test=replica-writer blocks={BLOCKS} resume")},
        "memory": {"size": 32u64 << 20},
        "disks": [{"path": disk, "format": "raw"}],
        "serial": {"mode": "file", "file": serial},
        "write_lease": {"deadline_monotonic_ns": ahead()},
    });
    let mut vmm = std::process::Command::new(vireo_e2e::bin("vireo"))
        .arg("--api-socket")
        .arg(&sock)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = vmm.id() as i32;
    vireo_e2e::wait_for_socket(&sock, T);
    let (st, body) = vireo_e2e::api(&sock, "PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(st, 204, "{body}");
    assert_eq!(vireo_e2e::api(&sock, "PUT", "vm.boot", None).0, 204);
    // Renewed as vireod renews it, until the guest has written a while.
    let start = std::time::Instant::now();
    while seqdisk::reported(&std::fs::read_to_string(&serial).unwrap_or_default()).len() < 200 {
        let (st, body) = vireo_e2e::api(&sock, "PUT", "vm.lease", Some(&lease(ahead())));
        assert_eq!(st, 204, "renewal refused: {body}");
        assert!(start.elapsed() < T, "the guest never wrote");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Frozen, and no renewal comes: the deadline passes while it is stopped.
    // SAFETY: signals to the VMM this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // kill() returns before every thread has stopped (a vCPU leaves the guest first):
    // until then the guest may still complete writes.
    wait_all_threads_stopped(pid);
    // What the guest completed is on the disk now (its serial output may still sit in
    // the VMM's buffer).
    let last = seqdisk::single_writer(&seqdisk::seeds(&disk, BLOCKS)).unwrap();
    let deadline = ahead();
    while seqdisk::monotonic_ns() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };

    // It pauses itself (or its guest, refused, gives up and the VMM exits).
    let start = std::time::Instant::now();
    loop {
        if vmm.try_wait().unwrap().is_some() {
            break;
        }
        let (st, body) = vireo_e2e::api(&sock, "GET", "vm.info", None);
        if st == 200 && body.contains("\"Paused\"") {
            assert!(body.contains("write lease expired"), "{body}");
            let (st, body) = vireo_e2e::api(&sock, "PUT", "vm.lease", Some(&lease(ahead())));
            assert_eq!(st, 409, "an expired lease was renewed: {body}");
            let (st, body) = vireo_e2e::api(&sock, "PUT", "vm.resume", None);
            assert_eq!(st, 409, "a VM past its lease resumed: {body}");
            break;
        }
        assert!(
            start.elapsed() < T,
            "the VMM neither paused nor ended: {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // At most the write in flight when it froze reached the disk; the guest completed
    // nothing after.
    let text = std::fs::read_to_string(&serial).unwrap();
    let after = seqdisk::reported(&text);
    assert!(
        after.iter().all(|n| *n <= last + 1),
        "the guest kept writing after the deadline: last before {last}, after {:?}",
        after.iter().rev().take(3).collect::<Vec<_>>()
    );
    let on_disk = seqdisk::single_writer(&seqdisk::seeds(&disk, BLOCKS)).unwrap();
    assert!(
        (last..=last + 1).contains(&on_disk),
        "disk holds sequence {on_disk}, the guest had reported {last}"
    );
    let _ = vmm.kill();
    let _ = vmm.wait();
}

/// Waits until every thread of `pid` is stopped (state `T` in /proc).
fn wait_all_threads_stopped(pid: i32) {
    let start = std::time::Instant::now();
    loop {
        let all_stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .all(|t| {
                std::fs::read_to_string(t.path().join("stat")).is_ok_and(|st| {
                    st.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().next())
                        == Some("T")
                })
            });
        if all_stopped {
            return;
        }
        assert!(start.elapsed() < T, "the VMM's threads never all stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
}
