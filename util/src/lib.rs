//! Helpers shared by Vireo's crates (see README.md): zero detection, the data extents
//! of sparse files, poison-tolerant locks, and CPU feature sets (CPUID).

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cpu_features;
pub mod extents;
pub mod sync;
pub mod zero;

pub use zero::is_zero;
