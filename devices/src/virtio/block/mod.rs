//! virtio-blk (virtio 1.2, section 5.2): a disk backed by any [`crate::block::BlockBackend`].

mod device;
mod on_error;
mod poll;
mod request;
#[cfg(test)]
mod tests;
mod worker;

pub use device::{Block, BlockConfig, BlockCounters, Reopen};
pub use on_error::{errno_of, DiskStopped, ErrorPolicy, StopSink};
