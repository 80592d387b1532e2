//! Seccomp filters: every thread of `vireo` runs under an allowlist of the system
//! calls its job needs (seccompiler), as in Firecracker and Cloud Hypervisor.
//!
//! A call outside the list raises SIGSYS; the handler prints the thread and the
//! system call number on stderr and ends the process (status 159 = 128 + SIGSYS), so a
//! missing entry is found at once, never hidden. `--seccomp false` turns filtering off
//! for debugging; `--seccomp log` lets everything through but logs violations to the
//! kernel audit log.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a thread does, and so which filter it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    /// The main thread: the control loop, which also creates and tears down VMs.
    Control,
    /// A vCPU: KVM_RUN and device emulation on exits (which may activate devices and
    /// so start worker threads).
    Vcpu,
    /// The REST API server.
    Api,
    /// A virtio-blk queue worker: disk I/O and interrupts.
    BlockWorker,
    /// The virtio-rng worker.
    RngWorker,
    /// The virtio-console worker: terminal or file I/O.
    ConsoleWorker,
    /// The virtio-net worker: readv/writev on its tap (opened and configured with
    /// TUNSETIFF & co. before any filter, or by the control thread on reattach),
    /// epoll, interrupts.
    NetWorker,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Control,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::BlockWorker,
        ThreadKind::RngWorker,
        ThreadKind::ConsoleWorker,
        ThreadKind::NetWorker,
    ];
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

