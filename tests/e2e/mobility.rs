//! Snapshot and restore, end to end: the guest's mobility workload (memory pages and
//! sequence-numbered disk blocks, each checked by the guest itself) runs across a
//! snapshot taken in one VMM process and restored in a fresh one.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vireo_e2e::{
    api, assert_guest_ok, bin, config_field_of, pattern, secret_field, wait_for_socket,
    wait_with_timeout, Vireo,
};

use vireo_e2e::mobility::{restore, send_with, Destination};
use vireo_e2e::tls_certs::{receive_tls, receive_tls_allowing, send_tls, Ca};

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

/// Restores the snapshot in `snap` in a fresh `vireo` and runs it to its end (bounded
/// by `T`), serial output into `serial`: its exit and its serial text.
fn restore_and_run(snap: &Path, serial: &Path) -> (std::process::Output, String) {
    let out = wait_with_timeout(restore(snap, serial, None), T);
    let text = std::fs::read_to_string(serial).unwrap();
    (out, text)
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

/// Runs the workload (`ops` iterations) with `extra` `vireo` arguments, snapshots it
/// once it passed iteration `pause_at` (refused while it runs and into a directory
/// that is not empty), restores it in a fresh VMM and checks that the guest goes on
/// from where it was paused to the end, every block on disk. Returns the snapshot.
fn snapshot_and_restore_continue(
    dir: &Path,
    extra: &[&str],
    ops: u64,
    pause_at: u64,
) -> std::path::PathBuf {
    let sock = dir.join("vm.sock");
    let disk = raw_disk(dir);
    let snap = dir.join("snap");
    let disk_arg = format!("path={}", disk.display());
    let mut args = vec!["--api-socket", sock.to_str().unwrap(), "--disk", &disk_arg];
    args.extend_from_slice(extra);
    let vm = Vireo::guest(
        &format!("test=workload pages=256 ops={ops} report=500"),
        &args,
    )
    .spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial(&format!("work iter={pause_at} "), T);
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
        before >= pause_at && before < ops,
        "paused at iteration {before}"
    );
    // A second snapshot into the same directory is refused; the first stays whole.
    let (s, body) = api(&sock, "PUT", "vm.snapshot", Some(&url));
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("not empty"), "{body}");
    assert_eq!(api(&sock, "PUT", "vm.shutdown", None).0, 204);
    assert_eq!(vm.wait(T).status.code(), Some(0));

    // A fresh process: the guest goes on from where it was paused, to the end.
    let serial = dir.join("restored.log");
    let (out, text) = restore_and_run(&snap, &serial);
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
    snap
}

#[test]
fn snapshot_restored_in_a_fresh_vmm_continues_the_workload() {
    let dir = tempfile::tempdir().unwrap();
    snapshot_and_restore_continue(dir.path(), &[], 12_000, 1500);
}

/// `--memory shared=on` (memfd-backed RAM, for vhost-user): the workload's own checks
/// pass across a snapshot and a restore in a fresh VMM, which maps shared memory again
/// (the restored configuration keeps `shared`).
#[test]
fn a_shared_memory_guest_snapshots_restores_and_its_workload_checks_pass() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot_and_restore_continue(
        dir.path(),
        &["--memory", "size=256M,shared=on"],
        4_000,
        1000,
    );
    let cfg = std::fs::read_to_string(snap.join("config.json"))
        .or_else(|_| std::fs::read_to_string(snap.join("snapshot.json")))
        .unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["memory"]["shared"], true, "{cfg}");
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

/// A source VMM running the workload on `disk`.
fn source(dir: &Path, disk: &Path, ops: u64) -> (vireo_e2e::Running, std::path::PathBuf) {
    source_with(dir, disk, ops, 512, &[])
}

/// [`source`] with more environment variables (e.g. `VIREO_FAULT`).
fn source_with_env(
    dir: &Path,
    disk: &Path,
    ops: u64,
    env: &[(&str, &str)],
) -> (vireo_e2e::Running, std::path::PathBuf) {
    source_with(dir, disk, ops, 512, env)
}

/// [`source`] whose workload rewrites (and checks) `pages` pages per iteration.
fn source_with_pages(
    dir: &Path,
    disk: &Path,
    ops: u64,
    pages: u64,
) -> (vireo_e2e::Running, std::path::PathBuf) {
    source_with(dir, disk, ops, pages, &[])
}

/// A source VMM running the workload (`pages` per iteration) on `disk`, with `env`;
/// it logs its migration's summary (vmm::live at info) on stderr.
fn source_with(
    dir: &Path,
    disk: &Path,
    ops: u64,
    pages: u64,
    env: &[(&str, &str)],
) -> (vireo_e2e::Running, std::path::PathBuf) {
    source_of(dir, disk, &format!("pages={pages} ops={ops}"), &[], env)
}

/// A source VMM running `test=workload {workload}` on `disk` with more `vireo` `args`.
fn source_of(
    dir: &Path,
    disk: &Path,
    workload: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (vireo_e2e::Running, std::path::PathBuf) {
    let sock = dir.join("src.sock");
    let disk_arg = format!("path={}", disk.display());
    let mut all = vec!["--api-socket", sock.to_str().unwrap(), "--disk", &disk_arg];
    all.extend_from_slice(args);
    let mut vm = Vireo::guest(&format!("test=workload {workload} report=200"), &all);
    vm.cmd.env("RUST_LOG", "vmm::live=info");
    vm.cmd.envs(env.iter().copied());
    let vm = vm.spawn();
    wait_for_socket(&sock, T);
    (vm, sock)
}

/// Log text without ANSI colour sequences.
fn plain(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A free TCP port on loopback, as a migration URL. The port is free when chosen and
/// the destination binds it later, so two tests running at once could be handed the
/// same one (and one test's source would migrate into the other's destination): each
/// port chosen is leased with a lock file held until this test's process ends.
fn tcp_url() -> String {
    use std::os::fd::AsRawFd;
    let leases = std::env::temp_dir().join("vireo-e2e-tcp-ports");
    std::fs::create_dir_all(&leases).unwrap();
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let lease = std::fs::File::create(leases.join(port.to_string())).unwrap();
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lease.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            // Held (and released by the kernel) for the life of this test process.
            std::mem::forget(lease);
            return format!("tcp:127.0.0.1:{port}");
        }
    }
}

fn migrate_and_check(url_of: impl Fn(&Path) -> String, extra: &str) {
    migrate_and_check_with(url_of, extra, "", 512);
}

/// Migrates the running workload and checks that it finishes at the destination with
/// every page and block intact; returns the source's log.
fn migrate_and_check_with(
    url_of: impl Fn(&Path) -> String,
    extra: &str,
    receive_extra: &str,
    pages: u64,
) -> String {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    // Enough work that the guest cannot finish (and power off, ending the source)
    // before the migration's end on a loaded machine (2000-3000 ops did in CI runs).
    let ops = 8000;
    let (src, src_sock) = source_with_pages(dir.path(), &disk, ops, pages);
    src.wait_serial("work iter=400 ", T);
    let dst = Destination::start(dir.path());
    let url = url_of(dir.path());
    dst.listen_with(&src_sock, &url, receive_extra);
    send_with(&src_sock, &url, extra);
    // The source hands over and ends cleanly; the guest finishes at the destination.
    let src_serial_path = src.serial.clone();
    let src_out = src.wait(T);
    assert_eq!(
        src_out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&src_out.stderr)
    );
    let _ = src_serial_path;
    let dst_out = dst.wait();
    let dst_serial = std::fs::read_to_string(dir.path().join("dst.log")).unwrap_or_else(|e| {
        panic!(
            "no destination serial ({e}); destination: {:?} {}",
            dst_out.status,
            String::from_utf8_lossy(&dst_out.stderr)
        )
    });
    assert_guest_ok(&dst_out, &dst_serial);
    assert!(
        dst_serial.contains(&format!("work done iter={ops}")),
        "{dst_serial}"
    );
    assert!(
        !dst_serial.contains("work pages="),
        "the guest must not start over"
    );
    assert_blocks(&disk, ops);
    plain(&src_out.stderr)
}

#[test]
fn live_migration_over_a_unix_socket_moves_the_running_workload() {
    migrate_and_check(|d| format!("unix:{}", d.join("mig.sock").display()), "");
}

/// A 1 TiB guest whose workload rewrites and checks a page every GiB snapshots into a
/// memory file that holds about what it touched (the rest are holes, never read), and,
/// restored in a fresh VMM, finishes its workload with every page and block intact.
#[test]
fn a_1_tib_guest_snapshot_holds_what_it_touched_and_restores() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let disk = raw_disk(dir.path());
    let snap = dir.path().join("snap");
    let ops = 3000;
    let vm = Vireo::guest(
        &format!("test=workload pages=1024 ops={ops} spread=on report=200"),
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--disk",
            &format!("path={}", disk.display()),
            "--memory",
            "size=1T,overcommit=on",
        ],
    )
    .spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("work iter=400 ", T);
    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 204);
    let url = format!(r#"{{"destination_url":"file://{}"}}"#, snap.display());
    let (s, body) = api(&sock, "PUT", "vm.snapshot", Some(&url));
    assert_eq!(s, 204, "{body}");
    let memory = std::fs::metadata(snap.join("memory")).unwrap();
    assert!(
        memory.len() == 1 << 40,
        "the file spans the guest: {}",
        memory.len()
    );
    let allocated = memory.blocks() * 512;
    assert!(
        allocated < 256 << 20,
        "{allocated} bytes allocated for ~1,100 touched pages"
    );
    assert_eq!(api(&sock, "PUT", "vm.shutdown", None).0, 204);
    assert_eq!(vm.wait(T).status.code(), Some(0));

    let serial = dir.path().join("restored.log");
    let (out, text) = restore_and_run(&snap, &serial);
    assert_guest_ok(&out, &text);
    assert!(!text.contains("work pages="), "started over:\n{text}");
    assert!(text.contains(&format!("work done iter={ops}")), "{text}");
    assert_blocks(&disk, ops);
}

