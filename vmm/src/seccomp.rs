//! Seccomp filters: every thread of `vireo` runs under an allowlist of the system
//! calls its job needs (seccompiler), as in Firecracker and Cloud Hypervisor.
//!
//! A call outside the list raises SIGSYS; the handler prints the thread's name and the
//! system call's name and number on stderr and ends the process (status 159 = 128 +
//! SIGSYS), so a missing entry is found at once, never hidden. `--seccomp false` turns
//! filtering off for debugging; `--seccomp log` lets everything through but logs
//! violations to the kernel audit log.
//!
//! Filters stack: a thread keeps the filter of the thread that started it and adds its
//! own, and the kernel applies the stricter answer. So only the threads that start
//! others (control, activator) allow `clone`, and then only with `CLONE_THREAD` (a
//! thread, never a process); `clone3`, whose flags a filter cannot read, fails with
//! ENOSYS on every thread (glibc then falls back to `clone`). No thread may `execve`.
//!
//! The machinery (compiling, installing, the violation report, the rules every thread
//! shares) is the `sandbox` crate's, shared with `vireo-switch`; the roles and their
//! allowlists are here.

use sandbox::{allow, base_rules, ioctl_rules as ioctls, Rules};
pub use sandbox::{keep_malloc_off_the_filesystem, syscall_name, SeccompError, SeccompMode};

/// What a thread does, and so which filter it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ThreadKind {
    /// The main thread: the control loop, which also creates and tears down VMs. The
    /// migration send thread, the storage copy thread and the thread accepting
    /// migration connections run under it too. It also builds an arriving VM (KVM, its
    /// disks, taps) for the receive thread.
    Control,
    /// A vCPU: KVM_RUN and device emulation on exits. Device activation and reset,
    /// which start and stop worker threads, open timers and flush disks, run on the
    /// activator instead, so a vCPU can neither start threads nor touch disks.
    Vcpu,
    /// The REST API server.
    Api,
    /// Activates and resets devices for the vCPUs (`vireo-activate`): it starts the
    /// device workers, which add their own filters on top of this one.
    Activator,
    /// A virtio-blk queue worker: disk I/O and interrupts.
    BlockWorker,
    /// The virtio-rng worker.
    RngWorker,
    /// The virtio-console worker: terminal or file I/O.
    ConsoleWorker,
    /// The virtio-balloon worker: madvise(MADV_DONTNEED) on guest memory the guest
    /// gives back (in COMMON), epoll, interrupts.
    BalloonWorker,
    /// The virtio-mem worker: madvise(MADV_DONTNEED) on blocks the guest unplugs (in
    /// COMMON), epoll, interrupts.
    MemWorker,
    /// The virtio-net worker: readv/writev on its tap (opened and configured with
    /// TUNSETIFF & co. before any filter, or by the control thread on reattach),
    /// epoll, interrupts.
    NetWorker,
    /// A vhost-user network device's link watcher (`vireo-vu-link`): it waits for the
    /// backend's socket to hang up, then connects to the same path again and replays
    /// the rings (unix sockets: socket, connect, sendmsg/recvmsg with fds; no files, no
    /// ioctls). Started by the control thread when the device is created.
    VhostUserLink,
    /// A vfio-user device's interrupt forwarder (`vireo-vfu-irq`): it waits on the
    /// eventfds the server signals and delivers MSI-X messages (epoll, read,
    /// KVM_SIGNAL_MSI). Started by the control thread when the device is created.
    UserDeviceIrq,
    /// A live migration page stream (`vireo-mig-in*`, `vireo-mig-out*`): it parses or
    /// writes the network stream and copies pages through the guest memory mapping;
    /// no files, no ioctls, no new sockets.
    PageStream,
    /// The migration receive thread (`vireo-migrate-recv`): it parses the control
    /// stream, writes pages into guest memory and blocks into the disks opened for it,
    /// and starts the page streams. No files, sockets or ioctls: the control thread
    /// opens /dev/kvm, disks and taps and restores the VM for it
    /// (`live::receive::on_control`).
    Receive,
    /// The file thread (`vireo-files`, [`crate::file_broker`]): the only thread that
    /// opens, creates, renames or removes files once the VMM runs. It serves named jobs
    /// of the control thread and its helpers; no `ioctl`, no sockets, no threads.
    Files,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 15] = [
        ThreadKind::Control,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::Activator,
        ThreadKind::BlockWorker,
        ThreadKind::RngWorker,
        ThreadKind::ConsoleWorker,
        ThreadKind::BalloonWorker,
        ThreadKind::MemWorker,
        ThreadKind::NetWorker,
        ThreadKind::VhostUserLink,
        ThreadKind::UserDeviceIrq,
        ThreadKind::PageStream,
        ThreadKind::Receive,
        ThreadKind::Files,
    ];

    /// Whether threads of this kind start other threads.
    fn spawns_threads(self) -> bool {
        matches!(
            self,
            ThreadKind::Control | ThreadKind::Activator | ThreadKind::Receive
        )
    }
}

