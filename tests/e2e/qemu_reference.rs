//! The same guest and disk under QEMU microvm (the reference VMM) and under Vireo give
//! the same results: the same serial lines and byte-identical images.

use std::process::Command;
use std::time::Duration;

use vireo_e2e::{assert_guest_ok, guest, have_qemu, serial_line, wait_with_timeout, Vireo};

const T: Duration = Duration::from_secs(60);

fn qemu(cmdline: &str, disk: &std::path::Path, cpus: u32, mem_mib: u32) -> String {
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,pcie=on",
            "-accel",
            "kvm",
            "-cpu",
            "host,-arch-capabilities",
        ])
        .args(["-m", &mem_mib.to_string(), "-smp", &cpus.to_string()])
        .args(["-display", "none", "-no-reboot", "-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-kernel")
        .arg(guest())
        .args(["-append", cmdline])
        .arg("-drive")
        .arg(format!("file={},if=none,id=d0,format=raw", disk.display()))
        .args(["-device", "virtio-blk-pci,drive=d0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run qemu-system-x86_64");
    let out = wait_with_timeout(child, T);
    // isa-debug-exit: status (code << 1) | 1; code 0 is success.
    assert_eq!(
        out.status.code(),
        Some(1),
        "QEMU run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn vireo_and_qemu_agree_on_the_same_guest_and_disk() {
    if !have_qemu() {
        panic!("qemu-system-x86_64 is required (scripts/setup installs it)");
    }
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("vireo.raw");
    let theirs = dir.path().join("qemu.raw");
    for p in [&ours, &theirs] {
        std::fs::File::create(p).unwrap().set_len(32 << 20).unwrap();
    }
    let cmd = "test=blk-write seed=1234 sectors=8000 offset=17";
    let q = qemu(cmd, &theirs, 2, 256);
    let (out, v) = Vireo::guest(
        cmd,
        &[
            "--cpus",
            "boot=2",
            "--memory",
            "size=256M",
            "--disk",
            &format!("path={}", ours.display()),
        ],
    )
    .run(T);
    assert_guest_ok(&out, &v);
    for prefix in ["vireo-guest: boot", "blk capacity=", "vireo-guest: result"] {
        assert_eq!(
            serial_line(&v, prefix),
            serial_line(&q, prefix),
            "line {prefix:?}"
        );
    }
    assert!(
        std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
        "images differ"
    );

    // Each reads back what the other wrote.
    let read = "test=blk-read seed=1234 sectors=8000 offset=17";
    assert!(qemu(read, &ours, 1, 128).contains("mismatches=0"));
    let (out, v) = Vireo::guest(
        read,
        &["--disk", &format!("path={},readonly=on", theirs.display())],
    )
    .run(T);
    assert_guest_ok(&out, &v);
}
