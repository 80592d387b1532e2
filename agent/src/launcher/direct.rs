//! The direct launcher: vireod forks and execs `vireo` in a new session (it keeps
//! running when vireod, its terminal or its process group is killed), output appended
//! to the VM's log, and — when CPU cgroups are on — already in the boot cgroup when
//! `vireo` starts.
//!
//! A jailed VMM is cloned (`clone3`) into a new PID namespace: it is PID 1 there and
//! still vireod's own child, so the pid vireod reports, its signals (through the pidfd
//! the clone returns) and the exit status it reaps stay those of the VMM itself.

use std::ffi::{CString, OsString};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;

use super::{watch, watch_with, Handle, LaunchSpec, Reap, Watch};
use crate::cgroup::CpuCgroups;
use crate::AgentError;

#[derive(Clone, Debug)]
pub struct Direct {
    pub cgroups: CpuCgroups,
}

impl Direct {
    pub fn new(cgroups: CpuCgroups) -> Self {
        Self { cgroups }
    }

    /// Starts `vireo <argv>` (see [`LaunchSpec::argv`]); a jailed one in its own PID
    /// namespace.
    pub fn spawn(&self, spec: &LaunchSpec) -> Result<(Handle, Watch), AgentError> {
        let _ = std::fs::remove_file(&spec.socket); // Stale: the VM is not running.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(|e| AgentError::io("cannot open VMM log", &spec.log, e))?;
        if spec.jail.is_some() {
            return self.spawn_in_pid_namespace(spec, log);
        }
        let log2 = log
            .try_clone()
            .map_err(|e| AgentError::io("cannot open VMM log", &spec.log, e))?;
        let mut cmd = Command::new(&spec.vireo_bin);
        cmd.args(spec.argv()?)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let boot_procs = self.cgroups.spawn_procs(&spec.name, spec.memory);
        // SAFETY: setsid, sigemptyset, sigprocmask, get/setpriority, open, write and close
        // are async-signal-safe; the closure touches nothing else (the cgroup path was
        // made into a C string before the fork). A new session and process group: the
        // VMM keeps running when vireod (or its terminal, or its process group) is
        // killed. vireod blocks SIGTERM/SIGINT in its threads; the VMM must not inherit
        // that mask.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                // VMMs run at normal priority when vireod runs above it (Nice= in
                // vireod.service): the control plane answers while guests spin. A
                // vireod that runs below normal (a benchmark under `nice`) keeps its
                // VMMs there too: they never run above it.
                if libc::getpriority(libc::PRIO_PROCESS, 0) < 0 {
                    libc::setpriority(libc::PRIO_PROCESS, 0, 0);
                }
                // Join the boot cgroup (v1) or the VM's own (v2) ("0": the writing process). A failure only
                // costs the placement, never the start.
                if let Some(p) = &boot_procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd >= 0 {
                        libc::write(fd, b"0".as_ptr().cast(), 1);
                        libc::close(fd);
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| AgentError::Spawn {
            bin: spec.vireo_bin.clone(),
            source,
        })?;
        let pid = child.id() as i32;
        match watch(pid, Some(child)) {
            Ok(x) => Ok(x),
            Err(e) => {
                // SAFETY: kill on the pid of our own unreaped child (it cannot be reused).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                Err(AgentError::io(
                    "cannot watch VMM process",
                    &spec.vireo_bin,
                    e,
                ))
            }
        }
    }
}

/// `struct clone_args` of clone3(2), its first version (64 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

/// Everything the cloned child needs, made before the clone: between clone and exec
/// a copy of one thread of a multi-threaded process may only make async-signal-safe
/// calls (no allocation, no locks).
struct Prepared {
    program: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    boot_procs: Option<CString>,
}

fn c_string(s: OsString, what: &str) -> Result<CString, AgentError> {
    CString::new(s.into_vec())
        .map_err(|_| AgentError::BadConfig(format!("{what} contains a NUL byte")))
}

