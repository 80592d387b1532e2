//! virtio-console chains from a hostile driver: a descriptor table, an avail ring and
//! guest memory from the input; the first chains are transmit buffers gathered into
//! the host buffer as the worker does (capped per chain and in all), the next receive
//! buffers filled with input bytes, and from `ctrl_from` on (when it is 32 or less)
//! the multiport worker's chains in turn: a control message from the driver, a control
//! receive buffer for the device's next message, bytes on the guest agent's port.
#![no_main]

use std::collections::VecDeque;

use devices::virtio::console::chains::{rx_fill, tx_take, MAX_BUFFERED, MAX_CHAIN_BYTES};
use devices::virtio::console::control::Control;
use devices::virtio::console::{AgentChannel, PortState, MAX_FROM_GUEST, MAX_PENDING_CONTROL};
use devices::virtio::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use vireo_fuzz::Input;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let table = inp.bytes(16 * 16);
    let _ = mem.write_slice(table, vq.desc_table_addr());
    let heads = inp.u8() % 17;
    for i in 0..heads {
        vq.avail()
            .ring()
            .ref_at(usize::from(i))
            .expect("avail slot")
            .store(inp.u16() % 16);
    }
    vq.avail().idx().store(u16::from(heads));
    let rx_from = inp.u8() % 17;
    let ctrl_from = inp.u8();
    let input_len = usize::from(inp.u16());
    let input = inp.bytes(input_len);
    let rest = inp.bytes(MEM - 0x1000);
    let _ = mem.write_slice(rest, GuestAddress(0x1000));
    let mut q: Queue = vq.create_queue().expect("queue");
    let mut buf = Vec::new();
    let mut pending: VecDeque<u8> = input.iter().copied().collect();
    let channel = AgentChannel::new().expect("eventfd");
    let mut ports = PortState::new(Control::default(), channel.clone());
    let mut popped = 0u8;
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        if popped >= ctrl_from {
            match (popped - ctrl_from) % 3 {
                0 => ports.control_chain(&mem, chain),
                1 => {
                    let had = ports.pending.len();
                    let written = ports.control_reply(&mem, chain);
                    assert!(had > 0 || written == 0);
                }
                _ => ports.port_chain(&mem, chain),
            }
            assert!(ports.pending.len() <= MAX_PENDING_CONTROL);
            let held = channel.recv_until(0xff, std::time::Instant::now());
            assert!(held.map_or(true, |b| b.len() <= MAX_FROM_GUEST));
        } else if popped < rx_from {
            if buf.len() + MAX_CHAIN_BYTES > MAX_BUFFERED {
                buf.clear(); // written out, as the worker does
            }
            let before = buf.len();
            let (kept, _, _) = tx_take(&mem, chain, &mut buf);
            assert_eq!(buf.len(), before + kept);
            assert!(kept <= MAX_CHAIN_BYTES && buf.len() <= MAX_BUFFERED);
        } else {
            let before = pending.len();
            let written = rx_fill(&mem, chain, &mut pending);
            assert!(written as usize <= before - pending.len());
        }
        popped += 1;
        if popped > 32 {
            break;
        }
    }
});
