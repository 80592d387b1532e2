//! A disk on a full host file system (a small tmpfs): with on_error=stop the VM pauses
//! with the reason, resumes once space is freed and loses nothing; with on_error=report
//! the guest sees the I/O error.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vireo_e2e::{api, pattern, serial_line, wait_for_socket, Vireo};

const T: Duration = Duration::from_secs(120);
/// The tmpfs; the filler takes most of it, so the guest's 8 MiB cannot fit.
const FS_SIZE: u64 = 8 << 20;
const FILLER: u64 = 6 << 20;
const SECTORS: u64 = 16384; // 8 MiB

/// A tmpfs mounted on a temporary directory (unmounted on drop).
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={FS_SIZE}")])
            .arg("tmpfs")
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(st.success(), "mount tmpfs (the e2e tests run as root)");
        Self { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A sparse raw disk and a filler file of real data on the small file system.
fn disk_and_filler(fs: &SmallFs) -> (PathBuf, PathBuf) {
    let disk = fs.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![0xeeu8; FILLER as usize]).unwrap();
    (disk, filler)
}

fn info(sock: &Path) -> serde_json::Value {
    let (s, body) = api(sock, "GET", "vm.info", None);
    assert_eq!(s, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The VM pauses on ENOSPC with the reason and a `disk-stopped` event, resumes once the
/// filler is gone, and every one of the `sectors` the guest wrote reads back (through
/// `read_back`, which gives the disk's contents as raw bytes).
fn stop_on_full_then_resume(
    fs: &SmallFs,
    disk_arg: &str,
    filler: &Path,
    sectors: u64,
    capacity: u64,
    read_back: impl FnOnce() -> Vec<u8>,
) {
    let sock = fs.path().join("vm.sock");
    let mut vm = Vireo::guest(
        &format!("test=blk-write seed=11 sectors={sectors} offset=0"),
        &["--api-socket", sock.to_str().unwrap(), "--disk", disk_arg],
    )
    .spawn();
    wait_for_socket(&sock, T);

    // The guest runs out of space: the VM pauses by itself and says why.
    let start = Instant::now();
    let paused = loop {
        let i = info(&sock);
        if i["state"] == "Paused" {
            break i;
        }
        assert!(
            start.elapsed() < T,
            "the VM never paused: {i}\nserial:\n{}",
            vm.serial_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let reason = paused["pause_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("disk0"), "{reason}");
    assert!(reason.contains("errno 28"), "{reason}");
    assert!(
        !vm.serial_text().contains("result"),
        "the guest saw an error"
    );
    // The VMM's event: which disk, which operation, which errno.
    let (s, body) = api(&sock, "GET", "vm.events", None);
    assert_eq!(s, 200, "{body}");
    let events: serde_json::Value = serde_json::from_str(&body).unwrap();
    let e = &events[0];
    assert_eq!(
        (&e["seq"], &e["event"], &e["disk"], &e["errno"]),
        (
            &serde_json::json!(1),
            &serde_json::json!("disk-stopped"),
            &serde_json::json!("disk0"),
            &serde_json::json!(libc::ENOSPC)
        ),
        "{events}"
    );

    // Free the space and resume: the kept request runs first, the guest finishes.
    std::fs::remove_file(filler).unwrap();
    let (s, body) = api(&sock, "PUT", "vm.resume", None);
    assert_eq!(s, 204, "{body}");
    let mut child = vm.child.take().unwrap();
    let status = {
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(start.elapsed() < T, "the guest did not finish after resume");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let serial = vm.serial_text();
    assert!(
        serial.contains("vireo-guest: result ok") && status.success(),
        "serial:\n{serial}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("disk stopped on a host I/O error") && stderr.contains("disk0"),
        "no log line names the disk:\n{stderr}"
    );
    assert_eq!(
        serial_line(&serial, "blk capacity="),
        format!(
            "blk capacity={} wrote={sectors} crc32={:08x}",
            capacity / 512,
            pattern::expected_crc32(11, 0, sectors)
        )
    );
    // Every sector the guest wrote is on the host, as the guest was told.
    let data = read_back();
    let mut want = vec![0u8; pattern::SECTOR_SIZE];
    for lba in 0..sectors {
        let at = (lba as usize) * pattern::SECTOR_SIZE;
        pattern::fill_sector(11, lba, &mut want);
        assert!(
            data[at..at + pattern::SECTOR_SIZE] == want[..],
            "sector {lba} lost"
        );
    }
}

#[test]
fn a_full_disk_with_on_error_stop_pauses_the_vm_and_resume_loses_nothing() {
    let fs = SmallFs::new();
    let (disk, filler) = disk_and_filler(&fs);
    let arg = format!("path={},on_error=stop", disk.display());
    stop_on_full_then_resume(&fs, &arg, &filler, SECTORS, 64 << 20, || {
        let f = std::fs::File::open(&disk).unwrap();
        let mut data = vec![0u8; (SECTORS as usize) * pattern::SECTOR_SIZE];
        f.read_exact_at(&mut data, 0).unwrap();
        data
    });
}

/// Bytes free on the file system of `dir`.
fn free_bytes(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs fills the zeroed struct we own from a valid C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c.as_ptr(), &mut st), 0);
        st.f_bavail * st.f_frsize
    }
}

#[test]
fn a_growing_vhdx_on_a_full_disk_pauses_the_vm_and_resume_loses_nothing() {
    // A dynamic VHDX (1 MiB blocks) grows by a block at the guest's first write to it;
    // the filler leaves less than a block free, so the first allocation fails.
    let fs = SmallFs::new();
    let disk = fs.path().join("disk.vhdx");
    let st = Command::new(vireo_e2e::bin("vireo-img"))
        .args(["create", "-f", "vhdx", "-o", "block_size=1M"])
        .arg(&disk)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    let filler = fs.path().join("filler");
    let room = free_bytes(fs.path()).saturating_sub(512 << 10);
    std::fs::write(&filler, vec![0xeeu8; room as usize]).unwrap();
    let sectors = 4096; // 2 MiB: two blocks.
    let arg = format!("path={},format=vhdx,on_error=stop", disk.display());
    stop_on_full_then_resume(&fs, &arg, &filler, sectors, 64 << 20, || {
        // The image is consistent and holds the data (read as raw by qemu-img).
        let out = tempfile::tempdir().unwrap();
        let raw = out.path().join("disk.raw");
        let check = Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(&disk)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "qemu-img check: {}",
            String::from_utf8_lossy(&check.stdout)
        );
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "vhdx", "-O", "raw"])
            .arg(&disk)
            .arg(&raw)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read(&raw).unwrap()
    });
}

#[test]
fn a_full_disk_with_on_error_report_gives_the_guest_an_io_error() {
    let fs = SmallFs::new();
    let (disk, _filler) = disk_and_filler(&fs);
    let (out, serial) = Vireo::guest(
        &format!("test=blk-write seed=11 sectors={SECTORS} offset=0"),
        &[
            "--disk",
            &format!("path={},on_error=report", disk.display()),
        ],
    )
    .run(T);
    assert!(
        serial.contains("vireo-guest: result fail write at sector"),
        "serial:\n{serial}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
