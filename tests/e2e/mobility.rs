//! Snapshot and restore, end to end: the guest's mobility workload (memory pages and
//! sequence-numbered disk blocks, each checked by the guest itself) runs across a
//! snapshot taken in one VMM process and restored in a fresh one.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vireo_e2e::{api, assert_guest_ok, bin, pattern, wait_for_socket, wait_with_timeout, Vireo};

const T: Duration = Duration::from_secs(60);
const BLOCKS: u64 = 64;

fn raw_disk(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("disk.raw");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    p
}

/// The last iteration `work iter=N` printed.
fn last_iter(serial: &str) -> u64 {
    serial
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("work iter="))
        .find_map(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// After `ops` iterations, block b holds the pattern of the last n <= ops with n % B = b.
fn assert_blocks(disk: &Path, ops: u64) {
    let f = std::fs::File::open(disk).unwrap();
    let mut got = vec![0u8; 4096];
    let mut want = vec![0u8; 4096];
    for n in ops.saturating_sub(BLOCKS - 1)..=ops {
        let lba = (n % BLOCKS) * 8;
        f.read_exact_at(&mut got, lba * 512).unwrap();
        pattern::fill(n, lba, &mut want);
        assert!(
            got == want,
            "block of iteration {n} (lba {lba}) is not on disk"
        );
    }
}

#[test]
fn snapshot_restored_in_a_fresh_vmm_continues_the_workload() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let disk = raw_disk(dir.path());
    let snap = dir.path().join("snap");
    let ops = 12_000;
    let vm = Vireo::guest(
        &format!("test=workload pages=256 ops={ops} report=500"),
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--disk",
            &format!("path={}", disk.display()),
        ],
    )
    .spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("work iter=1500 ", T);
    let url = format!(r#"{{"destination_url":"file://{}"}}"#, snap.display());
    // Only a paused VM can be snapshotted.
    let (s, body) = api(&sock, "PUT", "vm.snapshot", Some(&url));
    assert_eq!(s, 409, "{body}");
    assert!(!snap.join("snapshot.json").exists());
    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 204);
    let (s, body) = api(&sock, "PUT", "vm.snapshot", Some(&url));
    assert_eq!(s, 204, "{body}");
    let before = last_iter(&vm.serial_text());
    assert!(
        before >= 1500 && before < ops,
        "paused at iteration {before}"
    );
    // A second snapshot into the same directory is refused; the first stays whole.
    let (s, body) = api(&sock, "PUT", "vm.snapshot", Some(&url));
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("not empty"), "{body}");
    assert_eq!(api(&sock, "PUT", "vm.shutdown", None).0, 204);
    assert_eq!(vm.wait(T).status.code(), Some(0));

    // A fresh process: the guest goes on from where it was paused, to the end.
    let serial = dir.path().join("restored.log");
    let child = Command::new(bin("vireo"))
        .arg("--restore")
        .arg(format!("source_url=file://{},resume=on", snap.display()))
        .arg("--serial")
        .arg(format!("file={}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_timeout(child, T);
    let text = std::fs::read_to_string(&serial).unwrap();
    assert_guest_ok(&out, &text);
    assert!(
        !text.contains("work pages="),
        "the restored guest must not start over:\n{text}"
    );
    let first_after = text
        .lines()
        .find_map(|l| l.strip_prefix("work iter="))
        .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        first_after > before && first_after <= before + 500,
        "restored guest reported iteration {first_after} first; paused at {before}"
    );
    assert!(text.contains(&format!("work done iter={ops}")), "{text}");
    assert_blocks(&disk, ops);
}

#[test]
fn restore_refuses_what_is_not_a_whole_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let run = |arg: &str| {
        let out = Command::new(bin("vireo"))
            .args(["--restore", arg])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run(dir.path().to_str().unwrap());
    assert_eq!(code, Some(1));
    assert!(err.contains("not a complete snapshot"), "{err}");
    let (code, err) = run(&format!("source_url=http://x{}", dir.path().display()));
    assert_eq!(code, Some(1));
    assert!(err.contains("only file:// URLs"), "{err}");
    let (code, err) = run(dir.path().join("missing").to_str().unwrap());
    assert_eq!(code, Some(1));
    assert!(err.contains("missing"), "{err}");

    // A snapshot from a newer Vireo: refused by name, nothing started.
    let snap = dir.path().join("snap");
    let sock = dir.path().join("vm.sock");
    let vm = Vireo::guest(
        "test=counter period_ms=50",
        &["--api-socket", sock.to_str().unwrap()],
    )
    .spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("tick 1 ", T);
    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 204);
    let url = format!(r#"{{"destination_url":"file://{}"}}"#, snap.display());
    assert_eq!(api(&sock, "PUT", "vm.snapshot", Some(&url)).0, 204);
    assert_eq!(api(&sock, "PUT", "vm.shutdown", None).0, 204);
    drop(vm);
    let manifest = snap.join("snapshot.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("\"version\": 1", "\"version\": 7")).unwrap();
    let (code, err) = run(snap.to_str().unwrap());
    assert_eq!(code, Some(1));
    assert!(err.contains("newer Vireo"), "{err}");
}
