//! `vireo --jail`: the process confines itself before it opens anything, as
//! Firecracker's jailer does for its VMM.
//!
//! Why in `vireo` and not a separate jailer binary that execs it: `vireo` is linked
//! against glibc, so a binary exec'd inside the new root would need the loader and
//! libraries bind-mounted there too; and at start-up `vireo` is still single-threaded,
//! the one moment `unshare(CLONE_NEWNS)` and the uid change apply to the whole process.
//!
//! In order (as root, single-threaded):
//! 1. network namespace (`netns=PATH`), cgroup v1 `memory` and `pids` children of the
//!    current cgroups with `memory.limit_in_bytes` and `pids.max` (cgroup v2: the
//!    child NAME of the current cgroup with `memory.max` and `pids.max`, see
//!    [`crate::cgroup2`]);
//! 2. new mount, IPC and UTS namespaces; every path the VM names (kernel, initramfs,
//!    disks, serial/console files, the API socket's directory, `bind=` extras) is
//!    bind-mounted at the same path under `root=DIR`, plus /dev/kvm, /dev/urandom
//!    (and /dev/net/tun for taps), and a procfs with `hidepid=invisible`; then
//!    `pivot_root` into DIR and the old root is detached: nothing else exists;
//!    Each path is opened once first, as an `O_PATH` descriptor: beneath its storage
//!    root with no symlink anywhere (`openat2` `RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS`,
//!    the roots given by `--storage-root`), other paths (vireod's own run and state
//!    directories) not through a final symlink. The bind mount's source is
//!    `/proc/self/fd/N` and the chown is `fchownat(fd, "", AT_EMPTY_PATH)`: no lookup
//!    after the check can be redirected by a link swapped in meanwhile. Every such
//!    descriptor (and the roots) is closed before `pivot_root`;
//! 3. files the VMM writes (writable disks, serial/console files, the socket
//!    directory) are chowned to the jail's uid/gid through those descriptors;
//! 4. rlimits (open files, processes), supplementary groups dropped, gid and uid set,
//!    every capability set cleared (bounding and ambient too), no_new_privs.
//!
//! ## The PID namespace: made by the launcher, or by `pidns=new`
//! `unshare(CLONE_NEWPID)` moves only the caller's future children, so Firecracker's
//! jailer forks after it and the VMM becomes the child of a jailer that has to stay to
//! reap it (or exits, and the VMM is nobody's child). Vireo's supervisor (vireod's
//! direct launcher) instead clones `vireo` straight into a new PID namespace
//! (`clone3(CLONE_NEWPID | CLONE_PIDFD)`): the VMM is PID 1 there and still vireod's own
//! child. There is no second process; the pid vireod reports, the pidfd it signals
//! through and the status it reaps are the VMM's own. Its procfs (mounted here, after
//! the clone) shows only the namespace's processes: itself. A launcher that cannot
//! clone (a systemd unit starts `vireo` itself) asks for `pidns=new`: `vireo` then
//! clones itself before anything else and hands the child to systemd as the unit's
//! main process ([`crate::pidns`]).
//!
//! The price of being a namespace's init: the kernel delivers to it no signal it has
//! no handler for, not even its own `abort()` (SIGKILL from vireod still works). So a
//! `vireo` that is PID 1 ([`is_namespace_init`]) catches the signals that would have
//! ended it ([`INIT_FATAL_SIGNALS`]: SIGHUP, SIGINT, SIGABRT of a panic, SIGTERM) and
//! exits with status 128+N, which vireod records as that signal.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The signals that end a `vireo` by default and that, as PID 1 of its namespace, it
/// must catch to end at all (vireod's launcher maps status 128+N back to them).
pub const INIT_FATAL_SIGNALS: [libc::c_int; 4] =
    [libc::SIGHUP, libc::SIGINT, libc::SIGABRT, libc::SIGTERM];

/// Whether this process is the init (PID 1) of its PID namespace.
pub fn is_namespace_init() -> bool {
    std::process::id() == 1
}

