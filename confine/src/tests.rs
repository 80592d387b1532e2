//! Every trick a client could try, against both resolvers.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::*;

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

/// root/ with root/sub/inner.img, and outside/secret next to it.
fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(root.join("sub")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(root.join("sub/inner.img"), b"inside").unwrap();
    fs::write(outside.join("secret"), b"secret").unwrap();
    Setup {
        _tmp: tmp,
        root,
        outside,
    }
}

type Opener = fn(&OwnedFd, &Path, &Path) -> std::io::Result<OwnedFd>;

fn both() -> [(&'static str, Opener); 2] {
    [
        ("openat2", |d, root, rel| {
            open_beneath(d.as_fd(), root, rel, libc::O_RDONLY, 0)
        }),
        ("walk", |d, root, rel| {
            open_beneath_walk(d.as_fd(), root, rel, libc::O_RDONLY, 0)
        }),
    ]
}

fn errno(r: std::io::Result<OwnedFd>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

#[test]
fn opens_a_plain_path_beneath_the_root() {
    let s = setup();
    let d = open_dir(&s.root).unwrap();
    for (name, open) in both() {
        let fd = open(&d, &s.root, Path::new("sub/inner.img")).unwrap();
        let mut text = String::new();
        fs::File::from(fd).read_to_string(&mut text).unwrap();
        assert_eq!(text, "inside", "{name}");
    }
}

#[test]
fn a_symlink_component_is_refused() {
    let s = setup();
    symlink(&s.outside, s.root.join("link")).unwrap();
    let d = open_dir(&s.root).unwrap();
    for (name, open) in both() {
        assert_eq!(
            errno(open(&d, &s.root, Path::new("link/secret"))),
            libc::ELOOP,
            "{name}"
        );
    }
}

#[test]
fn a_symlink_as_the_final_component_is_refused_even_inside_the_root() {
    let s = setup();
    symlink(s.outside.join("secret"), s.root.join("abs")).unwrap();
    symlink("sub/inner.img", s.root.join("rel")).unwrap();
    let d = open_dir(&s.root).unwrap();
    for (name, open) in both() {
        assert_eq!(
            errno(open(&d, &s.root, Path::new("abs"))),
            libc::ELOOP,
            "{name}"
        );
        assert_eq!(
            errno(open(&d, &s.root, Path::new("rel"))),
            libc::ELOOP,
            "{name}"
        );
    }
}

#[test]
fn dot_dot_is_refused_even_when_it_stays_inside() {
    let s = setup();
    let d = open_dir(&s.root).unwrap();
    for (name, open) in both() {
        assert_eq!(
            errno(open(&d, &s.root, Path::new("../outside/secret"))),
            libc::EXDEV,
            "{name}"
        );
        assert_eq!(
            errno(open(&d, &s.root, Path::new("sub/../sub/inner.img"))),
            libc::EXDEV,
            "{name}"
        );
        assert_eq!(
            errno(open(&d, &s.root, Path::new("/etc/passwd"))),
            libc::EXDEV,
            "{name}"
        );
    }
}

#[test]
fn roots_refuse_each_trick_with_a_line_naming_the_path_and_why() {
    let s = setup();
    symlink(&s.outside, s.root.join("link")).unwrap();
    symlink(s.outside.join("secret"), s.root.join("abs")).unwrap();
    let roots = Roots::new(std::slice::from_ref(&s.root), &[]).unwrap();
    let msg = |p: PathBuf| roots.open_file(&p, false).unwrap_err().to_string();
    let m = msg(s.outside.join("secret"));
    assert!(
        m.contains("outside every storage root") && m.contains("secret"),
        "{m}"
    );
    let m = msg(s.root.join("link/secret"));
    assert!(m.contains("symlink"), "{m}");
    let m = msg(s.root.join("abs"));
    assert!(m.contains("symlink"), "{m}");
    let m = msg(s.root.join("sub/../../outside/secret"));
    assert!(m.contains("'..'"), "{m}");
    let m = roots
        .open_file(Path::new("rel/x"), false)
        .unwrap_err()
        .to_string();
    assert!(m.contains("absolute"), "{m}");
    let m = msg(PathBuf::from("/dev/null"));
    assert!(m.contains("outside every storage root"), "{m}");
    let m = msg(s.root.join("sub"));
    assert!(m.contains("not a regular file"), "{m}");
    let mut text = String::new();
    roots
        .open_file(&s.root.join("sub/inner.img"), false)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "inside");
}

#[test]
fn a_block_device_beneath_a_root_is_refused_unless_allow_listed() {
    let s = setup();
    let dev = s.root.join("blk");
    let c = std::ffi::CString::new(dev.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mknod with a valid path (needs CAP_MKNOD: the test machines run as root).
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(7, 0)) };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
    let roots = Roots::new(std::slice::from_ref(&s.root), &[]).unwrap();
    let m = roots.open_file(&dev, false).unwrap_err().to_string();
    assert!(m.contains("block device that is not allow-listed"), "{m}");
    // A character device on the allow-list is still not a block device.
    let roots = Roots::new(std::slice::from_ref(&s.root), &[PathBuf::from("/dev/null")]).unwrap();
    let m = roots
        .open_file(Path::new("/dev/null"), false)
        .unwrap_err()
        .to_string();
    assert!(m.contains("character device"), "{m}");
    let roots = Roots::new(std::slice::from_ref(&s.root), std::slice::from_ref(&dev)).unwrap();
    roots.open_file(&dev, false).unwrap();
}

