//! Port guards, an extension of the filter stage: what a VM port may not send.
//! Each guard is switched on per port ([`crate::port::Guards`]) and looks only at
//! frames entering the switch from that port.
//!
//! - **MAC spoofing**: the source address must be the port's `mac`.
//! - **ARP spoofing**: an ARP packet's sender hardware address must be the port's
//!   `mac` and, when the port lists `ips`, its sender IP one of them (0.0.0.0, an ARP
//!   probe, is allowed).
//! - **DHCP guard**: DHCPv4 server messages (UDP from port 67 to 68, or any BOOTREPLY
//!   to 68) and DHCPv6 server messages (UDP from 547 to 546) are dropped.
//! - **Router guard**: ICMPv6 router advertisements (134) and redirects (137), ICMPv4
//!   redirects (5) and router advertisements (9) are dropped.

use std::any::Any;
use std::net::Ipv4Addr;

use crate::extension::{DropReason, Extension, FrameCtx, Stage, Verdict};
use crate::frame::{IPPROTO_ICMP, IPPROTO_ICMPV6, L3, L4};

pub const MAC_SPOOF: DropReason = DropReason("mac-spoofing");
pub const ARP_SPOOF: DropReason = DropReason("arp-spoofing");
pub const DHCP_GUARD: DropReason = DropReason("dhcp-guard");
pub const ROUTER_GUARD: DropReason = DropReason("router-guard");

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
                let ip_ok = cfg.ips.is_empty()
                    || arp.sender_ip == Ipv4Addr::UNSPECIFIED
                    || cfg.ips.contains(&arp.sender_ip);
                if Some(arp.sender_mac) != port_mac || !ip_ok {
                    return Verdict::Drop(ARP_SPOOF);
                }
            }
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
