//! virtio-blk (virtio 1.2, section 5.2): a disk backed by any [`crate::block::BlockBackend`].

mod device;
mod poll;
mod request;
mod worker;

pub use device::{Block, BlockConfig, BlockCounters, Reopen};