/// As PID 1 of a PID namespace: each of [`INIT_FATAL_SIGNALS`] ends the process with
/// status 128+N (a panic's abort included), as the signal would have without the
/// namespace. Does nothing in any other process.
pub fn end_on_fatal_signals_as_init() {
    if !is_namespace_init() {
        return;
    }
    extern "C" fn on_fatal(sig: libc::c_int) {
        // SAFETY: _exit is async-signal-safe and allowed by every seccomp filter.
        unsafe { libc::_exit(128 + sig) };
    }
    for sig in INIT_FATAL_SIGNALS {
        // SAFETY: a zeroed sigaction with a valid handler is well formed.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fatal as *const () as usize;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// `--jail uid=U,gid=G,root=DIR[,netns=PATH][,bind=PATH]...[,bind_ro=PATH]...[,cgroup=NAME]
/// [,memory_max=BYTES][,pids_max=N][,nofile=N][,nproc=N][,pidns=new]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailConfig {
    pub uid: u32,
    pub gid: u32,
    pub root: PathBuf,
    pub netns: Option<PathBuf>,
    /// Extra paths (files or directories) visible read-write at the same path: where
    /// snapshots go, restore comes from, storage migrations write.
    pub binds: Vec<PathBuf>,
    /// Extra paths visible read-only at the same path, not chowned: what a VMM that
    /// waits for an incoming VM will read (its kernel, read-only disks).
    pub read_only: Vec<PathBuf>,
    pub cgroup: Option<String>,
    pub memory_max: Option<u64>,
    pub pids_max: Option<u64>,
    pub nofile: u64,
    pub nproc: u64,
    /// `pidns=new`: the VMM clones itself into a PID namespace of its own first
    /// ([`crate::pidns`]; for launchers that cannot, such as a systemd unit).
    pub new_pid_namespace: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("--jail: {0}")]
    Parse(String),
    #[error("jail: {0}")]
    Confine(#[from] confine::ConfineError),
    #[error("jail: {0}")]
    Privileges(#[from] sandbox::privileges::PrivilegeError),
    #[error("jail: cgroup v2: {0}")]
    Cgroup2(#[from] crate::cgroup2::Cgroup2Error),
    #[error("jail: {what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

/// -1 from libc as the error in errno.
fn check(r: libc::c_int, what: impl Into<String>) -> Result<(), JailError> {
    if r < 0 {
        return Err(sys(what)(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| JailError::Parse(format!("{} contains a NUL byte", p.display())))
}

impl std::str::FromStr for JailConfig {
    type Err = JailError;
    fn from_str(s: &str) -> Result<Self, JailError> {
        let err = |m: String| JailError::Parse(m);
        let (mut uid, mut gid, mut root) = (None, None, None);
        let mut cfg = JailConfig {
            uid: 0,
            gid: 0,
            root: PathBuf::new(),
            netns: None,
            binds: Vec::new(),
            read_only: Vec::new(),
            cgroup: None,
            memory_max: None,
            pids_max: None,
            nofile: 4096,
            nproc: 1024,
            new_pid_namespace: false,
        };
        let num = |k: &str, v: &str| {
            v.parse::<u64>()
                .map_err(|_| err(format!("{k}={v}: expected a number")))
        };
        for item in s.split(',') {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| err(format!("'{item}': expected key=value")))?;
            match k {
                "uid" => uid = Some(num(k, v)?),
                "gid" => gid = Some(num(k, v)?),
                "root" => root = Some(PathBuf::from(v)),
                "netns" => cfg.netns = Some(PathBuf::from(v)),
                "bind" => cfg.binds.push(PathBuf::from(v)),
                "bind_ro" => cfg.read_only.push(PathBuf::from(v)),
                "cgroup" => {
                    if v.is_empty() || v.contains('/') || v.starts_with('.') {
                        return Err(err(format!("cgroup={v}: expected a plain name")));
                    }
                    cfg.cgroup = Some(v.to_string())
                }
                "memory_max" => cfg.memory_max = Some(num(k, v)?),
                "pids_max" => cfg.pids_max = Some(num(k, v)?),
                "nofile" => cfg.nofile = num(k, v)?,
                "nproc" => cfg.nproc = num(k, v)?,
                "pidns" if v == "new" => cfg.new_pid_namespace = true,
                "pidns" => return Err(err(format!("pidns={v}: expected pidns=new"))),
                _ => return Err(err(format!("unknown option '{k}'"))),
            }
        }
        let id = |k: &str, v: Option<u64>| match v {
            Some(0) => Err(err(format!("{k}=0: the jail runs as a non-root user"))),
            Some(v) => u32::try_from(v).map_err(|_| err(format!("{k}={v}: out of range"))),
            None => Err(err(format!("missing {k}="))),
        };
        cfg.uid = id("uid", uid)?;
        cfg.gid = id("gid", gid)?;
        cfg.root = root.ok_or_else(|| err("missing root=DIR".into()))?;
        if !cfg.root.is_absolute() {
            return Err(err(format!(
                "root={}: expected an absolute path",
                cfg.root.display()
            )));
        }
        if (cfg.memory_max.is_some() || cfg.pids_max.is_some()) && cfg.cgroup.is_none() {
            return Err(err("memory_max and pids_max need cgroup=NAME".into()));
        }
        Ok(cfg)
    }
}

/// A host path the VMM needs, visible at the same path in the jail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailPath {
    pub path: PathBuf,
    /// The VMM writes it: chowned to the jail's uid (created empty if missing, unless
    /// it is a socket).
    pub writable: bool,
    /// A unix socket another process listens on and the VMM connects to (a vfio-user
    /// server's): it must exist and be a socket (never created), and is chowned to the
    /// jail's uid (connecting needs write permission on it).
    pub socket: bool,
}

impl JailPath {
    pub fn read_only(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            writable: false,
            socket: false,
        }
    }
    pub fn writable(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            writable: true,
            socket: false,
        }
    }
    /// A server's socket the VMM connects to (see [`JailPath::socket`]).
    pub fn socket(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            writable: true,
            socket: true,
        }
    }
}

/// Confines the calling (single-threaded) process; see the module documentation.
/// `storage_roots` and `block_devices` (`--storage-root`, `--allow-block-device`): the
/// paths beneath a root are opened through it (opened in the jail's new mount namespace,
/// so that its descriptors can be bind sources, and closed before `pivot_root`).
pub fn enter(
    cfg: &JailConfig,
    paths: &[JailPath],
    devices: &[&str],
    storage_roots: &[PathBuf],
    block_devices: &[PathBuf],
) -> Result<(), JailError> {
    // The VMM opens them later by the names it was given, from inside the jail, whose
    // working directory is its root.
    if let Some(p) = paths.iter().find(|p| !p.path.is_absolute()) {
        return Err(JailError::Parse(format!(
            "{}: give absolute paths to a jailed VMM",
            p.path.display()
        )));
    }
    if let Some(ns) = &cfg.netns {
        let f = std::fs::File::open(ns).map_err(sys(format!("netns {}", ns.display())))?;
        use std::os::fd::AsRawFd;
        check(
            // SAFETY: setns on an open namespace file descriptor.
            unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
            format!("setns {}", ns.display()),
        )?;
    }
    if let Some(name) = &cfg.cgroup {
        enter_cgroups(name, cfg)?;
    }
    check(
        // SAFETY: unshare with namespace flags only.
        unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) },
        "unshare",
    )?;
    // The jail's own directories (mount points of its paths, /proc, /dev) must be
    // traversable by the jail's uid: build them under umask 022, not the process's
    // private 077 (files the VMM creates later are private again).
    // SAFETY: umask only changes this process's file mode creation mask.
    let private = unsafe { libc::umask(0o022) };
    let built = (!storage_roots.is_empty())
        .then(|| confine::Roots::new(storage_roots, block_devices))
        .transpose()
        .map_err(JailError::from)
        .and_then(|roots| build_root(cfg, paths, devices, roots));
    // SAFETY: as above; puts the caller's mask back.
    unsafe { libc::umask(private) };
    built?;
    drop_privileges(cfg)
}

