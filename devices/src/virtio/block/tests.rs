//! The device and its worker end to end on mock virtqueues: a host I/O error with
//! on_error=stop keeps the request and asks for a pause; after the pause and a new
//! activation (resume) the request runs again and completes.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{Block, BlockConfig, DiskStopped, ErrorPolicy, StopSink};
use crate::block::{BlockBackend, IoBufs, IoBufsMut};
use crate::rate_limiter::RateLimiterConfig;
use crate::virtio::{
    ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, VirtioInterruptKind,
};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x10_1000;
const STATUS: u64 = 0x10_2000;

/// A disk that fails writes with ENOSPC while `full` is set.
struct FullDisk {
    full: AtomicBool,
    data: Mutex<Vec<u8>>,
}

impl BlockBackend for FullDisk {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_vectored_at(&self, _: &IoBufsMut<'_>, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64) -> std::io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let mut d = self.data.lock().unwrap();
        let v = bufs.to_vec();
        d[offset as usize..offset as usize + v.len()].copy_from_slice(&v);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct Irqs(AtomicU32);
impl VirtioInterrupt for Irqs {
    fn trigger(&self, _: VirtioInterruptKind) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn rig(policy: ErrorPolicy) -> (Block, Arc<FullDisk>, Arc<Mutex<Vec<DiskStopped>>>) {
    let disk = Arc::new(FullDisk {
        full: AtomicBool::new(true),
        data: Mutex::new(vec![0; 1 << 20]),
    });
    let stops = Arc::new(Mutex::new(Vec::new()));
    let sink = {
        let stops = stops.clone();
        StopSink(Arc::new(move |s| stops.lock().unwrap().push(s)))
    };
    let block = Block::new(
        disk.clone(),
        BlockConfig {
            read_only: false,
            serial: "t".into(),
            num_queues: 1,
            rate_limiter: RateLimiterConfig::default(),
            poll_us: 0,
            on_error: policy,
            stop_sink: Some(sink),
        },
    );
    (block, disk, stops)
}

/// One 512-byte write of `byte` at sector 8.
fn submit_write(mem: &GuestMemoryMmap, vq: &MockSplitQueue<'_, GuestMemoryMmap>, byte: u8) {
    let mut hdr = [0u8; 16];
    hdr[0] = 1; // VIRTIO_BLK_T_OUT
    hdr[8] = 8; // sector
    mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    mem.write_slice(&[byte; 512], GuestAddress(DATA)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let d = |a, l, f, n| RawDescriptor::from(Descriptor::new(a, l, f, n));
    vq.add_desc_chains(
        &[
            d(HDR, 16, F_NEXT, 1),
            d(DATA, 512, F_NEXT, 2),
            d(STATUS, 1, F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
}

fn activate(block: &mut Block, mem: &Arc<GuestMemoryMmap>, queue: Queue, kick: &EventFd) {
    let q = ActivatedQueue {
        index: 0,
        queue,
        kick: kick.try_clone().unwrap(),
    };
    block
        .activate(mem.clone(), Arc::new(Irqs::default()), vec![q])
        .unwrap();
}

#[test]
fn enospc_with_on_error_stop_keeps_the_request_until_resume_then_completes_it() {
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap());
    let vq = MockSplitQueue::create(mem.as_ref(), GuestAddress(0), 16);
    let (mut block, disk, stops) = rig(ErrorPolicy::Stop);
    submit_write(&mem, &vq, 0x5a);
    let kick = EventFd::new(0).unwrap();
    activate(&mut block, &mem, vq.create_queue().unwrap(), &kick);

    wait_for("the stop report", || !stops.lock().unwrap().is_empty());
    assert_eq!(
        stops.lock().unwrap()[0],
        DiskStopped {
            op: "write",
            errno: libc::ENOSPC
        }
    );
    // Kicks while stopped change nothing: the request is neither completed nor failed.
    kick.write(1).unwrap();
    let queues = block.pause();
    assert_eq!(vq.used().idx().load(), 0, "a stopped request was completed");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);
    assert_eq!(stops.lock().unwrap().len(), 1);

    // Space freed; the VM resumes: the kept request runs first and completes.
    disk.full.store(false, Ordering::SeqCst);
    let queue = queues.into_iter().next().unwrap().queue;
    activate(&mut block, &mem, queue, &kick);
    wait_for("the completion", || vq.used().idx().load() == 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0, "S_OK");
    assert_eq!(
        &disk.data.lock().unwrap()[8 * 512..9 * 512],
        &[0x5a; 512][..]
    );
    block.reset();
}

#[test]
fn on_error_report_gives_the_guest_an_io_error_and_does_not_stop() {
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap());
    let vq = MockSplitQueue::create(mem.as_ref(), GuestAddress(0), 16);
    let (mut block, disk, stops) = rig(ErrorPolicy::Report);
    submit_write(&mem, &vq, 0x5a);
    let kick = EventFd::new(0).unwrap();
    activate(&mut block, &mem, vq.create_queue().unwrap(), &kick);
    wait_for("the completion", || vq.used().idx().load() == 1);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        1,
        "S_IOERR"
    );
    assert!(stops.lock().unwrap().is_empty());
    assert!(disk.data.lock().unwrap().iter().all(|&b| b == 0));
    block.reset();
}

/// A disk that records, at each write, the `avail_event` the driver would read then
/// (virtio 1.2 §2.7.10: the u16 after the used ring's elements).
struct EventWatcher {
    mem: Arc<GuestMemoryMmap>,
    avail_event: GuestAddress,
    seen: Mutex<Vec<(u64, u16)>>,
}

impl BlockBackend for EventWatcher {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_vectored_at(&self, _: &IoBufsMut<'_>, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_vectored_at(&self, _: &IoBufs<'_>, offset: u64) -> std::io::Result<()> {
        let event = self.mem.read_obj::<u16>(self.avail_event).unwrap();
        self.seen.lock().unwrap().push((offset / 512, event));
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// Under VIRTIO_F_EVENT_IDX a worker that takes request after request in one pass keeps
/// `avail_event` a ring past the last one it took: a driver refilling a deep queue as
/// requests complete never reaches it, so it does not kick (one exit per request
/// otherwise, as a held-off event written only at the pass's start gave).
#[test]
fn each_request_taken_moves_the_held_off_event_a_ring_past_it() {
    const SIZE: u16 = 16;
    const REQUESTS: u16 = 4;
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap());
    let vq = MockSplitQueue::create(mem.as_ref(), GuestAddress(0), SIZE);
    let disk = Arc::new(EventWatcher {
        mem: mem.clone(),
        avail_event: GuestAddress(vq.used_addr().0 + 4 + 8 * u64::from(SIZE)),
        seen: Mutex::new(Vec::new()),
    });
    let mut block = Block::new(
        disk.clone(),
        BlockConfig {
            read_only: false,
            serial: "t".into(),
            num_queues: 1,
            rate_limiter: RateLimiterConfig::default(),
            poll_us: 0,
            on_error: ErrorPolicy::Report,
            stop_sink: None,
        },
    );
    let d = |a, l, f, n| RawDescriptor::from(Descriptor::new(a, l, f, n));
    let mut descs = Vec::new();
    for k in 0..REQUESTS {
        let base = HDR + u64::from(k) * 0x1000 * 3;
        let mut hdr = [0u8; 16];
        hdr[0] = 1; // VIRTIO_BLK_T_OUT
        hdr[8] = k as u8; // sector k
        mem.write_slice(&hdr, GuestAddress(base)).unwrap();
        let i = k * 3;
        descs.push(d(base, 16, F_NEXT, i + 1));
        descs.push(d(base + 0x1000, 512, F_NEXT, i + 2));
        descs.push(d(base + 0x2000, 1, F_WRITE, 0));
    }
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    virtio_queue::QueueT::set_event_idx(&mut queue, true);
    let kick = EventFd::new(0).unwrap();
    activate(&mut block, &mem, queue, &kick);
    wait_for("the completions", || vq.used().idx().load() == REQUESTS);
    let seen = disk.seen.lock().unwrap().clone();
    let want: Vec<(u64, u16)> = (0..REQUESTS)
        .map(|k| (u64::from(k), k + 1 + SIZE))
        .collect();
    assert_eq!(
        seen, want,
        "(sector, avail_event while the worker wrote it)"
    );
    // Asleep again, the worker asks for a kick at the next request.
    wait_for("notifications back on", || {
        mem.read_obj::<u16>(disk.avail_event).unwrap() == REQUESTS
    });
    block.reset();
}

/// A disk whose writes wait until `release` is set, saying when one has begun.
struct SlowDisk {
    writing: AtomicBool,
    release: AtomicBool,
}

impl BlockBackend for SlowDisk {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_vectored_at(&self, _: &IoBufsMut<'_>, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_vectored_at(&self, _: &IoBufs<'_>, _: u64) -> std::io::Result<()> {
        self.writing.store(true, Ordering::SeqCst);
        wait_for("the test to release the write", || {
            self.release.load(Ordering::SeqCst)
        });
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// Two queues, two workers sharing one stop eventfd: the idle worker stops at once;
/// the one busy with a request when the pause came must still see the stop once its
/// request is done (a worker that read the eventfd reset it for the other, and the
/// pause hung joining it).
#[test]
fn a_pause_stops_a_worker_that_was_busy_when_another_one_stopped() {
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap());
    let vq0 = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x1_0000), 16);
    let vq1 = MockSplitQueue::create(mem.as_ref(), GuestAddress(0), 16);
    let disk = Arc::new(SlowDisk {
        writing: AtomicBool::new(false),
        release: AtomicBool::new(false),
    });
    let mut block = Block::new(
        disk.clone(),
        BlockConfig {
            read_only: false,
            serial: "t".into(),
            num_queues: 2,
            rate_limiter: RateLimiterConfig::default(),
            poll_us: 0,
            on_error: ErrorPolicy::Report,
            stop_sink: None,
        },
    );
    submit_write(&mem, &vq1, 0x5a);
    let kicks = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
    let queues = [&vq0, &vq1]
        .iter()
        .zip(&kicks)
        .enumerate()
        .map(|(index, (vq, kick))| ActivatedQueue {
            index: index as u16,
            queue: vq.create_queue().unwrap(),
            kick: kick.try_clone().unwrap(),
        })
        .collect();
    block
        .activate(mem.clone(), Arc::new(Irqs::default()), queues)
        .unwrap();
    wait_for("queue 1's worker inside the write", || {
        disk.writing.load(Ordering::SeqCst)
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let pausing = std::thread::spawn(move || {
        let queues = block.pause();
        tx.send(queues.len()).unwrap();
        block
    });
    // The idle worker has long seen the stop when the busy one finishes its request.
    std::thread::sleep(Duration::from_millis(100));
    disk.release.store(true, Ordering::SeqCst);
    let stopped = rx.recv_timeout(Duration::from_secs(30));
    assert_eq!(stopped, Ok(2), "the pause did not stop both workers");
    assert_eq!(vq1.used().idx().load(), 1, "the busy request completed");
    pausing.join().unwrap().reset();
}
