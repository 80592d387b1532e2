//! The switch's threads and the system calls each may make (seccomp, through the
//! `sandbox` crate shared with `vireo`). A refused call ends the process with the
//! thread and the call named (status 159); `--seccomp false` turns filtering off,
//! `--seccomp log` lets everything through and logs to the kernel audit log.
//!
//! Filters stack (a thread keeps its starter's filter and adds its own): the opener
//! starts the listeners of ports added at run time, a listener starts the vhost-user
//! library's connection and vring worker threads. So a listener's list is within the
//! opener's, the worker's within the listener's. The switch thread, which parses every
//! frame, starts no thread and makes no socket: the opener does that for it.
//!
//! No thread opens a file (`openat` is on no list), starts a process or `execve`s.

use sandbox::{allow, arg_in, base_rules, ioctl_rules, Rules, ThreadRole};

pub use sandbox::{Filters, SeccompMode};

/// `SIOCGIFINDEX`: `if_nametoindex` for a port added through the control socket.
const SIOCGIFINDEX: u64 = 0x8933;
/// `FIONBIO`: std's `set_nonblocking` on control clients and sockets.
const FIONBIO: u64 = 0x5421;
/// `SIOCGIFFLAGS`: a team member's link state (read only).
const SIOCGIFFLAGS: u64 = 0x8913;
/// `SIOCETHTOOL`: a team member's carrier (the switch thread asks `ETHTOOL_GLINK`
/// only; the other ethtool commands that change a device need `CAP_NET_ADMIN`,
/// which the switch does not hold).
const SIOCETHTOOL: u64 = 0x8946;

/// What a thread of `vireo-switch` does, and so which filter it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The main thread (`vireo-switch`): the poll loop that receives and switches every
    /// frame (from AF_PACKET ports and from the vhost-user workers), sends them out and
    /// serves the control socket: receiving and sending on sockets it has, accepting
    /// control clients (`FIONBIO` on them), reading team members' link state
    /// (`SIOCGIFFLAGS`, `SIOCETHTOOL`), nothing else. No socket, bind, unlink, ioctl of any other
    /// kind, or thread: it asks the opener.
    Switch,
    /// The opener (`vireo-sw-open`): opens and removes ports for the switch thread:
    /// AF_PACKET and unix sockets only (`socket`'s family is checked), `bind`,
    /// `listen`, `connect`, `setsockopt`, `unlink`, `SIOCGIFINDEX`/`FIONBIO` ioctls;
    /// starts a vhost-user port's listener thread.
    Opener,
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
        &[
            Role::Switch,
            Role::Opener,
            Role::VhostListener,
            Role::VhostWorker,
        ]
    }

    fn spawns_threads(self) -> bool {
        matches!(self, Role::Opener | Role::VhostListener)
    }

    fn rules(self) -> Result<Rules, String> {
        let mut rules = base_rules(self.spawns_threads())?;
        match self {
            Role::Switch => {
                allow(&mut rules, SWITCH);
                rules.insert(
                    libc::SYS_ioctl,
                    ioctl_rules(&[FIONBIO, SIOCGIFFLAGS, SIOCETHTOOL])?,
                );
            }
            Role::Opener => {
                allow(&mut rules, LISTENER);
                allow(&mut rules, OPENER);
                rules.insert(
                    libc::SYS_socket,
                    arg_in(0, &[libc::AF_UNIX as u64, libc::AF_PACKET as u64])?,
                );
                rules.insert(libc::SYS_ioctl, ioctl_rules(&[SIOCGIFINDEX, FIONBIO])?);
            }
            Role::VhostListener => allow(&mut rules, LISTENER),
            Role::VhostWorker => {}
        }
        Ok(rules)
    }
}

/// The switch thread's socket calls: frames on the ports, the control socket's
/// clients.
const SWITCH: &[i64] = &[
    libc::SYS_recvmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_accept4,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// A vhost-user listener's and its connection thread's calls (which the opener, that
/// starts listeners at run time, allows too).
const LISTENER: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    // `vhost::Listener` removes its socket when the listener ends.
    libc::SYS_unlink,
];

/// The opener's own calls beyond the listener's: ports opened and removed.
const OPENER: &[i64] = &[
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_connect,
    libc::SYS_unlinkat,
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
    fn only_the_opener_makes_sockets_and_only_packet_and_unix_ones() {
        let got = under(Role::Opener, || {
            (
                new_socket(libc::AF_UNIX, libc::SOCK_STREAM),
                new_socket(libc::AF_PACKET, libc::SOCK_RAW),
                new_socket(libc::AF_INET, libc::SOCK_STREAM),
                new_socket(libc::AF_NETLINK, libc::SOCK_RAW),
                ioctl_request(SIOCGIFINDEX),
                ioctl_request(0x8914), // SIOCSIFFLAGS: no interface is reconfigured
            )
        });
        assert_eq!(
            got,
            (0, 0, libc::EPERM, libc::EPERM, libc::EBADF, libc::EPERM)
        );
        for role in [Role::Switch, Role::VhostListener, Role::VhostWorker] {
            let got = under(role, || new_socket(libc::AF_UNIX, libc::SOCK_STREAM));
            assert_eq!(got, libc::EPERM, "{role:?}");
        }
    }

    #[test]
    fn the_switch_thread_only_moves_frames_and_serves_clients() {
        let victim = tempfile::NamedTempFile::new().unwrap();
        let path = std::ffi::CString::new(victim.path().to_str().unwrap()).unwrap();
        let got = under(Role::Switch, move || {
            // SAFETY: recvfrom/bind on fd -1 and unlink of a valid C string: only the
            // filter's answer matters (EBADF: let through).
            unsafe {
                (
                    errno_of(libc::recvfrom(
                        -1,
                        std::ptr::null_mut(),
                        0,
                        0,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    ) as i64),
                    errno_of(libc::bind(-1, std::ptr::null(), 0).into()),
                    errno_of(libc::unlink(path.as_ptr()).into()),
                    ioctl_request(FIONBIO),
                    ioctl_request(SIOCGIFINDEX),
                    spawn_thread(),
                )
            }
        });
        assert_eq!(
            got,
            (
                libc::EBADF,
                libc::EPERM,
                libc::EPERM,
                libc::EBADF,
                libc::EPERM,
                false
            )
        );
        assert!(victim.path().exists());
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
        assert!(under(Role::Opener, spawn_thread));
    }
}
