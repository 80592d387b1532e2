//! Token-bucket rate limiting of a device's I/O: bytes per second and operations per
//! second, each a bucket of `size` tokens refilled evenly over `refill_time` (the model
//! of Firecracker and Cloud Hypervisor). A device worker asks [`RateLimiter::admit`]
//! before each request; a refusal says how long to wait, and the worker sleeps on its
//! own timer instead of spinning.
//!
//! A request larger than a bucket is admitted once that bucket is full and leaves it in
//! debt, so huge requests are slowed to the configured rate rather than refused forever.

use std::sync::Mutex;
use std::time::{Duration, Instant};
use vireo_util::sync;

/// One bucket's settings: `size` tokens (bytes or operations), refilled from empty to
/// full in `refill_time_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBucketConfig {
    pub size: u64,
    pub refill_time_ms: u64,
}

/// A device's limits; either bucket may be absent (no limit of that kind).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimiterConfig {
    pub bandwidth: Option<TokenBucketConfig>,
    pub ops: Option<TokenBucketConfig>,
}

#[derive(Debug)]
struct TokenBucket {
    size: u64,
    refill_ns: u128,
    /// Tokens now; negative while a larger-than-bucket request is being paid off.
    budget: i128,
    last_refill: Instant,
}

impl TokenBucket {
    fn new(cfg: TokenBucketConfig, now: Instant) -> Option<Self> {
        if cfg.size == 0 || cfg.refill_time_ms == 0 {
            return None;
        }
        Some(Self {
            size: cfg.size,
            refill_ns: u128::from(cfg.refill_time_ms) * 1_000_000,
            budget: i128::from(cfg.size),
            last_refill: now,
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_refill).as_nanos();
        let added = elapsed * u128::from(self.size) / self.refill_ns;
        if added == 0 {
            return;
        }
        let size = i128::from(self.size);
        self.budget = (self.budget + added as i128).min(size);
        if self.budget == size {
            self.last_refill = now;
        } else {
            // Advance only by the time the whole tokens took, keeping the fraction.
            let used_ns = added * self.refill_ns / u128::from(self.size);
            self.last_refill += Duration::from_nanos(used_ns.min(u64::MAX as u128) as u64);
        }
    }

    /// Tokens a request of `tokens` must find in the bucket before it may run.
    fn needed(&self, tokens: u64) -> i128 {
        i128::from(tokens.min(self.size))
    }

    /// Time until the bucket holds `tokens` (zero if it already does).
    fn wait_for(&self, tokens: u64) -> Duration {
        let missing = self.needed(tokens) - self.budget;
        if missing <= 0 {
            return Duration::ZERO;
        }
        let ns = (missing as u128 * self.refill_ns).div_ceil(u128::from(self.size));
        Duration::from_nanos(ns.min(u64::MAX as u128) as u64)
    }
}

#[derive(Debug)]
struct Buckets {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

/// The limiter of one device, shared by all its queue workers.
#[derive(Debug)]
pub struct RateLimiter {
    buckets: Mutex<Buckets>,
}

impl RateLimiter {
    /// None when `cfg` sets no limit (the device then skips the check entirely).
    pub fn new(cfg: &RateLimiterConfig) -> Option<Self> {
        Self::new_at(cfg, Instant::now())
    }

    fn new_at(cfg: &RateLimiterConfig, now: Instant) -> Option<Self> {
        let bandwidth = cfg.bandwidth.and_then(|b| TokenBucket::new(b, now));
        let ops = cfg.ops.and_then(|b| TokenBucket::new(b, now));
        if bandwidth.is_none() && ops.is_none() {
            return None;
        }
        Some(Self {
            buckets: Mutex::new(Buckets { bandwidth, ops }),
        })
    }

    /// Takes the tokens for one operation of `bytes` if both buckets allow it now;
    /// otherwise takes nothing and returns how long to wait before asking again.
    pub fn admit(&self, bytes: u64) -> Result<(), Duration> {
        self.admit_at(bytes, Instant::now())
    }

