//! Per-thread seccomp filters (seccompiler), as in Firecracker and Cloud Hypervisor:
//! each program names its threads' roles ([`ThreadRole`]) and their allowlists; this
//! module compiles them once at start-up ([`Filters`]) and installs one on a thread.
//!
//! A call outside the list raises SIGSYS (see [`crate::violation`]). Filters stack: a
//! thread keeps the filter of the thread that started it and adds its own, and the
//! kernel applies the stricter answer. So only roles that start threads allow
//! `clone`, and then only with `CLONE_THREAD` (a thread, never a process); `clone3`,
//! whose flags a filter cannot read, fails with ENOSYS (glibc then falls back to
//! `clone`). No role may `execve`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// A filter's allowlist: system call number to the rules of which one must match (an
/// empty list: any arguments).
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// What a thread does, and so which filter it gets.
pub trait ThreadRole:
    Copy + Eq + std::hash::Hash + std::fmt::Debug + Send + Sync + 'static
{
    /// Every role of the program (each one's filter is compiled at start-up).
    fn all() -> &'static [Self];
    /// Whether threads of this role start other threads.
    fn spawns_threads(self) -> bool;
    /// The role's allowlist, built on [`base_rules`].
    fn rules(self) -> Result<Rules, String>;
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
    #[error("cannot build the {kind} seccomp filter: {reason}")]
    Build { kind: String, reason: String },
    #[error("cannot install the {kind} seccomp filter: {source}")]
    Apply {
        kind: String,
        #[source]
        source: seccompiler::Error,
    },
}

/// Starting threads: `clone` with `CLONE_THREAD` (rules in [`base_rules`]), `clone3`
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
    // std's hash seeds; in `vireo`, rustls/ring's randomness for TLS handshakes on the
    // migration threads (TLS needs nothing else: its PEM files are read beforehand).
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

/// Adds `list` to `rules`, with any arguments.
pub fn allow(rules: &mut Rules, list: &[i64]) {
    for &s in list {
        rules.insert(s, Vec::new());
    }
}

/// What every role starts from: [`COMMON`], and for roles that start threads `clone`
/// (threads only), `clone3` and `seccomp`.
pub fn base_rules(spawns_threads: bool) -> Result<Rules, String> {
    let mut rules = Rules::new();
    allow(&mut rules, COMMON);
    if spawns_threads {
        allow(&mut rules, SPAWN);
        rules.insert(libc::SYS_clone, clone_threads_only()?);
    }
    Ok(rules)
}

/// Rules for `ioctl`: one of `requests` (argument 1, read as the kernel does: 32 bits).
pub fn ioctl_rules(requests: &[u64]) -> Result<Vec<SeccompRule>, String> {
    requests
        .iter()
        .map(|&r| {
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, r)
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// Rules for a call whose argument `arg` must be one of `values` (e.g. `socket`'s
/// address family).
pub fn arg_in(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, String> {
    values
        .iter()
        .map(|&v| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
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

fn compile<K: ThreadRole>(kind: K, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let build = |reason: String| SeccompError::Build {
        kind: format!("{kind:?}"),
        reason,
    };
    let rules = kind.rules().map_err(build)?;
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| build(e.to_string()))?;
    BpfProgram::try_from(f).map_err(|e| build(e.to_string()))
}

/// Compiles the filter of `kind` (none when filtering is off).
pub fn filter<K: ThreadRole>(
    kind: K,
    mode: SeccompMode,
) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    compile(kind, mismatch).map(Some)
}

/// A role's programs, installed in order: the ENOSYS answer to `clone3` (for
/// thread-starting roles), then the allowlist.
#[derive(Clone)]
struct Programs {
    clone3: Option<Arc<BpfProgram>>,
    main: Arc<BpfProgram>,
}

/// Every role's filter, compiled once at start-up (so a bad filter is an error at
/// launch, not in a worker thread later).
#[derive(Clone)]
pub struct Filters<K: ThreadRole> {
    programs: HashMap<K, Programs>,
}

impl<K: ThreadRole> Default for Filters<K> {
    fn default() -> Self {
        Self {
            programs: HashMap::new(),
        }
    }
}

impl<K: ThreadRole> Filters<K> {
    pub fn new(mode: SeccompMode) -> Result<Self, SeccompError> {
        let mut programs = HashMap::new();
        for &kind in K::all() {
            if let Some(main) = filter(kind, mode)? {
                let clone3 = if kind.spawns_threads() && mode == SeccompMode::Enforce {
                    let p = clone3_enosys().map_err(|reason| SeccompError::Build {
                        kind: format!("{kind:?}"),
                        reason,
                    })?;
                    Some(Arc::new(p))
                } else {
                    None
                };
                programs.insert(
                    kind,
                    Programs {
                        clone3,
                        main: Arc::new(main),
                    },
                );
            }
        }
        Ok(Self { programs })
    }

    /// Whether filters are installed at all (false with `--seccomp false`).
    pub fn enabled(&self) -> bool {
        !self.programs.is_empty()
    }

    /// Installs `kind`'s filter on the calling thread (nothing when filtering is off).
    pub fn apply(&self, kind: K) -> Result<(), SeccompError> {
        let Some(p) = self.programs.get(&kind) else {
            return Ok(());
        };
        let install = |prog: &BpfProgram| {
            seccompiler::apply_filter(prog).map_err(|source| SeccompError::Apply {
                kind: format!("{kind:?}"),
                source,
            })
        };
        if let Some(c) = &p.clone3 {
            install(c)?;
        }
        install(&p.main)
    }

    /// Like [`Filters::apply`] for threads that cannot return an error: a thread that
    /// cannot be confined does not run unconfined; the process ends.
    pub fn apply_or_exit(&self, kind: K) {
        if let Err(e) = self.apply(kind) {
            eprintln!("{}: error: {e}", crate::violation::program());
            std::process::exit(1);
        }
    }
}

/// Runs `f` on a new thread under `kind`'s rules with EPERM in place of SIGSYS, so that
/// a refused call is observed without ending the process (for tests: `errno` EPERM is
/// the filter's refusal).
pub fn run_under_errno<K: ThreadRole, R: Send + 'static>(
    kind: K,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, String> {
    let rules = kind.rules()?;
    let f_rules = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?;
    let prog = BpfProgram::try_from(f_rules).map_err(|e| e.to_string())?;
    let clone3 = if kind.spawns_threads() {
        Some(clone3_enosys()?)
    } else {
        None
    };
    std::thread::spawn(move || {
        if let Some(c) = &clone3 {
            seccompiler::apply_filter(c).map_err(|e| e.to_string())?;
        }
        seccompiler::apply_filter(&prog).map_err(|e| e.to_string())?;
        Ok(f())
    })
    .join()
    .map_err(|_| "the filtered thread panicked".to_string())?
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
