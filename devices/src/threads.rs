//! Start-up hook for the worker threads devices spawn, so the VMM can put each under
//! its seccomp filter without the devices knowing about seccomp.

use std::sync::OnceLock;

/// The kinds of threads devices start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerKind {
    Block,
    Console,
    Net,
    Rng,
}

type Hook = Box<dyn Fn(WorkerKind) + Send + Sync>;

static START_HOOK: OnceLock<Hook> = OnceLock::new();

/// Sets the function every device worker thread runs first (once per process).
pub fn set_start_hook(hook: Hook) {
    let _ = START_HOOK.set(hook);
}

/// Called by a worker thread before it serves anything.
pub(crate) fn started(kind: WorkerKind) {
    if let Some(h) = START_HOOK.get() {
        h(kind);
    }
}
