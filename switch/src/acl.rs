//! Port ACLs, an extension of the filter stage.
//!
//! Each port has a list of rules; a frame is checked against the rules of the port
//! it passes (on ingress with direction `outbound`, on egress with `inbound`), highest
//! `priority` first, ties in the order the rules were added; the first rule that
//! matches decides and counts the frame. No rule matching: allowed (as Hyper-V's port
//! ACLs). A rule names any of: direction, source/destination MAC, IP prefix, IP
//! protocol, TCP/UDP port ranges; an absent field matches everything.
//!
//! A **stateful** rule (an allow with a direction) records each flow it lets through
//! in the port's connection table ([`crate::conntrack`]); a frame in the other
//! direction that answers such a flow is treated as matching that rule, at the
//! rule's place in the list: rules above it still decide first, rules below it (a
//! catch-all deny) never see the reply. Nothing else is let in by it. The rule
//! counts what it matched (`packets`, `bytes`) and the replies it let pass
//! (`return_packets`, `return_bytes`).

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use net::MacAddr;
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::bucket::ByteBucket;
use crate::conntrack::{ConnTable, FlowKey, FlowStats, MAX_FLOWS_PER_PORT};
use crate::extension::{Direction, DropReason, Extension, FrameCtx, Stage, Verdict};
use crate::frame::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, L4};
use crate::qos::Rate;
use crate::PortId;

pub const ACL_DROP: DropReason = DropReason("acl");
/// Over a `meter` rule's rate.
pub const ACL_METER_DROP: DropReason = DropReason("acl-meter");
/// A meter's bucket holds this long of its rate (at least [`METER_MIN_BURST`]).
pub const METER_BURST: std::time::Duration = std::time::Duration::from_millis(10);
/// The least a meter's bucket holds: one largest frame at the default MTU (1500 +
/// Ethernet header + tag).
pub const METER_MIN_BURST: u64 = 1522;
/// The largest meter burst, in bytes (1 GiB).
pub const MAX_METER_BURST: u64 = 1 << 30;
/// Rules one port may hold.
pub const MAX_RULES_PER_PORT: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    /// Passes matching frames up to `rate` (a token bucket per rule); the excess is
    /// dropped (`acl-meter`).
    Meter,
}

/// An IPv4 or IPv6 prefix, `10.0.0.0/8` or `fe80::/10` (a bare address is a host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

impl IpPrefix {
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(p), IpAddr::V4(a)) => prefix_eq(&p.octets(), &a.octets(), self.len),
            (IpAddr::V6(p), IpAddr::V6(a)) => prefix_eq(&p.octets(), &a.octets(), self.len),
            _ => false,
        }
    }
}

