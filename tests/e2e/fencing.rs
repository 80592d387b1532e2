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