/// The cgroup a v1 hierarchy lists this process in (`/proc/self/cgroup`).
fn current_cgroup(controller: &str) -> Result<String, JailError> {
    let text = std::fs::read_to_string("/proc/self/cgroup").map_err(sys("/proc/self/cgroup"))?;
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            ctrls
                .split(',')
                .any(|c| c == controller)
                .then(|| path.to_string())
        })
        .next()
        .ok_or_else(|| JailError::Parse(format!("no cgroup v1 '{controller}' hierarchy")))
}

/// cgroup v1 (this project's hosts): NAME under the current `memory` and `pids` cgroups;
/// cgroup v2: see [`crate::cgroup2`].
fn enter_cgroups(name: &str, cfg: &JailConfig) -> Result<(), JailError> {
    if crate::cgroup2::mounted() {
        crate::cgroup2::enter(name, cfg.memory_max, cfg.pids_max)?;
        return Ok(());
    }
    let limits = [
        ("memory", "memory.limit_in_bytes", cfg.memory_max),
        ("pids", "pids.max", cfg.pids_max),
    ];
    for (controller, file, limit) in limits {
        let Some(limit) = limit else { continue };
        let current = current_cgroup(controller)?;
        let dir = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(current.trim_start_matches('/'))
            .join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(sys(format!("create {}", dir.display()))(e)),
        }
        std::fs::write(dir.join(file), limit.to_string())
            .map_err(sys(format!("{}/{file}", dir.display())))?;
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .map_err(sys(format!("{}/cgroup.procs", dir.display())))?;
    }
    Ok(())
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let src_c = src.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype_c = fstype.map(|t| CString::new(t).unwrap_or_default());
    let data_c = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a valid NUL-terminated string kept alive here.
    let r = unsafe {
        libc::mount(
            ptr(&src_c),
            target_c.as_ptr(),
            ptr(&fstype_c),
            flags,
            ptr(&data_c).cast(),
        )
    };
    check(r, format!("mount {}", target.display()))
}

