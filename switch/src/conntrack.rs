//! Connection tracking for stateful ACL rules ([`crate::acl`]): a per-port table of
//! the flows a stateful rule let out (or in), so that their replies pass the rules
//! that would otherwise drop them.
//!
//! A flow is keyed by the direction it was opened in and its 5-tuple: IP family and
//! addresses (in [`IpAddr`]), protocol, and TCP/UDP ports, or the identifier of an
//! ICMP/ICMPv6 echo. A reply is the same tuple reversed in the other direction (for
//! ICMP: an echo reply with the identifier of the tracked request). Other IP
//! protocols are tracked by addresses and protocol alone; ICMP other than echo and
//! non-first fragments (no ports to read) are not tracked and never match a flow.
//! No TCP state machine: a segment in either direction keeps a flow alive, a FIN or
//! RST shortens its life.
//!
//! Entries age on the clock passed in: TCP [`TCP_IDLE`] (then [`TCP_CLOSING`] once a
//! FIN or RST was seen), UDP, ICMP and others [`OTHER_IDLE`]. A table holds at most
//! `limit` flows; past that, new flows are refused (counted; their packets still pass
//! the rule that allowed them, but replies are not let in).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;

use crate::extension::Direction;
use crate::frame::{Frame, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, L4};

/// Flows one port may track.
pub const MAX_FLOWS_PER_PORT: usize = 65_536;
/// An idle TCP flow is forgotten after this long.
pub const TCP_IDLE: Duration = Duration::from_secs(300);
/// A TCP flow that saw a FIN or RST is forgotten this long after its last segment.
pub const TCP_CLOSING: Duration = Duration::from_secs(10);
/// An idle UDP, ICMP echo or other flow is forgotten after this long.
pub const OTHER_IDLE: Duration = Duration::from_secs(30);
/// A full table sweeps its aged flows at most this often when a new one knocks.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// A flow as seen in the direction it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    opened: Direction,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// TCP/UDP ports; for ICMP echo both hold the identifier; 0 for other protocols.
    sport: u16,
    dport: u16,
}

/// Whether a frame may open a flow or answer one (ICMP: requests open, replies answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Open,
    Answer,
}

impl FlowKey {
    fn of(frame: &Frame<'_>, dir: Direction, role: Role) -> Option<Self> {
        let ip = frame.ip()?;
        let (sport, dport) = match (ip.proto, ip.l4) {
            (IPPROTO_TCP | IPPROTO_UDP, L4::Ports { src, dst }) => (src, dst),
            (IPPROTO_TCP | IPPROTO_UDP, _) => return None,
            (IPPROTO_ICMP | IPPROTO_ICMPV6, _) => {
                let (request, id) = frame.icmp_echo()?;
                if request != (role == Role::Open) {
                    return None;
                }
                (id, id)
            }
            (_, _) => (0, 0),
        };
        Some(Self {
            opened: dir,
            src: ip.src,
            dst: ip.dst,
            proto: ip.proto,
            sport,
            dport,
        })
    }

    /// The flow `frame`, going in direction `dir`, would open.
    pub fn opening(frame: &Frame<'_>, dir: Direction) -> Option<Self> {
        Self::of(frame, dir, Role::Open)
    }

    /// The flow `frame`, going in direction `dir`, would be a reply to.
    pub fn answered_by(frame: &Frame<'_>, dir: Direction) -> Option<Self> {
        let k = Self::of(frame, dir, Role::Answer)?;
        Some(Self {
            opened: match dir {
                Direction::Inbound => Direction::Outbound,
                Direction::Outbound => Direction::Inbound,
            },
            src: k.dst,
            dst: k.src,
            proto: k.proto,
            sport: k.dport,
            dport: k.sport,
        })
    }