// ioctl request numbers the restricted threads may use.
#[cfg(test)]
mod ioctl_numbers {
    #[test]
    fn computed_numbers_match_the_kernel_headers() {
        // From <linux/kvm.h> on x86_64.
        assert_eq!(
            super::kvm_ior::<kvm_bindings::kvm_regs>(0x81),
            super::KVM_GET_REGS
        );
        assert_eq!(super::VCPU_SAVE_IOCTLS[0], 0x8138_ae83); // KVM_GET_SREGS
        assert_eq!(super::VCPU_SAVE_IOCTLS[1], 0xc008_ae88); // KVM_GET_MSRS
        assert_eq!(super::VCPU_SAVE_IOCTLS[6], 0x9000_aea4); // KVM_GET_XSAVE
    }
}
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_SIGNAL_MSI: u64 = 0x4020_aea5;
/// `_IOR(KVMIO, nr, T)` and `_IOWR(KVMIO, nr, T)`.
const fn kvm_ior<T>(nr: u64) -> u64 {
    (2 << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (0xae << 8) | nr
}
const fn kvm_iowr<T>(nr: u64) -> u64 {
    (3 << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (0xae << 8) | nr
}
/// What a paused vCPU thread reads to save its own state (snapshot, migration).
const VCPU_SAVE_IOCTLS: [u64; 8] = [
    kvm_ior::<kvm_bindings::kvm_sregs>(0x83),
    kvm_iowr::<kvm_bindings::kvm_msrs>(0x88),
    kvm_ior::<kvm_bindings::kvm_lapic_state>(0x8e),
    kvm_ior::<kvm_bindings::kvm_mp_state>(0x98),
    kvm_ior::<kvm_bindings::kvm_vcpu_events>(0x9f),
    kvm_ior::<kvm_bindings::kvm_debugregs>(0xa1),
    kvm_ior::<kvm_bindings::kvm_xsave>(0xa4),
    kvm_ior::<kvm_bindings::kvm_xcrs>(0xa6),
];
const TCGETS: u64 = 0x5401;
const TIOCGWINSZ: u64 = 0x5413;
const FIONBIO: u64 = 0x5421;

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
    // Starting threads (device activation, std's thread set-up).
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    // A thread started by a filtered thread adds its own (stricter) filter; filters
    // only ever stack, so allowing this cannot widen anything.
    libc::SYS_seccomp,
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
/// tearing them down, removing the API socket, writing and reading snapshots.
///
/// Threads the control thread starts (migration threads, and vCPUs of a VM created
/// through the API) inherit this filter — filters stack — so it also allows what they
/// need: migration sockets, disk rate-limit timers.
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
    libc::SYS_ioctl,
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

fn rules_for(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let allow = |rules: &mut BTreeMap<i64, Vec<SeccompRule>>, list: &[i64]| {
        for &s in list {
            rules.insert(s, Vec::new());
        }
    };
    allow(&mut rules, COMMON);
    match kind {
        ThreadKind::Control => {
            allow(&mut rules, DISK_IO);
            allow(&mut rules, SOCKETS);
            allow(&mut rules, CONTROL);
        }
        ThreadKind::Vcpu => {
            // Serial output to a file; flushing disks when a device is reset; a disk's
            // rate-limit timer when the driver activates it. Device workers are spawned
            // by the vCPU that activates them and inherit this filter (filters stack),
            // so what a worker needs must be allowed here too.
            allow(&mut rules, DISK_IO);
            allow(
                &mut rules,
                &[libc::SYS_timerfd_create, libc::SYS_timerfd_settime],
            );
            let mut allowed = vec![KVM_RUN, KVM_GET_REGS, KVM_SIGNAL_MSI, TCGETS, TIOCGWINSZ];
            allowed.extend(VCPU_SAVE_IOCTLS);
            rules.insert(libc::SYS_ioctl, ioctls(&allowed)?);
        }
        ThreadKind::Api => {
            allow(&mut rules, SOCKETS);
            rules.insert(libc::SYS_ioctl, ioctls(&[FIONBIO])?);
        }
        ThreadKind::BlockWorker => {
            allow(&mut rules, DISK_IO);
            allow(&mut rules, &[libc::SYS_timerfd_settime]);
            rules.insert(libc::SYS_ioctl, ioctls(&[KVM_SIGNAL_MSI])?);
        }
        ThreadKind::RngWorker | ThreadKind::NetWorker => {
            rules.insert(libc::SYS_ioctl, ioctls(&[KVM_SIGNAL_MSI])?);
        }
        ThreadKind::ConsoleWorker => {
            allow(&mut rules, &[libc::SYS_pwrite64, libc::SYS_fsync]);
            rules.insert(
                libc::SYS_ioctl,
                ioctls(&[KVM_SIGNAL_MSI, TCGETS, TIOCGWINSZ])?,
            );
        }
    }
    Ok(rules)
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

/// Installs the filter of `kind` on the calling thread.
pub fn apply(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    if let Some(prog) = filter(kind, mode)? {
        seccompiler::apply_filter(&prog).map_err(|source| SeccompError::Apply { kind, source })?;
    }
    Ok(())
}

/// Every thread kind's filter, compiled once at start-up (so a bad filter is an
/// error at launch, not in a worker thread later).
#[derive(Clone, Default)]
pub struct Filters {
    programs: std::collections::HashMap<u8, std::sync::Arc<BpfProgram>>,
}

impl Filters {
    pub fn new(mode: SeccompMode) -> Result<Self, SeccompError> {
        let mut programs = std::collections::HashMap::new();
        for kind in ThreadKind::ALL {
            if let Some(p) = filter(kind, mode)? {
                programs.insert(kind as u8, std::sync::Arc::new(p));
            }
        }
        Ok(Self { programs })
    }

    /// Installs `kind`'s filter on the calling thread (nothing when filtering is off).
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        match self.programs.get(&(kind as u8)) {
            Some(p) => {
                seccompiler::apply_filter(p).map_err(|source| SeccompError::Apply { kind, source })
            }
            None => Ok(()),
        }
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

/// Installs the SIGSYS handler that reports a violation and ends the process.
pub fn install_violation_handler() {
    extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // siginfo_t for SIGSYS: the system call number is the int at byte offset 24.
        // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers.
        let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
        let mut msg = *b"vireo: error: seccomp: blocked system call 0000 (run with --seccomp log to list them)\n";
        let mut n = nr.max(0) as u32;
        for i in (0..4).rev() {
            msg[43 + i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        // SAFETY: write(2) and _exit(2) are async-signal-safe.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
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
    }

    #[test]
    fn a_filtered_thread_cannot_open_files() {
        // The API filter has no openat: the call gets SIGSYS... which we turn into
        // EPERM here (Errno action) to observe it without ending the test process.
        let rules = rules_for(ThreadKind::Api).unwrap();
        let f = SeccompFilter::new(
            rules,
            SeccompAction::Errno(libc::EPERM as u32),
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .unwrap();
        let prog = BpfProgram::try_from(f).unwrap();
        let r = std::thread::spawn(move || {
            seccompiler::apply_filter(&prog).unwrap();
            std::fs::File::open("/etc/hostname")
                .map(|_| ())
                .map_err(|e| e.raw_os_error())
        })
        .join()
        .unwrap();
        assert_eq!(r, Err(Some(libc::EPERM)));
    }
}