/// A path the jail shows, opened before anything else is done with it.
struct Opened {
    path: PathBuf,
    fd: std::os::fd::OwnedFd,
    dir: bool,
    writable: bool,
}

/// Opens `p` as an `O_PATH` descriptor: beneath its storage root when `roots` has one
/// for it (no symlink anywhere), else not through a final symlink. A writable file that
/// does not exist is created first (0600, `O_EXCL|O_NOFOLLOW`, chowned later).
fn open_for_jail(p: &JailPath, roots: Option<&confine::Roots>) -> Result<Opened, JailError> {
    let path = p.path.as_path();
    let beneath = roots.filter(|r| r.contains(path));
    let open = || match (beneath, p.socket) {
        (Some(r), false) => r.open_path(path),
        (Some(r), true) => r.open_socket_path(path),
        (None, false) => confine::open_path_nofollow(path),
        (None, true) => confine::open_socket_path_nofollow(path),
    };
    let fd = match open() {
        Err(confine::ConfineError::Io { source, .. })
            if p.writable && !p.socket && source.kind() == std::io::ErrorKind::NotFound =>
        {
            create_private(path, beneath)?;
            open()?
        }
        other => other?,
    };
    let st = confine::fstat(fd.as_fd()).map_err(sys(format!("fstat {}", path.display())))?;
    Ok(Opened {
        path: path.to_path_buf(),
        fd,
        dir: st.st_mode & libc::S_IFMT == libc::S_IFDIR,
        writable: p.writable,
    })
}

/// Creates the empty private file `path` (beneath its root when there is one).
fn create_private(path: &Path, roots: Option<&confine::Roots>) -> Result<(), JailError> {
    match roots {
        Some(r) => r.create_file_private(path).map(drop)?,
        None => {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map(drop)
                .map_err(sys(format!("create {}", path.display())))?;
        }
    }
    Ok(())
}

/// `/proc/self/fd/N` of an opened path: a mount source the kernel takes from the
/// descriptor itself, with no lookup that a link could redirect.
fn fd_source(o: &Opened) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", o.fd.as_raw_fd()))
}

