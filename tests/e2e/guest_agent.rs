//! The guest agent channel end to end: `vireo --guest-agent` gives the test guest a
//! multiport virtio-console whose port `org.qemu.guest_agent.0` it opens; the
//! guest's agent (`test=replica-writer agent`) answers `vm.guest-command`, and a freeze
//! stops its block writer until the thaw. A guest that never opens the port gives a
//! 504 and runs on.

use std::path::Path;
use std::time::Duration;

use vireo_e2e::{api, wait_for_socket, Running, Vireo};

const T: Duration = Duration::from_secs(120);

/// `vm.guest-command` with `body`: (status, the reply as JSON or the error body).
fn command(sock: &Path, body: &str) -> (u16, serde_json::Value) {
    let (status, text) = api(sock, "PUT", "vm.guest-command", Some(body));
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text:?}: {e}"));
    (status, v)
}

/// The highest `rw n=` the guest printed (whole lines only).
fn last_write(vm: &Running) -> u64 {
    let s = vm.serial_text();
    let whole = &s[..s.rfind('\n').map_or(0, |i| i + 1)];
    whole
        .lines()
        .filter_map(|l| l.strip_prefix("rw n="))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

fn writer_vm(dir: &Path, cmdline: &str, agent: bool) -> (Running, std::path::PathBuf) {
    let disk = dir.join("os.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let sock = dir.join("vm.sock");
    let disk_arg = format!("path={}", disk.display());
    let mut args = vec!["--disk", &disk_arg, "--api-socket", sock.to_str().unwrap()];
    if agent {
        args.push("--guest-agent");
    }
    let vm = Vireo::guest(cmdline, &args).spawn();
    wait_for_socket(&sock, T);
    (vm, sock)
}

#[test]
fn the_guest_agent_answers_and_a_freeze_stops_the_guest_writes_until_the_thaw() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, sock) = writer_vm(dir.path(), "test=replica-writer blocks=64 agent", true);
    vm.wait_serial("agent ready port=org.qemu.guest_agent.0", T);
    vm.wait_serial("rw n=20\n", T);

    let (status, reply) = command(&sock, r#"{"execute": "guest-ping"}"#);
    assert_eq!((status, &reply), (200, &serde_json::json!({"return": {}})));
    let (status, reply) = command(&sock, r#"{"execute": "guest-no-such-thing"}"#);
    assert_eq!(status, 200);
    assert_eq!(reply["error"]["class"], "CommandNotFound", "{reply}");

    let (status, reply) = command(&sock, r#"{"execute": "guest-fsfreeze-freeze"}"#);
    assert_eq!((status, &reply), (200, &serde_json::json!({"return": 1})));
    // The guest prints each write before it serves the agent, and the freeze's reply
    // came after its flush: nothing past `frozen_at` may appear until the thaw.
    let frozen_at = last_write(&vm);
    assert!(vm.serial_text().contains("agent frozen filesystems=1"));
    for _ in 0..5 {
        // Each answer is a turn of the guest's frozen loop: it runs, and does not write.
        let (status, reply) = command(&sock, r#"{"execute": "guest-fsfreeze-status"}"#);
        assert_eq!(
            (status, &reply),
            (200, &serde_json::json!({"return": "frozen"}))
        );
        assert_eq!(last_write(&vm), frozen_at, "a write while frozen");
    }
    let (status, reply) = command(&sock, r#"{"execute": "guest-fsfreeze-freeze"}"#);
    assert_eq!(status, 200);
    assert_eq!(reply["error"]["class"], "GenericError", "{reply}");
    assert_eq!(last_write(&vm), frozen_at);

    let (status, reply) = command(&sock, r#"{"execute": "guest-fsfreeze-thaw"}"#);
    assert_eq!((status, &reply), (200, &serde_json::json!({"return": 1})));
    vm.wait_serial(&format!("rw n={}\n", frozen_at + 10), T);
    let (_, reply) = command(&sock, r#"{"execute": "guest-fsfreeze-status"}"#);
    assert_eq!(reply, serde_json::json!({"return": "thawed"}));

    // The disk holds the writes up to the freeze: block frozen_at's slot has its pattern.
    let image = std::fs::read(dir.path().join("os.raw")).unwrap();
    let slot = (frozen_at % 64) as usize * 4096;
    let mut want = vec![0u8; 4096];
    vireo_e2e::pattern::fill(frozen_at, (frozen_at % 64) * 8, &mut want);
    // (the writer has gone on since the thaw: the slot holds frozen_at or frozen_at + 64)
    let mut later = vec![0u8; 4096];
    vireo_e2e::pattern::fill(frozen_at + 64, (frozen_at % 64) * 8, &mut later);
    let got = &image[slot..slot + 4096];
    assert!(
        got == want || got == later,
        "block of write {frozen_at} is not on the disk"
    );
}

#[test]
fn a_guest_that_never_opens_the_port_gives_a_504_and_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, sock) = writer_vm(dir.path(), "test=replica-writer blocks=64", true);
    vm.wait_serial("rw n=10\n", T);
    for _ in 0..2 {
        let (status, err) = command(&sock, r#"{"execute": "guest-ping", "timeout_ms": 300}"#);
        assert_eq!(status, 504, "{err}");
        let m = err["error"].as_str().unwrap();
        assert!(m.contains("not opened by any guest program"), "{m}");
    }
    let after = last_write(&vm);
    vm.wait_serial(&format!("rw n={}\n", after + 20), T);
    let (status, info) = api(&sock, "GET", "vm.info", None);
    assert_eq!(status, 200);
    assert!(info.contains("Running"), "{info}");
    let (status, _) = command(&sock, r#"{"execute": "guest-ping", "timeout_ms": 0}"#);
    assert_eq!(status, 400);
}

#[test]
fn a_vm_without_the_channel_refuses_guest_commands() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, sock) = writer_vm(dir.path(), "test=replica-writer blocks=64", false);
    vm.wait_serial("rw n=5\n", T);
    let (status, err) = command(&sock, r#"{"execute": "guest-ping"}"#);
    assert_eq!(status, 409, "{err}");
    assert!(err["error"]
        .as_str()
        .unwrap()
        .contains("no guest agent channel"));
    let (status, _) = command(&sock, r#"{"execute": "guest-ping", "bogus": 1}"#);
    assert_eq!(status, 400);
}

#[test]
fn a_jailed_vmm_under_its_filters_serves_guest_commands() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let api_dir = dir.path().join("api");
    std::fs::create_dir(&api_dir).unwrap();
    let sock = api_dir.join("vm.sock");
    let jail = format!(
        "uid=100103,gid=100103,root={}",
        dir.path().join("root").display()
    );
    let disk_arg = format!("path={}", disk.display());
    let vm = Vireo::guest(
        "test=replica-writer blocks=16 agent",
        &[
            "--disk",
            &disk_arg,
            "--guest-agent",
            "--api-socket",
            sock.to_str().unwrap(),
            "--jail",
            &jail,
        ],
    )
    .spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("rw n=5\n", T);
    for (cmd, want) in [
        ("guest-fsfreeze-freeze", serde_json::json!({"return": 1})),
        (
            "guest-fsfreeze-status",
            serde_json::json!({"return": "frozen"}),
        ),
        ("guest-fsfreeze-thaw", serde_json::json!({"return": 1})),
    ] {
        let (status, reply) = command(&sock, &format!(r#"{{"execute": "{cmd}"}}"#));
        assert_eq!((status, reply), (200, want), "{cmd}");
    }
    let after = last_write(&vm);
    vm.wait_serial(&format!("rw n={}\n", after + 5), T);
    // Still the same process (no seccomp kill on the command thread).
    let (status, _) = api(&sock, "GET", "vm.info", None);
    assert_eq!(status, 200);
}

/// The control protocol's state is device state: a restored guest, which does not
/// repeat the console handshake, still has its agent port open to the new VMM.
#[test]
fn after_a_snapshot_and_restore_the_guest_agent_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, sock) = writer_vm(dir.path(), "test=replica-writer blocks=64 agent", true);
    vm.wait_serial("rw n=10\n", T);
    let (status, _) = command(&sock, r#"{"execute": "guest-ping"}"#);
    assert_eq!(status, 200);
    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 204);
    let snap = dir.path().join("snap");
    let url = format!(r#"{{"destination_url":"file://{}"}}"#, snap.display());
    let (s, body) = api(&sock, "PUT", "vm.snapshot", Some(&url));
    assert_eq!(s, 204, "{body}");
    assert_eq!(api(&sock, "PUT", "vm.shutdown", None).0, 204);
    assert_eq!(vm.wait(T).status.code(), Some(0));

    let rsock = dir.path().join("restored.sock");
    let rserial = dir.path().join("restored.log");
    let mut restored = vireo_e2e::mobility::restore(&snap, &rserial, Some(&rsock));
    wait_for_socket(&rsock, T);
    let (status, reply) = command(&rsock, r#"{"execute": "guest-fsfreeze-status"}"#);
    assert_eq!(
        (status, &reply),
        (200, &serde_json::json!({"return": "thawed"}))
    );
    let text = std::fs::read_to_string(&rserial).unwrap_or_default();
    assert!(
        !text.contains("agent ready"),
        "the guest started over: {text}"
    );
    assert!(text.contains("agent cmd=guest-fsfreeze-status"), "{text}");
    restored.kill().unwrap();
    restored.wait().unwrap();
}
