//! QoS as Hyper-V's switch has it, per port: a maximum bandwidth (a cap, per
//! direction), a link rate for ports whose speed is known (uplinks), a weight and an
//! absolute minimum for the port's traffic where it meets contention.
//!
//! This module holds the configuration (rates with k/M/G suffixes, [`QosSpec`], its
//! checks) and the **policer**, a filter-stage extension: a port whose cap covers
//! `out` (out of the VM, into the switch) has a token bucket ([`ByteBucket`]) of
//! `max` bits/s; a frame that does not fit is dropped as `qos-max`. The other half,
//! the **egress scheduler** (frames *to* a port with a known rate queued per source
//! port, deficit round robin by weight, minimums first, shaped to the rate), lives in
//! [`crate::scheduler`].
//!
//! Rates count the bytes of the Ethernet frames as the switch handles them (no FCS,
//! preamble or inter-frame gap). Every bucket holds 10 ms of its rate, and at least
//! one frame of the largest size the switch passes, and starts full.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::bucket::ByteBucket;
use crate::extension::{DropReason, Extension, FrameCtx, Stage, Verdict};
use crate::PortId;

/// A frame over a port's `out` cap.
pub const QOS_MAX: DropReason = DropReason("qos-max");
/// A frame to a scheduled port whose queue for the frame's source was full.
pub const QOS_QUEUE: DropReason = DropReason("qos-queue");
/// A frame still queued for a port when its source port was removed.
pub const QOS_SOURCE_REMOVED: DropReason = DropReason("qos-source-removed");

/// Rates a port may be given, bits per second.
pub const MIN_RATE: u64 = 1_000;
pub const MAX_RATE: u64 = 1_000_000_000_000;
/// Weights a port may be given; [`DEFAULT_WEIGHT`] without one.
pub const MAX_WEIGHT: u8 = 100;
pub const DEFAULT_WEIGHT: u8 = 1;
/// How much of its rate a bucket holds.
pub const BURST_TIME: Duration = Duration::from_millis(10);

/// A bucket's burst for `rate`: 10 ms of it, at least one frame of `max_frame` bytes.
pub fn burst_bytes(rate: u64, max_frame: usize) -> u64 {
    let ten_ms = rate / 8 / (1000 / BURST_TIME.as_millis() as u64);
    ten_ms.max(max_frame as u64)
}

/// Why a QoS setting is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QosError {
    #[error("bad rate '{0}' (bits/s: a number with an optional k, M, G or T suffix, e.g. 8M)")]
    Syntax(String),
    #[error("rate {0} bit/s is out of range ({MIN_RATE} bit/s - 1T)")]
    Range(u128),
    #[error("bad max direction '{0}' (in, out, both)")]
    Direction(String),
    #[error("weight {0} is out of range (1-{MAX_WEIGHT})")]
    Weight(u64),
    #[error("port '{port}': min {min} is above its own max {max} out")]
    MinAboveMax { port: String, min: Rate, max: Rate },
    #[error(
        "minimums on port '{port}' would total {total}, over its rate {rate} (from {sources})"
    )]
    Oversubscribed {
        port: String,
        total: Rate,
        rate: Rate,
        sources: String,
    },
}

/// A rate in bits per second, `MIN_RATE..=MAX_RATE`. Written `8M`, `1.5G`, `64k` or
/// `8000000` (decimal suffixes: k = 10³, M = 10⁶, G = 10⁹, T = 10¹²); shown and
/// serialized as the number of bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(u64);

impl Rate {
    pub fn new(bits_per_s: u64) -> Result<Self, QosError> {
        if (MIN_RATE..=MAX_RATE).contains(&bits_per_s) {
            Ok(Self(bits_per_s))
        } else {
            Err(QosError::Range(u128::from(bits_per_s)))
        }
    }

    pub fn bits_per_s(self) -> u64 {
        self.0
    }
}