/// Creates `target` in the jail's own tmpfs (an empty file, or a directory if the
/// opened path is one) and binds the opened path onto it (read-only unless writable).
fn bind(o: &Opened, target: &Path) -> Result<(), JailError> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(sys(format!("create {}", parent.display())))?;
    }
    if o.dir {
        std::fs::create_dir_all(target).map_err(sys(format!("create {}", target.display())))?;
    } else if !target.exists() {
        std::fs::File::create(target).map_err(sys(format!("create {}", target.display())))?;
    }
    mount(Some(&fd_source(o)), target, None, libc::MS_BIND, None)?;
    if !o.writable {
        mount(
            None,
            target,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
            None,
        )?;
    }
    Ok(())
}

/// Gives an opened path to the jail's uid/gid through its descriptor.
fn fchown(o: &Opened, cfg: &JailConfig) -> Result<(), JailError> {
    // SAFETY: fchownat on a valid descriptor with an empty path and AT_EMPTY_PATH (which
    // an O_PATH descriptor allows): it changes that file and follows no link.
    check(
        unsafe {
            libc::fchownat(
                o.fd.as_raw_fd(),
                c"".as_ptr(),
                cfg.uid,
                cfg.gid,
                libc::AT_EMPTY_PATH,
            )
        },
        format!("chown {}", o.path.display()),
    )
}

/// A node for the host's device `source` at `target`, owned by the jail's uid and
/// readable and writable by it alone (as Firecracker's jailer: the host node, e.g.
/// /dev/kvm root:kvm 0660, stays as it is).
fn device_node(source: &Path, target: &Path, cfg: &JailConfig) -> Result<(), JailError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(source).map_err(sys(format!("{}", source.display())))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(sys(format!("create {}", parent.display())))?;
    }
    let c = cstr(target)?;
    check(
        // SAFETY: mknod of a character device with the host node's number, a valid path.
        unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, meta.rdev()) },
        format!("mknod {}", target.display()),
    )?;
    chown(target, cfg)
}

fn chown(path: &Path, cfg: &JailConfig) -> Result<(), JailError> {
    std::os::unix::fs::chown(path, Some(cfg.uid), Some(cfg.gid))
        .map_err(sys(format!("chown {}", path.display())))
}