/// A 1 TiB guest on this 24 GiB host (overcommit) whose workload rewrites and checks
/// a page every GiB: it migrates with its pages intact, and what crosses is what it
/// touched (round 0 asks the kernel which pages are populated), not its size.
#[test]
fn a_1_tib_guest_that_touched_a_page_per_gib_migrates_only_what_it_touched() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    // No end of its own (a guest that finished before the migration on a loaded host
    // would end the source): it runs at the destination until the test has seen it
    // check its pages for another 400 iterations, then is shut down.
    let (src, src_sock) = source_of(
        dir.path(),
        &disk,
        "pages=1024 ops=0 spread=on",
        &["--memory", "size=1T,overcommit=on"],
        &[],
    );
    let first = src.wait_serial("work iter=200 ", T);
    assert!(
        first.contains("first=0x100000000 last=0x10"),
        "the pages must span the memory above 4 GiB: {first}"
    );
    let dst = Destination::start(dir.path());
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    dst.listen(&src_sock, &url);
    send_with(&src_sock, &url, "");
    // Where the guest was when the migration began (its serial goes with the source).
    let at_source = last_iter(&src.serial_text());
    let src_out = src.wait(T);
    assert_eq!(src_out.status.code(), Some(0), "{}", plain(&src_out.stderr));
    let log = plain(&src_out.stderr);
    let result = log
        .lines()
        .find_map(|l| {
            l.split_once("vireo: migration result: ")
                .map(|(_, json)| json)
        })
        .unwrap_or_else(|| panic!("no migration result line: {log}"));
    let info: serde_json::Value = serde_json::from_str(result).unwrap();
    assert_eq!(info["status"], "completed", "{info}");
    let sent = info["bytes_sent"].as_u64().unwrap();
    // 1,024 spread pages rewritten every iteration, resent each round, plus the low
    // memory the guest uses: tens of MiB. Every page would be 1 TiB.
    assert!(
        sent < 512 << 20,
        "{sent} bytes sent for a guest that touched ~1,100 pages: {info}"
    );
    // The guest goes on at the destination, checking every page each iteration.
    let start = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&dst.serial).unwrap_or_default();
        assert!(
            !text.contains("mismatch") && !text.contains("result fail"),
            "{text}"
        );
        assert!(!text.contains("work pages="), "started over: {text}");
        if last_iter(&text) >= at_source + 400 {
            break;
        }
        assert!(
            start.elapsed() < T,
            "no progress at the destination: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(api(&dst.sock, "PUT", "vm.shutdown", None).0, 204);
    assert_eq!(dst.wait().status.code(), Some(0));
}

/// A VM the user paused arrives paused (its guest makes no progress at the
/// destination until `vm.resume`), then finishes its workload there intact.
#[test]
fn a_paused_vm_arrives_paused_and_runs_when_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    let ops = 3000;
    let (src, src_sock) = source(dir.path(), &disk, ops);
    src.wait_serial("work iter=400 ", T);
    let (s, b) = api(&src_sock, "PUT", "vm.pause", None);
    assert_eq!(s, 204, "{b}");
    let dst = Destination::start(dir.path());
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    dst.listen(&src_sock, &url);
    send_with(&src_sock, &url, "");
    let src_out = src.wait(T);
    assert_eq!(
        src_out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&src_out.stderr)
    );
    let info = || {
        let (s, b) = api(&dst.sock, "GET", "vm.info", None);
        assert_eq!(s, 200, "{b}");
        serde_json::from_str::<serde_json::Value>(&b).unwrap()
    };
    let migration = || {
        let (_, b) = api(&dst.sock, "GET", "vm.migration-info", None);
        serde_json::from_str::<serde_json::Value>(&b).unwrap_or_default()
    };
    let start = std::time::Instant::now();
    while migration()["status"] != "completed" {
        assert!(start.elapsed() < T, "not completed: {}", migration());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(info()["state"], "Paused", "{}", info());
    let progress = || std::fs::read_to_string(&dst.serial).unwrap_or_default();
    let before = progress();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        progress(),
        before,
        "the paused guest ran at the destination"
    );
    let (s, b) = api(&dst.sock, "PUT", "vm.resume", None);
    assert_eq!(s, 204, "{b}");
    let dst_out = dst.wait();
    let dst_serial = std::fs::read_to_string(dir.path().join("dst.log")).unwrap();
    assert_guest_ok(&dst_out, &dst_serial);
    assert!(
        dst_serial.contains(&format!("work done iter={ops}")),
        "{dst_serial}"
    );
    assert_blocks(&disk, ops);
}

#[test]
fn live_migration_over_tcp_loopback_compressed_and_paced_moves_the_running_workload() {
    let url = tcp_url();
    // zstd pages and a 200 MiB/s cap: the guest checks every page it wrote. Plain TCP
    // is said out loud on both sides.
    migrate_and_check_with(
        move |_| url.clone(),
        r#","compress":true,"bandwidth_mib_s":200,"insecure":true"#,
        r#","insecure":true"#,
        512,
    );
}

#[test]
fn live_migration_over_tcp_with_mutual_tls_moves_the_running_workload() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new(certs.path(), "ca");
    let server = ca.server("dst", &["localhost", "127.0.0.1"]);
    let client = ca.client("src");
    let url = tcp_url();
    let log = migrate_and_check_with(
        move |_| url.clone(),
        &send_tls(Some(&client), &ca),
        &receive_tls(&server, &ca),
        512,
    );
    assert!(log.contains("migration committed"), "{log}");
    assert!(log.contains("tls=true"), "{log}");
}

#[test]
fn live_migration_over_four_connections_moves_the_running_workload() {
    // A 4 MiB hot set (1024 pages): each round's pages are split over the four page
    // streams, and the guest checks every page of every iteration after the move.
    let url = tcp_url();
    let log = migrate_and_check_with(
        move |_| url.clone(),
        r#","connections":4,"insecure":true"#,
        r#","insecure":true"#,
        1024,
    );
    assert!(log.contains("connections=4"), "{log}");
    assert!(log.contains("tls=false"), "{log}");
}

#[test]
fn live_migration_over_a_unix_socket_with_tls_and_two_compressed_connections() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new(certs.path(), "ca");
    let server = ca.server("dst", &["dst.vireo.test"]);
    let client = ca.client("src");
    let tls = send_tls(Some(&client), &ca);
    // A unix URL has no host: the certificate's name is given.
    let extra = format!(
        r#"{},"server_name":"dst.vireo.test"}},"connections":2,"compress":true"#,
        tls.trim_end_matches('}')
    );
    let log = migrate_and_check_with(
        |d| format!("unix:{}", d.join("mig.sock").display()),
        &extra,
        &receive_tls(&server, &ca),
        1024,
    );
    assert!(log.contains("connections=2"), "{log}");
    assert!(log.contains("tls=true"), "{log}");
}

