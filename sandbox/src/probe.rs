//! For the programs' fault-injection hooks (their `test-hooks` builds only): make a
//! system call a confined thread must not, to prove its filter refuses it.

/// Makes the call `name` (`openat` of `/`, `execve` of /bin/true, `socket` AF_INET,
/// `ioctl-tiocsti` on fd -1, `fork`) and returns its result, or `None` for an unknown
/// name. Under an enforcing filter that refuses it, it never returns.
pub fn forbidden_call(name: &str) -> Option<i64> {
    let path = c"/";
    // SAFETY: plain system calls with valid arguments; a forked child exits at once.
    let r = unsafe {
        match name {
            "openat" => libc::openat(libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY),
            "execve" => {
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr())
            }
            "socket" => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0),
            // TIOCSTI (typing into a terminal) on fd -1: refused by the filter before
            // the kernel looks at the fd, else EBADF; nothing is typed either way.
            "ioctl-tiocsti" => libc::ioctl(-1, libc::TIOCSTI, std::ptr::null_mut::<u8>()),
            "fork" => {
                let pid = libc::fork();
                if pid == 0 {
                    libc::_exit(0);
                }
                pid
            }
            _ => return None,
        }
    };
    Some(i64::from(r))
}

/// For filter tests run with [`crate::run_under_errno`]: each helper makes one call
/// and returns its errno (0 when it succeeded), EPERM being the filter's refusal.
///
/// errno of a failed call (0 if it succeeded).
pub fn errno_of(r: i64) -> i32 {
    if r < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

/// Closes `fd` if the call made one; its errno otherwise.
fn closed(fd: libc::c_int) -> i32 {
    let e = errno_of(fd.into());
    if fd >= 0 {
        // SAFETY: our own fd, made by the caller's call.
        unsafe { libc::close(fd) };
    }
    e
}

/// `openat` of `/`.
pub fn open_root() -> i32 {
    // SAFETY: openat of a valid C string; the fd is closed.
    closed(unsafe { libc::openat(libc::AT_FDCWD, c"/".as_ptr(), libc::O_RDONLY) })
}

/// `socket(family, kind)`.
pub fn new_socket(family: libc::c_int, kind: libc::c_int) -> i32 {
    // SAFETY: socket(2) with plain integer arguments; the fd is closed.
    closed(unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) })
}

/// A new process by fork (clone without CLONE_THREAD); the child exits at once.
pub fn fork_process() -> i32 {
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

/// `execve` of /bin/true (only returns on failure: a success replaces the process).
pub fn exec_true() -> i32 {
    let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: valid NUL-terminated argv/envp.
    let r = unsafe { libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    errno_of(r.into())
}

/// Whether a thread can be started (and joined).
pub fn spawn_thread() -> bool {
    std::thread::Builder::new()
        .spawn(|| 7)
        .map(|t| t.join().is_ok_and(|v| v == 7))
        .unwrap_or(false)
}

/// An ioctl with a request number only: the filter answers before any driver, so
/// EPERM is the filter's refusal and EBADF (fd -1) means it was let through.
pub fn ioctl_request(request: u64) -> i32 {
    // SAFETY: fd -1 makes the kernel fail the call before touching the pointer.
    let r = unsafe { libc::ioctl(-1, request as _, std::ptr::null_mut::<u8>()) };
    errno_of(r.into())
}
