//! virtio-blk requests from a hostile driver: a descriptor table, an avail
//! ring and guest memory all from the input (chains of any shape: loops,
//! out-of-memory addresses, wrong directions), each chain parsed and
//! executed as a queue worker does against a raw image.
#![no_main]

use devices::block::RawFile;
use devices::virtio::block::{process_chain, BlockConfig};
use devices::virtio::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use vireo_fuzz::Input;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 1 << 20;
const DISK: u64 = 1 << 20;

fn disk() -> &'static (tempfile::TempDir, RawFile) {
    static D: OnceLock<(tempfile::TempDir, RawFile)> = OnceLock::new();
    D.get_or_init(|| {
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("temp dir");
        let p = dir.path().join("disk.raw");
        std::fs::write(&p, vec![0u8; DISK as usize]).expect("disk");
        let f = RawFile::open(&p, false, false).expect("open disk");
        (dir, f)
    })
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let read_only = inp.u8() & 1 == 1;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    // The descriptor table, raw.
    let table = inp.bytes(16 * 16);
    let _ = mem.write_slice(table, vq.desc_table_addr());
    // Avail ring: how many heads, and which.
    let heads = inp.u8() % 17;
    for i in 0..heads {
        vq.avail()
            .ring()
            .ref_at(usize::from(i))
            .expect("avail slot")
            .store(inp.u16() % 16);
    }
    vq.avail().idx().store(u16::from(heads));
    // Everything else is guest memory from 0x1000 on (headers, data, status).
    let rest = inp.bytes(MEM - 0x1000);
    let _ = mem.write_slice(rest, GuestAddress(0x1000));
    let mut q: Queue = vq.create_queue().expect("queue");
    let cfg = BlockConfig {
        read_only,
        serial: "fuzz".into(),
        num_queues: 1,
        rate_limiter: Default::default(),
        poll_us: 0,
        // The default policy: stop for ENOSPC/EDQUOT, which the in-memory disk never
        // returns; no control loop to ask for a pause.
        on_error: Default::default(),
        stop_sink: None,
    };
    let (_, disk) = disk();
    let mut done = 0;
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        let len = process_chain(&mem, chain, disk, &cfg).map_or(0, |(_, l)| l);
        let _ = q.add_used(&mem, head, len);
        done += 1;
        if done > 64 {
            break;
        }
    }
});
