//! The switch's threads and the system calls each may make (seccomp, through the
//! `sandbox` crate shared with `vireo`). A refused call ends the process with the
//! thread and the call named (status 159); `--seccomp false` turns filtering off,
//! `--seccomp log` lets everything through and logs to the kernel audit log.
//!
//! Filters stack (a thread keeps its starter's filter and adds its own): the switch
//! thread starts the listeners, a listener starts the vhost-user library's
//! connection and vring worker threads. So each list below is within the one above
//! it, and the narrowest thread is the one that reads guest memory.
//!
//! No thread opens a file (`openat` is on no list), starts a process or `execve`s.

use sandbox::{allow, arg_in, base_rules, ioctl_rules, Rules, ThreadRole};

pub use sandbox::{Filters, SeccompMode};

/// `SIOCGIFINDEX`: `if_nametoindex` for a port added through the control socket.
const SIOCGIFINDEX: u64 = 0x8933;
/// `FIONBIO`: std's `set_nonblocking` on control clients and sockets.
const FIONBIO: u64 = 0x5421;
/// glibc's SIGSETXID (SIGRTMIN + 1), whose handler `pthread_create` installs when the
/// process starts its first thread: the switch thread's first vhost-user listener.
const SIGSETXID: u64 = 33;

/// What a thread of `vireo-switch` does, and so which filter it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The main thread (`vireo-switch`): the poll loop that receives and switches every
    /// frame (from AF_PACKET ports and from the vhost-user workers), sends them out,
    /// serves the control socket, and adds and removes ports on request: AF_PACKET and
    /// unix sockets only (`socket`'s family is checked), `bind`, `listen`, `connect`,
    /// `unlink`, `chmod` of its sockets, `SIOCGIFINDEX`/`FIONBIO` ioctls; and starting
    /// a vhost-user port's listener thread.
    Switch,
    /// A vhost-user port's listener (`vu-N`) and the library's connection thread it
    /// starts (`vu-NAME`): accepts a VMM on the port's bound socket, receives its
    /// memory and eventfds (`recvmsg` with SCM_RIGHTS, `mmap`), starts the vring
    /// worker, and removes its socket if it gives up. No new sockets, no ioctl.
    VhostListener,
    /// A vhost-user port's vring worker (`vring_worker`), which parses the guest's
    /// descriptor chains and copies frames to and from guest memory: confined at its
    /// first event, before it reads any guest memory. Memory, futexes, eventfds and
    /// epoll only ([`sandbox::filters`]' common list): no sockets, files, ioctls or
    /// threads.
    VhostWorker,
}

impl ThreadRole for Role {
    fn all() -> &'static [Self] {
        &[Role::Switch, Role::VhostListener, Role::VhostWorker]
    }

    fn spawns_threads(self) -> bool {
        matches!(self, Role::Switch | Role::VhostListener)
    }

    fn rules(self) -> Result<Rules, String> {
        let mut rules = base_rules(self.spawns_threads())?;
        match self {
            Role::Switch => {
                allow(&mut rules, LISTENER);
                allow(&mut rules, SWITCH);
                rules.insert(
                    libc::SYS_socket,
                    arg_in(0, &[libc::AF_UNIX as u64, libc::AF_PACKET as u64])?,
                );
                rules.insert(libc::SYS_ioctl, ioctl_rules(&[SIOCGIFINDEX, FIONBIO])?);
                rules.insert(libc::SYS_rt_sigaction, arg_in(0, &[SIGSETXID])?);
            }
            Role::VhostListener => allow(&mut rules, LISTENER),
            Role::VhostWorker => {}
        }
        Ok(rules)
    }
}

/// A vhost-user listener's and its connection thread's calls (which the switch thread,
/// that starts them, allows too).
const LISTENER: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    // `vhost::Listener` removes its socket when the listener ends.
    libc::SYS_unlink,
];

/// The switch thread's own calls beyond the listener's: packets, the control socket,
/// ports added and removed.
const SWITCH: &[i64] = &[
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_connect,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_unlinkat,
    libc::SYS_chmod,
    libc::SYS_fchmodat,
];

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox::probe::{
        errno_of, fork_process, ioctl_request, new_socket, open_root, spawn_thread,
    };

    fn under<R: Send + 'static>(role: Role, f: impl FnOnce() -> R + Send + 'static) -> R {
        sandbox::run_under_errno(role, f).unwrap()
    }

    /// Reads (changes nothing) the action of `sig`, by the system call itself (glibc's
    /// wrapper refuses its own signals before asking the kernel).
    fn sigaction_of(sig: i32) -> i32 {
        let mut old = [0u64; 4];
        // SAFETY: a query only: no new action, the old one (a kernel sigaction of 32
        // bytes with an 8-byte mask) written to a local buffer of that size.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<u8>(),
                old.as_mut_ptr(),
                8,
            )
        };
        errno_of(r)
    }

    #[test]
    fn every_filter_compiles() {
        assert!(Filters::<Role>::new(SeccompMode::Enforce)
            .unwrap()
            .enabled());
        assert!(!Filters::<Role>::new(SeccompMode::Off).unwrap().enabled());
    }

    #[test]
    fn no_thread_opens_a_file_or_starts_a_process() {
        for &role in Role::all() {
            assert_eq!(under(role, open_root), libc::EPERM, "{role:?} openat");
            assert_eq!(under(role, fork_process), libc::EPERM, "{role:?} fork");
        }
    }

    #[test]
    fn only_the_switch_thread_makes_sockets_and_only_packet_and_unix_ones() {
        let got = under(Role::Switch, || {
            (
                new_socket(libc::AF_UNIX, libc::SOCK_STREAM),
                new_socket(libc::AF_INET, libc::SOCK_STREAM),
                new_socket(libc::AF_NETLINK, libc::SOCK_RAW),
                ioctl_request(SIOCGIFINDEX),
                ioctl_request(0x8914), // SIOCSIFFLAGS: no interface is reconfigured
                sigaction_of(libc::SIGSYS),
                sigaction_of(SIGSETXID as i32),
            )
        });
        assert_eq!(
            got,
            (
                0,
                libc::EPERM,
                libc::EPERM,
                libc::EBADF,
                libc::EPERM,
                libc::EPERM,
                0
            )
        );
        for role in [Role::VhostListener, Role::VhostWorker] {
            let got = under(role, || {
                (
                    new_socket(libc::AF_UNIX, libc::SOCK_STREAM),
                    ioctl_request(FIONBIO),
                )
            });
            assert_eq!(got, (libc::EPERM, libc::EPERM), "{role:?}");
        }
    }

    #[test]
    fn the_vring_worker_has_no_socket_calls_and_starts_no_thread() {
        let got = under(Role::VhostWorker, || {
            // SAFETY: recvmsg/sendto on fd -1: only the filter's answer matters.
            let recv = errno_of(unsafe { libc::recvmsg(-1, std::ptr::null_mut(), 0) as i64 });
            // SAFETY: as above.
            let send = errno_of(unsafe {
                libc::sendto(-1, std::ptr::null(), 0, 0, std::ptr::null(), 0) as i64
            });
            (recv, send, spawn_thread())
        });
        assert_eq!(got, (libc::EPERM, libc::EPERM, false));
        assert!(under(Role::VhostListener, spawn_thread));
        assert!(under(Role::Switch, spawn_thread));
    }
}