fn prefix_eq(p: &[u8], a: &[u8], len: u8) -> bool {
    let (full, rest) = (usize::from(len / 8), len % 8);
    if p[..full] != a[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    p[full] & mask == a[full] & mask
}

impl FromStr for IpPrefix {
    type Err = AclError;
    fn from_str(s: &str) -> Result<Self, AclError> {
        let bad = || AclError::Field("IP prefix", s.to_string());
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if len > max {
            return Err(bad());
        }
        Ok(Self { addr, len })
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A TCP/UDP port or range, `80` or `1000-2000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    lo: u16,
    hi: u16,
}

impl FromStr for PortRange {
    type Err = AclError;
    fn from_str(s: &str) -> Result<Self, AclError> {
        let bad = || AclError::Field("port range", s.to_string());
        let (lo, hi) = match s.split_once('-') {
            Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
            None => {
                let p = s.parse().map_err(|_| bad())?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(bad());
        }
        Ok(Self { lo, hi })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// Strings in JSON, typed inside: the deserializer reports the bad field's value.
macro_rules! serde_via_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    S(String),
                    N(u64),
                }
                let s = match Raw::deserialize(d)? {
                    Raw::S(s) => s,
                    Raw::N(n) => n.to_string(),
                };
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_str!(IpPrefix);
serde_via_str!(PortRange);
serde_via_str!(Protocol);

/// An IP protocol: `tcp`, `udp`, `icmp`, `icmpv6` or a number 0-255.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocol(pub u8);

impl FromStr for Protocol {
    type Err = AclError;
    fn from_str(s: &str) -> Result<Self, AclError> {
        Ok(Protocol(match s {
            "tcp" => IPPROTO_TCP,
            "udp" => IPPROTO_UDP,
            "icmp" => IPPROTO_ICMP,
            "icmpv6" => IPPROTO_ICMPV6,
            _ => s.parse().map_err(|_| {
                AclError::Field("protocol (tcp, udp, icmp, icmpv6, 0-255)", s.into())
            })?,
        }))
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IPPROTO_TCP => f.write_str("tcp"),
            IPPROTO_UDP => f.write_str("udp"),
            IPPROTO_ICMP => f.write_str("icmp"),
            IPPROTO_ICMPV6 => f.write_str("icmpv6"),
            n => write!(f, "{n}"),
        }
    }
}

/// One rule, as the API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    pub action: Action,
    /// Absent: both directions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_ip: Option<IpPrefix>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_ip: Option<IpPrefix>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_port: Option<PortRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_port: Option<PortRange>,
    /// Let replies to the flows this rule allows back in (allow rules with a
    /// direction only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stateful: bool,
    /// A meter's rate (bits/s: a number or `"8M"`), meter rules only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// A meter's burst in bytes (default: 10 ms of the rate, at least 1522).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
}

impl AclRule {
    fn matches(&self, ctx: &FrameCtx<'_>) -> bool {
        let f = ctx.frame;
        if self.direction.is_some_and(|d| d != ctx.direction)
            || self.src_mac.is_some_and(|m| m.bytes() != f.src)
            || self.dst_mac.is_some_and(|m| m.bytes() != f.dst)
        {
            return false;
        }
        let needs_ip = self.src_ip.is_some()
            || self.dst_ip.is_some()
            || self.protocol.is_some()
            || self.src_port.is_some()
            || self.dst_port.is_some();
        if !needs_ip {
            return true;
        }
        let Some(ip) = f.ip() else { return false };
        if self.src_ip.is_some_and(|p| !p.contains(&ip.src))
            || self.dst_ip.is_some_and(|p| !p.contains(&ip.dst))
            || self.protocol.is_some_and(|p| p.0 != ip.proto)
        {
            return false;
        }
        if self.src_port.is_none() && self.dst_port.is_none() {
            return true;
        }
        let L4::Ports { src, dst } = ip.l4 else {
            return false;
        };
        let within = |r: Option<PortRange>, p: u16| r.is_none_or(|r| (r.lo..=r.hi).contains(&p));
        within(self.src_port, src) && within(self.dst_port, dst)
    }

    /// A meter's bucket size in bytes.
    fn meter_burst(&self, rate: Rate) -> u64 {
        self.burst.unwrap_or_else(|| {
            let ten_ms = u128::from(rate.bits_per_s()) * METER_BURST.as_nanos() / 8_000_000_000;
            u64::try_from(ten_ms)
                .unwrap_or(u64::MAX)
                .max(METER_MIN_BURST)
        })
    }

    fn validate(&self) -> Result<(), AclError> {
        match (self.action, self.rate) {
            (Action::Meter, None) => return Err(AclError::MeterNeedsRate),
            (Action::Allow | Action::Deny, Some(_)) => return Err(AclError::RateNeedsMeter),
            _ => {}
        }
        if let Some(b) = self.burst {
            if self.action != Action::Meter {
                return Err(AclError::RateNeedsMeter);
            }
            if !(64..=MAX_METER_BURST).contains(&b) {
                return Err(AclError::Burst(b));
            }
        }
        if self.stateful && self.action != Action::Allow {
            return Err(AclError::StatefulDeny);
        }
        if self.stateful && self.direction.is_none() {
            return Err(AclError::StatefulNeedsDirection);
        }
        let ports = self.src_port.is_some() || self.dst_port.is_some();
        if ports && !matches!(self.protocol, Some(Protocol(IPPROTO_TCP | IPPROTO_UDP))) {
            return Err(AclError::PortsNeedProtocol);
        }
        if let (Some(s), Some(d)) = (self.src_ip, self.dst_ip) {
            if s.addr.is_ipv4() != d.addr.is_ipv4() {
                return Err(AclError::MixedFamilies);
            }
        }
        Ok(())
    }
}

/// A rule with its id and counters, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstalledRule {
    pub id: u64,
    #[serde(flatten)]
    pub rule: AclRule,
    pub packets: u64,
    pub bytes: u64,
    /// Replies to this (stateful) rule's flows let through.
    #[serde(skip_serializing_if = "is_zero")]
    pub return_packets: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub return_bytes: u64,
    /// Frames a meter rule matched but dropped (over its rate); in `packets` too.
    #[serde(skip_serializing_if = "is_zero")]
    pub metered_packets: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub metered_bytes: u64,
    /// A meter's bucket (made at its first match, on the clock then).
    #[serde(skip)]
    pub meter: Option<ByteBucket>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    #[error("bad {0} '{1}'")]
    Field(&'static str, String),
    #[error("src_port/dst_port need protocol tcp or udp")]
    PortsNeedProtocol,
    #[error("src_ip and dst_ip are of different IP families")]
    MixedFamilies,
    #[error("a meter rule needs a rate (\"rate\": \"8M\", bits/s)")]
    MeterNeedsRate,
    #[error("rate and burst are for meter rules only")]
    RateNeedsMeter,
    #[error("meter burst {0} is out of range (64-{MAX_METER_BURST} bytes)")]
    Burst(u64),
    #[error("a stateful rule must be an allow (a deny keeps no state)")]
    StatefulDeny,
    #[error("a stateful rule needs a direction (outbound: flows the VM opens)")]
    StatefulNeedsDirection,
    #[error("port '{0}' already has {MAX_RULES_PER_PORT} rules")]
    Full(String),
    #[error("port '{port}' has no rule {id}")]
    NoRule { port: String, id: u64 },
}

/// The ACL extension.
#[derive(Debug)]
pub struct Acl {
    rules: HashMap<PortId, Vec<InstalledRule>>,
    /// Connection tables of the ports with stateful rules.
    flows: HashMap<PortId, ConnTable>,
    flow_limit: usize,
    next_id: u64,
}

impl Default for Acl {
    fn default() -> Self {
        Self::new(MAX_FLOWS_PER_PORT)
    }
}

impl Acl {
    /// An ACL extension whose ports track at most `flow_limit` flows each.
    pub fn new(flow_limit: usize) -> Self {
        Self {
            rules: HashMap::new(),
            flows: HashMap::new(),
            flow_limit,
            next_id: 0,
        }
    }

    /// Adds `rule` to `port` (named `name` in errors); returns its id.
    pub fn add(&mut self, port: PortId, name: &str, rule: AclRule) -> Result<u64, AclError> {
        rule.validate()?;
        let list = self.rules.entry(port).or_default();
        if list.len() >= MAX_RULES_PER_PORT {
            return Err(AclError::Full(name.to_string()));
        }
        self.next_id += 1;
        let id = self.next_id;
        if rule.stateful {
            let limit = self.flow_limit;
            self.flows
                .entry(port)
                .or_insert_with(|| ConnTable::new(limit));
        }
        list.push(InstalledRule {
            id,
            rule,
            packets: 0,
            bytes: 0,
            return_packets: 0,
            return_bytes: 0,
            metered_packets: 0,
            metered_bytes: 0,
            meter: None,
        });
        // Stable: equal priorities keep the order they were added in.
        list.sort_by_key(|r| std::cmp::Reverse(r.rule.priority));
        Ok(id)
    }

    pub fn remove(&mut self, port: PortId, name: &str, id: u64) -> Result<(), AclError> {
        let list = self.rules.entry(port).or_default();
        let before = list.len();
        list.retain(|r| r.id != id);
        if list.len() == before {
            return Err(AclError::NoRule {
                port: name.to_string(),
                id,
            });
        }
        if !list.iter().any(|r| r.rule.stateful) {
            self.flows.remove(&port);
        } else if let Some(t) = self.flows.get_mut(&port) {
            t.remove_rule(id);
        }
        Ok(())
    }

    /// The port's connection table counters (`None`: it has no stateful rule).
    pub fn flow_stats(&self, port: PortId) -> Option<FlowStats> {
        self.flows.get(&port).map(ConnTable::stats)
    }

    pub fn list(&self, port: PortId) -> &[InstalledRule] {
        self.rules.get(&port).map(Vec::as_slice).unwrap_or(&[])
    }

    fn check(&mut self, ctx: &FrameCtx<'_>) -> Verdict {
        let Some(list) = self.rules.get_mut(&ctx.port) else {
            return Verdict::Pass;
        };
        let mut table = self.flows.get_mut(&ctx.port);
        // A reply to a tracked flow stands in the list where its stateful rule does.
        let answers = match table.as_deref_mut() {
            Some(t) if !t.is_empty() => FlowKey::answered_by(ctx.frame, ctx.direction)
                .and_then(|k| t.answer(&k, ctx.frame, ctx.now)),
            _ => None,
        };
        let len = ctx.frame.bytes.len() as u64;
        for r in list.iter_mut() {
            if answers == Some(r.id) {
                r.return_packets += 1;
                r.return_bytes += len;
                return Verdict::Pass;
            }
            if !r.rule.matches(ctx) {
                continue;
            }
            r.packets += 1;
            r.bytes += len;
            match r.rule.action {
                Action::Deny => return Verdict::Drop(ACL_DROP),
                Action::Meter => {
                    let Some(rate) = r.rule.rate else {
                        return Verdict::Pass;
                    };
                    let burst = r.rule.meter_burst(rate);
                    let bucket = r
                        .meter
                        .get_or_insert_with(|| ByteBucket::full(rate.bits_per_s(), burst, ctx.now));
                    if bucket.take(ctx.frame.bytes.len(), ctx.now) {
                        return Verdict::Pass;
                    }
                    r.metered_packets += 1;
                    r.metered_bytes += len;
                    return Verdict::Drop(ACL_METER_DROP);
                }
                Action::Allow => {}
            }
            if r.rule.stateful {
                if let (Some(t), Some(k)) = (
                    table.as_deref_mut(),
                    FlowKey::opening(ctx.frame, ctx.direction),
                ) {
                    if !t.open(k, r.id, ctx.frame, ctx.now) {
                        debug!(
                            port = ctx.port,
                            rule = r.id,
                            "flow table full: flow not tracked"
                        );
                    }
                }
            }
            return Verdict::Pass;
        }
        Verdict::Pass
    }
}

impl Extension for Acl {
    fn name(&self) -> &str {
        "acl"
    }
    fn stage(&self) -> Stage {
        Stage::Filter
    }
    fn ingress(&mut self, ctx: &FrameCtx<'_>) -> Verdict {
        self.check(ctx)
    }
    fn egress(&mut self, ctx: &FrameCtx<'_>) -> Verdict {
        self.check(ctx)
    }
    fn port_removed(&mut self, port: PortId, _name: &str) {
        self.rules.remove(&port);
        self.flows.remove(&port);
    }
    fn expire(&mut self, now: std::time::Duration) {
        for t in self.flows.values_mut() {
            t.expire(now);
        }
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_ranges_parse_and_match() {
        let p: IpPrefix = "10.1.0.0/17".parse().unwrap();
        assert!(p.contains(&"10.1.127.255".parse().unwrap()));
        assert!(!p.contains(&"10.1.128.0".parse().unwrap()));
        assert!(!p.contains(&"::1".parse().unwrap()));
        let h: IpPrefix = "fe80::1".parse().unwrap();
        assert_eq!(h.to_string(), "fe80::1/128");
        for bad in ["10.0.0.0/33", "x/8", "10.0.0/8", "::/129"] {
            assert!(bad.parse::<IpPrefix>().is_err(), "{bad}");
        }
        assert_eq!("80".parse::<PortRange>().unwrap().to_string(), "80");
        assert!("90-80".parse::<PortRange>().is_err());
        assert!("70000".parse::<PortRange>().is_err());
    }

    #[test]
    fn malformed_rules_are_refused_with_their_field() {
        let cases = [
            (
                r#"{"action":"deny","src_ip":"10.0.0.0/40"}"#,
                "bad IP prefix '10.0.0.0/40'",
            ),
            (r#"{"action":"block"}"#, "unknown variant `block`"),
            (
                r#"{"action":"deny","dst_port":"80-x","protocol":"tcp"}"#,
                "bad port range",
            ),
            (r#"{"action":"deny","protocol":"sctpx"}"#, "bad protocol"),
            (r#"{"action":"deny","colour":1}"#, "unknown field `colour`"),
            (
                r#"{"action":"deny","src_mac":"ff:ff:ff:ff:ff:ff"}"#,
                "multicast",
            ),
        ];
        for (json, want) in cases {
            let e = serde_json::from_str::<AclRule>(json)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
        let r: AclRule = serde_json::from_str(r#"{"action":"deny","dst_port":80}"#).unwrap();
        assert_eq!(
            Acl::default().add(1, "p", r).unwrap_err(),
            AclError::PortsNeedProtocol
        );
    }
}
