//! Port guards, an extension of the filter stage: what a VM port may not send.
//! Each guard is switched on per port ([`crate::port::Guards`]) and looks only at
//! frames entering the switch from that port.
//!
//! - **MAC spoofing**: the source address must be the port's `mac`.
//! - **ARP spoofing**: an ARP packet's sender hardware address must be the port's
//!   `mac` and, when the port lists IPv4 `ips`, its sender IP one of them (0.0.0.0,
//!   an ARP probe, is allowed).
//! - **ND spoofing**: an ICMPv6 neighbour advertisement (136) must name, when the port
//!   lists IPv6 `ips`, one of them as its target, and its target link-layer address
//!   option (if present) must be the port's `mac`. Options are read defensively
//!   (lengths in units of 8 bytes; a zero length or one running past the packet
//!   makes the advertisement malformed): an advertisement that is truncated or whose
//!   options cannot be read is dropped as well.
//! - **DHCP guard**: DHCPv4 server messages (UDP from port 67 to 68, or any BOOTREPLY
//!   to 68) and DHCPv6 server messages (UDP from 547 to 546) are dropped.
//! - **Router guard**: ICMPv6 router advertisements (134) and redirects (137), ICMPv4
//!   redirects (5) and router advertisements (9) are dropped.

use std::any::Any;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::extension::{DropReason, Extension, FrameCtx, Stage, Verdict};
use crate::frame::{IPPROTO_ICMP, IPPROTO_ICMPV6, L3, L4};

pub const MAC_SPOOF: DropReason = DropReason("mac-spoofing");
pub const ARP_SPOOF: DropReason = DropReason("arp-spoofing");
pub const DHCP_GUARD: DropReason = DropReason("dhcp-guard");
pub const ROUTER_GUARD: DropReason = DropReason("router-guard");
pub const ND_SPOOF: DropReason = DropReason("nd-spoofing");

/// ICMPv6 neighbour advertisement.
const ND_ADVERT: u8 = 136;
/// The NDP option carrying the target's link-layer address.
const OPT_TARGET_LLADDR: u8 = 2;

#[derive(Debug, Default)]
pub struct GuardSet;

fn is_dhcp_server_message(ctx: &FrameCtx<'_>) -> bool {
    let Some((sport, dport, payload)) = ctx.frame.udp_payload() else {
        return false;
    };
    let bootreply = dport == 68 && payload.first() == Some(&2);
    (sport == 67 && dport == 68) || bootreply || (sport == 547 && dport == 546)
}

fn is_router_message(ctx: &FrameCtx<'_>) -> bool {
    let Some(ip) = ctx.frame.ip() else {
        return false;
    };
    match (ip.proto, ip.l4) {
        (IPPROTO_ICMPV6, L4::Icmp { ty, .. }) => ty == 134 || ty == 137,
        (IPPROTO_ICMP, L4::Icmp { ty, .. }) => ty == 5 || ty == 9,
        _ => false,
    }
}

/// Whether `ctx`'s frame is a neighbour advertisement the port may not send:
/// `Some(true)` spoofed or unreadable, `Some(false)` fine, `None` not an NA.
fn is_spoofed_advert(ctx: &FrameCtx<'_>, port_mac: Option<[u8; 6]>) -> Option<bool> {
    let ip = ctx.frame.ip()?;
    let L4::Icmp {
        ty: ND_ADVERT,
        code,
    } = ip.l4
    else {
        return None;
    };
    if ip.proto != IPPROTO_ICMPV6 {
        return None;
    }
    if code != 0 {
        // No valid NA (RFC 4861 7.1.2): hosts discard it; so may the switch.
        return Some(true);
    }
    let Some(na) = ctx.frame.l4_bytes() else {
        return Some(true);
    };
    // Type, code, checksum, flags (8 bytes), then the 16-byte target.
    let Some(target) = na.get(8..24) else {
        return Some(true);
    };
    let mut t = [0u8; 16];
    t.copy_from_slice(target);
    let target = IpAddr::V6(Ipv6Addr::from(t));
    let mut v6 = ctx
        .port_config
        .ips
        .iter()
        .filter(|a| a.is_ipv6())
        .peekable();
    if v6.peek().is_some() && !v6.any(|a| *a == target) {
        return Some(true);
    }
    let mut opts = &na[24..];
    while !opts.is_empty() {
        let (Some(&ty), Some(&len)) = (opts.first(), opts.get(1)) else {
            return Some(true);
        };
        let len = usize::from(len) * 8;
        if len == 0 || len > opts.len() {
            return Some(true);
        }
        if ty == OPT_TARGET_LLADDR && opts.get(2..8) != port_mac.as_ref().map(|m| &m[..]) {
            return Some(true);
        }
        opts = &opts[len..];
    }
    Some(false)
}

impl Extension for GuardSet {
    fn name(&self) -> &str {
        "guards"
    }
    fn stage(&self) -> Stage {
        Stage::Filter
    }
    fn ingress(&mut self, ctx: &FrameCtx<'_>) -> Verdict {
        let cfg = ctx.port_config;
        let g = cfg.guards;
        let port_mac = cfg.mac.map(|m| m.bytes());
        if g.mac_spoofing && Some(ctx.frame.src) != port_mac {
            return Verdict::Drop(MAC_SPOOF);
        }
        if g.arp {
            if let L3::Arp(arp) = ctx.frame.l3 {
                let v4 = || cfg.ips.iter().filter(|a| a.is_ipv4());
                let ip_ok = v4().next().is_none()
                    || arp.sender_ip == Ipv4Addr::UNSPECIFIED
                    || v4().any(|a| *a == IpAddr::V4(arp.sender_ip));
                if Some(arp.sender_mac) != port_mac || !ip_ok {
                    return Verdict::Drop(ARP_SPOOF);
                }
            }
        }
        if g.nd && is_spoofed_advert(ctx, port_mac) == Some(true) {
            return Verdict::Drop(ND_SPOOF);
        }
        if g.dhcp && is_dhcp_server_message(ctx) {
            return Verdict::Drop(DHCP_GUARD);
        }
        if g.router && is_router_message(ctx) {
            return Verdict::Drop(ROUTER_GUARD);
        }
        Verdict::Pass
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