    fn idle(&self, closing: bool) -> Duration {
        match (self.proto, closing) {
            (IPPROTO_TCP, false) => TCP_IDLE,
            (IPPROTO_TCP, true) => TCP_CLOSING,
            _ => OTHER_IDLE,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    /// The stateful rule that opened it.
    rule: u64,
    expires: Duration,
    closing: bool,
}

impl Flow {
    fn touch(&mut self, key: &FlowKey, frame: &Frame<'_>, now: Duration) {
        self.closing |= frame
            .tcp_flags()
            .is_some_and(|f| f & (TCP_FIN | TCP_RST) != 0);
        self.expires = now + key.idle(self.closing);
    }
}

/// A table's counters, as the API shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FlowStats {
    /// Flows in the table (some may have aged, not yet swept).
    pub active: usize,
    pub limit: usize,
    /// Flows recorded since the port's first stateful rule.
    pub opened: u64,
    /// New flows refused because the table was full.
    pub refused: u64,
    /// Flows forgotten because they aged.
    pub expired: u64,
}

/// One port's flows.
#[derive(Debug)]
pub struct ConnTable {
    flows: HashMap<FlowKey, Flow>,
    limit: usize,
    next_sweep: Duration,
    stats: FlowStats,
}

impl ConnTable {
    pub fn new(limit: usize) -> Self {
        Self {
            flows: HashMap::new(),
            limit,
            next_sweep: Duration::ZERO,
            stats: FlowStats {
                limit,
                ..FlowStats::default()
            },
        }
    }

    /// Records (or refreshes) `key`, opened by `rule`; false if the table is full.
    pub fn open(&mut self, key: FlowKey, rule: u64, frame: &Frame<'_>, now: Duration) -> bool {
        if let Some(f) = self.flows.get_mut(&key) {
            f.touch(&key, frame, now);
            return true;
        }
        if self.flows.len() >= self.limit && now >= self.next_sweep {
            self.expire(now);
            self.next_sweep = now + SWEEP_EVERY;
        }
        if self.flows.len() >= self.limit {
            self.stats.refused += 1;
            return false;
        }
        let mut f = Flow {
            rule,
            expires: now,
            closing: false,
        };
        f.touch(&key, frame, now);
        self.flows.insert(key, f);
        self.stats.opened += 1;
        true
    }

    /// The rule whose flow `key` is, if it is tracked and alive at `now` (refreshed).
    pub fn answer(&mut self, key: &FlowKey, frame: &Frame<'_>, now: Duration) -> Option<u64> {
        let f = self.flows.get_mut(key)?;
        if now >= f.expires {
            self.flows.remove(key);
            self.stats.expired += 1;
            return None;
        }
        f.touch(key, frame, now);
        Some(f.rule)
    }

    /// Forgets the flows aged at `now`.
    pub fn expire(&mut self, now: Duration) {
        let before = self.flows.len();
        self.flows.retain(|_, f| now < f.expires);
        self.stats.expired += (before - self.flows.len()) as u64;
    }

