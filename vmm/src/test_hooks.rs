//! Fault injection for the end-to-end tests, compiled only with the `test-hooks`
//! feature (never in a shipped build; see vmm/Cargo.toml).
//!
//! - `VIREO_TEST_PANIC_VCPU=now|after-resume`: vCPU 0 panics at its first exit, or at
//!   its first exit after a pause and resume.
//! - `VIREO_TEST_SYSCALL=THREAD:CALL`: the thread (`vcpu`, `control`, `files`: the
//!   file thread once confined, `receive`: the
//!   migration receive thread as it starts) makes a system
//!   call its filter should refuse once it is confined (`openat`, `execve`, `socket`,
//!   `fork`, `ioctl-tiocsti`) and prints the outcome if it survives.
//! - `VIREO_TEST_OPEN=PATH`: once confined, the file thread (`vireo-files`, the only
//!   one that may open) tries to open PATH with a plain open, skipping our checks, and
//!   prints `vireo: test hook: open PATH: <outcome>` (a jailed VMM must not reach host
//!   files).
//! - `VIREO_TEST_OPEN_BENEATH=PATH`: the same through the storage roots
//!   (`vmm::confinement::open_read`, as disks and kernels are opened), printing
//!   `vireo: test hook: open beneath PATH: <outcome>` (a root's descriptor must not
//!   reach past the jail).
//! - `VIREO_FAULT=<point>[,<point>...]`: the VMM dies by SIGKILL when it reaches a named
//!   point, exactly as a crash there would end it (no destructors, no flush, no goodbye
//!   on any socket). Points: `kill-after-commit` (the migration source, right after it
//!   sent Go).

/// True on the vCPU that must panic now: `VIREO_TEST_PANIC_VCPU=now` at vCPU 0's first
/// exit, `=after-resume` at its first exit after a pause and resume (a VM its
/// supervisor already sees Running).
pub fn vcpu_should_panic(id: u8, resumed: bool) -> bool {
    if id != 0 {
        return false;
    }
    match std::env::var("VIREO_TEST_PANIC_VCPU").as_deref() {
        Ok("now") => true,
        Ok("after-resume") => resumed,
        _ => false,
    }
}

/// Runs the system call `VIREO_TEST_SYSCALL` names for `thread`, if any.
pub fn probe_syscall(thread: &str) {
    let Ok(v) = std::env::var("VIREO_TEST_SYSCALL") else {
        return;
    };
    let Some((t, call)) = v.split_once(':') else {
        return;
    };
    if t != thread {
        return;
    }
    let Some(r) = sandbox::probe::forbidden_call(call) else {
        return;
    };
    eprintln!("vireo: test hook: {call} on the {thread} thread returned {r}");
}

/// Tries to open `VIREO_TEST_OPEN` (and `VIREO_TEST_OPEN_BENEATH` through the storage
/// roots) and prints the outcome.
pub fn probe_open() {
    if let Some(path) = std::env::var_os("VIREO_TEST_OPEN_BENEATH") {
        let outcome = match crate::confinement::open_read(std::path::Path::new(&path)) {
            Ok(_) => "opened".to_string(),
            Err(e) => format!("refused: {e}"),
        };
        eprintln!(
            "vireo: test hook: open beneath {}: {outcome}",
            std::path::Path::new(&path).display()
        );
    }
    if let Some(path) = std::env::var_os("VIREO_TEST_OPEN") {
        // Raw, skipping our checks, on the file thread (the only one that may open:
        // its Landlock domain has the last word).
        let target = path.clone();
        let opened = crate::file_broker::run(crate::file_broker::FileOp::TestProbe, move || {
            std::fs::File::open(target)
        });
        let outcome = match opened {
            Ok(_) => "opened".to_string(),
            Err(e) => format!("error {}", e.raw_os_error().unwrap_or(0)),
        };
        eprintln!(
            "vireo: test hook: open {}: {outcome}",
            std::path::Path::new(&path).display()
        );
    }
}

/// Dies by SIGKILL if `point` is named in `VIREO_FAULT`.
pub fn fault_point(point: &str) {
    let armed = std::env::var("VIREO_FAULT").is_ok_and(|v| v.split(',').any(|p| p == point));
    if !armed {
        return;
    }
    tracing::warn!(point, "VIREO_FAULT: killing the VMM here");
    // SAFETY: tgkill on our own process and thread with plain integer arguments;
    // SIGKILL ends the process, so nothing runs after it.
    unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::gettid(),
            libc::SIGKILL,
        );
    }
}
