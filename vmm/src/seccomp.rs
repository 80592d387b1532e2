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

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a thread does, and so which filter it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// The virtio-net worker: readv/writev on its tap (opened and configured with
    /// TUNSETIFF & co. before any filter, or by the control thread on reattach),
    /// epoll, interrupts.
    NetWorker,
    /// A vhost-user network device's link watcher (`vireo-vu-link`): it waits for the
    /// backend's socket to hang up, then connects to the same path again and replays
    /// the rings (unix sockets: socket, connect, sendmsg/recvmsg with fds; no files, no
    /// ioctls). Started by the control thread when the device is created.
    VhostUserLink,
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
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 12] = [
        ThreadKind::Control,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::Activator,
        ThreadKind::BlockWorker,
        ThreadKind::RngWorker,
        ThreadKind::ConsoleWorker,
        ThreadKind::BalloonWorker,
        ThreadKind::NetWorker,
        ThreadKind::VhostUserLink,
        ThreadKind::PageStream,
        ThreadKind::Receive,
    ];

    /// Whether threads of this kind start other threads.
    fn spawns_threads(self) -> bool {
        matches!(
            self,
            ThreadKind::Control | ThreadKind::Activator | ThreadKind::Receive
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SeccompMode {
    #[default]
    Enforce,
    Log,
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "true" | "on" | "enforce" => Ok(Self::Enforce),
            "log" => Ok(Self::Log),
            "false" | "off" => Ok(Self::Off),
            _ => Err(format!("--seccomp: expected true, false or log, got '{s}'")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {kind:?} seccomp filter: {reason}")]
    Build { kind: ThreadKind, reason: String },
    #[error("cannot install the {kind:?} seccomp filter: {source}")]
    Apply {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
}

mod ioctls;
use ioctls::{FIONBIO, KVM_GET_REGS, KVM_RUN, KVM_SIGNAL_MSI, TCGETS, TIOCGWINSZ};

/// Starting threads: `clone` with `CLONE_THREAD` (rules in [`rules_for`]), `clone3`
/// (answered ENOSYS by [`clone3_enosys`] before this filter allows it), and `seccomp`
/// for the new thread to add its own filter (filters only stack: it cannot widen).
const SPAWN: &[i64] = &[libc::SYS_clone3, libc::SYS_seccomp];

/// System calls every thread makes: memory, futexes, threads, time, signals, logging.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    // std's hash seeds; and on migration threads (which run under the Control filter)
    // rustls/ring's randomness for TLS handshakes and the page streams' session number.
    // TLS needs nothing else: it only reads and writes the sockets, and its PEM files
    // are read on the control thread when the migration is requested.
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    // A new thread's own set-up (std, glibc) and its name (also read by the
    // violation handler).
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    // Event loops and their eventfds.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
];

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

/// What the control thread needs beyond the rest: creating VMs (files, KVM, memory),
/// tearing them down, removing the API socket, writing and reading snapshots, opening
/// migration sockets and the destination disks of a storage migration.
///
/// Threads the control thread starts (migration threads, vCPUs, device workers on
/// resume and restore) inherit this filter — filters stack — so it also allows what
/// they need: migration sockets, disk rate-limit timers.
const CONTROL: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_lseek,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_flock,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
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

fn ioctls(requests: &[u64]) -> Result<Vec<SeccompRule>, String> {
    requests
        .iter()
        .map(|&r| {
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, r)
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// `clone` only when its flags (argument 0) include `CLONE_THREAD`: a thread of this
/// process, never a new process (fork, posix_spawn and vfork lack it).
fn clone_threads_only() -> Result<Vec<SeccompRule>, String> {
    let flag = libc::CLONE_THREAD as u64;
    SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(flag),
        flag,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map(|r| vec![r])
    .map_err(|e| e.to_string())
}

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

fn rules_for(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let allow = |rules: &mut BTreeMap<i64, Vec<SeccompRule>>, list: &[i64]| {
        for &s in list {
            rules.insert(s, Vec::new());
        }
    };
    allow(&mut rules, COMMON);
    if kind.spawns_threads() {
        allow(&mut rules, SPAWN);
        rules.insert(libc::SYS_clone, clone_threads_only()?);
    }
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
        ThreadKind::RngWorker | ThreadKind::NetWorker | ThreadKind::BalloonWorker => {
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
    }
    Ok(rules)
}

/// The filter stacked under every thread-starting thread's own: `clone3` fails with
/// ENOSYS (its flags live in memory a filter cannot read, so it cannot be limited to
/// threads), and glibc falls back to `clone`, whose flags the main filter checks.
fn clone3_enosys() -> Result<BpfProgram, String> {
    let mut rules = BTreeMap::new();
    rules.insert(libc::SYS_clone3, Vec::new());
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?;
    BpfProgram::try_from(f).map_err(|e| e.to_string())
}

/// Compiles the filter of `kind`.
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let build = |reason: String| SeccompError::Build { kind, reason };
    let rules = rules_for(kind).map_err(build)?;
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| build(e.to_string()))?;
    BpfProgram::try_from(f)
        .map(Some)
        .map_err(|e| build(e.to_string()))
}

/// A thread kind's programs, installed in order: the ENOSYS answer to `clone3` (for
/// thread-starting kinds), then the allowlist.
#[derive(Clone)]
struct Programs {
    clone3: Option<std::sync::Arc<BpfProgram>>,
    main: std::sync::Arc<BpfProgram>,
}

/// Every thread kind's filter, compiled once at start-up (so a bad filter is an
/// error at launch, not in a worker thread later).
#[derive(Clone, Default)]
pub struct Filters {
    programs: std::collections::HashMap<u8, Programs>,
}

impl Filters {
    pub fn new(mode: SeccompMode) -> Result<Self, SeccompError> {
        let mut programs = std::collections::HashMap::new();
        for kind in ThreadKind::ALL {
            if let Some(main) = filter(kind, mode)? {
                let clone3 = if kind.spawns_threads() && mode == SeccompMode::Enforce {
                    let p =
                        clone3_enosys().map_err(|reason| SeccompError::Build { kind, reason })?;
                    Some(std::sync::Arc::new(p))
                } else {
                    None
                };
                let main = std::sync::Arc::new(main);
                programs.insert(kind as u8, Programs { clone3, main });
            }
        }
        Ok(Self { programs })
    }

    /// Installs `kind`'s filter on the calling thread (nothing when filtering is off).
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let Some(p) = self.programs.get(&(kind as u8)) else {
            return Ok(());
        };
        let install = |prog: &BpfProgram| {
            seccompiler::apply_filter(prog).map_err(|source| SeccompError::Apply { kind, source })
        };
        if let Some(c) = &p.clone3 {
            install(c)?;
        }
        install(&p.main)
    }

    /// Like [`Filters::apply`] for threads that cannot return an error: a thread that
    /// cannot be confined does not run unconfined; the process ends.
    pub fn apply_or_exit(&self, kind: ThreadKind) {
        if let Err(e) = self.apply(kind) {
            eprintln!("vireo: error: {e}");
            std::process::exit(1);
        }
    }
}

/// Keeps glibc's allocator from opening files on filtered threads.
///
/// When a thread's malloc arena shrinks its heap, glibc reads
/// /proc/sys/vm/overcommit_memory (an `openat` that page streams, workers and the API
/// thread may not make: found by a TLS migration, whose page streams free large
/// frames). With a trim threshold above the largest per-thread heap (64 MiB), heaps are
/// never shrunk, only deleted whole (munmap, no file); the main arena no longer gives
/// its top back with brk either.
///
/// When a thread needs a new arena and there are already more than 8, glibc counts the
/// CPUs once for the process by reading /sys/devices/system/cpu/online: found when
/// page streams, started by the receive thread (no openat), were the first to get
/// there. With the arena limit set here (glibc's own default, 8 per CPU) it never
/// counts. Call before any thread starts.
pub fn keep_malloc_off_the_filesystem() {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let arenas = i32::try_from(cpus.saturating_mul(8)).unwrap_or(i32::MAX);
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

/// Names of the system calls a violation may name (`SYS_` stripped when printed);
/// any other is printed by number only.
macro_rules! syscall_names {
    ($($n:ident),* $(,)?) => {
        &[$((libc::$n, stringify!($n))),*]
    };
}
const SYSCALL_NAMES: &[(i64, &str)] = syscall_names![
    SYS_read,
    SYS_write,
    SYS_open,
    SYS_close,
    SYS_stat,
    SYS_fstat,
    SYS_lstat,
    SYS_poll,
    SYS_lseek,
    SYS_mmap,
    SYS_mprotect,
    SYS_munmap,
    SYS_brk,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_ioctl,
    SYS_pread64,
    SYS_pwrite64,
    SYS_readv,
    SYS_writev,
    SYS_access,
    SYS_pipe,
    SYS_select,
    SYS_mremap,
    SYS_madvise,
    SYS_dup,
    SYS_dup2,
    SYS_nanosleep,
    SYS_getpid,
    SYS_sendfile,
    SYS_socket,
    SYS_connect,
    SYS_accept,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_shutdown,
    SYS_bind,
    SYS_listen,
    SYS_getsockname,
    SYS_getpeername,
    SYS_socketpair,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_clone,
    SYS_fork,
    SYS_vfork,
    SYS_execve,
    SYS_exit,
    SYS_wait4,
    SYS_kill,
    SYS_uname,
    SYS_fcntl,
    SYS_flock,
    SYS_fsync,
    SYS_fdatasync,
    SYS_truncate,
    SYS_ftruncate,
    SYS_getdents64,
    SYS_getcwd,
    SYS_chdir,
    SYS_fchdir,
    SYS_rename,
    SYS_mkdir,
    SYS_rmdir,
    SYS_creat,
    SYS_link,
    SYS_unlink,
    SYS_symlink,
    SYS_readlink,
    SYS_chmod,
    SYS_fchmod,
    SYS_chown,
    SYS_fchown,
    SYS_umask,
    SYS_getrlimit,
    SYS_setrlimit,
    SYS_ptrace,
    SYS_getuid,
    SYS_setuid,
    SYS_setgid,
    SYS_setsid,
    SYS_setgroups,
    SYS_sigaltstack,
    SYS_mknod,
    SYS_statfs,
    SYS_fstatfs,
    SYS_prctl,
    SYS_chroot,
    SYS_mount,
    SYS_umount2,
    SYS_pivot_root,
    SYS_reboot,
    SYS_sethostname,
    SYS_init_module,
    SYS_gettid,
    SYS_tkill,
    SYS_futex,
    SYS_sched_setaffinity,
    SYS_sched_getaffinity,
    SYS_epoll_create,
    SYS_getdents,
    SYS_set_tid_address,
    SYS_timer_create,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_exit_group,
    SYS_epoll_wait,
    SYS_epoll_ctl,
    SYS_tgkill,
    SYS_mbind,
    SYS_openat,
    SYS_mkdirat,
    SYS_mknodat,
    SYS_fchownat,
    SYS_newfstatat,
    SYS_unlinkat,
    SYS_renameat,
    SYS_linkat,
    SYS_symlinkat,
    SYS_readlinkat,
    SYS_fchmodat,
    SYS_faccessat,
    SYS_ppoll,
    SYS_unshare,
    SYS_set_robust_list,
    SYS_splice,
    SYS_tee,
    SYS_epoll_pwait,
    SYS_timerfd_create,
    SYS_eventfd,
    SYS_fallocate,
    SYS_timerfd_settime,
    SYS_accept4,
    SYS_eventfd2,
    SYS_epoll_create1,
    SYS_dup3,
    SYS_pipe2,
    SYS_preadv,
    SYS_pwritev,
    SYS_prlimit64,
    SYS_name_to_handle_at,
    SYS_open_by_handle_at,
    SYS_setns,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_finit_module,
    SYS_renameat2,
    SYS_seccomp,
    SYS_getrandom,
    SYS_memfd_create,
    SYS_bpf,
    SYS_execveat,
    SYS_userfaultfd,
    SYS_statx,
    SYS_rseq,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_pidfd_open,
    SYS_clone3,
    SYS_openat2,
    SYS_pidfd_getfd,
    SYS_faccessat2,
];

/// The name of system call `nr` without its `SYS_` prefix, if known.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    SYSCALL_NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| name.trim_start_matches("SYS_"))
}

/// A line assembled in a fixed buffer, for the signal handler (no allocation).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == 0 || self.len == self.buf.len() {
                return;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    fn push_hex(&mut self, mut n: u64) {
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(n & 0xf) as usize];
            n >>= 4;
            if n == 0 {
                break;
            }
        }
        self.push(b"0x");
        self.push(&digits[i..]);
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// `vireo: error: seccomp: thread T made the forbidden system call NAME (NR); ...`,
/// with the request number of a refused `ioctl` (`ioctl (16) with request 0x5412`).
fn violation_line(thread: &[u8], nr: i64, arg1: u64) -> Line {
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"vireo: error: seccomp: thread ");
    line.push(thread);
    line.push(b" made the forbidden system call ");
    line.push(syscall_name(nr).unwrap_or("?").as_bytes());
    line.push(b" (");
    line.push_number(nr.max(0) as u64);
    line.push(b")");
    if nr == libc::SYS_ioctl {
        line.push(b" with request ");
        line.push_hex(arg1 & 0xffff_ffff);
    }
    line.push(b"; ending the process (run with --seccomp log to list them)\n");
    line
}

