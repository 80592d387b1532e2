//! A token bucket of bytes at a rate in bits per second, on a clock passed in: the
//! policer, the egress shaper and the minimum-bandwidth buckets of [`crate::qos`]
//! and [`crate::scheduler`].
//!
//! Exact integer arithmetic: the credit is counted in bit-nanoseconds (a byte is
//! 8·10⁹ of them), refilled by `elapsed ns × bits/s`, so no rounding drifts the rate.
//! The bucket holds at most `burst` bytes and starts full; a clock that steps back
//! mints nothing. [`ByteBucket::debit`] may take it into debt, down to minus the
//! burst (a minimum's bucket charged for frames sent another way).

use std::time::Duration;

/// Credit units in one byte: 8 bits × 10⁹ ns.
const UNITS_PER_BYTE: i128 = 8 * 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteBucket {
    /// Bits per second.
    rate: u64,
    /// Bytes it holds at most.
    burst: u64,
    credit: i128,
    last: Duration,
}

impl ByteBucket {
    /// A full bucket of `burst` bytes (at least one byte) refilled at `rate` bits/s.
    pub fn full(rate: u64, burst: u64, now: Duration) -> Self {
        let burst = burst.max(1);
        Self {
            rate: rate.max(1),
            burst,
            credit: i128::from(burst) * UNITS_PER_BYTE,
            last: now,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Changes the rate and burst, keeping the credit (cut to the new burst).
    pub fn reconfigure(&mut self, rate: u64, burst: u64, now: Duration) {
        self.refill(now);
        self.rate = rate.max(1);
        self.burst = burst.max(1);
        self.credit = self.credit.clamp(-self.cap(), self.cap());
    }

    fn cap(&self) -> i128 {
        i128::from(self.burst) * UNITS_PER_BYTE
    }

    /// Adds the credit earned since the last call.
    pub fn refill(&mut self, now: Duration) {
        let elapsed = i128::try_from(now.saturating_sub(self.last).as_nanos()).unwrap_or(i128::MAX);
        self.last = self.last.max(now);
        let earned = elapsed.saturating_mul(i128::from(self.rate));
        self.credit = self.credit.saturating_add(earned).min(self.cap());
    }

    /// Whether `bytes` fit the credit at `now` (refilled first).
    pub fn has(&mut self, bytes: usize, now: Duration) -> bool {
        self.refill(now);
        self.credit >= Self::units(bytes)
    }

    /// Takes `bytes` if they fit; whether they did.
    pub fn take(&mut self, bytes: usize, now: Duration) -> bool {
        if self.has(bytes, now) {
            self.credit -= Self::units(bytes);
            true
        } else {
            false
        }
    }

    /// Takes `bytes` whether they fit or not: the credit may go into debt, down to
    /// minus the burst.
    pub fn debit(&mut self, bytes: usize) {
        self.credit = (self.credit - Self::units(bytes)).max(-self.cap());
    }

    /// How long after the last refill until `bytes` fit (zero if they do now; never
    /// for a frame larger than the burst).
    pub fn wait_for(&self, bytes: usize) -> Option<Duration> {
        let need = Self::units(bytes);
        if need > self.cap() {
            return None;
        }
        let missing = (need - self.credit).max(0);
        // Rounded up: at that time the frame fits, never a nanosecond early.
        let rate = i128::from(self.rate);
        let ns = (missing + rate - 1) / rate;
        Some(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
    }

    /// The time of the last refill.
    pub fn last(&self) -> Duration {
        self.last
    }

    /// Whole bytes of credit now (as of the last refill; 0 in debt).
    pub fn bytes(&self) -> u64 {
        u64::try_from(self.credit.max(0) / UNITS_PER_BYTE).unwrap_or(u64::MAX)
    }

    fn units(bytes: usize) -> i128 {
        (bytes as i128) * UNITS_PER_BYTE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qos::MAX_RATE;

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let t0 = Duration::from_secs(1);
        // 8 Mbit/s = 1 byte/µs; 10,000 bytes of burst.
        let mut b = ByteBucket::full(8_000_000, 10_000, t0);
        assert!(b.take(10_000, t0));
        assert!(!b.take(1, t0));
        assert_eq!(b.wait_for(1000), Some(Duration::from_micros(1000)));
        assert!(!b.take(1000, t0 + Duration::from_micros(999)));
        assert!(b.take(1000, t0 + Duration::from_micros(1000)));
        // Capped at the burst after a long pause; a frame beyond it never fits.
        let later = t0 + Duration::from_secs(3600);
        assert!(b.has(10_000, later) && !b.has(10_001, later));
        assert_eq!(b.wait_for(10_001), None);
        // The clock stepping back mints nothing.
        assert!(b.take(10_000, later));
        assert!(!b.take(1, t0));
        // Debit goes into debt down to minus the burst, paid back by the refill.
        b.debit(1_000_000);
        assert_eq!(b.bytes(), 0);
        assert_eq!(b.wait_for(1000), Some(Duration::from_micros(11_000)));
        // Extremes do not overflow.
        let mut max = ByteBucket::full(MAX_RATE, MAX_RATE, Duration::ZERO);
        assert!(max.take(1500, Duration::MAX));
        // Exact over a long run: 1 kbit/s for 1000 s is 125,000 bytes.
        let mut slow = ByteBucket::full(1000, 125, Duration::ZERO);
        let mut sent = 0u64;
        for ms in 0..1_000_000u64 {
            if slow.take(125, Duration::from_millis(ms)) {
                sent += 125;
            }
        }
        assert_eq!(sent, 125 + 125_000 - 125);
    }
}
