//! Fault injection for the tests, compiled only with the `test-hooks` feature (never in
//! a shipped build; see switch/Cargo.toml).
//!
//! - `VIREO_SWITCH_TEST_SYSCALL=THREAD:CALL`: once confined, the thread (`switch`: the
//!   main loop as it starts; `opener`: the opener thread as it starts; `listener`: a
//!   vhost-user port's listener as it starts;
//!   `worker`: a vring worker at its first event) makes a system call its filter
//!   should refuse (`openat`, `execve`, `socket`, `ioctl-tiocsti`, `fork`) and prints
//!   the outcome if it survives.
//! - `VIREO_SWITCH_TEST_PANIC=THREAD`: the thread (`switch`, `worker`) panics there.

fn named(var: &str, thread: &str) -> Option<String> {
    let v = std::env::var(var).ok()?;
    match v.split_once(':') {
        Some((t, rest)) if t == thread => Some(rest.to_string()),
        None if v == thread => Some(String::new()),
        _ => None,
    }
}

/// Runs the system call `VIREO_SWITCH_TEST_SYSCALL` names for `thread`, if any.
pub fn probe_syscall(thread: &str) {
    let Some(call) = named("VIREO_SWITCH_TEST_SYSCALL", thread) else {
        return;
    };
    if let Some(r) = sandbox::probe::forbidden_call(&call) {
        eprintln!("vireo-switch: test hook: {call} on the {thread} thread returned {r}");
    }
}

/// Panics if `VIREO_SWITCH_TEST_PANIC` names `thread` (reported at the caller).
#[track_caller]
pub fn maybe_panic(thread: &str) {
    if named("VIREO_SWITCH_TEST_PANIC", thread).is_some() {
        panic!("test hook: VIREO_SWITCH_TEST_PANIC={thread}");
    }
}
