//! Defensive parsing of the Ethernet frames a port hands the switch.
//!
//! A hostile VM sends anything: every length is checked before it is used, and a frame
//! whose headers contradict themselves (an IPv4 header longer than the frame, an IPv6
//! extension header chain that runs past the end) is [`Malformed`]: the switch drops
//! and counts it, so no policy can be bypassed by a header the guards cannot read.
//! Nothing here allocates or panics, whatever the bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_QINQ: u16 = 0x88a8;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers walked before giving up (a chain longer than this is malformed).
const MAX_IPV6_EXT_HEADERS: usize = 8;

/// Why a frame could not be parsed (the drop reason is `malformed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    Short(usize),
    #[error("802.1Q tag cut off")]
    TruncatedTag,
    #[error("stacked (QinQ) tags are not switched")]
    StackedTags,
    #[error("source address is multicast")]
    MulticastSource,
    #[error("ARP header truncated or not Ethernet/IPv4")]
    Arp,
    #[error("IPv4 header inconsistent with the frame")]
    Ipv4,
    #[error("IPv6 header or extension chain inconsistent with the frame")]
    Ipv6,
    #[error("transport header truncated")]
    Transport,
}

/// An 802.1Q tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// 0..=4095 as on the wire; 0 means priority-tagged only.
    pub vid: u16,
    pub pcp: u8,
}

/// Transport-layer facts the policy looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// Not parsed: another protocol, or a non-first fragment.
    None,
    /// TCP or UDP ports.
    Ports { src: u16, dst: u16 },
    /// ICMP or ICMPv6 type and code.
    Icmp { ty: u8, code: u8 },
}

/// The IP header facts the policy looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ip {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 protocol, or the IPv6 upper-layer header after the extension chain.
    pub proto: u8,
    pub l4: L4,
    /// Offset of the transport header in the frame (meaningful when `l4` is not `None`).
    pub l4_offset: usize,
    /// Where the IP packet ends in the frame (Ethernet padding excluded).
    pub end: usize,
}

/// An ARP packet (Ethernet/IPv4 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_ip: Ipv4Addr,
}

/// What the frame carries above Ethernet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L3 {
    Other,
    Arp(Arp),
    Ip(Ip),
}

/// A parsed frame: borrowed bytes plus the header facts.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub bytes: &'a [u8],
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub tag: Option<Tag>,
    /// The ethertype after any tag.
    pub ethertype: u16,
    /// Where the L3 header starts (14, or 18 when tagged).
    pub l3_offset: usize,
    pub l3: L3,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn mac(b: &[u8], at: usize) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[at..at + 6]);
    m
}

pub fn is_multicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 1
}