impl sandbox::ThreadRole for ThreadKind {
    fn all() -> &'static [Self] {
        &Self::ALL
    }

    fn spawns_threads(self) -> bool {
        ThreadKind::spawns_threads(self)
    }

    fn rules(self) -> Result<Rules, String> {
        rules_for(self)
    }
}

/// Every thread kind's filter, compiled once at start-up.
pub type Filters = sandbox::Filters<ThreadKind>;

/// Compiles the filter of `kind`.
pub fn filter(
    kind: ThreadKind,
    mode: SeccompMode,
) -> Result<Option<seccompiler::BpfProgram>, SeccompError> {
    sandbox::filter(kind, mode)
}

/// Installs the SIGSYS handler that reports a violation (as `vireo`) and ends the
/// process.
pub fn install_violation_handler() {
    sandbox::install_violation_handler("vireo");
}

mod ioctls;
use ioctls::{FIONBIO, KVM_GET_REGS, KVM_RUN, KVM_SIGNAL_MSI, TCGETS, TIOCGWINSZ};

const DISK_IO: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
];

/// Sockets. The migration threads use `shutdown` to cut their streams from another
/// thread (a failed page stream ends the others at once) and `poll` to wait for page
/// streams with a time limit.
const SOCKETS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// What the control thread needs beyond the rest: creating VMs (KVM, memory, the
/// descriptors the file thread opened for it), tearing them down, opening migration
/// sockets. No `openat`, `mkdir`, `unlink` or `rename`: files are opened, created and
/// removed by the file thread (`vireo-files`, [`FILES`]).
///
/// Threads the control thread starts (migration threads, vCPUs, device workers on
/// resume and restore) inherit this filter — filters stack — so it also allows what
/// they need: migration sockets, disk rate-limit timers.
const CONTROL: &[i64] = &[
    libc::SYS_lseek,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    // Disk locks are dropped and taken again on a migration's hand-over.
    libc::SYS_flock,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_uname,
    libc::SYS_getcwd,
    libc::SYS_sysinfo,
    libc::SYS_rt_sigaction,
    // Virtual NUMA: binding a node's guest memory to its host node (at VM creation,
    // which a restore or an incoming migration does after the filters are in).
    libc::SYS_mbind,
    // `--memory shared=on`: one memfd per RAM region (sealed with fcntl).
    libc::SYS_memfd_create,
];

/// The file thread's calls beyond COMMON: open (beneath a root with `openat2`), make
/// directories, remove and rename (snapshot files, change-log segments, images), list
/// and lock, and the reads and writes of what it opens (snapshot memory, image
/// headers). No `ioctl`, no socket, no `clone`.
const FILES: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_flock,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_getcwd,
];

/// What the device workers need, which the thread that starts them (the activator)
/// must allow too, since they run under its filter as well as their own.
const WORKER_IOCTLS: [u64; 3] = [KVM_SIGNAL_MSI, TCGETS, TIOCGWINSZ];

/// Every ioctl the control thread makes, and the threads it starts (vCPUs, device
/// workers, migration threads: they run under its filter too): KVM's system, VM and
/// vCPU requests, taps, terminals, non-blocking sockets, PAGEMAP_SCAN on its own
/// pagemap. No block-device, terminal-
/// input, or other driver's request.
fn control_ioctls() -> Vec<u64> {
    let mut all = vec![KVM_RUN, KVM_GET_REGS, TCGETS, TIOCGWINSZ, FIONBIO];
    all.extend(ioctls::KVM_SYSTEM);
    all.extend(ioctls::KVM_VM);
    all.extend(ioctls::KVM_VCPU_SAVE);
    all.extend(ioctls::KVM_VCPU_SETUP);
    all.extend(ioctls::TAP);
    all.push(ioctls::PAGEMAP_SCAN);
    all.sort_unstable();
    all.dedup();
    all
}

