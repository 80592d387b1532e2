//! The VMM's file thread, `vireo-files` (the mechanism is [`confine::broker`]).
//!
//! Started before the control thread is confined, it enters the control thread's
//! Landlock domain ([`crate::landlock`]: the storage roots, output and socket
//! directories, the devices) and its own seccomp filter ([`ThreadKind::Files`]: files,
//! no `ioctl`, no sockets, no threads), then serves the named jobs of the control
//! thread and its helpers (`vireo-migrate-send`, `vireo-mig-gate`, `vireo-disk-copy`,
//! `vireo-throttle`), whose filter has no `openat`, `mkdir` or `unlink`. With storage
//! roots, what it opens is opened beneath a root (`openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`, [`confine::Roots`]); without, as given.

pub use confine::broker::{run, FileOp};

use crate::landlock::ControlDomain;
use crate::seccomp::{Filters, ThreadKind};

/// The file thread's name (in violation reports and `/proc/PID/task/*/comm`).
pub const THREAD_NAME: &str = "vireo-files";

/// Starts `vireo-files`: it enters `domain` (with storage roots) and the Files filter,
/// and returns once it has.
pub fn start(filters: Filters, domain: ControlDomain) -> Result<(), confine::broker::BrokerError> {
    confine::broker::start(THREAD_NAME, move || {
        crate::landlock::confine_thread(domain, THREAD_NAME).map_err(|e| e.to_string())?;
        filters
            .apply(ThreadKind::Files)
            .map_err(|e| e.to_string())?;
        #[cfg(feature = "test-hooks")]
        crate::test_hooks::probe_syscall("files");
        Ok(())
    })
}
