//! Storm limits, an extension of the filter stage: per port, the broadcast and
//! multicast frames the port may send into the switch, in packets per second
//! (`storm=PPS`, [`crate::port::PortConfig::storm`]).
//!
//! A token bucket per port on the clock passed in: it holds up to one second's worth
//! (PPS frames), starts full, refills continuously; a broadcast or multicast frame
//! takes a token or is dropped as `storm-limit`. Unicast frames are not counted (an
//! unknown unicast is flooded too, but the filter stage runs before the MAC table is
//! looked up: not limited). The bucket runs last in the filter stage, so frames the
//! guards or ACLs drop take no token. Changing a port's limit starts a full bucket.

use std::any::Any;
use std::collections::HashMap;
use std::time::Duration;

use crate::extension::{DropReason, Extension, FrameCtx, Stage, Verdict};
use crate::frame::is_multicast;
use crate::PortId;

pub const STORM_LIMIT: DropReason = DropReason("storm-limit");
/// The highest limit a port may have (packets per second).
pub const MAX_STORM_PPS: u32 = 10_000_000;

const NANOS: u64 = 1_000_000_000;

/// A token bucket counted in token-nanoseconds: exact in integers, refilled by
/// `elapsed ns × pps`, one frame costs 10⁹.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    pps: u32,
    credit: u64,
    last: Duration,
}

impl Bucket {
    fn full(pps: u32, now: Duration) -> Self {
        Self {
            pps,
            credit: u64::from(pps) * NANOS,
            last: now,
        }
    }

    fn take(&mut self, now: Duration) -> bool {
        let cap = u64::from(self.pps) * NANOS;
        // At most a second counts (the bucket is full by then): no overflow.
        let elapsed = now.saturating_sub(self.last).min(Duration::from_secs(1));
        self.last = self.last.max(now);
        let refill = elapsed.as_nanos() as u64 * u64::from(self.pps);
        self.credit = self.credit.saturating_add(refill).min(cap);
        if self.credit >= NANOS {
            self.credit -= NANOS;
            true
        } else {
            false
        }
    }
}

/// The storm-limit extension.
#[derive(Debug, Default)]
pub struct StormControl {
    buckets: HashMap<PortId, Bucket>,
}

impl Extension for StormControl {
    fn name(&self) -> &str {
        "storm"
    }
    fn stage(&self) -> Stage {
        Stage::Filter
    }
    fn ingress(&mut self, ctx: &FrameCtx<'_>) -> Verdict {
        let Some(pps) = ctx.port_config.storm else {
            return Verdict::Pass;
        };
        if !is_multicast(&ctx.frame.dst) {
            return Verdict::Pass;
        }
        let b = self
            .buckets
            .entry(ctx.port)
            .or_insert_with(|| Bucket::full(pps, ctx.now));
        if b.pps != pps {
            *b = Bucket::full(pps, ctx.now);
        }
        if b.take(ctx.now) {
            Verdict::Pass
        } else {
            Verdict::Drop(STORM_LIMIT)
        }
    }
    fn port_removed(&mut self, port: PortId, _name: &str) {
        self.buckets.remove(&port);
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_a_second_and_refills_at_its_rate() {
        let t0 = Duration::from_secs(5);
        let mut b = Bucket::full(100, t0);
        let passed = (0..1000).filter(|_| b.take(t0)).count();
        assert_eq!(passed, 100, "a full bucket: one second's worth");
        // 10 ms later: one more token.
        assert!(b.take(t0 + Duration::from_millis(10)));
        assert!(!b.take(t0 + Duration::from_millis(10)));
        assert!(!b.take(t0 + Duration::from_millis(19)));
        assert!(b.take(t0 + Duration::from_millis(20)));
        // A long pause refills to the cap, not beyond.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..1000).filter(|_| b.take(later)).count(), 100);
        // A clock that steps back does not mint tokens.
        assert!(!b.take(t0));
        assert!(!b.take(later));
        // The extremes do not overflow.
        let mut max = Bucket::full(MAX_STORM_PPS, Duration::ZERO);
        assert!(max.take(Duration::from_secs(u64::from(u32::MAX))));
    }
}
