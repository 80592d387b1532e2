//! virtio-net (virtio 1.2, section 5.1): one receive and one transmit queue over a
//! host [`NetBackend`] (a tap), or served by a vhost-user backend in another process
//! ([`VhostUserNet`]). Features: VERSION_1, MAC, STATUS, MRG_RXBUF; no offloads, no
//! control queue, no multiqueue.

mod chain;
mod device;
mod vhost_user;
mod worker;

#[cfg(test)]
mod tests;

pub use device::{Net, NetBackend, NetConfig, NetCounters, ReopenNet};
pub use vhost_user::{VhostUserError, VhostUserNet};

/// Entry points of the virtio-net fuzz target (fuzz/): the chain handling of
/// the worker without the tap, on chains a (hostile) driver wrote.
pub mod chains {
    use super::chain::{rx_header, spread, Chain, VNET_HDR_LEN};
    use crate::virtio::GuestMemoryMmap;
    use virtio_queue::DescriptorChain;
    use vm_memory::{Address, Bytes};

    /// Parses a transmit chain and gathers the frame after the virtio-net
    /// header, as the worker hands it to the tap; `None` for a chain the
    /// worker refuses (device-writable segment, too short, too long) or
    /// addresses outside guest memory.
    pub fn tx_frame(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Option<Vec<u8>> {
        let c = Chain::tx(chain).ok()?;
        let mut slices = Vec::new();
        c.host_slices(mem, VNET_HDR_LEN as u64, false, &mut slices)
            .ok()?;
        let mut frame = Vec::with_capacity(slices.iter().map(|s| s.1).sum());
        let mut skip = VNET_HDR_LEN as u64;
        for &(addr, len) in &c.segments {
            let len = u64::from(len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let mut b = vec![0u8; (len - skip) as usize];
            mem.read_slice(&mut b, addr.checked_add(skip)?).ok()?;
            skip = 0;
            frame.extend_from_slice(&b);
        }
        Some(frame)
    }

    /// Delivers `frame` into receive buffers the way the worker does with
    /// mergeable buffers: each chain parsed, the frame (after the header with
    /// `num_buffers`) spread over as many as it needs. Returns the bytes used
    /// per buffer, `None` when the buffers are refused or too small.
    pub fn rx_deliver(
        mem: &GuestMemoryMmap,
        chains: Vec<DescriptorChain<&GuestMemoryMmap>>,
        frame: &[u8],
    ) -> Option<Vec<u32>> {
        let bufs: Vec<Chain> = chains
            .into_iter()
            .map(Chain::rx)
            .collect::<Result<_, _>>()
            .ok()?;
        let n = (VNET_HDR_LEN + frame.len()) as u64;
        let lens = spread(bufs.iter().map(|c| c.len), n)?;
        let mut whole = rx_header(lens.len() as u16).to_vec();
        whole.extend_from_slice(frame);
        let mut at = 0usize;
        for (c, &l) in bufs.iter().zip(&lens) {
            c.write_at(mem, 0, &whole[at..at + l as usize]).ok()?;
            at += l as usize;
        }
        Some(lens)
    }
}
