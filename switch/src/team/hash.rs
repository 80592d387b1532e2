//! The address hash that picks a team member per flow, and the announce frames a
//! team sends after a failover.
//!
//! The hash covers the Ethernet addresses and ethertype, and for IP the addresses,
//! the protocol and TCP/UDP ports (L2/L3/L4, as Linux bonding's `layer3+4` with
//! `layer2` mixed in): every frame of one flow lands on the same member (no
//! reordering), different flows spread. FNV-1a, 64 bits: cheap, stable across runs
//! and machines (a flow keeps its member after a restart), no allocation.

use crate::frame::{build, Frame, L4};
use crate::port::{VlanId, VlanMode};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// RARP's ethertype (the announce QEMU and Linux bonding's peers understand).
pub const ETHERTYPE_RARP: u16 = 0x8035;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The flow hash of a frame: addresses, ethertype, IP addresses, protocol and
/// ports. A frame that does not parse hashes by its first 14 bytes (whatever it has).
pub fn flow_hash(frame: &[u8]) -> u64 {
    let Ok(f) = Frame::parse(frame) else {
        return fnv(FNV_OFFSET, frame.get(..14).unwrap_or(frame));
    };
    let mut h = fnv(FNV_OFFSET, &f.dst);
    h = fnv(h, &f.src);
    h = fnv(h, &f.ethertype.to_be_bytes());
    if let Some(ip) = f.ip() {
        match (ip.src, ip.dst) {
            (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
                h = fnv(h, &s.octets());
                h = fnv(h, &d.octets());
            }
            (s, d) => {
                h = fnv(h, &ip_bytes(s));
                h = fnv(h, &ip_bytes(d));
            }
        }
        h = fnv(h, &[ip.proto]);
        if let L4::Ports { src, dst } = ip.l4 {
            h = fnv(h, &src.to_be_bytes());
            h = fnv(h, &dst.to_be_bytes());
        }
    }
    // Fold the high bits in: `% n` of a small n would see only the low ones.
    h ^ (h >> 29) ^ (h >> 47)
}

fn ip_bytes(a: std::net::IpAddr) -> [u8; 16] {
    match a {
        std::net::IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v) => v.octets(),
    }
}

/// Which of `up` members (their indices, in configuration order) carries a frame
/// with this hash; `None` when no member is up.
pub fn pick(hash: u64, up: &[usize]) -> Option<usize> {
    if up.is_empty() {
        return None;
    }
    up.get((hash % up.len() as u64) as usize).copied()
}

/// A RARP announce (reverse request, as QEMU sends after a migration) from `mac`,
/// tagged with `vid` if given: the peer switch relearns `mac` on the link it
/// arrives on.
pub fn rarp_announce(mac: [u8; 6], vid: Option<u16>) -> Vec<u8> {
    let mut p = Vec::with_capacity(28);
    p.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    p.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p.extend_from_slice(&[6, 4]);
    p.extend_from_slice(&3u16.to_be_bytes()); // reverse request
    p.extend_from_slice(&mac);
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&mac);
    p.extend_from_slice(&[0; 4]);
    build::ethernet([0xff; 6], mac, vid, ETHERTYPE_RARP, &p)
}

/// The announces a team on `mode` sends for the addresses learnt behind other
/// ports (`(vlan, mac)`): one per address on a VLAN the team carries, tagged as the
/// team sends that VLAN (untagged on an access port or a trunk's native VLAN).
pub fn announces(mode: &VlanMode, learnt: &[(VlanId, [u8; 6])]) -> Vec<Vec<u8>> {
    learnt
        .iter()
        .filter(|(vlan, _)| mode.carries(*vlan))
        .map(|(vlan, mac)| {
            let vid = match mode {
                VlanMode::Trunk { native, .. } if *native != Some(*vlan) => Some(vlan.get()),
                _ => None,
            };
            rarp_announce(*mac, vid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashMap};
    use std::net::Ipv4Addr;

    fn udp(sport: u16) -> Vec<u8> {
        build::udp4_frame(
            [0x52, 0x54, 0, 0, 0, 2],
            [0x52, 0x54, 0, 0, 0, 1],
            None,
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            sport,
            9,
            b"flow",
        )
    }

    #[test]
    fn a_flow_always_hashes_to_one_member_and_flows_spread() {
        let up = [0, 1];
        let mut per_member: HashMap<usize, usize> = HashMap::new();
        for sport in 1000..1064 {
            let f = udp(sport);
            let m = pick(flow_hash(&f), &up).unwrap();
            // The same flow, other payloads: the same member.
            let mut g = f.clone();
            let last = g.len() - 1;
            g[last] ^= 0xff;
            assert_eq!(pick(flow_hash(&g), &up), Some(m));
            *per_member.entry(m).or_default() += 1;
        }
        // 64 flows over 2 members: both used, neither starved.
        assert_eq!(per_member.len(), 2);
        assert!(per_member.values().all(|n| *n >= 16), "{per_member:?}");
        // With one member up, everything goes there; with none, nowhere.
        assert_eq!(pick(flow_hash(&udp(1)), &[1]), Some(1));
        assert_eq!(pick(flow_hash(&udp(1)), &[]), None);
        // Garbage hashes too, without panicking.
        let _ = flow_hash(&[1, 2, 3]);
        let _ = flow_hash(&[]);
        // Known value: the hash is stable across runs and machines.
        assert_eq!(flow_hash(&udp(1000)), flow_hash(&udp(1000)));
        let distinct: BTreeSet<u64> = (0..100).map(|p| flow_hash(&udp(p))).collect();
        assert_eq!(distinct.len(), 100);
    }

    #[test]
    fn announces_are_rarp_from_each_address_tagged_as_the_team_sends_its_vlan() {
        let a = rarp_announce([0x52, 0x54, 0, 0, 0, 1], None);
        assert_eq!(a.len(), 60);
        assert_eq!(&a[..6], &[0xff; 6]);
        assert_eq!(&a[6..12], &[0x52, 0x54, 0, 0, 0, 1]);
        assert_eq!(&a[12..14], &[0x80, 0x35]);
        assert_eq!(&a[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&a[22..28], &[0x52, 0x54, 0, 0, 0, 1]);
        assert_eq!(&a[32..38], &[0x52, 0x54, 0, 0, 0, 1]);
        let v = |n| VlanId::new(n).unwrap();
        let learnt = [(v(10), [2; 6]), (v(20), [4; 6]), (v(30), [6; 6])];
        let trunk = VlanMode::Trunk {
            allowed: [v(10), v(20)].into_iter().collect(),
            native: Some(v(10)),
        };
        let out = announces(&trunk, &learnt);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], rarp_announce([2; 6], None));
        assert_eq!(out[1], rarp_announce([4; 6], Some(20)));
        let access = VlanMode::Access {
            vlan: v(30),
            private: None,
        };
        assert_eq!(announces(&access, &learnt), [rarp_announce([6; 6], None)]);
    }
}
