//! The egress scheduler of a port with a known rate (`rate=`, or a cap `in`): frames
//! to the port wait in one bounded queue per source port and leave at the port's
//! rate, chosen by
//! 1. **minimums first**: a source with a minimum (`min=`, honoured at ports with a
//!    `rate=`) whose minimum bucket holds its next frame goes first (round robin
//!    among such sources);
//! 2. otherwise **deficit round robin** by the sources' weights (`weight=`, 1-100):
//!    each turn a source may send `weight × quantum` bytes (the quantum is the
//!    largest frame), a deficit it does not use carries to its next turn while it has
//!    frames queued.
//!
//! A frame sent either way counts against its source's minimum bucket, so a minimum
//! is a floor under the source's share, not an addition to it: a backlogged source
//! gets about the larger of its minimum and its weighted share of what the minimums
//! leave. Weights do not cap: a source alone gets the whole rate, and a rate nobody
//! uses is not kept (work-conserving). The shaper is a token bucket of the port's
//! rate holding 10 ms (at least one largest frame).
//!
//! No clock of its own and no I/O: [`EgressScheduler::dequeue`] is given the time and
//! says when to come back ([`EgressScheduler::deadline`]).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::Serialize;

use crate::bucket::ByteBucket;
use crate::qos::burst_bytes;
use crate::PortId;

/// Frames one source may have queued at one port, by default.
pub const QUEUE_FRAMES: usize = 128;

/// A frame waiting for its port: the bytes as they will be sent and the monitor
/// ports that get a copy when it leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub frame: Vec<u8>,
    pub monitors: Vec<PortId>,
}

/// What one source did at one scheduled port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SourceStats {
    pub queued_packets: u64,
    pub queued_bytes: u64,
    pub sent_packets: u64,
    pub sent_bytes: u64,
    /// Frames refused because this source's queue was full.
    pub dropped: u64,
    pub weight: u8,
    /// The source's minimum here, bits/s (absent: none honoured here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<u64>,
}

#[derive(Debug)]
struct SourceQueue {
    frames: VecDeque<Queued>,
    bytes: u64,
    weight: u8,
    deficit: u64,
    /// This turn's quantum was added.
    topped: bool,
    min: Option<ByteBucket>,
    stats: SourceStats,
}

#[derive(Debug)]
pub struct EgressScheduler {
    /// `None`: the port lost its rate; what is queued leaves at once.
    shaper: Option<ByteBucket>,
    max_frame: usize,
    queue_frames: usize,
    sources: BTreeMap<PortId, SourceQueue>,
    /// Sources with frames queued, in round-robin order.
    active: VecDeque<PortId>,
    /// The source last served for its minimum.
    min_cursor: PortId,
    deadline: Option<Duration>,
}

impl EgressScheduler {
    /// A scheduler of `rate` bits/s for frames of at most `max_frame` bytes, each
    /// source queueing at most `queue_frames`.
    pub fn new(rate: u64, max_frame: usize, queue_frames: usize, now: Duration) -> Self {
        Self {
            shaper: Some(ByteBucket::full(rate, burst_bytes(rate, max_frame), now)),
            max_frame,
            queue_frames: queue_frames.max(1),
            sources: BTreeMap::new(),
            active: VecDeque::new(),
            min_cursor: 0,
            deadline: None,
        }
    }

    /// The rate, bits/s (`None`: draining).
    pub fn rate(&self) -> Option<u64> {
        self.shaper.map(|s| s.rate())
    }

    /// A new rate (keeping the credit), or none: the queues drain at once.
    pub fn set_rate(&mut self, rate: Option<u64>, now: Duration) {
        match (rate, &mut self.shaper) {
            (Some(r), Some(s)) => s.reconfigure(r, burst_bytes(r, self.max_frame), now),
            (Some(r), None) => {
                self.shaper = Some(ByteBucket::full(r, burst_bytes(r, self.max_frame), now))
            }
            (None, _) => self.shaper = None,
        }
        // Come back at once: the choice may differ now.
        self.deadline = (!self.active.is_empty()).then_some(now);
    }

    /// Queues `item` from `src` (whose weight and minimum here are given: they apply
    /// from now on). `Err` gives the frame back when the source's queue is full.
    pub fn enqueue(
        &mut self,
        src: PortId,
        weight: u8,
        min: Option<u64>,
        item: Queued,
        now: Duration,
    ) -> Result<(), Queued> {
        let max_frame = self.max_frame;
        let q = self.sources.entry(src).or_insert_with(|| SourceQueue {
            frames: VecDeque::new(),
            bytes: 0,
            weight,
            deficit: 0,
            topped: false,
            min: None,
            stats: SourceStats::default(),
        });
        q.weight = weight.max(1);
        match (min, &mut q.min) {
            (Some(m), Some(b)) if b.rate() == m => {}
            (Some(m), slot) => *slot = Some(ByteBucket::full(m, burst_bytes(m, max_frame), now)),
            (None, slot) => *slot = None,
        }
        if q.frames.len() >= self.queue_frames {
            q.stats.dropped += 1;
            return Err(item);
        }
        if q.frames.is_empty() {
            self.active.push_back(src);
        }
        q.bytes += item.frame.len() as u64;
        q.frames.push_back(item);
        Ok(())
    }