    /// Forgets the flows `rule` opened (the rule is gone).
    pub fn remove_rule(&mut self, rule: u64) {
        self.flows.retain(|_, f| f.rule != rule);
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn stats(&self) -> FlowStats {
        FlowStats {
            active: self.flows.len(),
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::frame::build::*;

    const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
    const VM: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const SRV: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn key(f: &[u8], dir: Direction, open: bool) -> Option<FlowKey> {
        let p = Frame::parse(f).unwrap();
        if open {
            FlowKey::opening(&p, dir)
        } else {
            FlowKey::answered_by(&p, dir)
        }
    }

    #[test]
    fn a_reply_is_the_reversed_tuple_in_the_other_direction() {
        let syn = tcp4_frame(B, A, VM, SRV, 40000, 80, 0x02, b"");
        let synack = tcp4_frame(A, B, SRV, VM, 80, 40000, 0x12, b"");
        let out = Direction::Outbound;
        let inn = Direction::Inbound;
        assert_eq!(key(&syn, out, true), key(&synack, inn, false));
        assert_ne!(
            key(&syn, out, true),
            key(&synack, out, false),
            "same direction"
        );
        let other_port = tcp4_frame(A, B, SRV, VM, 81, 40000, 0x12, b"");
        assert_ne!(key(&syn, out, true), key(&other_port, inn, false));
        let udp_reply = udp4_frame(A, B, None, SRV, VM, 80, 40000, b"");
        assert_ne!(
            key(&syn, out, true),
            key(&udp_reply, inn, false),
            "protocol"
        );
        // ICMP: a request opens, only a reply with its identifier answers.
        let req = icmp4_echo(B, A, VM, SRV, true, 7);
        let rep = icmp4_echo(A, B, SRV, VM, false, 7);
        assert_eq!(key(&req, out, true), key(&rep, inn, false));
        assert_ne!(
            key(&req, out, true),
            key(&icmp4_echo(A, B, SRV, VM, false, 8), inn, false)
        );
        assert_eq!(key(&rep, out, true), None, "a reply opens nothing");
        assert_eq!(key(&req, inn, false), None, "a request answers nothing");
        assert_eq!(key(&plain_arp(), out, true), None);
    }

    fn plain_arp() -> Vec<u8> {
        arp(A, 1, VM, [0; 6], SRV)
    }

    #[test]
    fn flows_age_shorten_on_fin_and_the_table_is_bounded() {
        let mut t = ConnTable::new(2);
        let t0 = Duration::from_secs(100);
        let out = Direction::Outbound;
        let udp = |sport| udp4_frame(B, A, None, VM, SRV, sport, 53, b"q");
        let f1 = udp(1000);
        let p1 = Frame::parse(&f1).unwrap();
        let k1 = FlowKey::opening(&p1, out).unwrap();
        assert!(t.open(k1, 7, &p1, t0));
        let reply = udp4_frame(A, B, None, SRV, VM, 53, 1000, b"a");
        let r = Frame::parse(&reply).unwrap();
        let rk = FlowKey::answered_by(&r, Direction::Inbound).unwrap();
        assert_eq!(
            t.answer(&rk, &r, t0 + OTHER_IDLE - Duration::from_millis(1)),
            Some(7)
        );
        // The answer refreshed it; 30 s after that it is gone.
        let later = t0 + OTHER_IDLE - Duration::from_millis(1) + OTHER_IDLE;
        assert_eq!(t.answer(&rk, &r, later), None);
        assert_eq!(t.stats().expired, 1);
        // Two flows fill the table; a third is refused until one ages.
        for sport in [1, 2] {
            let f = udp(sport);
            let p = Frame::parse(&f).unwrap();
            assert!(t.open(FlowKey::opening(&p, out).unwrap(), 7, &p, later));
        }
        let f3 = udp(3);
        let p3 = Frame::parse(&f3).unwrap();
        let k3 = FlowKey::opening(&p3, out).unwrap();
        assert!(!t.open(k3, 7, &p3, later));
        assert_eq!(t.stats().refused, 1);
        assert!(t.open(k3, 7, &p3, later + OTHER_IDLE));
        assert_eq!(t.stats().active, 1, "the two aged ones were swept");
        // TCP lives 300 s, 10 s once a FIN passed.
        let mut t = ConnTable::new(8);
        let syn = tcp4_frame(B, A, VM, SRV, 40000, 80, 0x02, b"");
        let s = Frame::parse(&syn).unwrap();
        let k = FlowKey::opening(&s, out).unwrap();
        assert!(t.open(k, 1, &s, t0));
        let ack = tcp4_frame(A, B, SRV, VM, 80, 40000, 0x10, b"");
        let a = Frame::parse(&ack).unwrap();
        let ak = FlowKey::answered_by(&a, Direction::Inbound).unwrap();
        assert_eq!(t.answer(&ak, &a, t0 + Duration::from_secs(299)), Some(1));
        let fin = tcp4_frame(A, B, SRV, VM, 80, 40000, 0x11, b"");
        let f = Frame::parse(&fin).unwrap();
        let at = t0 + Duration::from_secs(500);
        assert_eq!(t.answer(&ak, &f, at), Some(1));
        assert_eq!(t.answer(&ak, &a, at + TCP_CLOSING), None);
        // A removed rule's flows go with it.
        assert!(t.open(k, 1, &s, at));
        t.remove_rule(1);
        assert!(t.is_empty());
    }
}