/// Waits for the source's migration to fail; returns its error.
fn wait_send_failed(sock: &Path) -> String {
    let start = std::time::Instant::now();
    loop {
        let info = api(sock, "GET", "vm.migration-info", None).1;
        if info.contains("\"failed\"") {
            let v: serde_json::Value = serde_json::from_str(&info).unwrap();
            return v["error"].as_str().unwrap_or_default().to_string();
        }
        assert!(start.elapsed() < T, "the migration did not fail: {info}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the destination has refused `n` connections (it keeps waiting for its
/// source meanwhile); returns why it refused the last.
fn wait_refused(sock: &Path, n: u64) -> String {
    let start = std::time::Instant::now();
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&api(sock, "GET", "vm.migration-info", None).1).unwrap();
        if v["refused_connections"].as_u64().unwrap_or(0) >= n {
            assert_eq!(v["status"], "receiving", "{v}");
            return v["last_refusal"].as_str().unwrap_or_default().to_string();
        }
        assert!(start.elapsed() < T, "nothing refused: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest goes on counting: a report line past `after` appears.
fn assert_keeps_counting(src: &vireo_e2e::Running, sock: &Path) {
    let now = last_iter(&src.serial_text());
    let next = (now / 200 + 2) * 200;
    src.wait_serial(&format!("work iter={next} "), T);
    let (_, info) = api(sock, "GET", "vm.info", None);
    assert!(info.contains("\"Running\""), "{info}");
}

#[test]
fn tls_failures_leave_the_source_running_and_a_good_tls_migration_then_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let other = Ca::new(dir.path(), "other");
    let server = ca.server("dst", &["localhost", "127.0.0.1"]);
    let client = ca.client("src");
    let disk = raw_disk(dir.path());
    let ops = 5000;
    let (src, src_sock) = source_with_pages(dir.path(), &disk, ops, 512);
    src.wait_serial("work iter=400 ", T);

    // The destination trusts another CA than the one that signed the source.
    let d1 = dir.path().join("d1");
    std::fs::create_dir(&d1).unwrap();
    let dst = Destination::start(&d1);
    let url = tcp_url();
    dst.listen_with(&src_sock, &url, &receive_tls(&server, &other));
    send_with(&src_sock, &url, &send_tls(Some(&client), &ca));
    let e = wait_send_failed(&src_sock);
    assert!(e.contains("TLS handshake failed"), "{e}");
    assert!(e.contains("does not trust this side's certificate"), "{e}");
    // The destination refuses the connection and goes on waiting for its source.
    let d = wait_refused(&dst.sock, 1);
    assert!(d.contains("UnknownIssuer"), "{d}");
    assert_keeps_counting(&src, &src_sock);
    drop(dst);

    // The source presents no certificate.
    let d2 = dir.path().join("d2");
    std::fs::create_dir(&d2).unwrap();
    let dst = Destination::start(&d2);
    let url = tcp_url();
    dst.listen_with(&src_sock, &url, &receive_tls(&server, &ca));
    send_with(&src_sock, &url, &send_tls(None, &ca));
    let e = wait_send_failed(&src_sock);
    assert!(e.contains("requires a client certificate"), "{e}");
    let d = wait_refused(&dst.sock, 1);
    assert!(d.contains("no certificates"), "{d}");
    assert_keeps_counting(&src, &src_sock);

    // A plain source (insecure, said out loud) at a TLS destination: refused there.
    drop(dst);
    let d3 = dir.path().join("d3");
    std::fs::create_dir(&d3).unwrap();
    let dst = Destination::start(&d3);
    let url = tcp_url();
    dst.listen_with(&src_sock, &url, &receive_tls(&server, &ca));
    send_with(&src_sock, &url, r#","insecure":true"#);
    let d = wait_refused(&dst.sock, 1);
    assert!(d.contains("TLS handshake failed"), "{d}");
    wait_send_failed(&src_sock);
    assert_keeps_counting(&src, &src_sock);
    drop(dst);

    // A certificate from the right CA, but for a source the destination does not
    // allow: refused in the handshake, both sides say why.
    let d3b = dir.path().join("d3b");
    std::fs::create_dir(&d3b).unwrap();
    let dst = Destination::start(&d3b);
    let url = tcp_url();
    dst.listen_with(
        &src_sock,
        &url,
        &receive_tls_allowing(&server, &ca, &["other-host"]),
    );
    send_with(&src_sock, &url, &send_tls(Some(&client), &ca));
    let e = wait_send_failed(&src_sock);
    assert!(e.contains("TLS handshake failed"), "{e}");
    assert!(e.contains("allowed_peers"), "{e}");
    let d = wait_refused(&dst.sock, 1);
    assert!(d.contains("names no allowed peer"), "{d}");
    assert_keeps_counting(&src, &src_sock);
    drop(dst);

    // Then the right certificates, over four page streams: the guest finishes at the
    // destination with every page and block it wrote.
    let d4 = dir.path().join("d4");
    std::fs::create_dir(&d4).unwrap();
    let dst = Destination::start(&d4);
    let url = tcp_url();
    dst.listen_with(&src_sock, &url, &receive_tls(&server, &ca));
    send_with(
        &src_sock,
        &url,
        &format!(r#"{},"connections":4"#, send_tls(Some(&client), &ca)),
    );
    let src_out = src.wait(T);
    assert_eq!(src_out.status.code(), Some(0), "{}", plain(&src_out.stderr));
    let log = plain(&src_out.stderr);
    assert!(
        log.contains("tls=true") && log.contains("connections=4"),
        "{log}"
    );
    let dst_out = dst.wait();
    let dst_serial = std::fs::read_to_string(d4.join("dst.log")).unwrap();
    assert_guest_ok(&dst_out, &dst_serial);
    assert!(
        dst_serial.contains(&format!("work done iter={ops}")),
        "{dst_serial}"
    );
    assert_blocks(&disk, ops);
}

#[test]
fn migration_requests_with_bad_tls_or_connections_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.server("dst", &["localhost"]);
    let dst = Destination::start(dir.path());
    let send = |body: &str| api(&dst.sock, "PUT", "vm.send-migration", Some(body));
    for n in [0, 17] {
        let (s, b) = send(&format!(
            r#"{{"destination_url":"tcp:127.0.0.1:1","connections":{n}}}"#
        ));
        assert_eq!(s, 400, "{b}");
        assert!(b.contains("connections must be 1..=16"), "{b}");
    }
    let (s, b) =
        send(r#"{"destination_url":"tcp:127.0.0.1:1","tls":{"ca":"/nonexistent/ca.pem"}}"#);
    assert_eq!(s, 400, "{b}");
    assert!(
        b.contains("/nonexistent/ca.pem") && b.contains("No such file"),
        "{b}"
    );
    let (s, b) = send(&format!(
        r#"{{"destination_url":"unix:/tmp/x.sock"{}}}"#,
        send_tls(None, &ca)
    ));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("server_name"), "{b}");
    let (s, b) = send(&format!(
        r#"{{"destination_url":"tcp:127.0.0.1:1","tls":{{"ca":"{}","cert":"{}"}}}}"#,
        ca.file().display(),
        server.cert.display()
    ));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("both cert and key"), "{b}");

    // TCP without TLS only if said out loud, and never without a secret.
    let (s, b) = send(&format!(
        r#"{{"destination_url":"tcp:127.0.0.1:1"{}}}"#,
        secret_field()
    ));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("without mutual TLS is refused"), "{b}");
    let (s, b) = send(r#"{"destination_url":"tcp:127.0.0.1:1","insecure":true}"#);
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("needs secret"), "{b}");
    let (s, b) = send(r#"{"destination_url":"unix:/x","secret":"00"}"#);
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("64 hex digits"), "{b}");

    let receive = |body: &str| api(&dst.sock, "PUT", "vm.receive-migration", Some(body));
    let url = tcp_url();
    let config = guest_config();
    let (s, b) = receive(&format!(r#"{{"receiver_url":"{url}"}}"#));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("needs config"), "{b}");
    let (s, b) = receive(&format!(
        r#"{{"receiver_url":"{url}"{config},"tls":{{"cert":"{}","key":"{}","ca":"{}","allowed_peers":["src"]}}}}"#,
        server.cert.display(),
        ca.file().display(), // not a key
        ca.file().display()
    ));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("no PEM private key"), "{b}");
    let (s, b) = receive(&format!(
        r#"{{"receiver_url":"{url}"{config},"tls":{{"ca":"x"}}}}"#
    ));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("missing field"), "{b}");
    let (s, b) = receive(&format!(
        r#"{{"receiver_url":"{url}"{config}{}{}}}"#,
        secret_field(),
        receive_tls_allowing(&server, &ca, &[])
    ));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("allowed_peers is empty"), "{b}");
    let (s, b) = receive(&format!(
        r#"{{"receiver_url":"{url}"{config}{}}}"#,
        secret_field()
    ));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("without mutual TLS is refused"), "{b}");
    let (s, b) = receive(&format!(
        r#"{{"receiver_url":"{url}"{config},"insecure":true}}"#
    ));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("needs secret"), "{b}");
    // Nothing was left listening by the refused requests.
    dst.listen_config(&config, &url, r#","insecure":true"#);
}

/// `,"config":{...}` naming the test guest and nothing else.
fn guest_config() -> String {
    format!(
        r#","config":{}"#,
        serde_json::json!({"payload": {"kernel": vireo_e2e::guest()}})
    )
}

/// Reads one frame (kind, payload) by hand.
fn read_frame(s: &mut impl std::io::Read) -> Option<(u32, Vec<u8>)> {
    let mut hdr = [0u8; 12];
    s.read_exact(&mut hdr).ok()?;
    let kind = u32::from_le_bytes(hdr[..4].try_into().unwrap());
    let len = u64::from_le_bytes(hdr[4..].try_into().unwrap());
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).ok()?;
    Some((kind, payload))
}

/// Plays the destination's side of the join exchange on `s` (the tests' secret) and
/// admits the stream; returns what it claims to be.
fn admit(s: &mut std::os::unix::net::UnixStream) -> migration::auth::Claim {
    let secret: migration::auth::Secret = vireo_e2e::MIGRATION_SECRET.parse().unwrap();
    let claim = migration::auth::challenge(s, Some(&secret)).unwrap();
    migration::auth::admit(s).unwrap();
    claim
}

#[test]
fn a_page_stream_cut_mid_copy_leaves_the_source_running() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    let ops = 5000;
    let (src, src_sock) = source_with_pages(dir.path(), &disk, ops, 512);
    src.wait_serial("work iter=400 ", T);
    // A destination that takes the control stream and two page streams, drops page
    // stream 0 after its first frame, and from then on holds stream 1 open unread (so
    // the source's writer there blocks on a full socket).
    let path = dir.path().join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let peer = std::thread::spawn(move || {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (mut control, _) = listener.accept().unwrap();
        assert_eq!(admit(&mut control).stream, 0, "the control stream first");
        let (kind, hello) = read_frame(&mut control).unwrap();
        assert_eq!(kind, 1);
        let hello: serde_json::Value = serde_json::from_slice(&hello).unwrap();
        assert_eq!(hello["connections"], 2, "{hello}");
        let mut streams = [None, None];
        for _ in 0..2 {
            let mut s = listener.accept().unwrap().0;
            let claim = admit(&mut s);
            assert_eq!(claim.session, hello["session"].as_u64().unwrap());
            streams[claim.stream as usize - 1] = Some(s);
        }
        let [Some(mut lane0), Some(mut lane1)] = streams else {
            panic!("two page streams, lanes 0 and 1");
        };
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let drain = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) && read_frame(&mut lane1).is_some() {}
            lane1
        });
        let first = read_frame(&mut lane0).map(|(kind, _)| kind);
        stop.store(true, Ordering::SeqCst);
        let cut_at = std::time::Instant::now();
        drop(lane0);
        // The source gives up: it closes the control stream.
        while read_frame(&mut control).is_some() {}
        (first, cut_at, drain.join().unwrap())
    });
    send_with(
        &src_sock,
        &format!("unix:{}", path.display()),
        r#","connections":2"#,
    );
    let (first, cut_at, _held) = peer.join().unwrap();
    assert!(
        matches!(first, Some(2 | 12)),
        "Pages or RoundEnd first: {first:?}"
    );
    let e = wait_send_failed(&src_sock);
    assert!(e.contains("page stream"), "{e}");
    assert!(
        cut_at.elapsed() < Duration::from_secs(10),
        "the source took {:?} to give up (a blocked stream must not wait for its timeout)",
        cut_at.elapsed()
    );
    let serial = src.wait_serial("vireo-guest: result ok", T);
    assert!(
        serial.contains(&format!("work done iter={ops}")),
        "{serial}"
    );
    let out = src.wait(T);
    assert_eq!(out.status.code(), Some(0));
    assert_blocks(&disk, ops);
}

/// A destination that misbehaves at a chosen moment, speaking the wire format
/// (12-byte header: kind u32, length u64) by hand.
fn fake_destination(path: &Path, fail_at: &'static str) -> std::thread::JoinHandle<()> {
    fake_destination_with(path, fail_at, Box::new(|| {}))
}

/// [`fake_destination`] that runs `on_state` when the VM's state arrives (the disks
/// were handed over) before it refuses the VM.
fn fake_destination_with(
    path: &Path,
    fail_at: &'static str,
    on_state: Box<dyn FnOnce() + Send>,
) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    let mut on_state = Some(on_state);
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        admit(&mut s);
        let mut frames = 0;
        loop {
            let mut hdr = [0u8; 12];
            if s.read_exact(&mut hdr).is_err() {
                return;
            }
            let kind = u32::from_le_bytes(hdr[..4].try_into().unwrap());
            let len = u64::from_le_bytes(hdr[4..].try_into().unwrap());
            let mut payload = vec![0u8; len as usize];
            if s.read_exact(&mut payload).is_err() {
                return; // The source went away mid-frame: the test's checks say why.
            }
            frames += 1;
            match (fail_at, kind) {
                // Vanish in the middle of the memory copy.
                ("pages", 2) if frames >= 3 => return,
                // Refuse the VM when its state arrives (after the disks were handed over).
                ("state", 3) => {
                    if let Some(f) = on_state.take() {
                        f();
                    }
                    let why = b"destination disk full";
                    let mut f = Vec::new();
                    f.extend_from_slice(&6u32.to_le_bytes());
                    f.extend_from_slice(&(why.len() as u64).to_le_bytes());
                    f.extend_from_slice(why);
                    s.write_all(&f).unwrap();
                    return;
                }
                _ => {}
            }
        }
    })
}

