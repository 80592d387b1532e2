//! virtio-console (virtio 1.2, section 5.3): port 0 is the console (guest output to a
//! file or the terminal, terminal input to the guest); with a guest agent the device
//! is multiport and port 1, `org.qemu.guest_agent.0`, has the VMM as its host end.

mod channel;
pub mod control;
mod device;
mod ports;
mod worker;

pub use channel::{AgentChannel, ChannelError, MAX_FROM_GUEST, MAX_TO_GUEST};
pub use device::{Console, ConsoleInput, ConsoleOutput};
pub use ports::{PortState, MAX_CONTROL_CHAIN, MAX_PENDING_CONTROL};

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
