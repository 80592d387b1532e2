//! One `vireo` process: start it, find it again after vireod restarts (pid file +
//! /proc checks), signal it, and learn when it ends (a pidfd, which also works for
//! processes that are not vireod's children).
//!
//! Two ways to start it, one interface ([`Launcher`]): [`direct`] forks and execs
//! `vireo` in its own session (so it outlives vireod); [`systemd`] starts the template
//! unit `vireo@NAME.service` when systemd is PID 1. Everything above (supervision,
//! restart policy, migration) does not know which one ran.

pub mod direct;
pub mod systemd;

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;

use crate::cgroup::CpuCgroups;
use crate::procfs;
use crate::AgentError;

/// What the VMM is started for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmArgs {
    /// Boot the VM of this runtime configuration (`vireo --config`).
    Boot { config: PathBuf },
    /// Wait, with no VM, for one to arrive by live migration; its serial port goes to
    /// `serial` (`vireo --serial file=...`, which replaces the arriving VM's own).
    Receive { serial: PathBuf },
    /// Resume the VM saved in this snapshot directory (`vireo --restore
    /// source_url=file://DIR,resume=on`); it names its own configuration, but its
    /// serial output goes to `serial` (`--serial file=...`: this host's file of it, also
    /// when it was saved on another cluster node).
    Restore { dir: PathBuf, serial: PathBuf },
}

/// Where one VM's VMM finds its configuration and puts its socket, logs and pid.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    /// The VM's name (the systemd unit's instance).
    pub name: String,
    pub vireo_bin: PathBuf,
    pub args: VmmArgs,
    /// The VMM's REST socket (`vireo --api-socket`).
    pub socket: PathBuf,
    /// The VMM's stdout and stderr (appended).
    pub log: PathBuf,
    pub pid_file: PathBuf,
    /// The systemd launcher's environment file for the unit (`VIREO_ARGS=...`).
    pub env_file: PathBuf,
    /// vireod's storage roots and allow-listed block devices, passed on to the VMM
    /// (`--storage-root`, `--allow-block-device`), and where its migration sockets may
    /// be (`--socket-dir`: vireod's `vms/` and its same-host peers').
    pub storage_roots: Vec<PathBuf>,
    pub block_devices: Vec<PathBuf>,
    pub socket_dirs: Vec<PathBuf>,
    /// The guest's RAM in bytes, when known (cgroup v2 memory.max).
    pub memory: Option<u64>,
    /// Confine the VMM (`vireo --jail`; the direct launcher also gives it its own PID
    /// namespace). None: it runs as vireod's user, unconfined (`vireod --no-jail`).
    pub jail: Option<JailSpec>,
}

/// What `vireo --jail` gets from vireod for one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailSpec {
    /// The VM's own uid, also its gid (`vireod --jail-uids`).
    pub uid: u32,
    /// The jail's root (a tmpfs the VMM mounts in its own mount namespace).
    pub root: PathBuf,
    /// The network namespace the VMM joins, if any.
    pub netns: Option<PathBuf>,
    /// Directories and files it needs at run time beyond what its configuration names,
    /// chowned to `uid` by the jail: the VM's own run directory (API and migration
    /// sockets, files vireod hands it), a receiving VMM's console file, disks and
    /// `storage_dir`.
    pub binds: Vec<PathBuf>,
    /// Files it only reads that its configuration does not name at launch (a
    /// receiving VMM's kernel, initramfs and read-only disks): not chowned.
    pub read_only: Vec<PathBuf>,
    /// `pidns=new`: the VMM clones itself into its own PID namespace (the systemd
    /// launcher; the direct launcher clones it into one itself).
    pub new_pid_namespace: bool,
}

