//! The VHDX virtual disk format (MS-VHDX): open, log replay, read, write,
//! create, resize, compact, merge.
//!
//! [`Vhdx`] is the open image. All I/O methods take `&self` and may be called
//! from several threads; the BAT is behind a lock that is never held across
//! data I/O.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod bat;
mod bytes;
mod create;
mod diff;
mod error;
mod header;
mod image;
mod io;
mod iobuf;
mod journal;
mod lock;
mod log;
mod metadata;
mod ops;
mod region;
pub mod storage;

pub use bat::{payload_state_name, Geometry};
pub use create::{create_raw, CreateOptions, DiskKind};
pub use error::{Error, Result};
pub use header::Header;
pub use image::{OpenOptions, ParentOpen, ParentOpener, Vhdx};
pub use iobuf::{IoBufs, IoBufsMut};
pub use log::LogScanStats;
pub use metadata::{MetadataItem, ParentLocator, MAX_VIRTUAL_SIZE};
pub use ops::{commit, probe, CompactStats, Extent};
pub use storage::{FileStorage, MemStorage, Storage};

/// Raw BAT entry helpers (for tools and tests that inspect images).
pub mod bat_entry {
    pub use crate::bat::{
        entry, offset, state, PAYLOAD_FULLY_PRESENT, PAYLOAD_NOT_PRESENT,
        PAYLOAD_PARTIALLY_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_UNMAPPED, PAYLOAD_ZERO,
        SB_NOT_PRESENT, SB_PRESENT,
    };
}

#[cfg(test)]
mod send_sync {
    fn is_send_sync<T: Send + Sync>() {}
    #[test]
    fn vhdx_is_send_sync() {
        is_send_sync::<super::Vhdx>();
    }
}