    /// Frames queued, all sources.
    pub fn queued(&self) -> usize {
        self.sources.values().map(|q| q.frames.len()).sum()
    }

    /// When a frame may leave next (as of the last [`EgressScheduler::dequeue`] that
    /// found none); `None`: nothing waits for the clock.
    pub fn deadline(&self) -> Option<Duration> {
        if self.active.is_empty() {
            None
        } else {
            self.deadline
        }
    }

    /// The next frame that may leave at `now`, and its source.
    pub fn dequeue(&mut self, now: Duration) -> Option<(PortId, Queued)> {
        self.deadline = None;
        if self.active.is_empty() {
            return None;
        }
        let by_min = if self.shaper.is_some() {
            self.min_candidate(now)
        } else {
            None
        };
        let src = match by_min {
            Some(s) => s,
            None => self.drr_select()?,
        };
        let len = self.sources.get(&src)?.frames.front()?.frame.len();
        if let Some(shaper) = &mut self.shaper {
            let fits = shaper.has(len, now)
                // A frame larger than the bucket leaves when the bucket is full.
                || (len as u64 > shaper.burst() && shaper.bytes() >= shaper.burst());
            if !fits {
                let wait = shaper.wait_for(len.min(shaper.burst() as usize));
                self.deadline = Some(shaper.last() + wait.unwrap_or(Duration::from_millis(1)));
                return None;
            }
            shaper.debit(len);
        }
        let q = self.sources.get_mut(&src)?;
        let item = q.frames.pop_front()?;
        q.bytes -= len as u64;
        if by_min.is_none() {
            q.deficit = q.deficit.saturating_sub(len as u64);
        }
        if let Some(m) = &mut q.min {
            m.refill(now);
            m.debit(len);
        }
        q.stats.sent_packets += 1;
        q.stats.sent_bytes += len as u64;
        if q.frames.is_empty() {
            q.deficit = 0;
            q.topped = false;
            self.active.retain(|s| *s != src);
        }
        Some((src, item))
    }

    /// A source whose minimum bucket holds its next frame, round robin after the one
    /// served last.
    fn min_candidate(&mut self, now: Duration) -> Option<PortId> {
        let cursor = self.min_cursor;
        let after = self.sources.range_mut(cursor.saturating_add(1)..);
        let mut found = None;
        for (id, q) in after {
            if Self::min_ready(q, now) {
                found = Some(*id);
                break;
            }
        }
        if found.is_none() {
            for (id, q) in self.sources.range_mut(..=cursor) {
                if Self::min_ready(q, now) {
                    found = Some(*id);
                    break;
                }
            }
        }
        if let Some(id) = found {
            self.min_cursor = id;
        }
        found
    }

    fn min_ready(q: &mut SourceQueue, now: Duration) -> bool {
        match (&mut q.min, q.frames.front()) {
            (Some(b), Some(head)) => b.has(head.frame.len(), now),
            _ => false,
        }
    }

    /// The source deficit round robin serves next (it stays at the front of `active`
    /// until its deficit no longer covers its next frame).
    fn drr_select(&mut self) -> Option<PortId> {
        let quantum = self.max_frame as u64;
        loop {
            let src = *self.active.front()?;
            let Some(q) = self.sources.get_mut(&src) else {
                self.active.pop_front();
                continue;
            };
            let Some(head) = q.frames.front() else {
                self.active.pop_front();
                q.deficit = 0;
                q.topped = false;
                continue;
            };
            if !q.topped {
                q.deficit += quantum * u64::from(q.weight);
                q.topped = true;
            }
            if head.frame.len() as u64 <= q.deficit {
                return Some(src);
            }
            q.topped = false;
            self.active.rotate_left(1);
        }
    }

    /// Forgets `src`; returns how many of its frames were dropped.
    pub fn remove_source(&mut self, src: PortId) -> usize {
        self.active.retain(|s| *s != src);
        self.sources.remove(&src).map_or(0, |q| q.frames.len())
    }