impl FromStr for Rate {
    type Err = QosError;
    fn from_str(s: &str) -> Result<Self, QosError> {
        let bad = || QosError::Syntax(s.to_string());
        let t = s.trim();
        let (num, mult): (&str, u128) = match t.char_indices().last() {
            Some((i, 'k' | 'K')) => (&t[..i], 1_000),
            Some((i, 'm' | 'M')) => (&t[..i], 1_000_000),
            Some((i, 'g' | 'G')) => (&t[..i], 1_000_000_000),
            Some((i, 't' | 'T')) => (&t[..i], 1_000_000_000_000),
            _ => (t, 1),
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if int.is_empty()
            || frac.len() > 12
            || !(int.bytes().chain(frac.bytes())).all(|c| c.is_ascii_digit())
        {
            return Err(bad());
        }
        if int.len() > 15 {
            return Err(QosError::Range(u128::MAX));
        }
        let int: u128 = int.parse().map_err(|_| bad())?;
        let mut value = int * mult;
        if !frac.is_empty() {
            let f: u128 = frac.parse().map_err(|_| bad())?;
            let scale = 10u128.pow(frac.len() as u32);
            let part = f * mult;
            if !part.is_multiple_of(scale) {
                return Err(bad());
            }
            value += part / scale;
        }
        let v = u64::try_from(value).map_err(|_| QosError::Range(value))?;
        Rate::new(v)
    }
}

impl fmt::Display for Rate {
    /// `8M`, `1.5G`, `64k` when exact, else the number.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (div, suffix) in [
            (1_000_000_000_000, "T"),
            (1_000_000_000, "G"),
            (1_000_000, "M"),
            (1_000, "k"),
        ] {
            if self.0 >= div {
                if self.0.is_multiple_of(div) {
                    return write!(f, "{}{suffix}", self.0 / div);
                }
                if (self.0 * 10).is_multiple_of(div) {
                    return write!(f, "{}.{}{suffix}", self.0 / div, (self.0 % div) * 10 / div);
                }
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Rate {
    /// A number of bits per second or a string (`"8M"`).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Rate::new(n),
            Raw::Text(s) => s.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// Which way a port's cap holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapDirection {
    /// Frames the switch delivers to the port (into the VM): shaped by the port's
    /// egress scheduler (queued, not dropped, until its queues are full).
    In,
    /// Frames the port sends into the switch (out of the VM): policed (dropped as
    /// `qos-max`).
    Out,
    #[default]
    Both,
}

impl CapDirection {
    pub fn covers_in(self) -> bool {
        matches!(self, Self::In | Self::Both)
    }
    pub fn covers_out(self) -> bool {
        matches!(self, Self::Out | Self::Both)
    }
}

impl FromStr for CapDirection {
    type Err = QosError;
    fn from_str(s: &str) -> Result<Self, QosError> {
        match s {
            "in" => Ok(Self::In),
            "out" => Ok(Self::Out),
            "both" => Ok(Self::Both),
            _ => Err(QosError::Direction(s.to_string())),
        }
    }
}

impl fmt::Display for CapDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::In => "in",
            Self::Out => "out",
            Self::Both => "both",
        })
    }
}

/// A port's maximum bandwidth: `RATE[:in|out|both]` (both by default), or
/// `{"rate": .., "direction": ..}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cap {
    pub rate: Rate,
    pub direction: CapDirection,
}

impl FromStr for Cap {
    type Err = QosError;
    fn from_str(s: &str) -> Result<Self, QosError> {
        let (rate, direction) = match s.split_once(':') {
            Some((r, d)) => (r, d.parse()?),
            None => (s, CapDirection::Both),
        };
        Ok(Cap {
            rate: rate.parse()?,
            direction,
        })
    }
}

impl<'de> Deserialize<'de> for Cap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            rate: Rate,
            #[serde(default)]
            direction: CapDirection,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
            Full(Full),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Rate::new(n).map(|rate| Cap {
                rate,
                direction: CapDirection::Both,
            }),
            Raw::Text(s) => s.parse(),
            Raw::Full(f) => Ok(Cap {
                rate: f.rate,
                direction: f.direction,
            }),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// Checks a weight: 1 to [`MAX_WEIGHT`].