impl<'a> Frame<'a> {
    /// Parses `bytes` (a whole frame without FCS).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Malformed> {
        if bytes.len() < ETH_HLEN {
            return Err(Malformed::Short(bytes.len()));
        }
        let dst = mac(bytes, 0);
        let src = mac(bytes, 6);
        if is_multicast(&src) {
            return Err(Malformed::MulticastSource);
        }
        let mut ethertype = be16(bytes, 12).ok_or(Malformed::Short(bytes.len()))?;
        let mut l3_offset = ETH_HLEN;
        let mut tag = None;
        if ethertype == ETHERTYPE_VLAN {
            let tci = be16(bytes, 14).ok_or(Malformed::TruncatedTag)?;
            ethertype = be16(bytes, 16).ok_or(Malformed::TruncatedTag)?;
            tag = Some(Tag {
                vid: tci & 0x0fff,
                pcp: (tci >> 13) as u8,
            });
            l3_offset += VLAN_HLEN;
            if ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
                return Err(Malformed::StackedTags);
            }
        } else if ethertype == ETHERTYPE_QINQ {
            return Err(Malformed::StackedTags);
        }
        let l3 = match ethertype {
            ETHERTYPE_ARP => L3::Arp(parse_arp(&bytes[l3_offset..])?),
            ETHERTYPE_IPV4 => L3::Ip(parse_ipv4(bytes, l3_offset)?),
            ETHERTYPE_IPV6 => L3::Ip(parse_ipv6(bytes, l3_offset)?),
            _ => L3::Other,
        };
        Ok(Self {
            bytes,
            dst,
            src,
            tag,
            ethertype,
            l3_offset,
            l3,
        })
    }

    pub fn ip(&self) -> Option<&Ip> {
        match &self.l3 {
            L3::Ip(ip) => Some(ip),
            _ => None,
        }
    }

    /// The transport header and what follows it, up to the end of the IP packet
    /// (`None` for non-IP frames and non-first fragments).
    pub fn l4_bytes(&self) -> Option<&'a [u8]> {
        let ip = self.ip()?;
        if ip.l4 == L4::None {
            return None;
        }
        self.bytes.get(ip.l4_offset..ip.end)
    }

    /// A TCP segment's flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10).
    pub fn tcp_flags(&self) -> Option<u8> {
        match self.ip()? {
            Ip {
                proto: IPPROTO_TCP,
                l4: L4::Ports { .. },
                ..
            } => self.l4_bytes()?.get(13).copied(),
            _ => None,
        }
    }

    /// An ICMP or ICMPv6 echo request or reply: (is a request, identifier).
    pub fn icmp_echo(&self) -> Option<(bool, u16)> {
        let ip = self.ip()?;
        let L4::Icmp { ty, .. } = ip.l4 else {
            return None;
        };
        let request = match (ip.proto, ty) {
            (IPPROTO_ICMP, 8) | (IPPROTO_ICMPV6, 128) => true,
            (IPPROTO_ICMP, 0) | (IPPROTO_ICMPV6, 129) => false,
            _ => return None,
        };
        Some((request, be16(self.l4_bytes()?, 4)?))
    }

    /// A UDP datagram's ports and payload (for the DHCP guard).
    pub fn udp_payload(&self) -> Option<(u16, u16, &'a [u8])> {
        let ip = self.ip()?;
        match (ip.proto, ip.l4) {
            (IPPROTO_UDP, L4::Ports { src, dst }) => {
                Some((src, dst, self.bytes.get(ip.l4_offset + 8..)?))
            }
            _ => None,
        }
    }
}

fn parse_arp(b: &[u8]) -> Result<Arp, Malformed> {
    // htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4: 28 bytes.
    if b.len() < 28 || be16(b, 0) != Some(1) || be16(b, 2) != Some(ETHERTYPE_IPV4) {
        return Err(Malformed::Arp);
    }
    if b[4] != 6 || b[5] != 4 {
        return Err(Malformed::Arp);
    }
    Ok(Arp {
        op: be16(b, 6).ok_or(Malformed::Arp)?,
        sender_mac: mac(b, 8),
        sender_ip: Ipv4Addr::new(b[14], b[15], b[16], b[17]),
        target_ip: Ipv4Addr::new(b[24], b[25], b[26], b[27]),
    })
}

fn parse_l4(frame: &[u8], proto: u8, at: usize, end: usize) -> Result<L4, Malformed> {
    let seg = frame.get(at..end).ok_or(Malformed::Transport)?;
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let need = if proto == IPPROTO_TCP { 20 } else { 8 };
            if seg.len() < need {
                return Err(Malformed::Transport);
            }
            Ok(L4::Ports {
                src: u16::from_be_bytes([seg[0], seg[1]]),
                dst: u16::from_be_bytes([seg[2], seg[3]]),
            })
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            if seg.len() < 4 {
                return Err(Malformed::Transport);
            }
            Ok(L4::Icmp {
                ty: seg[0],
                code: seg[1],
            })
        }
        _ => Ok(L4::None),
    }
}

