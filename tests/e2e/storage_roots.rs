//! The VMM's storage roots (`--storage-root`) and declared disk formats, end to end:
//! paths outside the roots, through symlinks or with `..` are refused with one line and
//! nothing is created; snapshots are private; a VHDX header written into a raw disk does
//! not turn it into a VHDX.

use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vireo_e2e::{api, assert_guest_ok, bin, guest, serial_line, wait_for_socket, Vireo};

const T: Duration = Duration::from_secs(60);

/// tmp/root (the storage root, with the guest kernel in it) and tmp/outside.
struct Dirs {
    tmp: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::copy(guest(), root.join("guest.elf")).unwrap();
    Dirs { tmp, root, outside }
}

fn raw(path: &Path, size: u64) -> PathBuf {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
    path.to_path_buf()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

fn confined(d: &Dirs, cmdline: &str, args: &[&str]) -> Vireo {
    let root = d.root.to_str().unwrap().to_string();
    let mut all = vec!["--storage-root", &root];
    all.extend_from_slice(args);
    Vireo::payload(&d.root.join("guest.elf"), None, cmdline, &all)
}

/// The one-line error of a vireo that refused to start.
fn refused(out: &std::process::Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let line = err
        .lines()
        .find(|l| l.starts_with("vireo: error:"))
        .unwrap_or_else(|| panic!("no error line in {err}"));
    line.to_string()
}

#[test]
fn disks_and_kernels_outside_the_roots_through_symlinks_or_dot_dot_are_refused_at_start() {
    let d = dirs();
    let outside_disk = raw(&d.outside.join("d.raw"), 1 << 20);
    symlink(&d.outside, d.root.join("link")).unwrap();
    symlink(&outside_disk, d.root.join("alias.raw")).unwrap();
    let dotdot = format!("{}/../outside/d.raw", d.root.display());
    for (disk, why) in [
        (
            outside_disk.display().to_string(),
            "outside every storage root",
        ),
        (format!("{}/link/d.raw", d.root.display()), "symlink"),
        (format!("{}/alias.raw", d.root.display()), "symlink"),
        (dotdot, "'..' is not allowed"),
        ("/dev/null".to_string(), "outside every storage root"),
    ] {
        let (out, _) = confined(&d, "test=counter", &["--disk", &format!("path={disk}")]).run(T);
        let line = refused(&out);
        assert!(line.contains(why) && line.contains(&disk), "{disk}: {line}");
    }
    // The kernel too.
    let (out, _) = Vireo::payload(
        &guest(),
        None,
        "test=counter",
        &["--storage-root", d.root.to_str().unwrap()],
    )
    .run(T);
    assert!(refused(&out).contains("outside every storage root"));
    // The outside disk was never written.
    assert!(std::fs::read(&outside_disk)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn a_vhdx_parent_outside_the_roots_is_refused_and_one_inside_is_used() {
    let d = dirs();
    let make = |base: &Path, child: &Path| {
        vhdx::Vhdx::create(
            base,
            &vhdx::CreateOptions {
                size: 8 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        vhdx::Vhdx::create(
            child,
            &vhdx::CreateOptions {
                kind: vhdx::DiskKind::Differencing {
                    parent: base.to_path_buf(),
                },
                ..Default::default()
            },
        )
        .unwrap();
    };
    let child = d.root.join("child.vhdx");
    make(&d.outside.join("base.vhdx"), &child);
    let arg = format!("path={},format=vhdx", child.display());
    let (out, _) = confined(&d, "test=counter", &["--disk", &arg]).run(T);
    let line = refused(&out);
    assert!(line.contains("parent refused"), "{line}");
    // A chain inside the root opens (the guest sees the parent's 8 MiB).
    let inside = d.root.join("child2.vhdx");
    make(&d.root.join("base2.vhdx"), &inside);
    let arg = format!("path={},format=vhdx", inside.display());
    let (out, serial) = confined(
        &d,
        "test=blk-write seed=1 sectors=8 offset=0",
        &["--disk", &arg],
    )
    .run(T);
    assert_guest_ok(&out, &serial);
    assert!(serial_line(&serial, "blk capacity=").starts_with("blk capacity=16384 "));
}

#[test]
fn a_vhdx_header_written_into_a_raw_disk_leaves_it_raw() {
    let d = dirs();
    // What a guest could write at sector 0: a whole valid VHDX (32 MiB virtual).
    let img = d.outside.join("fake.vhdx");
    vhdx::Vhdx::create(
        &img,
        &vhdx::CreateOptions {
            size: 32 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let header = std::fs::read(&img).unwrap();
    assert!(header.len() < 10 << 20);
    for (name, extra) in [("old-config", ""), ("declared.img", ",format=raw")] {
        let disk = raw(&d.root.join(name), 64 << 20);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .unwrap()
            .write_all_at(&header, 0)
            .unwrap();
        let arg = format!("path={}{extra}", disk.display());
        let (seed, offset, sectors) = (5u64, 20480u64, 64u64);
        let (out, serial) = confined(
            &d,
            &format!("test=blk-write seed={seed} sectors={sectors} offset={offset}"),
            &["--disk", &arg],
        )
        .run(T);
        assert_guest_ok(&out, &serial);
        // The raw size (64 MiB), not the planted VHDX's 32 MiB.
        let line = serial_line(&serial, "blk capacity=");
        assert!(line.starts_with("blk capacity=131072 "), "{name}: {line}");
        // Restarted: still raw, the guest reads back what it wrote.
        let (out, serial) = confined(
            &d,
            &format!("test=blk-read seed={seed} sectors={sectors} offset={offset}"),
            &["--disk", &format!("{arg},readonly=on")],
        )
        .run(T);
        assert_guest_ok(&out, &serial);
        assert!(serial.contains("mismatches=0"), "{serial}");
        // The planted header is plain data, untouched (no log replay).
        let bytes = std::fs::read(&disk).unwrap();
        assert!(
            bytes[..header.len()] == header[..],
            "{name}: header changed"
        );
        assert_eq!(bytes.len(), 64 << 20);
    }
}

#[test]
fn vmm_api_paths_outside_the_roots_are_refused_and_nothing_is_created() {
    let d = dirs();
    let sock = d.tmp.path().join("vm.sock");
    let disk = raw(&d.root.join("d.raw"), 1 << 20);
    symlink(&d.outside, d.root.join("link")).unwrap();
    let vm = confined(
        &d,
        "test=counter period_ms=10",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--disk",
            &format!("path={},format=raw", disk.display()),
        ],
    )
    .spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("tick 2 ", T);
    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 204);
    let snap = |p: &Path| {
        api(
            &sock,
            "PUT",
            "vm.snapshot",
            Some(&format!(
                r#"{{"destination_url":"file://{}"}}"#,
                p.display()
            )),
        )
    };
    let bad = |(s, body): (u16, String), why: &str| {
        assert_eq!(s, 400, "{body}");
        assert!(body.contains(why), "{why}: {body}");
    };
    bad(snap(&d.outside.join("snap")), "outside every storage root");
    bad(snap(&d.root.join("link/snap")), "symlink");
    bad(
        snap(&d.root.join("x/../../outside/snap")),
        "'..' is not allowed",
    );
    // A snapshot directory with a planted link: refused, nothing written through it.
    let planted = d.root.join("planted");
    std::fs::create_dir(&planted).unwrap();
    symlink(d.outside.join("victim"), planted.join("memory")).unwrap();
    bad(snap(&planted), "not empty");
    assert!(!d.outside.join("victim").exists());
    let migrate = |dest: &Path| {
        api(
            &sock,
            "PUT",
            "vm.migrate-disk",
            Some(&format!(
                r#"{{"id":"disk0","destination":"{}"}}"#,
                dest.display()
            )),
        )
    };
    bad(
        migrate(&d.outside.join("new.raw")),
        "outside every storage root",
    );
    bad(migrate(&d.root.join("link/new.raw")), "symlink");
    bad(migrate(Path::new("/new.raw")), "outside every storage root");
    assert_eq!(
        std::fs::read_dir(&d.outside).unwrap().count(),
        0,
        "nothing created outside"
    );
    assert!(!Path::new("/new.raw").exists());
    // The symlinks were refused by the file thread (openat2 beneath the root) with a
    // 400, not by killing anything: the VM is still there, paused, and runs on.
    let (s, body) = api(&sock, "GET", "vm.info", None);
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("\"Paused\""), "{body}");
    assert_eq!(api(&sock, "PUT", "vm.resume", None).0, 204);
    let ticks = vm.serial_text().matches("tick ").count();
    vm.wait_serial(&format!("tick {} ", ticks + 2), T);
    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 204);
    // Inside the root: the snapshot is private.
    let good = d.root.join("snap");
    let (s, body) = snap(&good);
    assert_eq!(s, 204, "{body}");
    assert_eq!(mode(&good), 0o700);
    for f in ["memory", "state.json", "config.json", "snapshot.json"] {
        assert_eq!(mode(&good.join(f)), 0o600, "{f}");
    }
    assert_eq!(api(&sock, "PUT", "vm.shutdown", None).0, 204);
    assert_eq!(vm.wait(T).status.code(), Some(0));

    // A fresh VMM: restore from outside (a copy of the good snapshot) is refused, from
    // inside it works; a receiver may not listen or store outside either.
    let copy = d.outside.join("copy");
    std::fs::create_dir(&copy).unwrap();
    for f in std::fs::read_dir(&good).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), copy.join(f.file_name())).unwrap();
    }
    let sock2 = d.tmp.path().join("vm2.sock");
    let mut child = Command::new(bin("vireo"))
        .args(["--storage-root", d.root.to_str().unwrap()])
        .args(["--api-socket", sock2.to_str().unwrap()])
        .args(["--serial", "null"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&sock2, T);
    let restore = |p: &Path| {
        api(
            &sock2,
            "PUT",
            "vm.restore",
            Some(&format!(r#"{{"source_url":"file://{}"}}"#, p.display())),
        )
    };
    bad(restore(&copy), "outside every storage root");
    bad(
        api(
            &sock2,
            "PUT",
            "vm.receive-migration",
            Some(&format!(
                r#"{{"receiver_url":"unix:{}/r.sock"}}"#,
                d.outside.display()
            )),
        ),
        "outside every storage root",
    );
    bad(
        api(
            &sock2,
            "PUT",
            "vm.receive-migration",
            Some(&format!(
                r#"{{"receiver_url":"unix:{}/r.sock","storage_dir":"{}"}}"#,
                d.root.display(),
                d.outside.display()
            )),
        ),
        "outside every storage root",
    );
    assert!(!d.outside.join("r.sock").exists() && !d.root.join("r.sock").exists());
    let (s, body) = restore(&good);
    assert_eq!(s, 204, "{body}");
    assert_eq!(api(&sock2, "PUT", "vmm.shutdown", None).0, 204);
    let _ = child.wait();
}

/// Guards `vm.send-migration` with `--storage-root`: a `unix:` destination must be
/// beneath a root or in a `--socket-dir` (the receive side's rule). Without the check
/// the VMM connects to any socket a caller names (and streams the guest's memory to
/// it): here a listening socket outside would see a connection.
#[test]
fn send_migration_to_a_socket_outside_the_roots_and_socket_dirs_is_refused_unconnected() {
    use std::os::unix::net::UnixListener;
    let d = dirs();
    let sock_dir = d.tmp.path().join("socks");
    std::fs::create_dir(&sock_dir).unwrap();
    let sock = sock_dir.join("vm.sock");
    let vm = confined(
        &d,
        "test=counter period_ms=10",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--socket-dir",
            sock_dir.to_str().unwrap(),
        ],
    )
    .spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("tick 2 ", T);
    let thief = UnixListener::bind(d.outside.join("m.sock")).unwrap();
    thief.set_nonblocking(true).unwrap();
    let send = |url: String| {
        api(
            &sock,
            "PUT",
            "vm.send-migration",
            Some(&format!(r#"{{"destination_url":"{url}"}}"#)),
        )
    };
    for (url, why) in [
        (
            format!("unix:{}/m.sock", d.outside.display()),
            "outside every storage root",
        ),
        (
            format!("unix:{}/../outside/m.sock", sock_dir.display()),
            "'..' is not allowed",
        ),
    ] {
        let (s, body) = send(url.clone());
        assert_eq!(s, 400, "{url}: {body}");
        assert!(body.contains(why), "{url}: want {why:?}: {body}");
        assert!(body.contains("destination_url"), "{body}");
    }
    match thief.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the VMM connected to the socket outside: {other:?}"),
    }
    let (s, info) = api(&sock, "GET", "vm.info", None);
    assert_eq!(s, 200, "{info}");
    assert!(info.contains("\"Running\""), "{info}");
    assert_eq!(api(&sock, "PUT", "vm.shutdown", None).0, 204);
    assert_eq!(vm.wait(T).status.code(), Some(0));
}

/// With storage roots, the kernel (Landlock) holds the control thread to them: a raw
/// `open` that skips the VMM's own checks (the test hook, standing in for a bug in
/// them or an attacker's code on that thread) gets EACCES outside the roots, while the
/// same open beneath a root, and a snapshot into one, still work. Without roots the
/// same open succeeds, so the refusal is the domain's.
#[test]
fn past_its_own_checks_a_vmm_with_roots_still_opens_nothing_outside_them() {
    let d = dirs();
    let secret = d.outside.join("secret");
    std::fs::write(&secret, b"host file").unwrap();
    let inside = d.root.join("inside");
    std::fs::write(&inside, b"a file of this VM").unwrap();
    let sock = d.tmp.path().join("vm.sock");
    let disk = raw(&d.root.join("d.raw"), 1 << 20);
    let mut vm = confined(
        &d,
        "test=counter period_ms=10",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--disk",
            &format!("path={},format=raw", disk.display()),
        ],
    );
    vm.cmd
        .env("VIREO_TEST_OPEN", &secret)
        .env("VIREO_TEST_OPEN_BENEATH", &inside);
    let vm = vm.spawn();
    wait_for_socket(&sock, T);
    vm.wait_serial("tick 2 ", T);
    // The snapshot is written beneath the root by the confined control thread.
    assert_eq!(api(&sock, "PUT", "vm.pause", None).0, 204);
    let snap = d.root.join("snap");
    let (status, body) = api(
        &sock,
        "PUT",
        "vm.snapshot",
        Some(&format!(
            r#"{{"destination_url":"file://{}"}}"#,
            snap.display()
        )),
    );
    assert_eq!(status, 204, "{body}");
    assert!(snap.join("config.json").is_file());
    assert_eq!(api(&sock, "PUT", "vm.resume", None).0, 204);
    let ticks = vm.serial_text().matches("tick ").count();
    vm.wait_serial(&format!("tick {} ", ticks + 2), T);
    assert_eq!(api(&sock, "PUT", "vmm.shutdown", None).0, 204);
    let out = vm.wait(T);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("test hook: open {}: error 13", secret.display())),
        "the raw open outside the roots must get EACCES: {err}"
    );
    assert!(
        err.contains(&format!(
            "test hook: open beneath {}: opened",
            inside.display()
        )),
        "{err}"
    );

    // The same raw open in a VMM without roots succeeds: the domain refused it above.
    let mut bare = Vireo::guest("test=boot", &[]);
    bare.cmd.env("VIREO_TEST_OPEN", &secret);
    let (out, serial) = bare.run(T);
    assert_guest_ok(&out, &serial);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("test hook: open {}: opened", secret.display())),
        "{err}"
    );
}