impl Prepared {
    fn new(spec: &LaunchSpec, boot_procs: Option<CString>) -> Result<Self, AgentError> {
        let program = c_string(spec.vireo_bin.clone().into_os_string(), "the vireo path")?;
        let mut argv = vec![program.clone()];
        for a in spec.argv()? {
            argv.push(c_string(a, "a VMM argument")?);
        }
        let envp = std::env::vars_os()
            .filter_map(|(k, v)| {
                let mut kv = k;
                kv.push("=");
                kv.push(v);
                CString::new(kv.into_vec()).ok()
            })
            .collect::<Vec<_>>();
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        Ok(Self {
            argv_ptrs: ptrs(&argv),
            envp_ptrs: ptrs(&envp),
            program,
            _argv: argv,
            _envp: envp,
            boot_procs,
        })
    }
}

fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The cloned child, up to exec: what the `Command` path's pre_exec does, then the
/// standard descriptors, then execve. Reports errno on `report` if anything fails.
///
/// # Safety
/// Runs in the child of a clone of a multi-threaded process: only async-signal-safe
/// calls, on data prepared before the clone.
unsafe fn child_exec(p: &Prepared, null: i32, log: i32, report: i32) -> ! {
    // SAFETY: the caller's contract (see `# Safety`): each call below is async-signal-safe
    // and reads only `p`, prepared before the clone, and the descriptors passed in.
    unsafe {
        let fail = |report: i32| -> ! {
            let errno = *libc::__errno_location();
            let bytes = errno.to_ne_bytes();
            libc::write(report, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        };
        if libc::setsid() < 0 {
            fail(report);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        if libc::getpriority(libc::PRIO_PROCESS, 0) < 0 {
            libc::setpriority(libc::PRIO_PROCESS, 0, 0);
        }
        if let Some(procs) = &p.boot_procs {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
        }
        if libc::dup2(null, 0) < 0 || libc::dup2(log, 1) < 0 || libc::dup2(log, 2) < 0 {
            fail(report);
        }
        libc::execve(
            p.program.as_ptr(),
            p.argv_ptrs.as_ptr(),
            p.envp_ptrs.as_ptr(),
        );
        fail(report)
    }
}

impl Direct {
    /// `vireo` as PID 1 of a new PID namespace, vireod's child (see the module header).
    fn spawn_in_pid_namespace(
        &self,
        spec: &LaunchSpec,
        log: File,
    ) -> Result<(Handle, Watch), AgentError> {
        let spawn_err = |source| AgentError::Spawn {
            bin: spec.vireo_bin.clone(),
            source,
        };
        let prepared = Prepared::new(spec, self.cgroups.spawn_procs(&spec.name, spec.memory))?;
        let null = File::open("/dev/null").map_err(spawn_err)?;
        let (report_r, report_w) = cloexec_pipe().map_err(spawn_err)?;
        let mut pidfd: libc::c_int = -1;
        let args = CloneArgs {
            flags: (libc::CLONE_NEWPID | libc::CLONE_PIDFD) as u64,
            pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..CloneArgs::default()
        };
        // SAFETY: clone3 with a valid, fully initialised clone_args of its own size and
        // no CLONE_VM: the child gets a copy of this thread's memory, makes only
        // async-signal-safe calls on data prepared above, and execs or exits.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                std::ptr::addr_of!(args),
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if pid == 0 {
            // SAFETY: the cloned child (see above).
            unsafe {
                child_exec(
                    &prepared,
                    null.as_raw_fd(),
                    log.as_raw_fd(),
                    report_w.as_raw_fd(),
                )
            }
        }
        if pid < 0 {
            return Err(spawn_err(std::io::Error::last_os_error()));
        }
        let pid = pid as i32;
        // SAFETY: clone3 with CLONE_PIDFD stored a new descriptor we now own.
        let pidfd = Arc::new(unsafe { OwnedFd::from_raw_fd(pidfd) });
        drop(report_w);
        let mut errno = [0u8; 4];
        let mut report = File::from(report_r);
        if let Ok(()) = std::io::Read::read_exact(&mut report, &mut errno) {
            let mut status = 0;
            // SAFETY: reaping our own child, which has exited or is exiting.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            return Err(spawn_err(std::io::Error::from_raw_os_error(
                i32::from_ne_bytes(errno),
            )));
        }
        watch_with(pid, pidfd, Some(Reap::NamespaceInit(pid))).map_err(|e| {
            // SAFETY: kill on the pid of our own unreaped child (it cannot be reused).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            AgentError::io("cannot watch VMM process", &spec.vireo_bin, e)
        })
    }
}
