//! Adaptive polling of a queue after it ran dry (QEMU's `poll-max-ns` model).
//!
//! Sleeping in `epoll_wait` and being woken by the guest's kick costs tens of
//! microseconds where the host is itself a VM (the wake-up is an IPI to an idle
//! vCPU). A worker that watches the available ring for a few microseconds
//! after its last request serves a driver that submits the next one at once
//! without that cost. The window adapts: it grows (doubling, up to the disk's
//! `poll_us`) when the worker slept only briefly before the next kick, so
//! polling a little longer would have caught it, and shrinks (halving, down
//! to nothing) when the worker slept longer than the maximum, so polling was
//! wasted CPU.

use std::time::{Duration, Instant};

/// The poll window of one queue worker.
#[derive(Debug)]
pub(super) struct PollWindow {
    max: Duration,
    current: Duration,
    slept_at: Option<Instant>,
}

/// Smallest window a growing one starts from.
const MIN_GROW: Duration = Duration::from_micros(1);

impl PollWindow {
    pub fn new(max_us: u32) -> Self {
        let max = Duration::from_micros(u64::from(max_us));
        Self {
            max,
            current: max,
            slept_at: None,
        }
    }

    /// How long to poll now (zero: do not poll).
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The worker goes to sleep (polling found nothing).
    pub fn sleeping(&mut self) {
        self.slept_at = Some(Instant::now());
    }

    /// The worker woke up for a kick: adapts the window to how long it slept.
    pub fn woke_for_kick(&mut self) {
        let Some(at) = self.slept_at.take() else {
            return;
        };
        if self.max.is_zero() {
            return;
        }
        let slept = at.elapsed();
        if slept <= self.max {
            self.current = (self.current * 2).max(MIN_GROW).min(self.max);
        } else {
            self.current /= 2;
            if self.current < MIN_GROW {
                self.current = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_window_stays_zero() {
        let mut w = PollWindow::new(0);
        w.sleeping();
        w.woke_for_kick();
        assert_eq!(w.current(), Duration::ZERO);
    }

    #[test]
    fn long_sleeps_shrink_the_window_to_nothing_and_short_ones_grow_it_back() {
        let mut w = PollWindow::new(64);
        assert_eq!(w.current(), Duration::from_micros(64));
        for _ in 0..10 {
            w.slept_at = Some(Instant::now() - Duration::from_millis(5));
            w.woke_for_kick();
        }
        assert_eq!(w.current(), Duration::ZERO);
        let mut steps = 0;
        while w.current() < Duration::from_micros(64) {
            w.sleeping(); // woken at once: a short sleep
            w.woke_for_kick();
            steps += 1;
            assert!(steps < 10, "window did not grow back: {:?}", w.current());
        }
        assert_eq!(
            w.current(),
            Duration::from_micros(64),
            "capped at the maximum"
        );
    }

    #[test]
    fn a_kick_without_a_sleep_changes_nothing() {
        let mut w = PollWindow::new(50);
        w.woke_for_kick();
        assert_eq!(w.current(), Duration::from_micros(50));
    }
}
