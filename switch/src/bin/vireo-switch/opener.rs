//! The opener thread (`vireo-sw-open`): once the switch is confined, the only thread
//! that makes sockets, binds them, removes socket files and starts vhost-user listener
//! threads. The switch thread, which parses every frame, hands it those jobs (a port
//! added or removed through the control socket, the sockets removed at exit) and
//! waits for the answer, so its own filter has none of those calls.

use std::sync::mpsc::{self, Sender};

use crate::seccomp::{Filters, Role};

type Job = Box<dyn FnOnce() + Send>;

/// The switch thread's handle on the opener thread.
pub struct Opener {
    jobs: Sender<Job>,
}

impl Opener {
    /// Starts the thread, and returns once it has installed [`Role::Opener`]'s filter.
    pub fn spawn(filters: Filters<Role>) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (confined, ready) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("vireo-sw-open".into())
            .spawn(move || {
                filters.apply_or_exit(Role::Opener);
                let _ = confined.send(());
                #[cfg(feature = "test-hooks")]
                crate::test_hooks::probe_syscall("opener");
                for job in queue {
                    job();
                }
            })?;
        // Err only if the thread ended, which apply_or_exit does not allow.
        let _ = ready.recv();
        Ok(Self { jobs })
    }

    /// Runs `f` on the opener thread and returns what it returned (None if the thread
    /// is gone, which a panic there would not allow: it aborts the process).
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .ok()?;
        rx.recv().ok()
    }
}

/// Runs `f` on the opener if there is one yet, else here (while the switch starts,
/// before any thread is confined).
pub fn privileged<R: Send + 'static>(
    opener: Option<&Opener>,
    f: impl FnOnce() -> R + Send + 'static,
) -> Option<R> {
    match opener {
        Some(o) => o.run(f),
        None => Some(f()),
    }
}
