//! `vireo --jail ...,pidns=new`: the VMM clones itself into a PID namespace of its own
//! (for a launcher that cannot: a systemd unit, a user starting `vireo` by hand).
//!
//! `unshare(CLONE_NEWPID)` would move only later children, so the process clones
//! itself (`clone(CLONE_NEWPID)`, at start-up, single-threaded, before it opened
//! anything) and the child goes on as the VMM, PID 1 of the new namespace. The parent
//! cannot simply exit: the process that launched it watches it. So:
//!
//! - **Under systemd** (`$NOTIFY_SOCKET`, `vireo@.service` is `Type=notify`): the
//!   parent tells systemd the child is the unit's main process (`MAINPID=`), waits
//!   until systemd has read that (`BARRIER=1`, as `sd_notify_barrier` does) and exits.
//!   The child, orphaned, is reaped by systemd, which so sees its exit status; its
//!   `READY=1` and `WATCHDOG=1` come from the main process as `NotifyAccess=main` asks.
//! - **Otherwise** the parent stays as a small reaper: it forwards the signals that
//!   end a process to the child and, when the child ends, ends the same way (its exit
//!   status, or the signal that killed it), so whoever started `vireo` sees the VMM's
//!   own end.
//!
//! vireod's direct launcher clones the VMM into its PID namespace itself (see
//! `agent/src/launcher/direct.rs`) and does not ask for this.

use std::sync::atomic::{AtomicI32, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum PidNsError {
    #[error("cannot clone into a new PID namespace: {0}")]
    Clone(#[source] std::io::Error),
}

/// The child the reaper forwards signals to (0: none yet).
static CHILD: AtomicI32 = AtomicI32::new(0);

/// The signals the reaper passes on to the VMM (what a launcher or a terminal sends
/// to end it, and the user signals).
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Moves the VMM into a new PID namespace: returns in the child (PID 1 there); the
/// parent never returns (see the module documentation). A process that already is
/// the init of its namespace (cloned so by vireod) returns at once.
///
/// Call it while the process is single-threaded and has opened nothing of the VM.
pub fn enter() -> Result<(), PidNsError> {
    if crate::jail::is_namespace_init() {
        return Ok(());
    }
    // clone(2), not clone3: systemd's RestrictNamespaces= answers clone3 with ENOSYS
    // (its flags sit in memory a seccomp filter cannot read) and checks clone's flags,
    // which allow a PID namespace in vireo@.service.
    let flags = (libc::CLONE_NEWPID | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: clone with no new stack (0) and no CLONE_VM, from a single-threaded
    // process: the child is a copy of this process (as after fork) and goes on
    // running it; the tid and tls arguments are unused without their flags.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match pid {
        0 => {
            // The namespace's init: the signals that end a process must be caught.
            crate::jail::end_on_fatal_signals_as_init();
            Ok(())
        }
        p if p < 0 => Err(PidNsError::Clone(std::io::Error::last_os_error())),
        p => parent(p as i32),
    }
}

/// The parent's part: hand the child to systemd, or reap it and end as it did.
fn parent(child: i32) -> ! {
    match crate::notify::hand_over_main_pid(child) {
        Ok(true) => {
            tracing::debug!(
                child,
                "the VMM (PID 1 of its namespace) is the unit's main process now"
            );
            // SAFETY: _exit ends this process at once; the child runs on.
            unsafe { libc::_exit(0) }
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, "systemd did not take the VMM as the unit's main process; staying as its reaper");
        }
    }
    CHILD.store(child, Ordering::Relaxed);
    extern "C" fn forward(sig: libc::c_int) {
        let child = CHILD.load(Ordering::Relaxed);
        if child > 0 {
            // SAFETY: kill is async-signal-safe; the child is ours and not yet reaped.
            unsafe { libc::kill(child, sig) };
        }
    }
    for sig in FORWARDED {
        // SAFETY: a zeroed sigaction with a valid handler is well formed.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // SAFETY: _exit ends this process.
            unsafe { libc::_exit(1) }
        }
    }
    end_as(status)
}

/// Ends this process as the child ended (`status` from waitpid). The child, init of
/// its namespace, ends with status 128+N for a fatal signal N it caught
/// ([`crate::jail::INIT_FATAL_SIGNALS`]): that reads as the signal, as if the VMM had
/// no namespace of its own.
fn end_as(status: libc::c_int) -> ! {
    let caught = libc::WIFEXITED(status)
        .then(|| libc::WEXITSTATUS(status) - 128)
        .filter(|sig| crate::jail::INIT_FATAL_SIGNALS.contains(sig));
    let signal = caught.or(libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)));
    if let Some(sig) = signal {
        // SAFETY: back to the default action, unblocked, then the same signal to
        // ourselves; _exit if it did not end us (a signal whose default is to go on).
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig)
        }
    }
    // SAFETY: _exit with the child's exit status.
    unsafe { libc::_exit(libc::WEXITSTATUS(status)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reaper ends as its child did: runs in a forked process so that the
    /// test's own process goes on.
    fn ended_as(status: libc::c_int) -> libc::c_int {
        // SAFETY: fork in a test; the child only calls end_as (async-signal-safe
        // calls and _exit).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            end_as(status);
        }
        let mut got = 0;
        // SAFETY: waitpid on the child forked above.
        unsafe { libc::waitpid(pid, &mut got, 0) };
        got
    }

    #[test]
    fn the_reaper_ends_with_its_childs_status_or_signal() {
        // Exit status 3 (waitpid's encoding: status << 8).
        let got = ended_as(3 << 8);
        assert!(
            libc::WIFEXITED(got) && libc::WEXITSTATUS(got) == 3,
            "{got:#x}"
        );
        // Killed by SIGKILL (9) and by SIGTERM (15); and SIGTERM caught by the
        // namespace's init, which then exited 128+15.
        for (status, sig) in [
            (libc::SIGKILL, libc::SIGKILL),
            (libc::SIGTERM, libc::SIGTERM),
            ((128 + libc::SIGTERM) << 8, libc::SIGTERM),
        ] {
            let got = ended_as(status);
            assert!(
                libc::WIFSIGNALED(got) && libc::WTERMSIG(got) == sig,
                "{got:#x}"
            );
        }
        // An exit status above 128 that no caught signal explains stays a status.
        let got = ended_as(200 << 8);
        assert!(
            libc::WIFEXITED(got) && libc::WEXITSTATUS(got) == 200,
            "{got:#x}"
        );
    }
}
