//! Which etcd member a node talks to. One connection per member (never one channel
//! spread over all of them: a dead member keeps getting its share of the requests
//! there, each failing with "tcp connect error", and a node whose renewals fail that
//! way during an election fences itself for nothing). Every request goes to the
//! *current* member; a request that finds it unreachable moves the node to the next
//! member a health probe last saw with a leader, and the node stays there.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The members' health and the one in use. Lock-free: the probe task and every
/// request share it.
#[derive(Debug)]
pub struct Endpoints {
    /// Whether the last probe of member i had an answer and a leader.
    healthy: Vec<AtomicBool>,
    current: AtomicUsize,
}

impl Endpoints {
    /// `n` members (n ≥ 1), all presumed healthy, the first in use.
    pub fn new(n: usize) -> Self {
        Endpoints {
            healthy: (0..n.max(1)).map(|_| AtomicBool::new(true)).collect(),
            current: AtomicUsize::new(0),
        }
    }

    /// The member requests go to now.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }

    /// A probe's verdict on member `i`.
    pub fn set_healthy(&self, i: usize, ok: bool) {
        if let Some(h) = self.healthy.get(i) {
            h.store(ok, Ordering::Release);
        }
        // The one in use failed its probe: move before a request has to find out.
        if !ok && self.current() == i {
            self.failed(i);
        }
    }

    pub fn is_healthy(&self, i: usize) -> bool {
        self.healthy
            .get(i)
            .is_some_and(|h| h.load(Ordering::Acquire))
    }

    /// A request to member `i` found it unreachable (or without a leader): the next
    /// healthy member after `i` becomes current (the next one at all when none is
    /// healthy, so a node cut off keeps trying each in turn). A failure reported by a
    /// request that started before the node had already moved changes nothing.
    /// Returns the member now in use.
    pub fn failed(&self, i: usize) -> usize {
        let n = self.healthy.len();
        if let Some(h) = self.healthy.get(i) {
            h.store(false, Ordering::Release);
        }
        let next = (1..=n)
            .map(|k| (i + k) % n)
            .find(|&j| j != i && self.is_healthy(j))
            .unwrap_or((i + 1) % n);
        match self
            .current
            .compare_exchange(i, next, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => next,
            Err(moved) => moved,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_member_is_left_for_the_next_healthy_one_and_stays_left() {
        let e = Endpoints::new(3);
        assert_eq!(e.current(), 0);
        e.set_healthy(1, false);
        // 0 fails: 1 is known bad, so 2.
        assert_eq!(e.failed(0), 2);
        assert_eq!(e.current(), 2);
        // A late failure report of 0 (a request that began before the move) keeps 2.
        assert_eq!(e.failed(0), 2);
        assert_eq!(e.current(), 2);
    }

    #[test]
    fn a_probe_that_fails_the_current_member_moves_the_node() {
        let e = Endpoints::new(3);
        e.set_healthy(0, false);
        assert_eq!(e.current(), 1);
        // Member 0 healthy again: the node stays where it is.
        e.set_healthy(0, true);
        assert_eq!(e.current(), 1);
    }

    #[test]
    fn with_no_healthy_member_each_is_tried_in_turn() {
        let e = Endpoints::new(3);
        for i in 0..3 {
            e.set_healthy(i, false);
        }
        let start = e.current();
        let seen: Vec<usize> = (0..3).map(|_| e.failed(e.current())).collect();
        assert_eq!(seen.len(), 3);
        assert_eq!(e.current(), start, "three failures go round once");
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2]);
    }

    #[test]
    fn one_member_stays_in_use() {
        let e = Endpoints::new(1);
        assert_eq!(e.failed(0), 0);
        e.set_healthy(0, false);
        assert_eq!(e.current(), 0);
    }
}