    /// Each source's counters.
    pub fn stats(&self) -> impl Iterator<Item = (PortId, SourceStats)> + '_ {
        self.sources.iter().map(|(id, q)| {
            let mut s = q.stats;
            s.queued_packets = q.frames.len() as u64;
            s.queued_bytes = q.bytes;
            s.weight = q.weight;
            s.min = q.min.map(|b| b.rate());
            (*id, s)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(len: usize, tag: u8) -> Queued {
        Queued {
            frame: vec![tag; len],
            monitors: Vec::new(),
        }
    }

    /// Keeps sources backlogged for `secs` seconds; bytes sent per source.
    fn run(
        s: &mut EgressScheduler,
        srcs: &[(PortId, u8, Option<u64>, usize)],
        secs: u64,
    ) -> BTreeMap<PortId, u64> {
        let mut now = Duration::ZERO;
        let end = Duration::from_secs(secs);
        let mut sent = BTreeMap::new();
        while now < end {
            for &(src, w, min, len) in srcs {
                while s.enqueue(src, w, min, item(len, src as u8), now).is_ok() {}
            }
            while let Some((src, q)) = s.dequeue(now) {
                *sent.entry(src).or_default() += q.frame.len() as u64;
            }
            now = s
                .deadline()
                .expect("backlogged")
                .max(now + Duration::from_nanos(1));
        }
        sent
    }

    #[test]
    fn weights_share_the_rate_and_a_lone_source_takes_it_all() {
        // 10 Mbit/s for 10 s = 12.5 MB.
        let mut s = EgressScheduler::new(10_000_000, 1518, 64, Duration::ZERO);
        let sent = run(&mut s, &[(1, 1, None, 1000), (2, 3, None, 1000)], 10);
        let total = (sent[&1] + sent[&2]) as f64;
        assert!((total / 12_500_000.0 - 1.0).abs() < 0.01, "{total}");
        let share = sent[&1] as f64 / total;
        assert!((share - 0.25).abs() < 0.01, "{share}");
        let mut s = EgressScheduler::new(10_000_000, 1518, 64, Duration::ZERO);
        let sent = run(&mut s, &[(1, 1, None, 300)], 10);
        assert!(
            (sent[&1] as f64 / 12_500_000.0 - 1.0).abs() < 0.01,
            "{sent:?}"
        );
        // Different frame sizes: bytes, not frames, are shared.
        let mut s = EgressScheduler::new(10_000_000, 1518, 64, Duration::ZERO);
        let sent = run(&mut s, &[(1, 1, None, 1500), (2, 1, None, 100)], 10);
        let ratio = sent[&1] as f64 / sent[&2] as f64;
        assert!((ratio - 1.0).abs() < 0.05, "{sent:?}");
    }

    #[test]
    fn minimums_come_first_then_weights() {
        // 6 of 10 Mbit/s reserved for source 1 (weight 1) against weight 3.
        let mut s = EgressScheduler::new(10_000_000, 1518, 64, Duration::ZERO);
        let sent = run(
            &mut s,
            &[(1, 1, Some(6_000_000), 1000), (2, 3, None, 1000)],
            10,
        );
        let share = sent[&1] as f64 / (sent[&1] + sent[&2]) as f64;
        assert!((share - 0.6).abs() < 0.02, "{share}");
        // A minimum below the weighted share changes nothing.
        let mut s = EgressScheduler::new(10_000_000, 1518, 64, Duration::ZERO);
        let sent = run(
            &mut s,
            &[(1, 1, Some(1_000_000), 1000), (2, 1, None, 1000)],
            10,
        );
        let share = sent[&1] as f64 / (sent[&1] + sent[&2]) as f64;
        assert!((share - 0.5).abs() < 0.02, "{share}");
    }

    #[test]
    fn queues_are_bounded_and_a_lost_rate_drains_them() {
        let t = Duration::from_secs(1);
        let mut s = EgressScheduler::new(1_000_000, 1518, 4, t);
        let accepted = (0..10)
            .filter(|_| s.enqueue(7, 1, None, item(1000, 7), t).is_ok())
            .count();
        assert_eq!(accepted, 4);
        let st: Vec<_> = s.stats().collect();
        assert_eq!(
            (
                st[0].1.dropped,
                st[0].1.queued_packets,
                st[0].1.queued_bytes
            ),
            (6, 4, 4000)
        );
        // 1 Mbit/s holds 1518 bytes: one frame now, the next 3.856 ms later (482
        // bytes missing at 125 bytes/ms).
        assert!(s.dequeue(t).is_some());
        assert!(s.dequeue(t).is_none());
        assert_eq!(s.deadline(), Some(t + Duration::from_nanos(3_856_000)));
        assert!(s.dequeue(t + Duration::from_nanos(3_855_999)).is_none());
        assert!(s.dequeue(t + Duration::from_nanos(3_856_000)).is_some());
        s.set_rate(None, t);
        assert_eq!(s.deadline(), Some(t));
        assert_eq!(std::iter::from_fn(|| s.dequeue(t)).count(), 2);
        assert_eq!((s.queued(), s.deadline()), (0, None));
        assert_eq!(s.remove_source(7), 0);
    }
}
