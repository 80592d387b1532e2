//! virtio-console (virtio 1.2, section 5.3), single port: guest output to a file or
//! the terminal, terminal input to the guest.

mod device;
mod worker;

pub use device::{Console, ConsoleInput, ConsoleOutput};

/// Entry points of the virtio-console fuzz target (fuzz/): the worker's chain handling
/// without its files, on chains a (hostile) driver wrote.
pub mod chains {
    use std::collections::VecDeque;

    use crate::virtio::GuestMemoryMmap;
    use virtio_queue::DescriptorChain;

    pub use super::worker::{MAX_BUFFERED, MAX_CHAIN_BYTES};

    /// What one transmit chain gave: bytes kept, bytes over the cap (never read),
    /// bytes outside guest memory.
    pub fn tx_take(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        buf: &mut Vec<u8>,
    ) -> (usize, u64, u64) {
        let t = super::worker::take_chain(mem, chain, buf);
        (t.kept, t.dropped, t.unreadable)
    }

    /// Input bytes moved into one receive chain (how many).
    pub fn rx_fill(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        pending: &mut VecDeque<u8>,
    ) -> u32 {
        super::worker::fill_chain(mem, chain, pending)
    }
}