/// Installs the SIGSYS handler that reports a violation and ends the process.
pub fn install_violation_handler() {
    extern "C" fn on_sigsys(
        _: libc::c_int,
        info: *mut libc::siginfo_t,
        context: *mut libc::c_void,
    ) {
        // siginfo_t for SIGSYS: the system call number is the int at byte offset 24.
        // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers.
        let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
        // The registers at the refused call: its second argument is in RSI.
        // SAFETY: for SA_SIGINFO handlers the third argument is the interrupted
        // thread's ucontext_t, valid for the handler's duration.
        let arg1 = unsafe {
            (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RSI as usize]
        };
        let mut name = [0u8; 17];
        // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into the buffer; prctl
        // is allowed by every filter and async-signal-safe.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
        let line = violation_line(&name, i64::from(nr), arg1 as u64);
        // SAFETY: write(2) and _exit(2) are async-signal-safe.
        unsafe {
            libc::write(2, line.buf.as_ptr().cast(), line.len);
            libc::_exit(159);
        }
    }
    // SAFETY: a zeroed sigaction with a valid handler and SA_SIGINFO is well formed.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let f_rules = SeccompFilter::new(
            rules_for(kind).unwrap(),
            SeccompAction::Errno(libc::EPERM as u32),
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .unwrap();
        let prog = BpfProgram::try_from(f_rules).unwrap();
        let clone3 = kind.spawns_threads().then(|| clone3_enosys().unwrap());
        std::thread::spawn(move || {
            if let Some(c) = &clone3 {
                seccompiler::apply_filter(c).unwrap();
            }
            seccompiler::apply_filter(&prog).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    /// errno of a failed call (0 if it succeeded).
    fn errno_of(r: i64) -> i32 {
        if r < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    fn open_root() -> i32 {
        // SAFETY: openat of a valid C string; the fd is closed.
        let fd = unsafe { libc::openat(libc::AT_FDCWD, c"/".as_ptr(), libc::O_RDONLY) };
        let e = errno_of(fd.into());
        if fd >= 0 {
            // SAFETY: our own fd.
            unsafe { libc::close(fd) };
        }
        e
    }

    fn new_socket() -> i32 {
        // SAFETY: socket(2) with constant arguments; the fd is closed.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        let e = errno_of(fd.into());
        if fd >= 0 {
            // SAFETY: our own fd.
            unsafe { libc::close(fd) };
        }
        e
    }

    /// A new process by fork (clone without CLONE_THREAD); the child exits at once.
    fn fork_process() -> i32 {
        // SAFETY: the child only calls _exit; the parent reaps it.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: async-signal-safe exit of the forked child.
            unsafe { libc::_exit(0) };
        }
        if pid > 0 {
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        }
        errno_of(pid.into())
    }

    fn exec_true() -> i32 {
        let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: valid NUL-terminated argv/envp; it only returns on failure (if it
        // succeeded the test process would be replaced and the test fail).
        let r = unsafe { libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        errno_of(r.into())
    }

    fn spawn_thread() -> bool {
        std::thread::Builder::new()
            .spawn(|| 7)
            .map(|t| t.join().unwrap() == 7)
            .unwrap_or(false)
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

    #[test]
    fn only_the_control_thread_opens_files_and_sockets() {
        for kind in ThreadKind::ALL {
            let (open, socket) = under(kind, || (open_root(), new_socket()));
            let want = if kind == ThreadKind::Control {
                0
            } else {
                libc::EPERM
            };
            assert_eq!(open, want, "{kind:?} openat");
            // The vhost-user link watcher connects again to a restarted backend (a unix
            // socket); it still opens no file.
            let want_socket = if kind == ThreadKind::VhostUserLink {
                0
            } else {
                want
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

    /// An ioctl with a request number only: the filter answers before any driver,
    /// so EPERM is the filter's refusal and EBADF (fd -1) means it was let through.
    fn ioctl_request(request: u64) -> i32 {
        // SAFETY: fd -1 makes the kernel fail the call before touching the pointer.
        let r = unsafe { libc::ioctl(-1, request as _, std::ptr::null_mut::<u8>()) };
        errno_of(r.into())
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

    #[test]
    fn a_violation_names_the_thread_and_the_system_call() {
        let line = violation_line(b"vireo-vcpu0\0\0\0", libc::SYS_openat, 0x5412);
        let text = std::str::from_utf8(&line.buf[..line.len]).unwrap();
        assert_eq!(
            text,
            "vireo: error: seccomp: thread vireo-vcpu0 made the forbidden system call \
             openat (257); ending the process (run with --seccomp log to list them)\n"
        );
        let line = violation_line(b"vireo\0", libc::SYS_ioctl, 0xffff_ffff_0000_5412);
        let text = std::str::from_utf8(&line.buf[..line.len]).unwrap();
        assert!(
            text.contains("forbidden system call ioctl (16) with request 0x5412; ending"),
            "{text}"
        );
        assert_eq!(syscall_name(libc::SYS_execve), Some("execve"));
        assert_eq!(syscall_name(100_000), None);
    }
}
