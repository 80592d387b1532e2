//! What Vireo's processes (`vireo`, `vireo-switch`) share to confine themselves:
//! per-thread seccomp filters ([`filters`]), the report of a refused system call
//! ([`violation`]), the abort-on-panic hook ([`panic`]), giving up uid,
//! capabilities and resources ([`privileges`]), and file-system domains ([`landlock`]). Each program keeps its own thread
//! roles and allowlists.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod filters;
pub mod landlock;
pub mod panic;
pub mod privileges;
pub mod probe;
pub mod violation;

pub use filters::{
    allow, arg_in, base_rules, filter, ioctl_rules, keep_malloc_off_the_filesystem,
    run_under_errno, Filters, Rules, SeccompError, SeccompMode, ThreadRole,
};
pub use violation::{install_violation_handler, syscall_name};
