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

/// Parses and executes one request chain the way a queue worker does (without
/// the rate limiter), writing the status byte; returns the status and the
/// bytes the used ring reports, or `None` for a malformed chain (or one the disk's
/// error policy keeps for a resume). The entry
/// point of the virtio-blk fuzz target (fuzz/), kept to what a worker does.
pub fn process_chain(
    mem: &crate::virtio::GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&crate::virtio::GuestMemoryMmap>,
    disk: &dyn crate::block::BlockBackend,
    config: &BlockConfig,
) -> Option<(u8, u32)> {
    use vm_memory::Bytes;
    let req = request::Request::parse(mem, chain).ok()?;
    match req.execute(mem, disk, config, &BlockCounters::default()) {
        request::Outcome::Done { status, written } => {
            mem.write_obj(status, req.status).ok()?;
            Some((status, written.saturating_add(1)))
        }
        // The policy keeps the request for a resume: nothing is completed.
        request::Outcome::Stop(_) => None,
    }
}