fn failed_migration_leaves_the_source_running(fail_at: &'static str) {
    failed_migration_leaves_the_source_running_with(fail_at, "");
}

fn failed_migration_leaves_the_source_running_with(fail_at: &'static str, extra: &str) {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    // Enough work that the guest cannot finish (and power off, ending the source)
    // before the migration's end on a loaded machine (2000-3000 ops did in CI runs).
    let ops = 8000;
    let (src, src_sock) = source(dir.path(), &disk, ops);
    src.wait_serial("work iter=400 ", T);
    let mig = dir.path().join("fake.sock");
    let peer = fake_destination(&mig, fail_at);
    send_with(&src_sock, &format!("unix:{}", mig.display()), extra);
    peer.join().unwrap();
    // The source notices, takes its disk back and goes on: the guest finishes here,
    // every page and block checked by the guest and the blocks by us.
    let mut info = String::new();
    for _ in 0..500 {
        info = api(&src_sock, "GET", "vm.migration-info", None).1;
        if info.contains("\"failed\"") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(info.contains("\"failed\""), "{info}");
    if fail_at == "state" {
        assert!(info.contains("destination disk full"), "{info}");
    }
    let serial = src.wait_serial("vireo-guest: result ok", T);
    assert!(serial.contains("vireo-guest: result ok"), "{serial}");
    assert!(
        serial.contains(&format!("work done iter={ops}")),
        "{serial}"
    );
    let out = src.wait(T);
    assert_eq!(out.status.code(), Some(0));
    assert_blocks(&disk, ops);
}

/// The source takes back the disk it had, not whatever its path names when the
/// migration fails: here the path was moved away and a blank image put in its place
/// while the destination held the disk (as a jailed destination on the same host
/// chowns a shared disk to its own uid, so the source's uid could no longer open it by
/// path). Before, the source reopened the path: the guest found its last block missing.
#[test]
fn a_failed_migration_gives_the_source_back_its_own_disk_whatever_the_path_now_names() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    let moved = dir.path().join("moved.raw");
    let ops = 8000;
    let (src, src_sock) = source(dir.path(), &disk, ops);
    src.wait_serial("work iter=400 ", T);
    let mig = dir.path().join("fake.sock");
    let (d, m) = (disk.clone(), moved.clone());
    let peer = fake_destination_with(
        &mig,
        "state",
        Box::new(move || {
            std::fs::rename(&d, &m).unwrap();
            std::fs::File::create(&d)
                .unwrap()
                .set_len(64 << 20)
                .unwrap();
        }),
    );
    send_with(&src_sock, &format!("unix:{}", mig.display()), "");
    peer.join().unwrap();
    let serial = src.wait_serial("vireo-guest: result ok", T);
    assert!(
        serial.contains(&format!("work done iter={ops}")),
        "{serial}"
    );
    let out = src.wait(T);
    assert_eq!(out.status.code(), Some(0));
    // Every block is in the image the source had; the blank one was never written.
    assert_blocks(&moved, ops);
    let blank = std::fs::read(&disk).unwrap();
    assert!(
        blank.iter().all(|&b| b == 0),
        "the source wrote the file now at its path"
    );
}

#[test]
fn destination_vanishing_mid_copy_leaves_the_source_running() {
    failed_migration_leaves_the_source_running("pages");
}

#[test]
fn destination_refusing_after_the_disk_handover_leaves_the_source_running() {
    failed_migration_leaves_the_source_running("state");
}