fn rules_for(kind: ThreadKind) -> Result<Rules, String> {
    let mut rules = base_rules(kind.spawns_threads())?;
    match kind {
        ThreadKind::Control => {
            allow(&mut rules, DISK_IO);
            allow(&mut rules, SOCKETS);
            allow(&mut rules, CONTROL);
            rules.insert(libc::SYS_ioctl, ioctls(&control_ioctls())?);
        }
        ThreadKind::Vcpu => {
            // Emulation only: serial output (write), interrupts, its own state.
            // The serial port's output file is size-capped (devices::output::RotatingFile):
            // it writes at an offset and, when full, copies itself to PATH.1 and empties
            // itself (pwrite64, pread64, ftruncate on the fds opened at start; no fsync).
            allow(
                &mut rules,
                &[libc::SYS_pwrite64, libc::SYS_pread64, libc::SYS_ftruncate],
            );
            // vfio-user BAR accesses are requests on the device's socket, which the
            // control thread connected: send and receive (std's socket reads are
            // recvfrom), no new sockets.
            allow(&mut rules, &[libc::SYS_sendto, libc::SYS_recvfrom]);
            let mut allowed = vec![KVM_RUN, KVM_GET_REGS, KVM_SIGNAL_MSI, TCGETS, TIOCGWINSZ];
            allowed.extend(ioctls::KVM_VCPU_SAVE);
            rules.insert(libc::SYS_ioctl, ioctls(&allowed)?);
        }
        ThreadKind::Api => {
            allow(&mut rules, SOCKETS);
            rules.insert(libc::SYS_ioctl, ioctls(&[FIONBIO])?);
        }
        ThreadKind::Activator => {
            // Flushing a disk on reset, a disk's rate-limit timer on activation; and
            // everything its workers need.
            allow(&mut rules, DISK_IO);
            allow(
                &mut rules,
                &[libc::SYS_timerfd_create, libc::SYS_timerfd_settime],
            );
            // vhost-user network devices: the rings are sent to the backend (memfds
            // and eventfds as SCM_RIGHTS) on the socket the control thread connected.
            allow(&mut rules, &[libc::SYS_sendmsg, libc::SYS_recvmsg]);
            rules.insert(libc::SYS_ioctl, ioctls(&WORKER_IOCTLS)?);
        }
        ThreadKind::BlockWorker => {
            allow(&mut rules, DISK_IO);
            allow(&mut rules, &[libc::SYS_timerfd_settime]);
            rules.insert(libc::SYS_ioctl, ioctls(&[KVM_SIGNAL_MSI])?);
        }
        ThreadKind::RngWorker
        | ThreadKind::NetWorker
        | ThreadKind::BalloonWorker
        | ThreadKind::MemWorker
        | ThreadKind::UserDeviceIrq => {
            rules.insert(libc::SYS_ioctl, ioctls(&[KVM_SIGNAL_MSI])?);
        }
        ThreadKind::ConsoleWorker => {
            // pread64 and ftruncate: rotating a size-capped output file
            // (devices::output::RotatingFile).
            allow(
                &mut rules,
                &[
                    libc::SYS_pwrite64,
                    libc::SYS_fsync,
                    libc::SYS_pread64,
                    libc::SYS_ftruncate,
                ],
            );
            rules.insert(libc::SYS_ioctl, ioctls(&WORKER_IOCTLS)?);
        }
        ThreadKind::PageStream => {
            allow(&mut rules, SOCKETS);
        }
        ThreadKind::VhostUserLink => {
            allow(&mut rules, SOCKETS);
            allow(&mut rules, &[libc::SYS_socket, libc::SYS_connect]);
        }
        ThreadKind::Receive => {
            // The streams it was handed, and writes and flushes of the disks the
            // control thread opened for a shared-nothing migration.
            allow(&mut rules, SOCKETS);
            allow(&mut rules, DISK_IO);
        }
        ThreadKind::Files => {
            allow(&mut rules, FILES);
            allow(&mut rules, DISK_IO);
        }
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox::probe::{
        errno_of, exec_true, fork_process, ioctl_request, open_root, spawn_thread,
    };

    fn new_socket() -> i32 {
        sandbox::probe::new_socket(libc::AF_UNIX, libc::SOCK_STREAM)
    }

    #[test]
    fn every_filter_compiles() {
        for kind in ThreadKind::ALL {
            assert!(filter(kind, SeccompMode::Enforce).unwrap().is_some());
        }
        assert!(filter(ThreadKind::Vcpu, SeccompMode::Off)
            .unwrap()
            .is_none());
        assert!(Filters::new(SeccompMode::Enforce).is_ok());
    }

    /// Runs `f` on a new thread under `kind`'s rules, with EPERM in place of SIGSYS so
    /// that a refused call is observed without ending the test process.
    fn under<R: Send + 'static>(kind: ThreadKind, f: impl FnOnce() -> R + Send + 'static) -> R {
        sandbox::run_under_errno(kind, f).unwrap()
    }

    fn timer() -> i32 {
        // SAFETY: timerfd_create with constant arguments; the fd is closed.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, 0) };
        let e = errno_of(fd.into());
        if fd >= 0 {
            // SAFETY: our own fd.
            unsafe { libc::close(fd) };
        }
        e
    }

    fn ioctl_on_stdin(request: u64) -> i32 {
        let mut buf = [0u8; 4096];
        // SAFETY: an ioctl on fd 0 with a zeroed buffer big enough for any request
        // tried here; the call's outcome is all that is checked.
        let r = unsafe { libc::ioctl(0, request as _, buf.as_mut_ptr()) };
        errno_of(r.into())
    }

    #[test]
    fn no_thread_can_start_a_process_or_exec() {
        for kind in ThreadKind::ALL {
            assert_eq!(under(kind, fork_process), libc::EPERM, "{kind:?} fork");
            assert_eq!(under(kind, exec_true), libc::EPERM, "{kind:?} execve");
        }
    }

    /// mkdir, rename, unlink in a fresh directory under `kind`: their errnos.
    fn mkdir_rename_unlink(kind: ThreadKind) -> [i32; 3] {
        let dir = tempfile::tempdir().unwrap();
        let c = |p: std::path::PathBuf| std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let (made, from, to) = (
            c(dir.path().join("d")),
            c(dir.path().join("f")),
            c(dir.path().join("g")),
        );
        under(kind, move || {
            // SAFETY: mkdir, rename and unlink of valid C strings in a temporary directory.
            unsafe {
                [
                    errno_of(libc::mkdir(made.as_ptr(), 0o700).into()),
                    errno_of(libc::rename(from.as_ptr(), to.as_ptr()).into()),
                    errno_of(libc::unlink(to.as_ptr()).into()),
                ]
            }
        })
    }

    #[test]
    fn the_file_thread_makes_and_removes_files_but_no_socket_ioctl_or_thread() {
        assert_eq!(mkdir_rename_unlink(ThreadKind::Files), [0; 3]);
        assert_eq!(mkdir_rename_unlink(ThreadKind::Control), [libc::EPERM; 3]);
        let got = under(ThreadKind::Files, || {
            (
                new_socket(),
                ioctl_request(ioctls::KVM_CREATE_VM),
                ioctl_request(FIONBIO),
                ioctl_request(0x5412), // TIOCSTI
                spawn_thread(),
            )
        });
        assert_eq!(
            (got.0, got.1, got.2, got.3),
            (libc::EPERM, libc::EPERM, libc::EPERM, libc::EPERM),
            "socket, KVM_CREATE_VM, FIONBIO, TIOCSTI"
        );
        assert!(!got.4, "the file thread starts no thread");
    }

    #[test]
    fn only_the_file_thread_opens_files_and_the_control_thread_makes_sockets() {
        for kind in ThreadKind::ALL {
            let (open, socket) = under(kind, || (open_root(), new_socket()));
            let want_open = if kind == ThreadKind::Files {
                0
            } else {
                libc::EPERM
            };
            assert_eq!(open, want_open, "{kind:?} openat");
            // Migration sockets are the control thread's; the vhost-user link watcher
            // connects again to a restarted backend (a unix socket). The file thread
            // makes none.
            let want_socket = if matches!(kind, ThreadKind::Control | ThreadKind::VhostUserLink) {
                0
            } else {
                libc::EPERM
            };
            assert_eq!(socket, want_socket, "{kind:?} socket");
        }
    }

    #[test]
    fn only_control_and_activator_start_threads_through_the_clone_fallback() {
        for kind in ThreadKind::ALL {
            assert_eq!(under(kind, spawn_thread), kind.spawns_threads(), "{kind:?}");
        }
        // clone3 itself is answered ENOSYS (glibc then used clone, as above).
        let e = under(ThreadKind::Control, || {
            // SAFETY: clone3 with a null argument fails before doing anything.
            let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) };
            errno_of(r)
        });
        assert_eq!(e, libc::ENOSYS);
    }

    #[test]
    fn the_vcpu_has_no_disk_timer_or_foreign_ioctl() {
        let (timerfd, fsync, tun) = under(ThreadKind::Vcpu, || {
            // SAFETY: fsync of stdin: only the filter's answer matters.
            let fsync = errno_of(unsafe { libc::fsync(0) }.into());
            (timer(), fsync, ioctl_on_stdin(0x4004_54ca)) // TUNSETIFF
        });
        assert_eq!(
            (timerfd, fsync, tun),
            (libc::EPERM, libc::EPERM, libc::EPERM)
        );
        // The activator, which starts block workers, may create their timers.
        assert_eq!(under(ThreadKind::Activator, timer), 0);
    }

    #[test]
    fn the_control_thread_makes_only_its_own_ioctls() {
        let allowed = control_ioctls();
        // What it may make: KVM's system, VM and vCPU requests, taps, terminals.
        for request in [
            ioctls::KVM_CREATE_VM, // vm.create, vm.restore, an incoming migration
            KVM_RUN,
            KVM_SIGNAL_MSI,
            ioctls::KVM_VM[1], // KVM_GET_DIRTY_LOG
            ioctls::TAP[0],    // TUNSETIFF
            TCGETS,
            FIONBIO,
        ] {
            assert!(allowed.contains(&request), "{request:#x}");
        }
        let got = under(ThreadKind::Control, move || {
            let lets_through: Vec<i32> = allowed.iter().map(|&r| ioctl_request(r)).collect();
            let refused = [
                0x5412,        // TIOCSTI: type into a terminal
                0x1277,        // BLKDISCARD
                0xc00c_aee0,   // KVM_CREATE_DEVICE
                0x4080_aebf,   // KVM_SET_NESTED_STATE
                0x4004_54cb,   // TUNSETPERSIST
                0x5451,        // FIOCLEX: not used (fds are opened O_CLOEXEC)
                0x1_0000_ae80, // KVM_RUN in the low 32 bits only counts as KVM_RUN
            ]
            .map(ioctl_request);
            (lets_through, refused)
        });
        assert!(got.0.iter().all(|&e| e == libc::EBADF), "{:?}", got.0);
        assert_eq!(got.1[..6], [libc::EPERM; 6]);
        // The kernel reads the request as a 32-bit int: so does the filter.
        assert_eq!(got.1[6], libc::EBADF);
    }

    #[test]
    fn the_receive_thread_only_reads_streams_and_writes_disks_it_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("disk")).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"x").unwrap();
        let path = std::ffi::CString::new(victim.to_str().unwrap()).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let got = under(ThreadKind::Receive, move || {
            // SAFETY: pwrite64 from a live buffer to our own fd.
            let write = unsafe { libc::pwrite64(fd, b"data".as_ptr().cast(), 4, 0) };
            // SAFETY: unlink of a valid C string.
            let unlink = errno_of(unsafe { libc::unlink(path.as_ptr()) }.into());
            (
                write,
                open_root(),
                new_socket(),
                ioctl_request(ioctls::KVM_CREATE_VM),
                ioctl_request(KVM_RUN),
                ioctl_request(FIONBIO),
                unlink,
                timer(),
                spawn_thread(),
            )
        });
        assert_eq!(got.0, 4, "writes a disk it was handed");
        let refused = [got.1, got.2, got.3, got.4, got.5, got.6, got.7];
        assert_eq!(
            refused,
            [libc::EPERM; 7],
            "openat socket ioctl*3 unlink timerfd"
        );
        assert!(got.8, "starts its page stream threads");
        assert!(victim.exists());
        drop(file);
    }

    /// Found by the four-connection migration: a thread started by a thread without
    /// openat (the receive thread starting page streams) was killed for glibc reading
    /// /sys/devices/system/cpu/online as it made its ninth malloc arena. Run in a child
    /// process (this test binary again) with the real filter and violation handler:
    /// 32 threads alive at once, each allocating, must not end it.
    #[test]
    fn threads_started_under_a_filter_without_openat_never_make_malloc_open_a_file() {
        const CHILD: &str = "VIREO_TEST_ARENA_CHILD";
        if std::env::var_os(CHILD).is_some() {
            keep_malloc_off_the_filesystem();
            install_violation_handler();
            Filters::new(SeccompMode::Enforce)
                .unwrap()
                .apply(ThreadKind::Receive)
                .unwrap();
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(32));
            let threads: Vec<_> = (0..32)
                .map(|i| {
                    let b = barrier.clone();
                    std::thread::spawn(move || {
                        let v = vec![i as u8; 4096 * (i + 1)];
                        b.wait();
                        v.iter().map(|&x| u64::from(x)).sum::<u64>()
                    })
                })
                .collect();
            let sum: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
            assert!(sum > 0);
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "seccomp::tests::threads_started_under_a_filter_without_openat_never_make_malloc_open_a_file",
                "--exact",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{:?}: {err}", out.status);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "the child ran the test"
        );
    }

    #[test]
    fn page_streams_make_no_ioctl() {
        let e = under(ThreadKind::PageStream, || ioctl_on_stdin(KVM_SIGNAL_MSI));
        assert_eq!(e, libc::EPERM);
    }
}