pub fn check_weight(w: u64) -> Result<u8, QosError> {
    u8::try_from(w)
        .ok()
        .filter(|w| (1..=MAX_WEIGHT).contains(w))
        .ok_or(QosError::Weight(w))
}

/// A port's QoS (`max=`, `rate=`, `weight=`, `min=` in its spec; `qos-set` live).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosSpec {
    /// The cap, per direction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Cap>,
    /// The speed of the port's link, if known (an uplink): frames to the port are
    /// scheduled at this rate and sources' minimums are reserved from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// This port's share, as a source, at a scheduled port under contention (1-100;
    /// 1 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// This port's reserved bandwidth, as a source, at every port with a `rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<Rate>,
}

impl QosSpec {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The rate frames to this port are scheduled at: the lower of its link rate and
    /// its cap `in`; `None`: not scheduled.
    pub fn egress_rate(&self) -> Option<Rate> {
        let cap = self.max.filter(|c| c.direction.covers_in()).map(|c| c.rate);
        match (self.rate, cap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The cap on what the port sends into the switch.
    pub fn out_cap(&self) -> Option<Rate> {
        self.max
            .filter(|c| c.direction.covers_out())
            .map(|c| c.rate)
    }

    pub fn weight(&self) -> u8 {
        self.weight.unwrap_or(DEFAULT_WEIGHT)
    }

    /// What the types cannot check: the weight's range, a minimum above the port's
    /// own cap out.
    pub fn validate(&self, port: &str) -> Result<(), QosError> {
        if let Some(w) = self.weight {
            check_weight(u64::from(w))?;
        }
        if let (Some(min), Some(max)) = (self.min, self.out_cap()) {
            if min > max {
                return Err(QosError::MinAboveMax {
                    port: port.to_string(),
                    min,
                    max,
                });
            }
        }
        Ok(())
    }

    /// Applies `update`: the fields it gives replace this spec's.
    pub fn merge(&mut self, update: &QosSpec) {
        if update.max.is_some() {
            self.max = update.max;
        }
        if update.rate.is_some() {
            self.rate = update.rate;
        }
        if update.weight.is_some() {
            self.weight = update.weight;
        }
        if update.min.is_some() {
            self.min = update.min;
        }
    }

    /// The spec options (`,max=8M:in,weight=3`), empty without QoS.
    pub fn spec_options(&self) -> String {
        let mut s = String::new();
        if let Some(c) = self.max {
            s += &format!(",max={}:{}", c.rate, c.direction);
        }
        if let Some(r) = self.rate {
            s += &format!(",rate={r}");
        }
        if let Some(w) = self.weight {
            s += &format!(",weight={w}");
        }
        if let Some(m) = self.min {
            s += &format!(",min={m}");
        }
        s
    }
}

/// Checks that the minimums of `sources` (name, min) fit the scheduled port
/// `port`'s rate. Sources without a minimum and the port itself do not count.
pub fn check_minimums<'a>(
    port: &str,
    rate: Rate,
    sources: impl Iterator<Item = (&'a str, Option<Rate>)>,
) -> Result<(), QosError> {
    let mut total: u128 = 0;
    let mut names = Vec::new();
    for (name, min) in sources {
        if let Some(m) = min.filter(|_| name != port) {
            total += u128::from(m.bits_per_s());
            names.push(format!("{name} {m}"));
        }
    }
    if total > u128::from(rate.bits_per_s()) {
        return Err(QosError::Oversubscribed {
            port: port.to_string(),
            total: Rate(u64::try_from(total).unwrap_or(u64::MAX)),
            rate,
            sources: names.join(", "),
        });
    }
    Ok(())
}

/// The policer: a port's cap `out` on the frames it sends into the switch. The last
/// filter of the chain (after the guards, ACLs and storm limit: frames they drop take
/// no credit).
#[derive(Debug)]
pub struct Policer {
    max_frame: usize,
    buckets: HashMap<PortId, ByteBucket>,
}

impl Policer {
    /// `max_frame`: the largest frame the switch passes (the bucket holds at least one).
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame,
            buckets: HashMap::new(),
        }
    }

