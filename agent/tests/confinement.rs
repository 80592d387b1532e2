//! vireod's storage roots: a definition may only name files beneath them (no symlinks,
//! no `..`, no block device unless allow-listed); each refusal is one 400 line; a
//! symlink swapped in after the definition was accepted is not followed at start;
//! formats are declared at define time; vireod's own files are private.

use crate::common;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, Daemon};
use serde_json::{json, Value};

fn define(d: &Daemon, name: &str, config: Value) -> (u16, String) {
    let body = json!({ "config": config }).to_string();
    d.api("PUT", &format!("/api/v1/vms/{name}"), Some(&body))
}

fn refused(d: &Daemon, name: &str, config: Value, why: &str) -> String {
    let (s, b) = define(d, name, config);
    assert_eq!(s, 400, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    let msg = v["error"].as_str().unwrap().to_string();
    assert!(msg.contains(why), "want {why:?}: {msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(d.absent(name), "nothing defined");
    msg
}

fn with_disk(disk: &Path, extra: Value) -> Value {
    let mut c = common::counter_config();
    let mut d = json!({ "path": disk });
    if let (Some(o), Some(e)) = (d.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    c["disks"] = json!([d]);
    c
}

fn raw(p: &Path) -> PathBuf {
    std::fs::File::create(p).unwrap().set_len(1 << 20).unwrap();
    p.to_path_buf()
}

#[test]
fn definitions_naming_paths_outside_the_roots_are_refused_with_one_line() {
    let d = Daemon::start(&["--no-autostart"]);
    let outside = tempfile::tempdir().unwrap();
    let secret = raw(&outside.path().join("secret.raw"));
    let root = d.dir.path();
    symlink(outside.path(), root.join("link")).unwrap();
    symlink(&secret, root.join("alias.raw")).unwrap();
    refused(
        &d,
        "a",
        with_disk(&secret, json!({})),
        "outside every storage root",
    );
    refused(
        &d,
        "b",
        with_disk(&root.join("link/secret.raw"), json!({})),
        "symlink",
    );
    refused(
        &d,
        "c",
        with_disk(&root.join("alias.raw"), json!({})),
        "symlink",
    );
    let dotdot = PathBuf::from(format!(
        "{}/../{}/secret.raw",
        root.display(),
        outside.path().display()
    ));
    refused(
        &d,
        "e",
        with_disk(&dotdot, json!({})),
        "'..' is not allowed",
    );
    // /dev/null is a character device (and outside); a block device made with mknod
    // beneath a root is refused unless allow-listed.
    refused(
        &d,
        "f",
        with_disk(Path::new("/dev/null"), json!({})),
        "outside every storage root",
    );
    let blk = root.join("blk.raw");
    let c = std::ffi::CString::new(blk.to_str().unwrap()).unwrap();
    // SAFETY: mknod with a valid path (the tests run as root).
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(7, 0)) };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
    refused(
        &d,
        "g",
        with_disk(&blk, json!({})),
        "block device that is not allow-listed",
    );
    // Kernels and initramfs too.
    let mut k = common::counter_config();
    k["payload"]["kernel"] = json!(secret);
    refused(&d, "h", k, "payload.kernel");
    let mut k = common::counter_config();
    k["payload"]["initramfs"] = json!("/etc/shadow");
    refused(&d, "i", k, "outside every storage root");
    // The console file is vireod's to choose.
    let mut k = common::counter_config();
    k["console"] = json!({"mode": "file", "file": secret});
    refused(&d, "j", k, "vireod writes a VM's console to");
    // Formats are declared: an image without format= or a known extension is refused.
    let plain = raw(&root.join("plain"));
    refused(
        &d,
        "k",
        with_disk(&plain, json!({})),
        "say format=raw or format=vhdx",
    );
    let (s, b) = define(&d, "ok", with_disk(&plain, json!({"format": "raw"})));
    assert_eq!(s, 201, "{b}");
    // The extension decides when format= is missing; the stored definition says it.
    let (s, b) = define(&d, "ok2", with_disk(&raw(&root.join("d.img")), json!({})));
    assert_eq!(s, 201, "{b}");
    let v = d.vm("ok2");
    assert_eq!(
        v["definition"]["config"]["disks"][0]["format"], "raw",
        "{v}"
    );
    // The outside file was never written.
    assert!(std::fs::read(&secret).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn a_vhdx_whose_parent_is_outside_the_roots_is_refused() {
    let d = Daemon::start(&["--no-autostart"]);
    let outside = tempfile::tempdir().unwrap();
    let base = outside.path().join("base.vhdx");
    let child = d.dir.path().join("child.vhdx");
    let run = |args: &[&str]| {
        let out = Command::new(bin("vireo-img")).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    run(&["create", "-f", "vhdx", base.to_str().unwrap(), "8M"]);
    run(&[
        "create",
        "-f",
        "vhdx",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "vhdx",
        child.to_str().unwrap(),
    ]);
    let m = refused(&d, "v", with_disk(&child, json!({})), "parent refused");
    assert!(
        m.contains("outside every storage root") || m.contains("'..'"),
        "{m}"
    );
}

#[test]
fn a_disk_swapped_for_a_symlink_after_define_is_not_followed_at_start() {
    let d = Daemon::start(&["--no-autostart"]);
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.raw");
    std::fs::write(&secret, vec![0x5au8; 1 << 20]).unwrap();
    let disk = raw(&d.dir.path().join("disk.raw"));
    let (s, b) = define(&d, "swap", with_disk(&disk, json!({})));
    assert_eq!(s, 201, "{b}");
    std::fs::remove_file(&disk).unwrap();
    symlink(&secret, &disk).unwrap();
    let before = std::fs::metadata(&secret).unwrap();
    let (s, b) = d.api("PUT", "/api/v1/vms/swap/start", None);
    assert_eq!(s, 500, "{b}");
    assert!(b.contains("symlink"), "{b}");
    assert_eq!(d.state("swap"), "Stopped");
    // Never opened: its access time and content are as before.
    let after = std::fs::metadata(&secret).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (before.atime(), before.atime_nsec()),
        (after.atime(), after.atime_nsec())
    );
    assert!(std::fs::read(&secret).unwrap().iter().all(|&b| b == 0x5a));
}

/// The disk's directory swapped for a link to a directory outside the roots after
/// define: the disk's last component is no link, so the jail's old check (a symlink
/// test on the path, then a bind and a chown by path) let it through and handed the
/// outside file to the VM's uid. The jail opens every path beneath its root first
/// (no symlink on the way) and binds and chowns through that descriptor: refused,
/// and the outside file keeps its owner, mode and bytes.
#[test]
fn a_disk_directory_swapped_for_a_symlink_after_define_is_not_followed_at_start() {
    use std::os::unix::fs::MetadataExt;
    let d = Daemon::start(&["--no-autostart"]);
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("disk.raw");
    std::fs::write(&secret, vec![0x5au8; 1 << 20]).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let dir = d.dir.path().join("disks");
    std::fs::create_dir(&dir).unwrap();
    let disk = raw(&dir.join("disk.raw"));
    let (s, b) = define(&d, "swapdir", with_disk(&disk, json!({})));
    assert_eq!(s, 201, "{b}");
    std::fs::remove_file(&disk).unwrap();
    std::fs::remove_dir(&dir).unwrap();
    symlink(outside.path(), &dir).unwrap();
    let before = std::fs::metadata(&secret).unwrap();
    let (s, b) = d.api("PUT", "/api/v1/vms/swapdir/start", None);
    assert_eq!(s, 500, "{b}");
    assert!(b.contains("symlink"), "{b}");
    assert_eq!(d.state("swapdir"), "Stopped");
    let after = std::fs::metadata(&secret).unwrap();
    assert_eq!(
        (after.uid(), after.gid(), after.mode() & 0o7777),
        (before.uid(), before.gid(), 0o600),
        "the outside file was not handed over"
    );
    assert_eq!(
        (before.atime(), before.atime_nsec()),
        (after.atime(), after.atime_nsec())
    );
    assert!(std::fs::read(&secret).unwrap().iter().all(|&b| b == 0x5a));
}

#[test]
fn a_relative_run_or_state_dir_is_refused_at_start() {
    for flag in ["--run-dir", "--state-dir"] {
        let dir = tempfile::tempdir().unwrap();
        let (state, run) = (dir.path().join("s"), dir.path().join("r"));
        let (state, run) = match flag {
            "--run-dir" => (state.to_str().unwrap().to_string(), "relative".to_string()),
            _ => ("relative".to_string(), run.to_str().unwrap().to_string()),
        };
        let mut cmd = Command::new(bin("vireod"));
        cmd.current_dir(dir.path())
            .args(["--state-dir", &state, "--run-dir", &run])
            .args(["--no-cpu-cgroups", "--no-autostart"]);
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("{flag} relative: must be an absolute path")),
            "{err}"
        );
        assert!(!dir.path().join("relative").exists());
    }
}

#[test]
fn receiver_sockets_and_storage_dirs_of_incoming_migrations_are_confined() {
    let d = Daemon::start(&["--no-autostart"]);
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    for (extra, why) in [
        (
            json!({"receiver_url": format!("unix:{}", victim.display())}),
            "a unix socket must be in",
        ),
        (
            json!({"storage_dir": outside.path()}),
            "outside every storage root",
        ),
    ] {
        let mut req = json!({"name": "rx", "definition": {"config": common::counter_config()}});
        if let (Some(o), Some(e)) = (req.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        let (s, b) = d.api(
            "POST",
            "/api/v1/migrations/incoming",
            Some(&req.to_string()),
        );
        assert_eq!(s, 400, "{b}");
        assert!(b.contains(why), "{b}");
        assert!(d.absent("rx"));
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep", "not unlinked");
}

#[test]
fn vireods_files_are_private_and_not_written_through_links() {
    let d = Daemon::start(&["--no-autostart"]);
    d.define_counter("p", "Off", "never");
    // A planted link where the runtime config goes: replaced, not followed.
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    let config = d.run_dir.join("vms/p.json");
    symlink(&victim, &config).unwrap();
    d.ok("PUT", "/api/v1/vms/p/start", None);
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    let m = std::fs::symlink_metadata(&config).unwrap();
    assert!(m.is_file(), "the link was replaced");
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    let pid = d.run_dir.join("vms/p.pid");
    assert_eq!(
        std::fs::metadata(&pid).unwrap().permissions().mode() & 0o777,
        0o600
    );
    d.ok("PUT", "/api/v1/vms/p/kill", None);
}

/// Guards `destination_agent` socket paths and unix send URLs (issue 11, parts 1-2).
/// vireod (root) connects to a `destination_agent` socket and sends the VM's definition,
/// and its VMM streams the guest's memory to a `unix:` URL: without the checks an
/// operator could point either at any socket of the host. Only `--peer-socket`s may be
/// named as agents, only sockets in this vireod's or its peers' `vms/` as URLs, through
/// vireod's API and the VMM's own; a listening socket outside sees no connection.
#[test]
fn agent_sockets_and_send_urls_outside_the_peers_are_refused_and_never_connected() {
    use std::os::unix::net::UnixListener;
    let (d, peer) = Daemon::pair(&["--no-autostart"], &["--no-autostart"]);
    d.define_counter("m", "Medium", "never");
    d.ok("PUT", "/api/v1/vms/m/start", None);
    d.wait_serial("m", "tick 2 ", common::T);
    let pid = d.pid("m");
    let outside = tempfile::tempdir().unwrap();
    let thief_path = outside.path().join("thief.sock");
    let thief = UnixListener::bind(&thief_path).unwrap();
    thief.set_nonblocking(true).unwrap();
    let dotdot = peer
        .run_dir
        .join("vms/../../../")
        .join(thief_path.strip_prefix("/").unwrap_or(&thief_path));
    for (body, why) in [
        (
            json!({"destination_agent": thief_path}),
            "not a peer vireod of this host",
        ),
        (json!({"destination_agent": dotdot}), "'..' is not allowed"),
        (
            json!({"destination_url": format!("unix:{}", thief_path.display())}),
            "a unix migration socket must be in",
        ),
        (
            json!({"destination_url": format!("unix:{}", dotdot.display())}),
            "'..' is not allowed",
        ),
    ] {
        let (s, b) = d.api("PUT", "/api/v1/vms/m/migrate", Some(&body.to_string()));
        assert_eq!(s, 400, "{body}: {b}");
        let v: Value = serde_json::from_str(&b).unwrap();
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(why), "{body}: want {why:?}: {msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
    assert!(d.migrations().is_empty(), "nothing queued");
    // The VM's own VMM (started by vireod with its socket dirs) refuses the same URL.
    let vmm = d.run_dir.join("vms/m/api.sock");
    let (s, b) = common::http(
        &vmm,
        "PUT",
        "/api/v1/vm.send-migration",
        Some(&json!({"destination_url": format!("unix:{}", thief_path.display())}).to_string()),
    );
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("destination_url"), "{b}");
    match thief.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("something connected to the socket outside: {other:?}"),
    }
    assert_eq!(d.state("m"), "Running");
    assert_eq!(d.pid("m"), pid);
    // The peer itself is accepted: the VM moves there.
    let rec = d.migrate("m", &json!({"destination_agent": peer.socket}));
    let done = d.wait_migration(rec["id"].as_str().unwrap(), common::T);
    assert_eq!(done["state"], "completed", "{done}\n{}", peer.log());
    peer.wait_state("m", "Running", common::T);
}