impl JailSpec {
    /// `uid=U,gid=U,root=DIR[,netns=PATH][,bind=PATH]...`; a path with a `,` could not
    /// be told apart from the next option and is refused.
    pub fn option(&self) -> Result<OsString, AgentError> {
        let mut o = OsString::from(format!("uid={0},gid={0},root=", self.uid));
        let path = |key: &str, p: &Path, o: &mut OsString| {
            if p.as_os_str().as_encoded_bytes().contains(&b',') {
                return Err(AgentError::BadConfig(format!(
                    "{}: a path with ',' cannot be given to a jailed VMM",
                    p.display()
                )));
            }
            o.push(key);
            o.push(p);
            Ok(())
        };
        path("", &self.root, &mut o)?;
        if let Some(ns) = &self.netns {
            path(",netns=", ns, &mut o)?;
        }
        for b in &self.binds {
            path(",bind=", b, &mut o)?;
        }
        for b in &self.read_only {
            path(",bind_ro=", b, &mut o)?;
        }
        if self.new_pid_namespace {
            o.push(",pidns=new");
        }
        Ok(o)
    }
}

impl LaunchSpec {
    /// The VMM's arguments (after the program name).
    pub fn argv(&self) -> Result<Vec<OsString>, AgentError> {
        let mut v: Vec<OsString> = Vec::new();
        if let Some(jail) = &self.jail {
            v.push("--jail".into());
            v.push(jail.option()?);
        }
        match &self.args {
            VmmArgs::Boot { config } => {
                v.push("--config".into());
                v.push(config.into());
            }
            VmmArgs::Receive { serial } => {
                let mut s = OsString::from("file=");
                s.push(serial);
                v.push("--serial".into());
                v.push(s);
            }
            VmmArgs::Restore { dir, serial } => {
                let mut s = OsString::from("source_url=file://");
                s.push(dir);
                s.push(",resume=on");
                v.push("--restore".into());
                v.push(s);
                let mut s = OsString::from("file=");
                s.push(serial);
                v.push("--serial".into());
                v.push(s);
            }
        }
        v.push("--api-socket".into());
        v.push(self.socket.clone().into());
        for r in &self.storage_roots {
            v.push("--storage-root".into());
            v.push(r.into());
        }
        for d in &self.block_devices {
            v.push("--allow-block-device".into());
            v.push(d.into());
        }
        if !self.storage_roots.is_empty() {
            for d in &self.socket_dirs {
                v.push("--socket-dir".into());
                v.push(d.into());
            }
        }
        Ok(v)
    }
}

/// Starts VMMs one way or the other; the rest of vireod only sees [`Handle`] and
/// [`Watch`].
#[derive(Clone, Debug)]
pub enum Launcher {
    /// vireod forks and execs `vireo` itself.
    Direct(direct::Direct),
    /// `systemctl start vireo@NAME.service`.
    Systemd(systemd::Systemd),
}

/// Which launcher to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LauncherKind {
    /// systemd when it is PID 1 (/run/systemd/system exists), else direct.
    #[default]
    Auto,
    Direct,
    Systemd,
}

impl std::str::FromStr for LauncherKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "direct" => Ok(Self::Direct),
            "systemd" => Ok(Self::Systemd),
            _ => Err(format!("expected auto, direct or systemd, got {s:?}")),
        }
    }
}

/// sd_booted(): systemd is the init system of this host.
pub fn systemd_booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

impl Launcher {
    /// The launcher of `kind`; `cgroups` are the direct launcher's CPU placement (the
    /// systemd launcher leaves cgroups to systemd: its units live in `vireo.slice`).
    pub fn new(kind: LauncherKind, systemctl: PathBuf, cgroups: CpuCgroups) -> Self {
        let systemd = match kind {
            LauncherKind::Auto => systemd_booted(),
            LauncherKind::Direct => false,
            LauncherKind::Systemd => true,
        };
        if systemd {
            Launcher::Systemd(systemd::Systemd::new(systemctl))
        } else {
            Launcher::Direct(direct::Direct::new(cgroups))
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Launcher::Direct(_) => "direct",
            Launcher::Systemd(_) => "systemd",
        }
    }

