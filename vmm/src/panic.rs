//! No thread of `vireo` dies silently: a panic anywhere (a vCPU, a device worker, a
//! migration thread) is logged with the thread's name, the message and the source
//! location, and then the whole process aborts. A VM whose vCPU is gone must never
//! look Running: the supervisor (vireod, systemd) sees the process killed by SIGABRT
//! and records the VM as crashed.
//!
//! The hook is installed by the `vireo` binary only: library tests keep unwinding.

pub use sandbox::panic::describe;

/// Makes every panic end the process (after logging it), whatever thread it is on.
pub fn install_abort_hook() {
    sandbox::panic::install_abort_hook("vireo");
}
