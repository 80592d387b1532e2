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
    Balloon,
    /// The virtio-mem request queue.
    Mem,
    /// Watches a vhost-user backend's socket and connects again when it goes away.
    VhostUserLink,
    /// Turns a vfio-user server's interrupt eventfds into MSI-X messages.
    UserDeviceIrq,
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

/// A unit of device activation or reset, handed to the thread that runs them.
pub type ActivationJob = Box<dyn FnOnce() + Send + 'static>;

/// Takes a job to the activation thread; gives it back if that thread is gone.
type Runner = Box<dyn Fn(ActivationJob) -> Result<(), ActivationJob> + Send + Sync>;

static ACTIVATION_RUNNER: OnceLock<Runner> = OnceLock::new();

/// Sets where device activation and reset run (once per process). The VMM runs them on
/// a dedicated thread so that the vCPU whose register write triggers them needs no
/// right to start threads, create timers or flush disks.
pub fn set_activation_runner(runner: Runner) {
    let _ = ACTIVATION_RUNNER.set(runner);
}

/// `f` and the channel its result goes back on; fields drop in order, so a job dropped
/// unrun drops `f` (and whatever it borrows) before the sender that wakes the caller.
struct Borrowed<F, R> {
    f: Option<F>,
    done: std::sync::mpsc::SyncSender<R>,
}

/// Runs `f` on the activation thread and waits for it (inline when no runner is set,
/// as in unit tests, or when the runner is gone). None if the job was dropped unrun.
pub(crate) fn run_activation<'a, R, F>(f: F) -> Option<R>
where
    R: Send + 'a,
    F: FnOnce() -> R + Send + 'a,
{
    let Some(runner) = ACTIVATION_RUNNER.get() else {
        return Some(f());
    };
    let (done, result) = std::sync::mpsc::sync_channel(1);
    let mut job = Borrowed { f: Some(f), done };
    let job: Box<dyn FnOnce() + Send + 'a> = Box::new(move || {
        if let Some(f) = job.f.take() {
            let _ = job.done.send(f());
        }
    });
    // SAFETY: the job borrows from the caller ('a) and is erased to 'static only so
    // that another thread can run it. This function does not return before the job has
    // finished with its borrows: `result.recv()` returns once the job has sent f's
    // result, or once the job was dropped unrun, which drops `f` before `done` (field
    // order of `Borrowed`), the only sender. A job given back is run here.
    let job: ActivationJob =
        unsafe { std::mem::transmute::<Box<dyn FnOnce() + Send + 'a>, ActivationJob>(job) };
    if let Err(job) = runner(job) {
        job();
    }
    result.recv().ok()
}