fn parse_ipv4(frame: &[u8], at: usize) -> Result<Ip, Malformed> {
    let h = frame.get(at..).ok_or(Malformed::Ipv4)?;
    if h.len() < 20 || h[0] >> 4 != 4 {
        return Err(Malformed::Ipv4);
    }
    let ihl = usize::from(h[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    // Ethernet pads short frames: the IP length may be below the frame's, never above.
    if ihl < 20 || total < ihl || total > h.len() {
        return Err(Malformed::Ipv4);
    }
    let proto = h[9];
    let frag_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
    let l4_offset = at + ihl;
    let l4 = if frag_offset == 0 {
        parse_l4(frame, proto, l4_offset, at + total)?
    } else {
        L4::None
    };
    Ok(Ip {
        src: IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
        dst: IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
        proto,
        l4,
        l4_offset,
        end: at + total,
    })
}

fn ipv6_addr(b: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    Ipv6Addr::from(a)
}

fn parse_ipv6(frame: &[u8], at: usize) -> Result<Ip, Malformed> {
    let h = frame.get(at..).ok_or(Malformed::Ipv6)?;
    if h.len() < 40 || h[0] >> 4 != 6 {
        return Err(Malformed::Ipv6);
    }
    let payload = usize::from(u16::from_be_bytes([h[4], h[5]]));
    let end = at + 40 + payload;
    if end > frame.len() {
        return Err(Malformed::Ipv6);
    }
    let (src, dst) = (ipv6_addr(&h[8..]), ipv6_addr(&h[24..]));
    let mut next = h[6];
    let mut off = at + 40;
    let mut first_fragment = true;
    // Walk the extension headers, so that an RA behind a hop-by-hop header is still an RA.
    for _ in 0..=MAX_IPV6_EXT_HEADERS {
        let ext = frame.get(off..end).ok_or(Malformed::Ipv6)?;
        let len = match next {
            0 | 43 | 60 => {
                if ext.len() < 8 {
                    return Err(Malformed::Ipv6);
                }
                (usize::from(ext[1]) + 1) * 8
            }
            44 => {
                if ext.len() < 8 {
                    return Err(Malformed::Ipv6);
                }
                first_fragment &= u16::from_be_bytes([ext[2], ext[3]]) >> 3 == 0;
                8
            }
            _ => {
                let l4 = if first_fragment {
                    parse_l4(frame, next, off, end)?
                } else {
                    L4::None
                };
                return Ok(Ip {
                    src: IpAddr::V6(src),
                    dst: IpAddr::V6(dst),
                    proto: next,
                    l4,
                    l4_offset: off,
                    end,
                });
            }
        };
        if ext.len() < len {
            return Err(Malformed::Ipv6);
        }
        next = ext[0];
        off += len;
    }
    Err(Malformed::Ipv6)
}

/// Builders for well-formed frames (tests, the fuzz seeds, docs examples).
pub mod build {
    use super::*;

    /// An Ethernet header (optionally tagged) followed by `payload`, padded to 60 bytes.
    pub fn ethernet(
        dst: [u8; 6],
        src: [u8; 6],
        vid: Option<u16>,
        ethertype: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut f = Vec::with_capacity(ETH_HLEN + VLAN_HLEN + payload.len());
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        if let Some(vid) = vid {
            f.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        if f.len() < 60 {
            f.resize(60, 0);
        }
        f
    }

    /// An IPv4 packet (no options, checksum left zero) carrying `l4`.
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
        let total = (20 + l4.len()) as u16;
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    /// A UDP header (checksum zero: none) and payload.
    pub fn udp(src: u16, dst: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = Vec::with_capacity(8 + payload.len());
        u.extend_from_slice(&src.to_be_bytes());
        u.extend_from_slice(&dst.to_be_bytes());
        u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(payload);
        u
    }

    /// A whole IPv4/UDP frame.
    #[allow(clippy::too_many_arguments)]
    pub fn udp4_frame(
        dst: [u8; 6],
        src: [u8; 6],
        vid: Option<u16>,
        ip_src: Ipv4Addr,
        ip_dst: Ipv4Addr,
        sport: u16,
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let ip = ipv4(ip_src, ip_dst, IPPROTO_UDP, &udp(sport, dport, payload));
        ethernet(dst, src, vid, ETHERTYPE_IPV4, &ip)
    }

    /// A DHCP OFFER-shaped BOOTREPLY from `server` (UDP 67 → 68, broadcast).
    pub fn dhcp_offer(src: [u8; 6], server: Ipv4Addr) -> Vec<u8> {
        let mut bootp = vec![0u8; 240];
        bootp[0] = 2; // BOOTREPLY
        bootp[1] = 1;
        bootp[2] = 6;
        bootp[236..240].copy_from_slice(&[99, 130, 83, 99]); // magic cookie
        bootp.extend_from_slice(&[53, 1, 2, 255]); // DHCP message type OFFER, end
        udp4_frame(
            [0xff; 6],
            src,
            None,
            server,
            Ipv4Addr::BROADCAST,
            67,
            68,
            &bootp,
        )
    }

    /// An ARP request or reply (op 1 or 2).
    pub fn arp(
        src: [u8; 6],
        op: u16,
        sender_ip: Ipv4Addr,
        target_mac: [u8; 6],
        target_ip: Ipv4Addr,
    ) -> Vec<u8> {
        let mut a = vec![0, 1, 0x08, 0, 6, 4];
        a.extend_from_slice(&op.to_be_bytes());
        a.extend_from_slice(&src);
        a.extend_from_slice(&sender_ip.octets());
        a.extend_from_slice(&target_mac);
        a.extend_from_slice(&target_ip.octets());
        let dst = if op == 1 { [0xff; 6] } else { target_mac };
        ethernet(dst, src, None, ETHERTYPE_ARP, &a)
    }

    /// A TCP header (20 bytes, no options, checksum zero) with `flags` and `payload`.
    pub fn tcp(src: u16, dst: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut t = Vec::with_capacity(20 + payload.len());
        t.extend_from_slice(&src.to_be_bytes());
        t.extend_from_slice(&dst.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        t.extend_from_slice(payload);
        t
    }

    /// A whole IPv4/TCP frame (untagged).
    #[allow(clippy::too_many_arguments)]
    pub fn tcp4_frame(
        dst: [u8; 6],
        src: [u8; 6],
        ip_src: Ipv4Addr,
        ip_dst: Ipv4Addr,
        sport: u16,
        dport: u16,
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let ip = ipv4(
            ip_src,
            ip_dst,
            IPPROTO_TCP,
            &tcp(sport, dport, flags, payload),
        );
        ethernet(dst, src, None, ETHERTYPE_IPV4, &ip)
    }

    /// An ICMPv4 echo request (or reply) with identifier `id` (checksum zero).
    pub fn icmp4_echo(
        dst: [u8; 6],
        src: [u8; 6],
        ip_src: Ipv4Addr,
        ip_dst: Ipv4Addr,
        request: bool,
        id: u16,
    ) -> Vec<u8> {
        let mut icmp = vec![if request { 8 } else { 0 }, 0, 0, 0];
        icmp.extend_from_slice(&id.to_be_bytes());
        icmp.extend_from_slice(&[0, 1]);
        icmp.extend_from_slice(b"vireo echo");
        let ip = ipv4(ip_src, ip_dst, IPPROTO_ICMP, &icmp);
        ethernet(dst, src, None, ETHERTYPE_IPV4, &ip)
    }

    /// An IPv6 packet (hop limit 255) carrying `l4` as protocol `next`.
    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next, 255]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    /// A neighbour advertisement (ICMPv6 136, solicited and override set, checksum
    /// zero) for `target`, from `ip_src` to all nodes, with a target link-layer
    /// address option when `tlla` is given, then `options` (raw bytes) as they are.
    pub fn neighbour_advert(
        src: [u8; 6],
        ip_src: Ipv6Addr,
        target: Ipv6Addr,
        tlla: Option<[u8; 6]>,
        options: &[u8],
    ) -> Vec<u8> {
        let mut na = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
        na.extend_from_slice(&target.octets());
        if let Some(mac) = tlla {
            na.extend_from_slice(&[2, 1]);
            na.extend_from_slice(&mac);
        }
        na.extend_from_slice(options);
        let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        let ip = ipv6(ip_src, all_nodes, IPPROTO_ICMPV6, &na);
        ethernet([0x33, 0x33, 0, 0, 0, 1], src, None, ETHERTYPE_IPV6, &ip)
    }

    /// An ICMPv6 message of type `ty` (e.g. 134, a router advertisement) to all nodes.
    pub fn icmpv6(src: [u8; 6], ty: u8) -> Vec<u8> {
        let body = [ty, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(body.len() as u16).to_be_bytes());
        p.extend_from_slice(&[IPPROTO_ICMPV6, 255]);
        p.extend_from_slice(&Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1).octets());
        p.extend_from_slice(&Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets());
        p.extend_from_slice(&body);
        ethernet([0x33, 0x33, 0, 0, 0, 1], src, None, ETHERTYPE_IPV6, &p)
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

    #[test]
    fn parses_tagged_udp_to_ports() {
        let f = udp4_frame(
            B,
            A,
            Some(10 | (5 << 13)),
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            1234,
            53,
            b"hi",
        );
        let p = Frame::parse(&f).unwrap();
        assert_eq!(p.tag, Some(Tag { vid: 10, pcp: 5 }));
        assert_eq!(p.ethertype, ETHERTYPE_IPV4);
        let ip = p.ip().unwrap();
        assert_eq!(ip.proto, IPPROTO_UDP);
        assert_eq!(ip.l4, L4::Ports { src: 1234, dst: 53 });
        assert_eq!(p.udp_payload().unwrap().2[..2], *b"hi");
    }

    #[test]
    fn every_truncation_of_valid_frames_is_an_error_or_a_shorter_parse_never_a_panic() {
        let frames = [
            dhcp_offer(A, Ipv4Addr::new(10, 0, 0, 1)),
            arp(
                A,
                1,
                Ipv4Addr::new(10, 0, 0, 1),
                [0; 6],
                Ipv4Addr::new(10, 0, 0, 2),
            ),
            icmpv6(A, 134),
            udp4_frame(
                B,
                A,
                Some(7),
                Ipv4Addr::LOCALHOST,
                Ipv4Addr::LOCALHOST,
                1,
                2,
                b"",
            ),
        ];
        for f in &frames {
            assert!(Frame::parse(f).is_ok());
            for n in 0..f.len() {
                let _ = Frame::parse(&f[..n]);
            }
        }
        assert_eq!(Frame::parse(&A[..5]).unwrap_err(), Malformed::Short(5));
    }

    #[test]
    fn lying_lengths_are_malformed() {
        let mut f = udp4_frame(
            B,
            A,
            None,
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::LOCALHOST,
            1,
            2,
            b"",
        );
        f[14 + 2..14 + 4].copy_from_slice(&2000u16.to_be_bytes()); // IPv4 total length
        assert_eq!(Frame::parse(&f).unwrap_err(), Malformed::Ipv4);
        f[14 + 2..14 + 4].copy_from_slice(&28u16.to_be_bytes());
        f[14] = 0x4f; // IHL 60 bytes
        assert_eq!(Frame::parse(&f).unwrap_err(), Malformed::Ipv4);
        let mut v6 = icmpv6(A, 134);
        v6[14 + 4..14 + 6].copy_from_slice(&9000u16.to_be_bytes());
        assert_eq!(Frame::parse(&v6).unwrap_err(), Malformed::Ipv6);
        let mut multi = icmpv6(A, 134);
        multi[6] = 1;
        assert_eq!(
            Frame::parse(&multi).unwrap_err(),
            Malformed::MulticastSource
        );
        let qinq = ethernet(B, A, Some(5), ETHERTYPE_VLAN, &[0, 6, 0x08, 0]);
        assert_eq!(Frame::parse(&qinq).unwrap_err(), Malformed::StackedTags);
    }

    #[test]
    fn a_router_advertisement_behind_extension_headers_is_still_seen() {
        let mut f = icmpv6(A, 134);
        // Insert an 8-byte hop-by-hop header: next header 58, length 0, padding.
        let at = 14 + 40;
        f.truncate(at + 16);
        let body = f.split_off(at);
        f.extend_from_slice(&[IPPROTO_ICMPV6, 0, 1, 4, 0, 0, 0, 0]);
        f.extend_from_slice(&body);
        f[14 + 6] = 0; // next header: hop-by-hop
        f[14 + 4..14 + 6].copy_from_slice(&24u16.to_be_bytes());
        let p = Frame::parse(&f).unwrap();
        assert_eq!(p.ip().unwrap().l4, L4::Icmp { ty: 134, code: 0 });
        // A chain that loops through too many headers is malformed, not followed forever.
        let mut long = f[..at].to_vec();
        long[14 + 4..14 + 6].copy_from_slice(&(8u16 * 10 + 16).to_be_bytes());
        for _ in 0..10 {
            long.extend_from_slice(&[0, 0, 1, 4, 0, 0, 0, 0]);
        }
        long.extend_from_slice(&body);
        assert_eq!(Frame::parse(&long).unwrap_err(), Malformed::Ipv6);
    }
}
