//! The report of a seccomp violation: a SIGSYS handler that prints the thread's name
//! and the refused system call's name and number (and an `ioctl`'s request) on stderr,
//! then ends the process with status 159 (128 + SIGSYS). It allocates nothing and makes
//! only async-signal-safe calls every filter allows (prctl, write, _exit).

use std::sync::OnceLock;

/// The program named at the start of the line (`vireo`, `vireo-switch`).
static PROGRAM: OnceLock<&'static str> = OnceLock::new();

/// The program's name for error lines (`vireo` until a handler names another).
pub(crate) fn program() -> &'static str {
    PROGRAM.get().copied().unwrap_or("vireo")
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

/// `PROGRAM: error: seccomp: thread T made the forbidden system call NAME (NR); ...`,
/// with the request number of a refused `ioctl` (`ioctl (16) with request 0x5412`).
fn violation_line(program: &str, thread: &[u8], nr: i64, arg1: u64) -> Line {
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(program.as_bytes());
    line.push(b": error: seccomp: thread ");
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

/// Installs the SIGSYS handler that reports a violation as `name` (the program) and
/// ends the process.
pub fn install_violation_handler(name: &'static str) {
    let _ = PROGRAM.set(name);
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
        let line = violation_line(program(), &name, i64::from(nr), arg1 as u64);
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
    fn a_violation_names_the_thread_and_the_system_call() {
        let line = violation_line("vireo", b"vireo-vcpu0\0\0\0", libc::SYS_openat, 0x5412);
        let text = std::str::from_utf8(&line.buf[..line.len]).unwrap();
        assert_eq!(
            text,
            "vireo: error: seccomp: thread vireo-vcpu0 made the forbidden system call \
             openat (257); ending the process (run with --seccomp log to list them)\n"
        );
        let line = violation_line(
            "vireo-switch",
            b"vireo\0",
            libc::SYS_ioctl,
            0xffff_ffff_0000_5412,
        );
        let text = std::str::from_utf8(&line.buf[..line.len]).unwrap();
        assert!(
            text.starts_with("vireo-switch: error: seccomp: thread vireo made")
                && text.contains("forbidden system call ioctl (16) with request 0x5412; ending"),
            "{text}"
        );
        assert_eq!(syscall_name(libc::SYS_execve), Some("execve"));
        assert_eq!(syscall_name(100_000), None);
    }
}
