//! virtio-net chains from a hostile driver: a descriptor table, an avail
//! ring and guest memory from the input; transmit chains gathered into
//! frames, then those frames delivered into receive chains (mergeable
//! buffers) of the same queue, as the worker does around the tap.
#![no_main]

use devices::virtio::net::chains::{rx_deliver, tx_frame};
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
    let rest = inp.bytes(MEM - 0x1000);
    let _ = mem.write_slice(rest, GuestAddress(0x1000));
    let mut q: Queue = vq.create_queue().expect("queue");
    let mut frames = Vec::new();
    let mut rx = Vec::new();
    let mut popped = 0u8;
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        if popped < rx_from {
            if let Some(f) = tx_frame(&mem, chain) {
                frames.push(f);
            }
        } else {
            rx.push(chain);
        }
        popped += 1;
        if popped > 32 {
            break;
        }
    }
    let frame = frames.pop().unwrap_or_else(|| vec![0xee; 60]);
    let _ = rx_deliver(&mem, rx, &frame);
});
