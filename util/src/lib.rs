//! Helpers shared by Vireo's crates (see README.md): zero detection, the data extents
//! of sparse files, and poison-tolerant locks.

pub mod extents;
pub mod sync;
pub mod zero;

pub use zero::is_zero;