fn build_root(
    cfg: &JailConfig,
    paths: &[JailPath],
    devices: &[&str],
    roots: Option<confine::Roots>,
) -> Result<(), JailError> {
    let root = &cfg.root;
    // Nothing mounted from here on propagates back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    std::fs::create_dir_all(root).map_err(sys(format!("create {}", root.display())))?;
    // pivot_root needs the new root to be a mount point: a tmpfs of its own, so the
    // jail's directories are not left behind on the host.
    mount(
        Some(Path::new("none")),
        root,
        Some("tmpfs"),
        // Device nodes (created below, by root, before the uid changes) must work.
        libc::MS_NOSUID,
        Some("mode=0755,size=1m"),
    )?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    // Each path is opened once, with the confinement rules (beneath its storage root
    // without any symlink; elsewhere not through a final symlink); its type, chown and
    // bind all go through that descriptor, so a path swapped for a link (e.g. a disk
    // replaced by a link to another file after it was defined) is refused, and one
    // swapped after the check is never looked up again.
    let opened = paths
        .iter()
        .map(|p| open_for_jail(p, roots.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    // A path inside a directory that is bound anyway is not bound again: a file mount
    // on top of it could not be renamed or deleted (a storage migration's
    // delete_source) inside the jail.
    let dirs: Vec<&Path> = opened
        .iter()
        .filter(|o| o.dir)
        .map(|o| o.path.as_path())
        .collect();
    for o in &opened {
        if o.writable {
            fchown(o, cfg)?;
        }
        if dirs.iter().any(|d| o.path != *d && o.path.starts_with(d)) {
            continue;
        }
        bind(o, &inside(&o.path))?;
    }
    // No descriptor of a host file or directory may outlive pivot_root: it would reach
    // the host's tree from inside the jail.
    drop(opened);
    drop(roots);
    for dev in devices {
        device_node(Path::new(dev), &inside(Path::new(dev)), cfg)?;
    }
    let proc_dir = root.join("proc");
    std::fs::create_dir_all(&proc_dir).map_err(sys("create /proc"))?;
    mount(
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("hidepid=invisible"),
    )?;
    let old = root.join(".old-root");
    std::fs::create_dir_all(&old).map_err(sys("create .old-root"))?;
    let (new_c, old_c) = (cstr(root)?, cstr(&old)?);
    check(
        // SAFETY: pivot_root with two valid paths (no libc wrapper).
        unsafe { libc::syscall(libc::SYS_pivot_root, new_c.as_ptr(), old_c.as_ptr()) } as i32,
        "pivot_root",
    )?;
    std::env::set_current_dir("/").map_err(sys("chdir /"))?;
    check(
        // SAFETY: detaching the old root, a valid path.
        unsafe { libc::umount2(c"/.old-root".as_ptr(), libc::MNT_DETACH) },
        "umount the old root",
    )?;
    std::fs::remove_dir("/.old-root").map_err(sys("remove /.old-root"))?;
    // The jail's own tmpfs: read-only from now on (the bind mounts stay as they are).
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
        None,
    )
}

fn drop_privileges(cfg: &JailConfig) -> Result<(), JailError> {
    sandbox::privileges::set_limits(cfg.nofile, cfg.nproc)?;
    // From root to a non-root uid keeping no capability: every set is cleared.
    sandbox::privileges::drop_privileges(Some((cfg.uid, cfg.gid)), &[])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_path_must_exist_and_be_a_socket_and_is_never_created() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone.sock");
        assert!(open_for_jail(&JailPath::socket(&missing), None).is_err());
        assert!(!missing.exists(), "a missing socket must not become a file");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            open_for_jail(&JailPath::socket(&file), None),
            Err(JailError::Confine(confine::ConfineError::WrongType { path, .. })) if path == file
        ));
        let sock = dir.path().join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let o = open_for_jail(&JailPath::socket(&sock), None).unwrap();
        assert!(o.writable && !o.dir);
        // A writable file still is created when missing.
        let made = dir.path().join("made");
        open_for_jail(&JailPath::writable(&made), None).unwrap();
        assert!(made.is_file());
    }

    #[test]
    fn parses_a_full_jail_option() {
        let c: JailConfig = "uid=100001,gid=100002,root=/srv/jail/vm1,netns=/run/netns/a,\
                             bind=/snap,bind=/dst,bind_ro=/k,cgroup=vm1,memory_max=1073741824,pids_max=64"
            .parse()
            .unwrap();
        assert_eq!((c.uid, c.gid), (100001, 100002));
        assert_eq!(c.root, PathBuf::from("/srv/jail/vm1"));
        assert_eq!(c.binds, vec![PathBuf::from("/snap"), PathBuf::from("/dst")]);
        assert_eq!(c.read_only, vec![PathBuf::from("/k")]);
        assert_eq!((c.memory_max, c.pids_max), (Some(1 << 30), Some(64)));
        assert!(!c.new_pid_namespace);
        let c: JailConfig = "uid=5,gid=5,root=/j,pidns=new".parse().unwrap();
        assert!(c.new_pid_namespace);
    }

    #[test]
    fn refuses_root_relative_roots_and_odd_cgroup_names() {
        for bad in [
            "uid=0,gid=5,root=/j",
            "uid=5,gid=5,root=j",
            "uid=5,gid=5",
            "uid=5,gid=5,root=/j,cgroup=../x",
            "uid=5,gid=5,root=/j,memory_max=5",
            "uid=5,gid=5,root=/j,flag",
            "uid=5,gid=5,root=/j,what=1",
            "uid=5,gid=5,root=/j,pidns=host",
        ] {
            assert!(bad.parse::<JailConfig>().is_err(), "{bad}");
        }
    }
}