    /// The credit left in `port`'s bucket, in bytes (None: no cap out).
    pub fn credit(&self, port: PortId) -> Option<u64> {
        self.buckets.get(&port).map(ByteBucket::bytes)
    }
}

impl Extension for Policer {
    fn name(&self) -> &str {
        "qos"
    }
    fn stage(&self) -> Stage {
        Stage::Filter
    }
    fn ingress(&mut self, ctx: &FrameCtx<'_>) -> Verdict {
        let Some(cap) = ctx.port_config.qos.out_cap() else {
            if !self.buckets.is_empty() {
                self.buckets.remove(&ctx.port);
            }
            return Verdict::Pass;
        };
        let rate = cap.bits_per_s();
        let burst = burst_bytes(rate, self.max_frame);
        let b = self
            .buckets
            .entry(ctx.port)
            .or_insert_with(|| ByteBucket::full(rate, burst, ctx.now));
        if b.rate() != rate {
            // A new cap starts with a full bucket.
            *b = ByteBucket::full(rate, burst, ctx.now);
        }
        if b.take(ctx.frame.bytes.len(), ctx.now) {
            Verdict::Pass
        } else {
            Verdict::Drop(QOS_MAX)
        }
    }
    fn port_removed(&mut self, port: PortId, _name: &str) {
        self.buckets.remove(&port);
    }
    fn status(&self) -> serde_json::Value {
        serde_json::json!({ "capped_ports": self.buckets.len() })
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_suffixes_and_print_back() {
        for (s, v) in [
            ("8M", 8_000_000),
            ("8m", 8_000_000),
            ("1.5G", 1_500_000_000),
            ("64k", 64_000),
            ("1000", 1000),
            ("1T", 1_000_000_000_000),
            (" 100M ", 100_000_000),
            ("2.125M", 2_125_000),
        ] {
            let r: Rate = s.parse().unwrap();
            assert_eq!(r.bits_per_s(), v, "{s}");
            assert_eq!(r.to_string().parse::<Rate>().unwrap(), r);
        }
        assert_eq!(Rate::new(1_500_000_000).unwrap().to_string(), "1.5G");
        assert_eq!(Rate::new(1234).unwrap().to_string(), "1234");
        for bad in ["", "M", "8X", "-8M", "8.M5", "1.0000001k", "8 M", "0x10"] {
            let e = bad.parse::<Rate>().unwrap_err().to_string();
            assert!(e.starts_with("bad rate"), "{bad}: {e}");
        }
        for out in ["0", "999", "2T", "99999999999999999999999G"] {
            let e = out.parse::<Rate>().unwrap_err().to_string();
            assert!(e.contains("out of range"), "{out}: {e}");
        }
        let c: Cap = "8M:in".parse().unwrap();
        assert_eq!(
            (c.rate.bits_per_s(), c.direction),
            (8_000_000, CapDirection::In)
        );
        assert_eq!("8M".parse::<Cap>().unwrap().direction, CapDirection::Both);
        assert!("8M:up"
            .parse::<Cap>()
            .unwrap_err()
            .to_string()
            .contains("bad max direction 'up'"));
        let j: QosSpec =
            serde_json::from_str(r#"{"max":"8M:out","rate":1000000000,"weight":3,"min":"1M"}"#)
                .unwrap();
        assert_eq!(j.out_cap(), Some(Rate(8_000_000)));
        assert_eq!(j.egress_rate(), Some(Rate(1_000_000_000)));
        let j: QosSpec =
            serde_json::from_str(r#"{"max":{"rate":"2M","direction":"in"},"rate":"1G"}"#).unwrap();
        assert_eq!(
            (j.out_cap(), j.egress_rate()),
            (None, Some(Rate(2_000_000)))
        );
        assert_eq!(burst_bytes(8_000_000, 1518), 10_000);
        assert_eq!(burst_bytes(64_000, 1518), 1518);
    }
}