    /// Starts the VMM and writes its pid file.
    pub async fn spawn(&self, spec: &LaunchSpec) -> Result<(Handle, Watch), AgentError> {
        let (h, w) = match self {
            Launcher::Direct(d) => d.spawn(spec)?,
            Launcher::Systemd(s) => s.spawn(spec).await?,
        };
        if let Err(e) = write_pid_file(&spec.pid_file, &h) {
            let _ = h.signal(libc::SIGKILL);
            return Err(e);
        }
        Ok((h, w))
    }

    /// Finds the VMM that a previous vireod started (see [`adopt`]).
    pub fn adopt(&self, spec: &LaunchSpec) -> Result<(Handle, Watch), NotAdopted> {
        let (h, mut w) = adopt(spec)?;
        if let Launcher::Systemd(s) = self {
            w.unit = Some(s.status_query(spec));
        }
        Ok((h, w))
    }

    /// The VM runs: give the VMM the VM's CPU weight (its own cgroup, or the unit's
    /// CPUWeight=). `vcpus`: how many vCPU threads to expect (a thread names itself
    /// when it first runs, which on a busy host can come after the VM reports
    /// running: placement waits for the names, up to 2 s).
    pub async fn running(&self, spec: &LaunchSpec, pid: i32, weight: u32, vcpus: usize) {
        match self {
            Launcher::Direct(d) => {
                for _ in 0..100 {
                    match d.cgroups.place_running(&spec.name, pid, weight) {
                        Some(placed) if placed < vcpus => {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await
                        }
                        _ => return,
                    }
                }
                tracing::warn!(vm = %spec.name, pid, "vCPU threads not found; not all placed in the VM's cgroup");
            }
            Launcher::Systemd(s) => s.set_weight(&spec.name, weight).await,
        }
    }

    /// The VM's guest threads run at the VMMs' share for a moment (a pause or a stop
    /// waits for every vCPU to leave the guest).
    pub fn boost(&self, spec: &LaunchSpec, pid: i32) {
        if let Launcher::Direct(d) = self {
            d.cgroups.boost(&spec.name, pid);
        }
    }

    /// Back to the VM's own share after [`Launcher::boost`].
    pub fn unboost(&self, spec: &LaunchSpec, pid: i32) {
        if let Launcher::Direct(d) = self {
            d.cgroups.unboost(&spec.name, pid);
        }
    }

    /// A VMM that waits for an incoming VM (re-adopted): back to the boot share.
    pub fn booting(&self, pid: i32) {
        if let Launcher::Direct(d) = self {
            d.cgroups.place_booting(pid);
        }
    }

    /// The VMM has ended: remove what the launcher made for it.
    pub fn ended(&self, spec: &LaunchSpec) {
        match self {
            Launcher::Direct(d) => {
                if d.cgroups.remove(&spec.name) {
                    return;
                }
                // A VMM vireod did not start (re-adopted) is reaped by someone else;
                // until then its cgroup is busy.
                let (cgroups, name) = (d.cgroups.clone(), spec.name.clone());
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        for _ in 0..50 {
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            if cgroups.remove(&name) {
                                return;
                            }
                        }
                    });
                }
            }
            Launcher::Systemd(_) => {
                let _ = std::fs::remove_file(&spec.env_file);
                let _ = std::fs::remove_file(systemd::exit_file(&spec.env_file));
            }
        }
    }
}

/// How to reach a VMM process (cheap to clone; signals go through the pidfd, so they
/// can never hit another process that reused the pid).
#[derive(Clone, Debug)]
pub struct Handle {
    pub pid: i32,
    pub start_ticks: u64,
    pidfd: Arc<OwnedFd>,
}

/// vireod's own child, which it reaps.
enum Reap {
    /// Started through `std::process::Command`.
    Command(Child),
    /// Cloned into its own PID namespace ([`direct`]): reaped with waitpid. It is that
    /// namespace's init, which no signal without a handler can end (only SIGKILL from
    /// here): `vireo` then ends with status 128+N for the fatal signals it catches
    /// ([`NAMESPACE_INIT_SIGNALS`]), reported as that signal.
    NamespaceInit(i32),
}

