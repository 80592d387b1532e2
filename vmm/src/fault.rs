//! Fault injection for the test suite: with `VIREO_FAULT=<point>[,<point>...]` in
//! its environment the VMM dies by SIGKILL when it reaches a named point, exactly
//! as a crash there would end it (no destructors, no flush, no goodbye on any
//! socket). Points:
//!
//! - `kill-after-commit`: the migration source, right after it sent Go.

/// Dies by SIGKILL if `point` is named in `VIREO_FAULT`.
pub fn point(point: &str) {
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
