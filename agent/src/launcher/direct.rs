//! The direct launcher: vireod forks and execs `vireo` in a new session (it keeps
//! running when vireod, its terminal or its process group is killed), output appended
//! to the VM's log, and — when CPU cgroups are on — already in the boot cgroup when
//! `vireo` starts.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use super::{watch, Handle, LaunchSpec, Watch};
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

    /// Starts `vireo <argv>` (see [`LaunchSpec::argv`]).
    pub fn spawn(&self, spec: &LaunchSpec) -> Result<(Handle, Watch), AgentError> {
        let _ = std::fs::remove_file(&spec.socket); // Stale: the VM is not running.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(|e| AgentError::io("cannot open VMM log", &spec.log, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| AgentError::io("cannot open VMM log", &spec.log, e))?;
        let mut cmd = Command::new(&spec.vireo_bin);
        cmd.args(spec.argv())
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