#[test]
fn destination_refuses_a_bad_url_and_a_second_vm() {
    let dir = tempfile::tempdir().unwrap();
    let dst = Destination::start(dir.path());
    let (s, b) = api(
        &dst.sock,
        "PUT",
        "vm.receive-migration",
        Some(r#"{"receiver_url":"ftp:nowhere"}"#),
    );
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("unix:/path or tcp:host:port"), "{b}");
    let (s, _) = api(
        &dst.sock,
        "PUT",
        "vm.send-migration",
        Some(r#"{"destination_url":"unix:/x"}"#),
    );
    assert_eq!(s, 404, "no VM to send");
    let _ = &dst.serial;
}

/// A VMM waiting for a migration refuses everything that would make it a VM other than
/// the one that arrives — `vm.create`, `vm.restore`, `vm.boot`, a second
/// `vm.receive-migration` — with 409 and a message saying why; once the wait ended
/// (here: no source came within `timeout_s`), a VM created and booted then is kept and
/// runs: the failed receive tears nothing down.
#[test]
fn a_vmm_waiting_for_a_migration_refuses_a_second_vm_and_keeps_one_made_after() {
    let dir = tempfile::tempdir().unwrap();
    let dst = Destination::start(dir.path());
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    dst.listen_config(&guest_config(), &url, r#","timeout_s":2"#);
    let later_serial = dir.path().join("later.log");
    let create_body = serde_json::json!({
        "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=counter period_ms=10"},
        "memory": {"size": 32u64 << 20},
        "serial": {"mode": "file", "file": later_serial},
    })
    .to_string();
    let (s, b) = api(&dst.sock, "PUT", "vm.create", Some(&create_body));
    assert_eq!(s, 409, "{b}");
    assert!(b.contains("receiving a migration"), "{b}");
    let restore = format!(r#"{{"source_url":"file://{}"}}"#, dir.path().display());
    let (s, b) = api(&dst.sock, "PUT", "vm.restore", Some(&restore));
    assert_eq!(s, 409, "{b}");
    assert!(b.contains("receiving a migration"), "{b}");
    let (s, b) = api(&dst.sock, "PUT", "vm.boot", None);
    assert_eq!(s, 409, "{b}");
    assert!(b.contains("receiving a migration"), "{b}");
    let again = format!(r#"{{"receiver_url":"{url}"{}}}"#, guest_config());
    let (s, b) = api(&dst.sock, "PUT", "vm.receive-migration", Some(&again));
    assert_eq!(s, 409, "{b}");
    assert!(b.contains("already in progress"), "{b}");
    assert_eq!(api(&dst.sock, "GET", "vm.info", None).0, 404);

    // The wait ends: no source within 2 s.
    let t0 = std::time::Instant::now();
    loop {
        let (_, info) = api(&dst.sock, "GET", "vm.migration-info", None);
        if !info.contains("\"receiving\"") {
            assert!(info.contains("\"failed\""), "{info}");
            break;
        }
        assert!(t0.elapsed() < T, "still receiving: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (s, b) = api(&dst.sock, "PUT", "vm.create", Some(&create_body));
    assert_eq!(s, 204, "{b}");
    let (s, b) = api(&dst.sock, "PUT", "vm.boot", None);
    assert_eq!(s, 204, "{b}");
    // The guest made after the failed receive runs: it counts on its serial port.
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&later_serial)
        .unwrap_or_default()
        .contains("tick 5 ")
    {
        assert!(
            t0.elapsed() < T,
            "the VM created after the failed receive does not run"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (s, b) = api(&dst.sock, "GET", "vm.info", None);
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("\"Running\""), "{b}");
}

fn disk_info(sock: &Path) -> serde_json::Value {
    serde_json::from_str(&api(sock, "GET", "vm.migrate-disk-info", None).1).unwrap()
}

fn wait_disk_migration(sock: &Path) -> serde_json::Value {
    for _ in 0..1500 {
        let i = disk_info(sock);
        if i["status"] == "completed" || i["status"] == "failed" {
            return i;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("storage migration did not end: {}", disk_info(sock));
}

/// A VHDX passes `qemu-img check` and holds the workload's blocks (read back as raw
/// bytes through qemu-img into `scratch`: the peer decides).
fn assert_vhdx_blocks(vhdx: &Path, scratch: &Path, ops: u64) {
    let check = Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(vhdx)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    vhdx_as_raw(vhdx, scratch);
    assert_blocks(scratch, ops);
}

/// Reads a VHDX back as raw bytes through qemu-img (the peer decides).
fn vhdx_as_raw(vhdx: &Path, raw: &Path) {
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(vhdx)
        .arg(raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn storage_migration_moves_a_running_disk_to_vhdx_and_deletes_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    let ops = 3000;
    let (src, sock) = source(dir.path(), &disk, ops);
    src.wait_serial("work iter=400 ", T);
    let new = dir.path().join("moved.vhdx");
    let body = format!(
        r#"{{"id":"disk0","destination":"{}","format":"vhdx","delete_source":true}}"#,
        new.display()
    );
    let (s, b) = api(&sock, "PUT", "vm.migrate-disk", Some(&body));
    assert_eq!(s, 204, "{b}");
    // One at a time; and no snapshot while it runs.
    let (s, _) = api(&sock, "PUT", "vm.migrate-disk", Some(&body));
    assert!(s == 409 || s == 400, "second storage migration: {s}");
    let info = wait_disk_migration(&sock);
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(info["copied_bytes"], 64 << 20);
    assert!(!disk.exists(), "the old image is deleted after the switch");
    let (_, vm_info) = api(&sock, "GET", "vm.info", None);
    assert!(vm_info.contains("moved.vhdx"), "{vm_info}");
    // The guest goes on (now writing only to the new image) and finishes.
    let serial = src.wait_serial("vireo-guest: result ok", T);
    assert!(serial.contains("vireo-guest: result ok"), "{serial}");
    assert!(
        serial.contains(&format!("work done iter={ops}")),
        "{serial}"
    );
    assert_eq!(src.wait(T).status.code(), Some(0));
    assert_vhdx_blocks(&new, &dir.path().join("back.raw"), ops);
}

#[test]
fn cancelled_storage_migration_leaves_the_disk_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    let ops = 2000;
    let (src, sock) = source(dir.path(), &disk, ops);
    src.wait_serial("work iter=200 ", T);
    let new = dir.path().join("moved.raw");
    // Bad requests change nothing.
    for (body, code) in [
        (
            r#"{"id":"disk9","destination":"/tmp/x.raw"}"#.to_string(),
            404,
        ),
        (
            format!(r#"{{"id":"disk0","destination":"{}"}}"#, disk.display()),
            400,
        ),
        (
            format!(
                r#"{{"id":"disk0","destination":"{}","format":"qcow2"}}"#,
                new.display()
            ),
            400,
        ),
        (
            format!(
                r#"{{"id":"disk0","destination":"{}/no/such/dir/x.raw"}}"#,
                dir.path().display()
            ),
            400,
        ),
    ] {
        let (s, b) = api(&sock, "PUT", "vm.migrate-disk", Some(&body));
        assert_eq!(s, code, "{body}: {b}");
    }
    assert_eq!(api(&sock, "PUT", "vm.migrate-disk-cancel", None).0, 409);
    let body = format!(r#"{{"id":"disk0","destination":"{}"}}"#, new.display());
    assert_eq!(api(&sock, "PUT", "vm.migrate-disk", Some(&body)).0, 204);
    let _ = api(&sock, "PUT", "vm.migrate-disk-cancel", None);
    let info = wait_disk_migration(&sock);
    if info["status"] == "failed" {
        assert_eq!(info["error"], "cancelled", "{info}");
        assert!(!new.exists(), "the abandoned new image is removed");
        let (_, vm_info) = api(&sock, "GET", "vm.info", None);
        assert!(vm_info.contains("disk.raw"), "{vm_info}");
    }
    // Either way (a 64 MiB copy may finish before the cancel lands) the guest
    // completes and every block is on the image the VM now uses.
    let serial = src.wait_serial("vireo-guest: result ok", T);
    assert!(serial.contains("vireo-guest: result ok"), "{serial}");
    assert!(
        serial.contains(&format!("work done iter={ops}")),
        "{serial}"
    );
    assert_eq!(src.wait(T).status.code(), Some(0));
    let used = if info["status"] == "failed" {
        &disk
    } else {
        &new
    };
    assert_blocks(used, ops);
}

/// A real source's Hello (its configuration and this host's guest shape), caught by a
/// fake destination; and that source's configuration as `,"config":{...}`.
fn real_hello(dir: &Path) -> (serde_json::Value, String) {
    let sock = dir.join("capture-src.sock");
    let vm = Vireo::guest(
        "test=counter period_ms=50",
        &["--api-socket", sock.to_str().unwrap()],
    )
    .spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("tick 1 ", T);
    let config = config_field_of(&sock);
    let path = dir.join("capture.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    send_with(&sock, &format!("unix:{}", path.display()), "");
    let (mut s, _) = listener.accept().unwrap();
    admit(&mut s);
    let (kind, hello) = read_frame(&mut s).unwrap();
    assert_eq!(kind, 1, "Hello");
    drop(vm);
    (serde_json::from_slice(&hello).unwrap(), config)
}

/// Plays a source by hand: connects to `path`, joins as the control stream of session
/// 0 with the tests' secret, and writes `frames` (kind, payload).
fn fake_source(path: &Path, frames: &[(u32, Vec<u8>)], cut_last: bool) {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    let secret: migration::auth::Secret = vireo_e2e::MIGRATION_SECRET.parse().unwrap();
    migration::auth::join(
        &mut s,
        Some(&secret),
        migration::auth::Claim {
            session: 0,
            stream: 0,
        },
    )
    .unwrap();
    for (i, (kind, payload)) in frames.iter().enumerate() {
        let mut f = Vec::new();
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        f.extend_from_slice(payload);
        if cut_last && i == frames.len() - 1 {
            f.truncate(f.len() / 2);
        }
        let _ = s.write_all(&f);
    }
}

fn wait_failed(sock: &Path) -> String {
    for _ in 0..500 {
        let info = api(sock, "GET", "vm.migration-info", None).1;
        if info.contains("\"failed\"") {
            return info;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "destination did not fail: {}",
        api(sock, "GET", "vm.migration-info", None).1
    );
}

#[test]
fn destination_refuses_a_wrong_version_a_wrong_peer_and_a_truncated_stream() {
    let capture = tempfile::tempdir().unwrap();
    let (real, config) = real_hello(capture.path());
    // The real Hello (this host's guest shape), with the session of the fake source.
    let hello = |version: u32| {
        let mut h = real.clone();
        h["version"] = serde_json::json!(version);
        h["session"] = serde_json::json!(0);
        serde_json::to_vec(&h).unwrap()
    };
    type Case = (&'static str, Vec<(u32, Vec<u8>)>, bool, &'static str);
    let cases: Vec<Case> = vec![
        ("version", vec![(1, hello(99))], false, "protocol 99"),
        ("peer", vec![(4, vec![])], false, "expected Hello"),
        (
            "garbage",
            vec![(1, b"{not json".to_vec())],
            false,
            "bad JSON in Hello",
        ),
        (
            "truncated",
            vec![
                (1, hello(migration::protocol::PROTOCOL_VERSION)),
                (2, vec![0u8; 13 + 4096]),
            ],
            true,
            "migration connection",
        ),
        (
            "outside",
            vec![
                (1, hello(migration::protocol::PROTOCOL_VERSION)),
                (2, {
                    let mut p = Vec::new();
                    p.extend_from_slice(&(1u64 << 40).to_le_bytes());
                    p.extend_from_slice(&1u32.to_le_bytes());
                    p.push(0);
                    p.extend_from_slice(&[7u8; 4096]);
                    p
                }),
            ],
            false,
            "outside guest memory",
        ),
    ];
    for (name, frames, cut, expect) in cases {
        let dir = tempfile::tempdir().unwrap();
        let dst = Destination::start(dir.path());
        let mig = dir.path().join("mig.sock");
        dst.listen_config(&config, &format!("unix:{}", mig.display()), "");
        fake_source(&mig, &frames, cut);
        let info = wait_failed(&dst.sock);
        assert!(info.contains(expect), "{name}: {info}");
        // Nothing was installed: the VMM has no VM and can be asked again.
        assert_eq!(api(&dst.sock, "GET", "vm.info", None).0, 404, "{name}");
        dst.listen_config(&config, &format!("unix:{}", mig.display()), "");
    }
}

/// vm.receive-migration's body for a shared-nothing migration of the VM at `source`
/// into `storage_dir`: its configuration, with the disk's size declared (the copy is
/// made that size, and the source may not write beyond it).
fn shared_nothing_receive(source: &Path, mig: &Path, storage_dir: &Path) -> String {
    let mut config = vireo_e2e::vm_config(source);
    config["disks"][0]["size"] = serde_json::json!(64 << 20);
    format!(
        r#"{{"receiver_url":"unix:{}","storage_dir":"{}","config":{config}{}}}"#,
        mig.display(),
        storage_dir.display(),
        secret_field()
    )
}

#[test]
fn shared_nothing_migration_copies_a_vhdx_disk_and_the_running_workload() {
    let dir = tempfile::tempdir().unwrap();
    let (src_dir, dst_dir) = (dir.path().join("src"), dir.path().join("dst"));
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();
    let disk = src_dir.join("os.vhdx");
    let out = Command::new(bin("vireo-img"))
        .args(["create", "-f", "vhdx"])
        .arg(&disk)
        .arg("64M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Long enough that the guest cannot finish (and power off, ending the source with
    // status 0 before the switch-over) while the disk is copied on a loaded machine:
    // with 3000 it did once in CI's neighbourhood, the destination then saw the
    // source's end mid-copy.
    let ops = 8000;
    let (src, src_sock) = source(dir.path(), &disk, ops);
    src.wait_serial("work iter=400 ", T);
    let dst = Destination::start(dir.path());
    let mig = dir.path().join("mig.sock");
    let body = shared_nothing_receive(&src_sock, &mig, &dst_dir);
    let (s, b) = api(&dst.sock, "PUT", "vm.receive-migration", Some(&body));
    assert_eq!(s, 204, "{b}");
    send_with(
        &src_sock,
        &format!("unix:{}", mig.display()),
        r#","copy_storage":true"#,
    );
    let src_out = src.wait(T);
    assert_eq!(
        src_out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&src_out.stderr)
    );
    let dst_out = dst.wait();
    let dst_serial = std::fs::read_to_string(dir.path().join("dst.log")).unwrap();
    assert_guest_ok(&dst_out, &dst_serial);
    assert!(
        dst_serial.contains(&format!("work done iter={ops}")),
        "{dst_serial}"
    );
    // The copy is a valid VHDX holding every block the guest wrote, before and after.
    let copy = dst_dir.join("os.vhdx");
    assert_vhdx_blocks(&copy, &dir.path().join("back.raw"), ops);
    assert!(disk.exists(), "the source keeps its own image");
}

#[test]
fn shared_nothing_migration_refused_leaves_the_source_on_its_disk() {
    failed_migration_leaves_the_source_running_with("state", r#","copy_storage":true"#);
}

#[test]
fn source_killed_right_after_the_commit_leaves_the_vm_running_at_the_destination() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    // Long enough that the guest cannot finish at the source before the commit,
    // even on a loaded machine.
    let ops = 8000;
    let (src, src_sock) = source_with_env(
        dir.path(),
        &disk,
        ops,
        &[("VIREO_FAULT", "kill-after-commit")],
    );
    src.wait_serial("work iter=400 ", T);
    let dst = Destination::start(dir.path());
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    dst.listen(&src_sock, &url);
    send_with(&src_sock, &url, "");
    // The source dies by SIGKILL the moment Go is out: no clean end, no goodbye.
    let src_out = src.wait(T);
    assert_eq!(
        src_out.status.signal(),
        Some(libc::SIGKILL),
        "the fault point must have killed the source: {:?}",
        src_out.status
    );
    // Exactly one VM runs: the destination's, to the end, every page and block checked.
    let dst_out = dst.wait();
    let dst_serial = std::fs::read_to_string(dir.path().join("dst.log")).unwrap_or_else(|e| {
        panic!(
            "no destination serial ({e}); destination: {:?} {}",
            dst_out.status,
            String::from_utf8_lossy(&dst_out.stderr)
        )
    });
    assert_guest_ok(&dst_out, &dst_serial);
    assert!(
        dst_serial.contains(&format!("work done iter={ops}")),
        "{dst_serial}"
    );
    assert!(
        !dst_serial.contains("work pages="),
        "the guest must not start over"
    );
    assert_blocks(&disk, ops);
}

#[test]
fn real_destination_killed_mid_copy_leaves_the_source_running() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    let ops = 6000;
    let (src, src_sock) = source(dir.path(), &disk, ops);
    src.wait_serial("work iter=400 ", T);
    let mut dst = Destination::start(dir.path());
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    dst.listen(&src_sock, &url);
    // 1 MiB/s: the copy of the guest's memory takes seconds, the kill lands inside it.
    send_with(&src_sock, &url, r#","bandwidth_mib_s":1"#);
    // Round 0 of the copy takes seconds at 1 MiB/s: kill the destination inside it.
    let mut copying = false;
    for _ in 0..500 {
        let info = api(&src_sock, "GET", "vm.migration-info", None).1;
        if info.contains("\"sending\"") {
            copying = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(copying, "the copy did not start");
    std::thread::sleep(Duration::from_millis(300));
    let info = api(&src_sock, "GET", "vm.migration-info", None).1;
    assert!(
        info.contains("\"sending\""),
        "still copying when killed: {info}"
    );
    let mut child = dst.child.take().unwrap();
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    let info = wait_failed(&src_sock);
    assert!(info.contains("\"failed\""), "{info}");
    let serial = src.wait_serial("vireo-guest: result ok", T);
    assert!(
        serial.contains(&format!("work done iter={ops}")),
        "{serial}"
    );
    let out = src.wait(T);
    assert_eq!(out.status.code(), Some(0));
    assert_blocks(&disk, ops);
}

/// `vm.migration-info` moves during a round, frame by frame, not only at its end: a
/// paused guest with 16 MiB written, sent at 4 MiB/s, shows round 0's pages go from
/// remaining to sent.
#[test]
fn migration_progress_moves_within_round_zero() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("src.sock");
    let src = Vireo::guest(
        "test=dirty pages=4096 rate=100000 report_ms=50",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--memory",
            "size=64M",
        ],
    )
    .spawn();
    wait_for_socket(&sock, T);
    src.wait_serial("dirty pass=3 ", T);
    let (s, b) = api(&sock, "PUT", "vm.pause", None);
    assert_eq!(s, 204, "{b}");
    let mut dst = Destination::start(dir.path());
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    dst.listen(&sock, &url);
    send_with(&sock, &url, r#","bandwidth_mib_s":4"#);
    let mut seen = Vec::new();
    let start = std::time::Instant::now();
    while seen.len() < 3 && start.elapsed() < Duration::from_secs(10) {
        let v: serde_json::Value =
            serde_json::from_str(&api(&sock, "GET", "vm.migration-info", None).1).unwrap();
        if v["status"] == "sending" && v["rounds"] == 0 {
            let (sent, left) = (
                v["pages_sent"].as_u64().unwrap(),
                v["remaining_pages"].as_u64().unwrap(),
            );
            // (0, 0) until round 0 starts (connection and handshake first).
            if sent + left > 0 && seen.last() != Some(&(sent, left)) {
                seen.push((sent, left));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut child = dst.child.take().unwrap();
    child.kill().unwrap();
    let _ = child.wait();
    assert!(
        seen.len() >= 3,
        "progress did not move within round 0: {seen:?}"
    );
    for w in seen.windows(2) {
        assert!(w[1].0 > w[0].0 && w[1].1 < w[0].1, "{seen:?}");
        assert_eq!(
            w[1].0 + w[1].1,
            w[0].0 + w[0].1,
            "round 0's total changed: {seen:?}"
        );
    }
    assert!(seen[0].0 + seen[0].1 >= 4096, "{seen:?}");
    let info = wait_failed(&sock);
    assert!(info.contains("\"failed\""), "{info}");
    let (s, b) = api(&sock, "GET", "vm.info", None);
    assert_eq!(s, 200, "{b}");
    assert!(
        b.contains("\"Paused\""),
        "the source keeps the VM as it was: {b}"
    );
}

/// A small tmpfs mounted for the test (root only), unmounted on drop.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> Option<SmallFs> {
        let p = dir.join("smallfs");
        std::fs::create_dir_all(&p).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&p)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallFs(p))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn destination_disk_full_during_shared_nothing_leaves_the_source_on_its_disk() {
    let dir = tempfile::tempdir().unwrap();
    let Some(small) = SmallFs::mount(dir.path(), "4M") else {
        vireo_e2e::skip_or_fail_under_ci(
            "cannot mount a tmpfs here (needs root): no real full disk to test",
        );
        return;
    };
    let disk = raw_disk(dir.path());
    // 8 MiB of data away from the workload's blocks: more than the 4 MiB tmpfs holds.
    let filler: Vec<u8> = (0..8 << 20)
        .map(|i: u32| (i * 7 + i / 4096) as u8)
        .collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(&filler, 16 << 20)
        .unwrap();
    // Enough work that the guest cannot finish (and power off, ending the source)
    // before the migration's end on a loaded machine (2000-3000 ops did in CI runs).
    let ops = 8000;
    let (src, src_sock) = source(dir.path(), &disk, ops);
    src.wait_serial("work iter=400 ", T);
    let dst = Destination::start(dir.path());
    let mig = dir.path().join("mig.sock");
    let body = shared_nothing_receive(&src_sock, &mig, &small.0);
    let (s, b) = api(&dst.sock, "PUT", "vm.receive-migration", Some(&body));
    assert_eq!(s, 204, "{b}");
    send_with(
        &src_sock,
        &format!("unix:{}", mig.display()),
        r#","copy_storage":true"#,
    );
    // The destination fails on its full disk and says so; the source carries on.
    let dst_info = wait_failed(&dst.sock);
    assert!(dst_info.contains("No space left on device"), "{dst_info}");
    let info = wait_failed(&src_sock);
    assert!(info.contains("\"failed\""), "{info}");
    let serial = src.wait_serial("vireo-guest: result ok", T);
    assert!(
        serial.contains(&format!("work done iter={ops}")),
        "{serial}"
    );
    let out = src.wait(T);
    assert_eq!(out.status.code(), Some(0));
    assert_blocks(&disk, ops);
    let mut back = vec![0u8; filler.len()];
    std::fs::File::open(&disk)
        .unwrap()
        .read_exact_at(&mut back, 16 << 20)
        .unwrap();
    assert!(back == filler, "the source image lost data");
    assert_eq!(
        api(&dst.sock, "GET", "vm.info", None).0,
        404,
        "no VM at the destination"
    );
}

// Host trust: a migration source sends the guest's state, never the destination's
// configuration; streams get in only with the secret.

/// What the man in the middle does to the migration it relays.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tamper {
    /// The Hello's configuration names host files as the disk, console and serial.
    HostFiles,
    /// The Hello says twice the memory.
    Memory,
    /// The Hello has one disk more.
    ExtraDisk,
    /// Nothing is changed, but before page stream 1 joins, a forged join for it (the
    /// control stream's proof replayed) goes to the destination.
    ForgedPageStream,
}

/// The files a rogue source would like the destination to open.
struct Victims {
    disk: std::path::PathBuf,
    console: std::path::PathBuf,
    serial: std::path::PathBuf,
}

impl Victims {
    fn new(dir: &Path) -> Self {
        let d = dir.join("victims");
        std::fs::create_dir_all(&d).unwrap();
        let v = Self {
            disk: d.join("disk.img"),
            console: d.join("console.log"),
            serial: d.join("serial.log"),
        };
        std::fs::write(&v.disk, vec![0x5au8; 1 << 20]).unwrap();
        std::fs::write(&v.console, "precious console\n").unwrap();
        std::fs::write(&v.serial, "precious serial\n").unwrap();
        v
    }

    fn paths(&self) -> [&Path; 3] {
        [&self.disk, &self.console, &self.serial]
    }

    /// Each file's content and modification time.
    fn fingerprint(&self) -> Vec<(Vec<u8>, std::time::SystemTime)> {
        self.paths()
            .iter()
            .map(|p| {
                (
                    std::fs::read(p).unwrap(),
                    std::fs::metadata(p).unwrap().modified().unwrap(),
                )
            })
            .collect()
    }
}

/// Relays `connections` connections from `listen` to the destination at `dst`, frame
/// by frame through the join exchange and the Hello (changed as `tamper` says), then
/// byte for byte. Returns the answers the forged joins got.
fn relay(
    listen: &Path,
    dst: &Path,
    connections: usize,
    tamper: Tamper,
    victims: Option<&Victims>,
) -> std::thread::JoinHandle<Vec<String>> {
    let listener = std::os::unix::net::UnixListener::bind(listen).unwrap();
    let dst = dst.to_path_buf();
    let victims = victims.map(|v| (v.disk.clone(), v.console.clone(), v.serial.clone()));
    std::thread::spawn(move || {
        let control_mac = std::sync::Arc::new(std::sync::Mutex::new(None));
        let threads: Vec<_> = (0..connections)
            .map(|_| {
                let (from_src, _) = listener.accept().unwrap();
                let (dst, victims, control_mac) =
                    (dst.clone(), victims.clone(), control_mac.clone());
                std::thread::spawn(move || {
                    relay_one(from_src, &dst, tamper, victims.as_ref(), &control_mac)
                })
            })
            .collect();
        threads
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .collect()
    })
}

type Mac = [u8; migration::auth::MAC_LEN];

fn relay_one(
    mut from_src: std::os::unix::net::UnixStream,
    dst: &Path,
    tamper: Tamper,
    victims: Option<&(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)>,
    control_mac: &std::sync::Mutex<Option<Mac>>,
) -> Option<String> {
    use migration::protocol::{recv, send, Message};
    let mut to_dst = std::os::unix::net::UnixStream::connect(dst).unwrap();
    assert!(matches!(recv(&mut from_src).unwrap(), Message::Knock));
    send(&mut to_dst, &Message::Knock).unwrap();
    let challenge = recv(&mut to_dst).unwrap();
    send(&mut from_src, &challenge).unwrap();
    let Message::Auth {
        session,
        stream,
        mac,
    } = recv(&mut from_src).unwrap()
    else {
        panic!("the source did not answer the challenge");
    };
    if stream == 0 {
        *control_mac.lock().unwrap() = Some(mac);
    }
    let mut forged = None;
    if tamper == Tamper::ForgedPageStream && stream == 1 {
        let replayed = control_mac
            .lock()
            .unwrap()
            .expect("the control stream joined first");
        let mut f = std::os::unix::net::UnixStream::connect(dst).unwrap();
        send(&mut f, &Message::Knock).unwrap();
        assert!(matches!(recv(&mut f).unwrap(), Message::Challenge { .. }));
        send(
            &mut f,
            &Message::Auth {
                session,
                stream: 1,
                mac: replayed,
            },
        )
        .unwrap();
        forged = Some(match recv(&mut f) {
            Ok(Message::Error(why)) => why,
            Ok(m) => format!("admitted: {}", m.name()),
            Err(e) => e.to_string(),
        });
    }
    send(
        &mut to_dst,
        &Message::Auth {
            session,
            stream,
            mac,
        },
    )
    .unwrap();
    let joined = recv(&mut to_dst).unwrap();
    send(&mut from_src, &joined).unwrap();
    if stream == 0 {
        let Message::Hello(mut hello) = recv(&mut from_src).unwrap() else {
            panic!("Hello first");
        };
        let c = &mut hello.config;
        match tamper {
            Tamper::HostFiles => {
                let (disk, console, serial) = victims.expect("victims");
                c["disks"][0]["path"] = serde_json::json!(disk);
                c["console"] = serde_json::json!({"mode": "file", "file": console});
                c["serial"] = serde_json::json!({"mode": "file", "file": serial});
            }
            Tamper::Memory => {
                let size = c["memory"]["size"].as_u64().unwrap();
                c["memory"]["size"] = serde_json::json!(size * 2);
            }
            Tamper::ExtraDisk => {
                let mut extra = c["disks"][0].clone();
                extra["id"] = serde_json::json!("rogue");
                c["disks"].as_array_mut().unwrap().push(extra);
            }
            Tamper::ForgedPageStream => {}
        }
        send(&mut to_dst, &Message::Hello(hello)).unwrap();
    }
    pump(from_src, to_dst);
    forged
}

/// Copies both ways until both ends are done.
fn pump(a: std::os::unix::net::UnixStream, b: std::os::unix::net::UnixStream) {
    use std::net::Shutdown;
    let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut a2, &mut b2);
        let _ = b2.shutdown(Shutdown::Write);
    });
    let (mut a, mut b) = (a, b);
    let _ = std::io::copy(&mut b, &mut a);
    let _ = a.shutdown(Shutdown::Write);
    t.join().unwrap();
}

/// The files the process `pid` has open.
fn open_files(pid: u32) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_rogue_source_naming_host_files_gets_the_destinations_own_vm_and_the_files_stay_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    let victims = Victims::new(dir.path());
    let before = victims.fingerprint();
    let ops = 3000;
    let src_sock = dir.path().join("src.sock");
    let src_console = dir.path().join("src-console.log");
    let src = Vireo::guest(
        &format!("test=workload pages=512 ops={ops} report=200"),
        &[
            "--api-socket",
            src_sock.to_str().unwrap(),
            "--disk",
            &format!("path={}", disk.display()),
            "--console",
            &format!("file={}", src_console.display()),
        ],
    )
    .spawn();
    wait_for_socket(&src_sock, T);
    src.wait_serial("work iter=400 ", T);
    // Paused, so it arrives paused: the checks below see the VM installed, not gone.
    let (st, b) = api(&src_sock, "PUT", "vm.pause", None);
    assert_eq!(st, 204, "{b}");

    // The destination's own definition of the VM: its console file is its own.
    let dst = Destination::start(dir.path());
    let dst_console = dir.path().join("dst-console.log");
    let mut config = vireo_e2e::vm_config(&src_sock);
    config["console"] = serde_json::json!({"mode": "file", "file": dst_console});
    let mig = dir.path().join("mig.sock");
    dst.listen_config(
        &format!(r#","config":{config}"#),
        &format!("unix:{}", mig.display()),
        "",
    );
    let dst_pid = dst.child.as_ref().unwrap().id();
    let relayed = dir.path().join("relay.sock");
    let man_in_the_middle = relay(&relayed, &mig, 1, Tamper::HostFiles, Some(&victims));
    send_with(&src_sock, &format!("unix:{}", relayed.display()), "");

    // While it moves, and once the VM runs there: the destination never has a
    // victim open.
    let assert_untouched_by_dst = || {
        let open = open_files(dst_pid);
        for v in victims.paths() {
            assert!(
                !open.iter().any(|p| p == v),
                "{} is open: {open:?}",
                v.display()
            );
        }
        open
    };
    let start = std::time::Instant::now();
    loop {
        assert_untouched_by_dst();
        let info = api(&dst.sock, "GET", "vm.migration-info", None).1;
        if info.contains("\"completed\"") {
            break;
        }
        assert!(!info.contains("\"failed\""), "{info}");
        assert!(start.elapsed() < T, "{info}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let open = assert_untouched_by_dst();
    assert!(
        open.iter().any(|p| p == &disk) && open.iter().any(|p| p == &dst_console),
        "the destination runs on its own disk and console: {open:?}"
    );
    let (_, info) = api(&dst.sock, "GET", "vm.info", None);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["config"]["disks"][0]["path"], disk.to_str().unwrap());
    assert_eq!(
        info["config"]["console"]["file"],
        dst_console.to_str().unwrap()
    );
    let (st, b) = api(&dst.sock, "PUT", "vm.resume", None);
    assert_eq!(st, 204, "{b}");

    let src_out = src.wait(T);
    assert_eq!(src_out.status.code(), Some(0), "{}", plain(&src_out.stderr));
    let dst_out = dst.wait();
    let dst_serial = std::fs::read_to_string(dir.path().join("dst.log")).unwrap();
    assert_guest_ok(&dst_out, &dst_serial);
    assert!(
        dst_serial.contains(&format!("work done iter={ops}")),
        "{dst_serial}"
    );
    assert_blocks(&disk, ops);
    man_in_the_middle.join().unwrap();
    assert!(
        victims.fingerprint() == before,
        "a victim file changed (content or mtime)"
    );
}

/// A relayed migration whose Hello `tamper` changes fails at the destination naming
/// `expect`; the destination is left clean (no VM, can listen again) and the source
/// runs on.
fn a_different_guest_fails_naming(tamper: Tamper, expect: impl Fn(&serde_json::Value) -> String) {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    // Long enough that the guest is still counting when the test checks it goes on.
    let (src, src_sock) = source_with_pages(dir.path(), &disk, 50_000, 512);
    src.wait_serial("work iter=400 ", T);
    let dst = Destination::start(dir.path());
    let mig = format!("unix:{}", dir.path().join("mig.sock").display());
    dst.listen(&src_sock, &mig);
    let relayed = dir.path().join("relay.sock");
    let man_in_the_middle = relay(&relayed, &dir.path().join("mig.sock"), 1, tamper, None);
    send_with(&src_sock, &format!("unix:{}", relayed.display()), "");
    let expect = expect(&vireo_e2e::vm_config(&src_sock));
    let info = wait_failed(&dst.sock);
    assert!(info.contains(&expect), "{info}");
    let e = wait_send_failed(&src_sock);
    assert!(e.contains(&expect), "the source is told why: {e}");
    man_in_the_middle.join().unwrap();
    assert_eq!(
        api(&dst.sock, "GET", "vm.info", None).0,
        404,
        "no VM installed"
    );
    assert_keeps_counting(&src, &src_sock);
    dst.listen(&src_sock, &mig);
}

#[test]
fn a_hello_with_other_memory_fails_naming_the_field() {
    a_different_guest_fails_naming(Tamper::Memory, |c| {
        let size = c["memory"]["size"].as_u64().unwrap();
        format!("memory.size: source {}, destination {size}", size * 2)
    });
}

#[test]
fn a_hello_with_an_extra_device_fails_naming_it() {
    a_different_guest_fails_naming(Tamper::ExtraDisk, |_| {
        "devices[1]: source disk 'rogue', destination none".to_string()
    });
}

#[test]
fn strangers_and_a_forged_page_stream_join_are_refused_while_the_real_migration_completes() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    let ops = 3000;
    let (src, src_sock) = source_with_pages(dir.path(), &disk, ops, 1024);
    src.wait_serial("work iter=400 ", T);
    let dst = Destination::start(dir.path());
    let mig = dir.path().join("mig.sock");
    dst.listen(&src_sock, &format!("unix:{}", mig.display()));

    // Strangers come first: one sends garbage, one proves another secret, one says
    // nothing at all (and stays connected).
    let mut garbage = std::os::unix::net::UnixStream::connect(&mig).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut wrong = std::os::unix::net::UnixStream::connect(&mig).unwrap();
    let other: migration::auth::Secret = "00".repeat(32).parse().unwrap();
    let e = migration::auth::join(
        &mut wrong,
        Some(&other),
        migration::auth::Claim {
            session: 7,
            stream: 0,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("wrong proof"), "{e}");
    let _silent = std::os::unix::net::UnixStream::connect(&mig).unwrap();
    wait_refused(&dst.sock, 2);

    // The real source, over four page streams, through a relay that first tries page
    // stream 1 with the control stream's proof (replayed: another nonce).
    let relayed = dir.path().join("relay.sock");
    let man_in_the_middle = relay(&relayed, &mig, 5, Tamper::ForgedPageStream, None);
    send_with(
        &src_sock,
        &format!("unix:{}", relayed.display()),
        r#","connections":4"#,
    );
    let forged = man_in_the_middle.join().unwrap();
    assert_eq!(forged.len(), 1, "{forged:?}");
    assert!(forged[0].contains("wrong proof"), "{forged:?}");
    // Every page the guest wrote arrived: it checks them all and finishes there.
    let src_out = src.wait(T);
    assert_eq!(src_out.status.code(), Some(0), "{}", plain(&src_out.stderr));
    assert!(plain(&src_out.stderr).contains("connections=4"));
    let dst_out = dst.wait();
    let dst_serial = std::fs::read_to_string(dir.path().join("dst.log")).unwrap_or_else(|e| {
        panic!(
            "no destination serial ({e}); destination: {:?} {}",
            dst_out.status,
            String::from_utf8_lossy(&dst_out.stderr)
        )
    });
    assert_guest_ok(&dst_out, &dst_serial);
    assert!(
        dst_serial.contains(&format!("work done iter={ops}")),
        "{dst_serial}"
    );
    assert!(
        !dst_serial.contains("work pages="),
        "the guest must not start over"
    );
    assert_blocks(&disk, ops);
    // The destination logged each refusal: the garbage, the wrong secret, the replay.
    let log = plain(&dst_out.stderr);
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused a migration connection"))
        .collect();
    assert!(refusals.len() >= 3, "{log}");
    assert!(
        refusals
            .iter()
            .filter(|l| l.contains("wrong proof"))
            .count()
            >= 2,
        "{log}"
    );
}

/// Both VMMs jailed (`vireo --jail`, the same uid as on shared storage): the source
/// sees the migration socket's directory, the destination that directory and the disk
/// the arriving VM names; the disk is handed to the uid, as whoever sets up jails does.
#[test]
fn live_migration_between_jailed_vmms_over_unix_and_tcp() {
    for transport in ["unix", "tcp"] {
        let dir = tempfile::tempdir().unwrap();
        let uid = 100103;
        let disk = raw_disk(dir.path());
        std::os::unix::fs::chown(&disk, Some(uid), Some(uid)).unwrap();
        let mig = dir.path().join("mig");
        let (src_api, dst_api) = (dir.path().join("src"), dir.path().join("dst"));
        for d in [&mig, &src_api, &dst_api] {
            std::fs::create_dir(d).unwrap();
        }
        let jail = |root: &str, extra: &str| {
            format!(
                "uid={uid},gid={uid},root={},bind={}{extra}",
                dir.path().join(root).display(),
                mig.display()
            )
        };
        let ops = 2000;
        let src_sock = src_api.join("src.sock");
        let mut src = Vireo::guest(
            &format!("test=workload pages=512 ops={ops} report=200"),
            &[
                "--api-socket",
                src_sock.to_str().unwrap(),
                "--disk",
                &format!("path={}", disk.display()),
                "--jail",
                &jail("r1", ""),
            ],
        );
        src.cmd.env("RUST_LOG", "vmm::live=info");
        let src = src.spawn();
        wait_for_socket(&src_sock, T);
        src.wait_serial("work iter=200 ", T);

        let dst_sock = dst_api.join("dst.sock");
        let dst_serial = dir.path().join("dst.log");
        let dst = Command::new(bin("vireo"))
            .arg("--api-socket")
            .arg(&dst_sock)
            .arg("--serial")
            .arg(format!("file={}", dst_serial.display()))
            .arg("--jail")
            .arg(jail("r2", &format!(",bind={}", disk.display())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_socket(&dst_sock, T);
        let url = match transport {
            "unix" => format!("unix:{}", mig.join("mig.sock").display()),
            _ => tcp_url(),
        };
        // Plain TCP between the two jails here; TLS is tested on its own above.
        let insecure = if transport == "tcp" {
            r#","insecure":true"#
        } else {
            ""
        };
        let body = format!(
            r#"{{"receiver_url":"{url}"{}{}{insecure}}}"#,
            vireo_e2e::config_field_of(&src_sock),
            secret_field()
        );
        let (s, b) = api(&dst_sock, "PUT", "vm.receive-migration", Some(&body));
        assert_eq!(s, 204, "{b}");
        send_with(&src_sock, &url, insecure);
        let src_out = src.wait(T);
        assert_eq!(
            src_out.status.code(),
            Some(0),
            "{transport}: {}",
            String::from_utf8_lossy(&src_out.stderr)
        );
        // Shown if the destination fails: what the source saw.
        eprintln!(
            "{transport} source log:\n{}",
            String::from_utf8_lossy(&src_out.stderr)
        );
        let dst_out = wait_with_timeout(dst, T);
        let text = std::fs::read_to_string(&dst_serial).unwrap();
        assert_guest_ok(&dst_out, &text);
        assert!(
            text.contains(&format!("work done iter={ops}")),
            "{transport}: {text}"
        );
        assert_blocks(&disk, ops);
    }
}

/// A jailed VMM moves its running disk to a VHDX in a directory handed to its jail
/// (`bind=`), and deletes the old image there.
#[test]
fn storage_migration_works_in_a_jail() {
    let dir = tempfile::tempdir().unwrap();
    let uid = 100104;
    let store = dir.path().join("store");
    let api_dir = dir.path().join("api");
    std::fs::create_dir(&store).unwrap();
    std::fs::create_dir(&api_dir).unwrap();
    let disk = raw_disk(&store);
    let ops = 2000;
    let sock = api_dir.join("vm.sock");
    let jail = format!(
        "uid={uid},gid={uid},root={},bind={}",
        dir.path().join("root").display(),
        store.display()
    );
    let src = Vireo::guest(
        &format!("test=workload pages=512 ops={ops} report=200"),
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--disk",
            &format!("path={}", disk.display()),
            "--jail",
            &jail,
        ],
    )
    .spawn();
    wait_for_socket(&sock, T);
    src.wait_serial("work iter=200 ", T);
    let new = store.join("moved.vhdx");
    let body = format!(
        r#"{{"id":"disk0","destination":"{}","format":"vhdx","delete_source":true}}"#,
        new.display()
    );
    let (s, b) = api(&sock, "PUT", "vm.migrate-disk", Some(&body));
    assert_eq!(s, 204, "{b}");
    let info = match std::panic::catch_unwind(|| wait_disk_migration(&sock)) {
        Ok(info) => info,
        Err(_) => {
            let out = src.wait(T);
            panic!(
                "no answer about the storage migration; the VMM: {:?} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    assert_eq!(info["status"], "completed", "{info}");
    assert!(!disk.exists(), "the old image is deleted after the switch");
    let serial = src.wait_serial("vireo-guest: result ok", T);
    assert!(
        serial.contains(&format!("work done iter={ops}")),
        "{serial}"
    );
    assert_eq!(src.wait(T).status.code(), Some(0));
    assert_vhdx_blocks(&new, &dir.path().join("back.raw"), ops);
}

/// A clustered VM's receiving VMM takes `vm.lease` renewals while the VM arrives (a
/// cluster node's vireod sends them), and the VM is built under the deadline as
/// renewed: a migration that takes longer than the deadline it was created with (at
/// most 1.5 s ahead on a cluster node) still ends with the VM running and writing.
/// (Before, `vm.lease` answered 404 until the VM existed, and the VM was built with
/// the passed deadline: paused for good, its writes refused.)
#[test]
fn a_receiving_vmm_takes_write_lease_renewals_while_the_vm_arrives() {
    use vireo_e2e::seqdisk::monotonic_ns;
    // 100 ms: the copy, paced at 1 MiB/s, outlasts it however little the guest has
    // touched (1 s did not: a guest of 69 pages arrived in 0.3 s under load).
    migrate_renewing_the_lease(monotonic_ns() + 100_000_000);
}

/// A receiving VMM whose process took longer to start than the deadline it was given
/// (a loaded host: the deadline is taken before the spawn) is not lost: nothing ran
/// under that lease yet, so the first renewal vireod sends while its node holds the
/// cluster lease puts it in force again. (Before, the renewal was refused as expired
/// and vireod killed the VMM: the migration failed.)
#[test]
fn a_receiving_vmm_born_after_its_deadline_takes_the_first_renewal() {
    use vireo_e2e::seqdisk::monotonic_ns;
    migrate_renewing_the_lease(monotonic_ns().saturating_sub(1));
}

/// Migrates a writing VM into a receiver created with the write lease deadline
/// `first` (ns on `CLOCK_MONOTONIC`), renewing it every 200 ms as a node's vireod
/// would, paced to outlast `first`: the VM runs at the destination and every write of
/// its guest is on the disk.
fn migrate_renewing_the_lease(first: u64) {
    use vireo_e2e::seqdisk::monotonic_ns;
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    let ops = 8000;
    let (src, src_sock) = source(dir.path(), &disk, ops);
    src.wait_serial("work iter=400 ", T);
    let dst = Destination::start(dir.path());
    // Renewals 3 s ahead (a loaded machine may hold this loop up a while).
    let ahead = || monotonic_ns() + 3_000_000_000;
    let lease = |ns: u64| format!(r#"{{"deadline_monotonic_ns":{ns}}}"#);
    let mut config = vireo_e2e::vm_config(&src_sock);
    config["write_lease"] = serde_json::json!({ "deadline_monotonic_ns": first });
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    dst.listen_config(&format!(r#","config":{config}"#), &url, "");
    // Paced so that the copy outlasts the deadline the receiver was created with.
    send_with(&src_sock, &url, r#","bandwidth_mib_s":1"#);
    let start = std::time::Instant::now();
    let mut renewals = 0;
    loop {
        let (st, body) = api(&dst.sock, "PUT", "vm.lease", Some(&lease(ahead())));
        assert_eq!(st, 204, "renewal {renewals} refused: {body}");
        renewals += 1;
        let (_, info) = api(&dst.sock, "GET", "vm.info", None);
        if info.contains("\"Running\"") {
            break;
        }
        assert!(
            start.elapsed() < T,
            "the VM never ran at the destination: {info}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        monotonic_ns() > first,
        "the migration ended within the first deadline: it proves nothing"
    );
    // Renewed on: the guest finishes its work at the destination, every write taken.
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&dst.serial)
        .unwrap_or_default()
        .contains(&format!("work done iter={ops}"))
    {
        let _ = api(&dst.sock, "PUT", "vm.lease", Some(&lease(ahead())));
        let (_, info) = api(&dst.sock, "GET", "vm.info", None);
        assert!(!info.contains("write lease expired"), "{info}");
        assert!(
            start.elapsed() < T,
            "the guest did not finish at the destination"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = src.wait(T);
    let dst_out = dst.wait();
    let dst_serial = std::fs::read_to_string(dir.path().join("dst.log")).unwrap();
    assert_guest_ok(&dst_out, &dst_serial);
    assert_blocks(&disk, ops);
}

/// A receiver whose write lease nobody renews (its host lost its cluster lease, or
/// its vireod is gone) refuses the VM at the end of the copy: the VM never runs there,
/// and the source takes it back and finishes its work, every write on the disk.
#[test]
fn a_receiver_whose_write_lease_lapsed_refuses_the_vm_and_the_source_keeps_it() {
    use vireo_e2e::seqdisk::monotonic_ns;
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    // Enough work that the source is still writing when the destination refuses (it
    // waits up to 2 s for a renewal first).
    let ops = 8000;
    let (src, src_sock) = source(dir.path(), &disk, ops);
    src.wait_serial("work iter=400 ", T);
    let dst = Destination::start(dir.path());
    let mut config = vireo_e2e::vm_config(&src_sock);
    // Lapsed before the copy starts (however fast the copy is), and never renewed.
    let first = monotonic_ns().saturating_sub(1);
    config["write_lease"] = serde_json::json!({ "deadline_monotonic_ns": first });
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    dst.listen_config(&format!(r#","config":{config}"#), &url, "");
    send_with(&src_sock, &url, r#","bandwidth_mib_s":1"#);
    let start = std::time::Instant::now();
    let info = loop {
        let info = api(&src_sock, "GET", "vm.migration-info", None).1;
        if info.contains("\"failed\"") {
            break info;
        }
        assert!(start.elapsed() < T, "the migration did not fail: {info}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(info.contains("write lease expired"), "{info}");
    // The VM never ran there (its guest would have printed on the destination's
    // serial; the destination VMM may have exited already).
    assert_eq!(dst.serial_text(), "", "the VM ran at the destination");
    let serial = src.wait_serial("vireo-guest: result ok", T);
    assert!(
        serial.contains(&format!("work done iter={ops}")),
        "{serial}"
    );
    assert_eq!(src.wait(T).status.code(), Some(0));
    assert_blocks(&disk, ops);
}
