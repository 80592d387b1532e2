//! A guest that floods its console or serial port: the output files stay within their
//! cap (plus one rotated file), the VMM's memory stays bounded, and the VM keeps
//! running.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vireo_e2e::{bin, guest, wait_with_timeout, Vireo};

const T: Duration = Duration::from_secs(300);

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn rotated(p: &Path) -> std::path::PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".1");
    s.into()
}

/// The kB value of `key` in /proc/PID/status.
fn proc_status_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_console_flood_is_capped_on_disk_and_in_memory_and_the_vm_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("console.log");
    const BYTES: u64 = 32 << 20;
    const CAP: u64 = 1 << 20;
    let vm = Vireo::guest(
        &format!("test=flood-console bytes={BYTES} hold=1"),
        &[
            "--memory",
            "size=128M",
            "--console",
            &format!("file={},max_size={CAP}", out.display()),
        ],
    )
    .spawn();
    let serial = vm.wait_serial("flood holding", T);
    assert!(serial.contains(&format!("flood done lines={}", BYTES / 64)));
    let pid = vm.child.as_ref().unwrap().id();
    // The VMM's peak resident memory: guest RAM it touched plus its own; 32 MiB of
    // output must not have been held.
    let hwm_kb = proc_status_kb(pid, "VmHWM:");
    assert!(hwm_kb < 96 * 1024, "VMM peak RSS {hwm_kb} kB");
    assert!(len(&out) <= CAP, "{} bytes", len(&out));
    assert_eq!(len(&rotated(&out)), CAP, "the rotated file is one full cap");
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("console"))
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    // The newest output is in the file: its last line is the guest's last.
    let text = std::fs::read_to_string(&out).unwrap();
    let last = text.lines().last().unwrap();
    assert!(
        last.starts_with(&format!("flood {:010} ", BYTES / 64 - 1)),
        "{last}"
    );
}

#[test]
fn a_serial_flood_rotates_within_its_cap_and_the_guest_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("serial.log");
    // Each serial byte is a VM exit: keep it small enough for a loaded machine.
    const BYTES: u64 = 192 << 10;
    const CAP: u64 = 16 << 10;
    let child = Command::new(bin("vireo"))
        .arg("--kernel")
        .arg(guest())
        .args(["--cmdline", &format!("test=flood-serial bytes={BYTES}")])
        .arg("--serial")
        .arg(format!("file={},max_size={CAP}", out.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let res = wait_with_timeout(child, T);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(len(&out) <= CAP, "{} bytes", len(&out));
    assert_eq!(len(&rotated(&out)), CAP);
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.ends_with("vireo-guest: result ok\n"), "{text}");
    assert!(text.contains(&format!("flood done lines={}", BYTES / 64)));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}