/// The signals a jailed `vireo`, init of its PID namespace, turns into exit status
/// 128+N (the same list as `vmm::jail::INIT_FATAL_SIGNALS`).
pub const NAMESPACE_INIT_SIGNALS: [i32; 4] =
    [libc::SIGHUP, libc::SIGINT, libc::SIGABRT, libc::SIGTERM];

/// Waits for the end of the process (owned by the one task that watches it).
pub struct Watch {
    pidfd: AsyncFd<Arc<OwnedFd>>,
    child: Option<Reap>,
    pid: i32,
    /// A process systemd started: how to ask it for the exit status.
    unit: Option<systemd::StatusQuery>,
}

/// How the process ended: `status` and `signal` are None when vireod cannot know
/// (the process is not its child).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub status: Option<i32>,
    pub signal: Option<i32>,
}

impl Exit {
    /// How the end of a `vireo` that was the init of its PID namespace reads: its
    /// status 128+N for a signal N in [`NAMESPACE_INIT_SIGNALS`] is that signal.
    pub fn of_namespace_init(self) -> Exit {
        match self.status.and_then(|code| code.checked_sub(128)) {
            Some(sig) if NAMESPACE_INIT_SIGNALS.contains(&sig) => Exit {
                status: None,
                signal: Some(sig),
            },
            _ => self,
        }
    }
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl Handle {
    /// Sends `signal` (e.g. libc::SIGKILL). An exited process is not an error.
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    pub fn alive(&self) -> bool {
        procfs::stat(self.pid)
            .is_some_and(|s| s.start_ticks == self.start_ticks && s.state != 'Z' && s.state != 'X')
    }
}

impl Watch {
    /// Waits until the process has ended; reaps it if it is vireod's child, or asks
    /// systemd how it ended if systemd started it.
    pub async fn wait(mut self) -> Exit {
        let exit = self.wait_gone().await;
        match self.unit.take() {
            Some(q) if exit.status.is_none() && exit.signal.is_none() => {
                let pid = self.pid;
                tokio::task::spawn_blocking(move || q.exit_of(pid))
                    .await
                    .unwrap_or(exit)
            }
            _ => exit,
        }
    }

    async fn wait_gone(&mut self) -> Exit {
        loop {
            match self.pidfd.readable().await {
                Ok(mut g) => {
                    g.clear_ready();
                    if let Some(e) = self.try_exit() {
                        return e;
                    }
                }
                Err(_) => {
                    // Cannot poll: fall back to /proc.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    if let Some(e) = self.try_exit() {
                        return e;
                    }
                }
            }
        }
    }

    /// The exit, if the process has ended.
    pub fn try_exit(&mut self) -> Option<Exit> {
        match &mut self.child {
            Some(Reap::NamespaceInit(pid)) => reap_namespace_init(*pid),
            Some(Reap::Command(c)) => match c.try_wait() {
                Ok(Some(st)) => Some(Exit {
                    status: st.code(),
                    signal: st.signal(),
                }),
                Ok(None) => None,
                Err(_) => Some(Exit {
                    status: None,
                    signal: None,
                }),
            },
            None => (!procfs::alive(self.pid)).then_some(Exit {
                status: None,
                signal: None,
            }),
        }
    }
}

/// waitpid(WNOHANG) of a child cloned into its own PID namespace; 128+N of a signal
/// in [`NAMESPACE_INIT_SIGNALS`] is reported as that signal.
fn reap_namespace_init(pid: i32) -> Option<Exit> {
    let mut status = 0;
    // SAFETY: waitpid on our own child's pid with a valid status pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r == 0 {
        return None;
    }
    if r < 0 {
        return Some(Exit {
            status: None,
            signal: None,
        });
    }
    if libc::WIFSIGNALED(status) {
        return Some(Exit {
            status: None,
            signal: Some(libc::WTERMSIG(status)),
        });
    }
    Some(
        Exit {
            status: Some(libc::WEXITSTATUS(status)),
            signal: None,
        }
        .of_namespace_init(),
    )
}