    fn admit_at(&self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let mut b = sync::lock(&self.buckets);
        let Buckets { bandwidth, ops } = &mut *b;
        let mut wait = Duration::ZERO;
        for (bucket, tokens) in [(bandwidth.as_mut(), bytes), (ops.as_mut(), 1)] {
            if let Some(bucket) = bucket {
                bucket.refill(now);
                wait = wait.max(bucket.wait_for(tokens));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        for (bucket, tokens) in [(bandwidth.as_mut(), bytes), (ops.as_mut(), 1)] {
            if let Some(bucket) = bucket {
                bucket.budget -= i128::from(tokens);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(bw: Option<(u64, u64)>, ops: Option<(u64, u64)>, t0: Instant) -> RateLimiter {
        let cfg = RateLimiterConfig {
            bandwidth: bw.map(|(size, refill_time_ms)| TokenBucketConfig {
                size,
                refill_time_ms,
            }),
            ops: ops.map(|(size, refill_time_ms)| TokenBucketConfig {
                size,
                refill_time_ms,
            }),
        };
        RateLimiter::new_at(&cfg, t0).expect("limited")
    }

    #[test]
    fn no_limit_means_no_limiter() {
        assert!(RateLimiter::new(&RateLimiterConfig::default()).is_none());
        let zero = RateLimiterConfig {
            ops: Some(TokenBucketConfig {
                size: 0,
                refill_time_ms: 100,
            }),
            bandwidth: None,
        };
        assert!(
            RateLimiter::new(&zero).is_none(),
            "a zero-size bucket limits nothing"
        );
    }

    #[test]
    fn ops_bucket_admits_its_size_then_one_per_refill_share() {
        let t0 = Instant::now();
        // 10 ops per 100 ms = 100 IOPS.
        let rl = limiter(None, Some((10, 100)), t0);
        for _ in 0..10 {
            assert_eq!(rl.admit_at(4096, t0), Ok(()));
        }
        let wait = rl.admit_at(4096, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(10), "one op refills in 10 ms");
        assert!(rl.admit_at(4096, t0 + Duration::from_millis(9)).is_err());
        assert_eq!(rl.admit_at(4096, t0 + Duration::from_millis(10)), Ok(()));
    }

    #[test]
    fn sustained_rate_matches_the_configuration() {
        let t0 = Instant::now();
        // 1 MiB per 100 ms = 10 MiB/s; 64 KiB requests.
        let rl = limiter(Some((1 << 20, 100)), None, t0);
        let mut now = t0;
        let mut bytes = 0u64;
        let end = t0 + Duration::from_secs(10);
        while now < end {
            match rl.admit_at(64 << 10, now) {
                Ok(()) => bytes += 64 << 10,
                Err(wait) => now += wait,
            }
        }
        // 1 MiB burst + 10 s at 10 MiB/s.
        let expected = (1u64 << 20) + 100 * (1 << 20);
        assert!(
            bytes.abs_diff(expected) <= 64 << 10,
            "moved {bytes} bytes, expected about {expected}"
        );
    }

    #[test]
    fn request_larger_than_the_bucket_runs_when_full_and_leaves_debt() {
        let t0 = Instant::now();
        let rl = limiter(Some((1000, 1000)), None, t0); // 1000 B/s
        assert_eq!(
            rl.admit_at(5000, t0),
            Ok(()),
            "full bucket admits a big request"
        );
        // 4000 bytes of debt + 1000 for the next bucket-sized request: 5 s.
        let wait = rl.admit_at(1000, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(5));
        assert_eq!(rl.admit_at(1000, t0 + Duration::from_secs(5)), Ok(()));
    }

    #[test]
    fn both_buckets_must_agree_and_a_refusal_takes_nothing() {
        let t0 = Instant::now();
        let rl = limiter(Some((8192, 1000)), Some((100, 1000)), t0);
        assert_eq!(rl.admit_at(8192, t0), Ok(()));
        // Bandwidth is empty: refused, and the ops bucket keeps its 99 tokens.
        assert!(rl.admit_at(4096, t0).is_err());
        for _ in 0..99 {
            assert_eq!(
                rl.admit_at(0, t0),
                Ok(()),
                "zero-byte ops (flush) use ops only"
            );
        }
        assert!(rl.admit_at(0, t0).is_err());
    }

    #[test]
    fn fractional_refill_is_not_lost() {
        let t0 = Instant::now();
        let rl = limiter(None, Some((3, 1000)), t0); // one op per 333.3 ms
        for _ in 0..3 {
            assert_eq!(rl.admit_at(0, t0), Ok(()));
        }
        // Polling every 100 ms must still yield 3 ops per second, not fewer.
        let mut admitted = 0;
        for step in 1..=30 {
            if rl
                .admit_at(0, t0 + Duration::from_millis(100 * step))
                .is_ok()
            {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 9, "3 s at 3 ops/s");
    }
}
