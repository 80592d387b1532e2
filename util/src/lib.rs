//! Helpers shared by Vireo's crates (see README.md): zero detection, the data extents
//! of sparse files, poison-tolerant locks, and CPU feature sets (CPUID).

pub mod cpu_features;
pub mod extents;
pub mod sync;
pub mod zero;

pub use zero::is_zero;