fn watch(pid: i32, child: Option<Child>) -> Result<(Handle, Watch), std::io::Error> {
    let pidfd = Arc::new(pidfd_open(pid)?);
    watch_with(pid, pidfd, child.map(Reap::Command))
}

fn watch_with(
    pid: i32,
    pidfd: Arc<OwnedFd>,
    child: Option<Reap>,
) -> Result<(Handle, Watch), std::io::Error> {
    let start_ticks = procfs::stat(pid).map(|s| s.start_ticks).unwrap_or(0);
    // SAFETY: the AsyncFd holds a clone of the Arc, so the pidfd stays open and is the
    // same descriptor for the AsyncFd's whole life.
    let registered =
        unsafe { AsyncFd::register_with_interest(pidfd.clone(), tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
    let w = Watch {
        pidfd: registered,
        child,
        pid,
        unit: None,
    };
    Ok((
        Handle {
            pid,
            start_ticks,
            pidfd,
        },
        w,
    ))
}

pub(crate) fn write_pid_file(path: &Path, h: &Handle) -> Result<(), AgentError> {
    let tmp = path.with_extension("pid.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| AgentError::io("cannot write pid file", &tmp, e))?;
    writeln!(f, "{} {}", h.pid, h.start_ticks)
        .and_then(|_| f.sync_all())
        .map_err(|e| AgentError::io("cannot write pid file", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| AgentError::io("cannot write pid file", path, e))
}

/// Why a pid file did not lead to a live VMM.
#[derive(Debug, PartialEq, Eq)]
pub enum NotAdopted {
    NoPidFile,
    Gone,
    /// The pid is alive but is not this VM's vireo (pid reuse).
    NotOurs(String),
}

/// Finds the VMM that a previous vireod started, from its pid file: the process must
/// be alive, started at the recorded time, run `vireo` and serve this VM's socket.
pub fn adopt(spec: &LaunchSpec) -> Result<(Handle, Watch), NotAdopted> {
    let text = std::fs::read_to_string(&spec.pid_file).map_err(|_| NotAdopted::NoPidFile)?;
    let mut it = text.split_whitespace();
    let pid: i32 = it
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or(NotAdopted::NoPidFile)?;
    let start: u64 = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let check = || -> Result<(), NotAdopted> {
        let st = procfs::stat(pid).ok_or(NotAdopted::Gone)?;
        if st.state == 'Z' || st.state == 'X' {
            return Err(NotAdopted::Gone);
        }
        if start != 0 && st.start_ticks != start {
            return Err(NotAdopted::NotOurs("started at another time".into()));
        }
        let exe = procfs::exe(pid).unwrap_or_default();
        let exe_name = exe
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !exe_name.starts_with("vireo") {
            return Err(NotAdopted::NotOurs(format!("runs {}", exe.display())));
        }
        let args = procfs::cmdline(pid).unwrap_or_default();
        let sock = spec.socket.to_string_lossy();
        if !args.iter().any(|a| *a == sock) {
            return Err(NotAdopted::NotOurs(format!(
                "does not serve {sock}: {}",
                args.join(" ")
            )));
        }
        Ok(())
    };
    check()?;
    let (h, w) = watch(pid, None).map_err(|_| NotAdopted::Gone)?;
    // The pidfd now pins this process; check again that it is still the one.
    check()?;
    Ok((h, w))
}

/// The last `n` lines of a text file (at most the last 64 KiB are read).
pub fn tail_lines(path: &Path, n: usize) -> Vec<String> {
    tail(path, n, false)
}

/// The last `n` complete lines (a line still being written is left out: the guest
/// writes its serial output byte by byte).
pub fn tail_complete_lines(path: &Path, n: usize) -> Vec<String> {
    tail(path, n, true)
}

fn tail(path: &Path, n: usize, complete: bool) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(64 * 1024);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    if complete {
        let end = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        buf.truncate(end);
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<String> = text
        .lines()
        .skip(usize::from(from > 0)) // The first line may be cut.
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let keep = lines.len().saturating_sub(n);
    lines.drain(..keep);
    lines
}

#[cfg(test)]
mod tests;
