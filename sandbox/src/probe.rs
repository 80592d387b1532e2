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