#[test]
fn a_symlink_swapped_in_after_the_check_is_not_followed() {
    let s = setup();
    let roots = Roots::new(std::slice::from_ref(&s.root), &[]).unwrap();
    let disk = s.root.join("sub/inner.img");
    roots.check(&disk).unwrap();
    fs::remove_file(&disk).unwrap();
    symlink(s.outside.join("secret"), &disk).unwrap();
    let m = roots.open_file(&disk, true).unwrap_err().to_string();
    assert!(m.contains("symlink"), "{m}");
    // A directory swapped for a symlink to outside after the parent was checked.
    fs::rename(s.root.join("sub"), s.root.join("sub.old")).unwrap();
    symlink(&s.outside, s.root.join("sub")).unwrap();
    let m = roots
        .create_file_private(&s.root.join("sub/new"))
        .unwrap_err()
        .to_string();
    assert!(m.contains("symlink"), "{m}");
    assert!(!s.outside.join("new").exists());
}

#[test]
fn private_files_and_dirs_are_0600_and_0700_and_never_written_through_a_link() {
    let s = setup();
    let roots = Roots::new(std::slice::from_ref(&s.root), &[]).unwrap();
    let dir = roots.create_dir_private(&s.root.join("snap")).unwrap();
    let mut f = create_private(dir.as_fd(), "memory".as_ref()).unwrap();
    f.write_all(b"ram").unwrap();
    assert_eq!(
        fs::metadata(s.root.join("snap"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    assert_eq!(
        fs::metadata(s.root.join("snap/memory")).unwrap().mode() & 0o777,
        0o600
    );
    // A planted link (dangling or not) is EEXIST: nothing is written through it.
    symlink(s.outside.join("planted"), s.root.join("snap/state")).unwrap();
    let e = create_private(dir.as_fd(), "state".as_ref()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
    assert!(!s.outside.join("planted").exists());
    // A planted directory symlink is not taken for the directory.
    symlink(&s.outside, s.root.join("snap2")).unwrap();
    assert!(roots.create_dir_private(&s.root.join("snap2")).is_err());
    // Names are single components.
    assert!(create_private(dir.as_fd(), "../x".as_ref()).is_err());
    // Atomic private writes replace a link instead of following it.
    symlink(s.outside.join("secret"), s.root.join("snap/config.json")).unwrap();
    write_private_atomic(dir.as_fd(), "config.json".as_ref(), b"{}").unwrap();
    assert_eq!(fs::read(s.outside.join("secret")).unwrap(), b"secret");
    let m = fs::symlink_metadata(s.root.join("snap/config.json")).unwrap();
    assert!(m.is_file() && m.mode() & 0o777 == 0o600);
}

#[test]
fn the_longest_matching_root_is_used_and_a_root_itself_is_not_a_file() {
    let s = setup();
    let roots = Roots::new(&[s.root.clone(), s.root.join("sub")], &[]).unwrap();
    roots
        .open_file(&s.root.join("sub/inner.img"), false)
        .unwrap();
    assert!(roots.create_file_private(&s.root).is_err());
    assert!(roots.contains(&s.root.join("x")));
    assert!(!roots.contains(&s.outside));
}

#[test]
fn a_socket_dir_admits_its_sockets_and_its_vm_directories_sockets_only() {
    let dirs = [PathBuf::from("/run/vireo/vms")];
    for ok in ["/run/vireo/vms/a.sock", "/run/vireo/vms/web/migrate.sock"] {
        assert!(in_socket_dir(Path::new(ok), &dirs), "{ok}");
    }
    for bad in [
        "/run/vireo/vms",
        "/run/vireo/other.sock",
        "/run/vireo/vms/web/deeper/x.sock",
        "/run/systemd/notify",
    ] {
        assert!(!in_socket_dir(Path::new(bad), &dirs), "{bad}");
    }
}

#[test]
fn open_path_gives_files_and_directories_and_refuses_every_symlink_on_the_way() {
    let s = setup();
    let roots = Roots::new(std::slice::from_ref(&s.root), &[]).unwrap();
    let kind = |fd: &OwnedFd| fstat(fd.as_fd()).unwrap().st_mode & libc::S_IFMT;
    let file = roots.open_path(&s.root.join("sub/inner.img")).unwrap();
    assert_eq!(kind(&file), libc::S_IFREG);
    let dir = roots.open_path(&s.root.join("sub")).unwrap();
    assert_eq!(kind(&dir), libc::S_IFDIR);
    // A disk swapped for a link to a file outside, and a directory link on the way.
    symlink(s.outside.join("secret"), s.root.join("swapped.img")).unwrap();
    symlink(&s.outside, s.root.join("linkdir")).unwrap();
    for p in ["swapped.img", "linkdir", "linkdir/secret"] {
        let e = roots.open_path(&s.root.join(p)).unwrap_err();
        assert!(matches!(e, ConfineError::Symlink { .. }), "{p}: {e}");
        assert!(e.to_string().contains("symlink"), "{e}");
    }
    let e = open_path_nofollow(&s.root.join("swapped.img")).unwrap_err();
    assert!(matches!(e, ConfineError::Symlink { .. }), "{e}");
    assert!(open_path_nofollow(&s.root.join("sub/inner.img")).is_ok());
    assert!(roots.open_path(&s.outside.join("secret")).is_err());
}
