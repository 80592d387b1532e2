//! The destination's parallel page streams (`connections` > 1; the gate admits them):
//! one thread per stream applying its pages, and the barrier that keeps rounds apart.
//!
//! Within a round every page travels on exactly one stream, so streams never race for
//! a page. Across rounds they could: a page sent in round k on stream A and again in
//! round k+1 on stream B must not have B's copy overwritten by A's late one. So a stream
//! that reads `RoundEnd {k}` waits at the [`RoundBarrier`] until every stream has read
//! its `RoundEnd {k}` (and so applied all its pages of round k) before it reads on.

use std::sync::{Condvar, Mutex};
use vireo_util::sync;

use migration::protocol::{self, Message};
use migration::transport::Stream;

use api::MigrationInfo;
use devices::virtio::GuestMemoryMmap;

/// Where every page stream stands.
pub struct RoundBarrier {
    state: Mutex<BarrierState>,
    cv: Condvar,
}

struct BarrierState {
    /// Rounds each stream has finished.
    finished: Vec<u32>,
    failed: Option<String>,
}

impl RoundBarrier {
    pub fn new(streams: usize) -> Self {
        Self {
            state: Mutex::new(BarrierState {
                finished: vec![0; streams],
                failed: None,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BarrierState> {
        vireo_util::sync::lock(&self.state)
    }

    /// Stream `lane` has applied all its pages of `round`: waits until every stream has,
    /// or one failed. (A stream that stalls fails by its socket's read timeout, and the
    /// receiver then fails the barrier: no timeout is needed here, and none could know
    /// how long a paced round may take.)
    pub fn arrive(&self, lane: usize, round: u32) -> Result<(), String> {
        let mut s = self.lock();
        let expected = s.finished.get(lane).copied().ok_or("no such page stream")?;
        if round != expected {
            return Err(format!(
                "page stream {lane} ended round {round}, expected round {expected}"
            ));
        }
        s.finished[lane] = round + 1;
        self.cv.notify_all();
        loop {
            if let Some(f) = &s.failed {
                return Err(format!("another page stream failed: {f}"));
            }
            if s.finished.iter().all(|&f| f > round) {
                return Ok(());
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Records the first failure and wakes every waiting stream.
    pub fn fail(&self, why: &str) {
        let mut s = self.lock();
        if s.failed.is_none() {
            s.failed = Some(why.to_string());
        }
        self.cv.notify_all();
    }

    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }
}

/// Applies stream `lane`'s pages until its last `RoundEnd`.
pub fn receive_stream(
    lane: usize,
    stream: &mut dyn Stream,
    mem: &GuestMemoryMmap,
    barrier: &RoundBarrier,
    info: &Mutex<MigrationInfo>,
) -> Result<(), String> {
    loop {
        match protocol::recv(stream).map_err(|e| format!("page stream {lane}: {e}"))? {
            Message::Pages(p) => {
                let n = super::receive::apply_pages(mem, &p)?;
                let mut i = sync::lock(info);
                i.pages_sent += n;
                i.bytes_sent += p.len() as u64 + 12;
            }
            Message::RoundEnd { round, last } => {
                barrier.arrive(lane, round)?;
                if last {
                    return Ok(());
                }
            }
            other => {
                return Err(format!(
                    "page stream {lane}: unexpected {} from the source",
                    other.name()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn no_stream_passes_a_round_before_all_have_finished_it() {
        let b = Arc::new(RoundBarrier::new(3));
        let passed = Arc::new(Mutex::new(Vec::new()));
        let t: Vec<_> = (0..2)
            .map(|lane| {
                let (b, passed) = (b.clone(), passed.clone());
                std::thread::spawn(move || {
                    b.arrive(lane, 0).unwrap();
                    passed.lock().unwrap().push(lane);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            passed.lock().unwrap().is_empty(),
            "stream 2 is still in round 0"
        );
        b.arrive(2, 0).unwrap();
        for h in t {
            h.join().unwrap();
        }
        assert_eq!(passed.lock().unwrap().len(), 2);
        // Rounds come in order, per stream.
        assert!(b.arrive(0, 2).is_err());
    }

    #[test]
    fn a_failed_stream_releases_the_others_with_its_error() {
        let b = Arc::new(RoundBarrier::new(2));
        let b2 = b.clone();
        let waiter = std::thread::spawn(move || b2.arrive(0, 0));
        std::thread::sleep(Duration::from_millis(50));
        b.fail("page stream 1: connection reset");
        let e = waiter.join().unwrap().unwrap_err();
        assert!(e.contains("connection reset"), "{e}");
        assert!(b.failure().is_some_and(|f| f.contains("stream 1")));
    }

    /// Round 0 sends page P on stream A, round 1 resends it (newer) on stream B, and B's
    /// frames all arrive before A's: the barrier must hold B's round-1 copy back until
    /// A's round 0 is in, so P ends with the newer copy.
    #[test]
    fn a_page_resent_on_another_stream_is_never_overwritten_by_its_older_copy() {
        use std::os::unix::net::UnixStream;
        use vm_memory::{Bytes, GuestAddress};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let pages = |byte: u8| {
            let mut p = Vec::new();
            protocol::push_run(&mut p, 0x3000, 1, Some(&[byte; 4096]));
            Message::Pages(p)
        };
        let (mut a_tx, a_rx) = UnixStream::pair().unwrap();
        let (mut b_tx, b_rx) = UnixStream::pair().unwrap();
        let round = |round, last| Message::RoundEnd { round, last };
        for m in [round(0, false), pages(0xbb), round(1, true)] {
            protocol::send(&mut b_tx, &m).unwrap();
        }
        let barrier = RoundBarrier::new(2);
        let info = Mutex::new(MigrationInfo::default());
        std::thread::scope(|s| {
            let (mem, barrier, info) = (&mem, &barrier, &info);
            let b = s.spawn(move || {
                let mut rx = b_rx;
                receive_stream(1, &mut rx, mem, barrier, info)
            });
            let a = s.spawn(move || {
                let mut rx = a_rx;
                receive_stream(0, &mut rx, mem, barrier, info)
            });
            // Stream B has long read its round-1 page when A's round 0 comes in.
            std::thread::sleep(Duration::from_millis(200));
            for m in [pages(0xaa), round(0, false), round(1, true)] {
                protocol::send(&mut a_tx, &m).unwrap();
            }
            a.join().unwrap().unwrap();
            b.join().unwrap().unwrap();
        });
        let mut got = [0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(0x3000)).unwrap();
        assert!(
            got.iter().all(|&b| b == 0xbb),
            "round 0's copy won: {:#x}",
            got[0]
        );
        assert_eq!(info.lock().unwrap().pages_sent, 2);
    }
}
