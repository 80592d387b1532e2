//! The switching core's behaviour, frame by frame, with a clock we move by hand.

use std::any::Any;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::acl::AclRule;
use crate::extension::{DropReason, Extension, FrameCtx, Stage, Verdict};
use crate::frame::build::*;
use crate::frame::{ETHERTYPE_IPV4, IPPROTO_ICMPV6};
use crate::port::PortConfig;
use crate::{Egress, PortId, Switch, SwitchConfig};

pub(crate) const T0: Duration = Duration::from_secs(10);
pub(crate) const BCAST: [u8; 6] = [0xff; 6];

pub(crate) fn mac(n: u8) -> [u8; 6] {
    [0x52, 0x54, 0, 0, 0, n]
}

pub(crate) fn switch(specs: &[&str]) -> (Switch, Vec<PortId>) {
    let mut sw = Switch::new(SwitchConfig::default());
    let ids = specs
        .iter()
        .map(|s| sw.add_port(s.parse::<PortConfig>().unwrap()).unwrap())
        .collect();
    (sw, ids)
}

pub(crate) fn send(sw: &mut Switch, from: PortId, frame: &[u8]) -> Vec<Egress> {
    let mut out = Vec::new();
    sw.process(from, frame, T0, &mut out);
    out
}

pub(crate) fn ports(out: &[Egress]) -> Vec<PortId> {
    out.iter().map(|e| e.port).collect()
}

pub(crate) fn plain(dst: [u8; 6], src: [u8; 6], vid: Option<u16>) -> Vec<u8> {
    ethernet(dst, src, vid, 0x88b5, b"vireo-switch test payload")
}

/// `frame` with an 802.1Q tag inserted after the addresses.
fn with_tag(frame: &[u8], tci: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&[0x81, 0, (tci >> 8) as u8, tci as u8]);
    f.extend_from_slice(&frame[12..]);
    f
}

pub(crate) fn drops(sw: &Switch, port: &str, why: &str) -> u64 {
    sw.counters(port)
        .unwrap()
        .rx_dropped
        .get(why)
        .copied()
        .unwrap_or(0)
}

#[test]
fn floods_within_the_vlan_then_learns_and_forwards_to_one_port() {
    let (mut sw, p) = switch(&[
        "name=a,vlan=10",
        "name=b,vlan=10",
        "name=c,vlan=10",
        "name=d,vlan=20",
    ]);
    let out = send(&mut sw, p[0], &plain(BCAST, mac(1), None));
    assert_eq!(
        ports(&out),
        [p[1], p[2]],
        "broadcast: the VLAN's other ports, not d"
    );
    assert!(out.iter().all(|e| e.frame == plain(BCAST, mac(1), None)));
    // Unknown unicast floods too; the reply is then switched to a alone.
    assert_eq!(
        ports(&send(&mut sw, p[1], &plain(mac(9), mac(2), None))),
        [p[0], p[2]]
    );
    assert_eq!(
        ports(&send(&mut sw, p[1], &plain(mac(1), mac(2), None))),
        [p[0]]
    );
    assert_eq!(
        ports(&send(&mut sw, p[0], &plain(mac(2), mac(1), None))),
        [p[1]]
    );
    // The same address on another VLAN is unknown there.
    let out = send(&mut sw, p[3], &plain(mac(1), mac(4), None));
    assert!(out.is_empty(), "d is alone on VLAN 20");
    let c = sw.counters("a").unwrap();
    assert_eq!((c.rx_packets, c.tx_packets), (2, 2));
}

#[test]
fn aged_addresses_are_flooded_again() {
    let (mut sw, p) = switch(&["name=a", "name=b", "name=c"]);
    send(&mut sw, p[0], &plain(BCAST, mac(1), None));
    let mut out = Vec::new();
    sw.process(
        p[1],
        &plain(mac(1), mac(2), None),
        T0 + Duration::from_secs(299),
        &mut out,
    );
    assert_eq!(ports(&out), [p[0]]);
    out.clear();
    sw.process(
        p[1],
        &plain(mac(1), mac(2), None),
        T0 + Duration::from_secs(300),
        &mut out,
    );
    assert_eq!(ports(&out), [p[0], p[2]], "a's entry aged out after 300 s");
}

#[test]
fn trunks_tag_and_untag_and_enforce_their_allowed_list() {
    let (mut sw, p) = switch(&[
        "name=a,vlan=10",
        "name=b,vlan=20",
        "name=up,trunk=10:20,native=30",
        "name=n,vlan=30",
    ]);
    let out = send(&mut sw, p[0], &plain(BCAST, mac(1), None));
    assert_eq!(ports(&out), [p[2]]);
    assert_eq!(
        out[0].frame,
        with_tag(&plain(BCAST, mac(1), None), 10),
        "tagged 10 on the trunk"
    );
    // Tagged 20 from the trunk reaches b untagged, byte for byte otherwise.
    let out = send(&mut sw, p[2], &plain(BCAST, mac(7), Some(20 | (3 << 13))));
    assert_eq!(ports(&out), [p[1]]);
    assert_eq!(out[0].frame, plain(BCAST, mac(7), None));
    // The native VLAN leaves and enters untagged.
    let out = send(&mut sw, p[3], &plain(BCAST, mac(8), None));
    assert_eq!(out[0].frame, plain(BCAST, mac(8), None));
    assert_eq!(
        ports(&send(&mut sw, p[2], &plain(BCAST, mac(7), None))),
        [p[3]]
    );
    // VLAN 40 is not allowed on the trunk; 4095 is no VLAN; a tag from an access port is refused.
    assert!(send(&mut sw, p[2], &plain(BCAST, mac(7), Some(40))).is_empty());
    assert!(send(&mut sw, p[2], &plain(BCAST, mac(7), Some(4095))).is_empty());
    assert_eq!(drops(&sw, "up", "vlan-not-allowed"), 2);
    assert!(send(&mut sw, p[0], &plain(BCAST, mac(1), Some(10))).is_empty());
    assert_eq!(drops(&sw, "a", "tagged-on-access"), 1);
    // PCP of a tagged frame is kept from trunk to trunk: the priority bits survive.
    let (mut sw, p) = switch(&["name=t1,trunk=5", "name=t2,trunk=5"]);
    let out = send(&mut sw, p[0], &plain(BCAST, mac(1), Some(5 | (6 << 13))));
    assert_eq!(out[0].frame, plain(BCAST, mac(1), Some(5 | (6 << 13))));
    // A trunk without a native VLAN drops untagged frames.
    assert!(send(&mut sw, p[0], &plain(BCAST, mac(1), None)).is_empty());
    assert_eq!(drops(&sw, "t1", "untagged-on-trunk"), 1);
}

#[test]
fn private_vlans_isolate_and_group_ports() {
    let (mut sw, p) = switch(&[
        "name=i1,vlan=10,pvlan=isolated",
        "name=i2,vlan=10,pvlan=isolated",
        "name=c1,vlan=10,pvlan=community:1",
        "name=c2,vlan=10,pvlan=community:1",
        "name=c3,vlan=10,pvlan=community:2",
        "name=pr,vlan=10,pvlan=promiscuous",
        "name=up,trunk=10",
    ]);
    assert_eq!(
        ports(&send(&mut sw, p[0], &plain(BCAST, mac(1), None))),
        [p[5], p[6]]
    );
    assert_eq!(
        ports(&send(&mut sw, p[2], &plain(BCAST, mac(3), None))),
        [p[3], p[5], p[6]]
    );
    assert_eq!(
        ports(&send(&mut sw, p[5], &plain(BCAST, mac(6), None))),
        [p[0], p[1], p[2], p[3], p[4], p[6]]
    );
    // Known unicast between isolated ports is refused too, and counted.
    send(&mut sw, p[1], &plain(BCAST, mac(2), None));
    assert!(send(&mut sw, p[0], &plain(mac(2), mac(1), None)).is_empty());
    assert_eq!(drops(&sw, "i1", "no-egress"), 1);
}

#[test]
fn hostile_frames_are_dropped_and_counted_never_forwarded() {
    let (mut sw, p) = switch(&["name=a", "name=b"]);
    let good = plain(BCAST, mac(1), None);
    for n in 0..14 {
        assert!(send(&mut sw, p[0], &good[..n]).is_empty());
    }
    let mut ipv4 = udp4_frame(
        BCAST,
        mac(1),
        None,
        Ipv4Addr::LOCALHOST,
        Ipv4Addr::LOCALHOST,
        1,
        2,
        b"x",
    );
    ipv4[14 + 2] = 0xff; // total length beyond the frame
    assert!(send(&mut sw, p[0], &ipv4).is_empty());
    let mut multicast_src = good.clone();
    multicast_src[6] |= 1;
    assert!(send(&mut sw, p[0], &multicast_src).is_empty());
    assert_eq!(drops(&sw, "a", "malformed"), 16);
    let jumbo = ethernet(BCAST, mac(1), None, 0x88b5, &[0u8; 1501]);
    assert!(send(&mut sw, p[0], &jumbo).is_empty());
    assert_eq!(drops(&sw, "a", "oversize"), 1);
    let max = ethernet(BCAST, mac(1), None, 0x88b5, &[0u8; 1500]);
    assert_eq!(send(&mut sw, p[0], &max).len(), 1, "1514 bytes is fine");
    assert!(sw
        .mac_table(T0)
        .iter()
        .all(|r| r.mac == "52:54:00:00:00:01"));
    // Frames from a port that is gone are ignored.
    sw.remove_port("a").unwrap();
    assert!(send(&mut sw, p[0], &good).is_empty());
}

#[test]
fn acls_deny_by_priority_and_count_per_rule() {
    let (mut sw, p) = switch(&["name=vm,vlan=1", "name=up,vlan=1"]);
    let deny: AclRule = serde_json::from_str(
        r#"{"action":"deny","direction":"outbound","protocol":"udp","dst_port":"9000-9999","dst_ip":"10.0.0.0/8"}"#,
    )
    .unwrap();
    let allow_dns: AclRule = serde_json::from_str(
        r#"{"action":"allow","priority":10,"protocol":"udp","dst_port":9053}"#,
    )
    .unwrap();
    let deny_id = sw.acl_add("vm", deny).unwrap();
    let allow_id = sw.acl_add("vm", allow_dns).unwrap();
    let to = |port: u16, dst: Ipv4Addr| {
        udp4_frame(
            mac(2),
            mac(1),
            None,
            Ipv4Addr::new(192, 168, 0, 1),
            dst,
            5555,
            port,
            b"acl",
        )
    };
    let ten = Ipv4Addr::new(10, 1, 2, 3);
    assert!(send(&mut sw, p[0], &to(9999, ten)).is_empty(), "denied");
    assert_eq!(
        send(&mut sw, p[0], &to(9053, ten)).len(),
        1,
        "the higher-priority allow wins"
    );
    assert_eq!(
        send(&mut sw, p[0], &to(9999, Ipv4Addr::new(11, 0, 0, 1))).len(),
        1,
        "other prefix"
    );
    assert_eq!(send(&mut sw, p[0], &to(8999, ten)).len(), 1, "other port");
    // Inbound traffic to the VM is not outbound: the rule does not apply.
    let inbound = udp4_frame(mac(1), mac(2), None, ten, ten, 1, 9999, b"in");
    assert_eq!(send(&mut sw, p[1], &inbound).len(), 1);
    let rules = sw.acl_list("vm").unwrap();
    assert_eq!(rules[0].id, allow_id, "listed highest priority first");
    assert_eq!((rules[0].packets, rules[1].packets), (1, 1));
    assert_eq!(rules[1].bytes, to(9999, ten).len() as u64);
    assert_eq!(drops(&sw, "vm", "acl"), 1);
    // An inbound rule on vm stops frames at egress (counted on the port's tx side).
    let inbound_deny: AclRule = serde_json::from_str(
        r#"{"action":"deny","direction":"inbound","src_mac":"52:54:00:00:00:02"}"#,
    )
    .unwrap();
    sw.acl_add("vm", inbound_deny).unwrap();
    assert!(send(&mut sw, p[1], &inbound).is_empty());
    assert_eq!(sw.counters("vm").unwrap().tx_dropped.get("acl"), Some(&1));
    sw.acl_remove("vm", deny_id).unwrap();
    assert_eq!(send(&mut sw, p[0], &to(9999, ten)).len(), 1, "removed");
    assert!(sw
        .acl_remove("vm", deny_id)
        .unwrap_err()
        .to_string()
        .contains("no rule"));
    assert!(sw
        .acl_list("nope")
        .unwrap_err()
        .to_string()
        .contains("no port 'nope'"));
}

#[test]
fn guards_drop_spoofed_sources_rogue_servers_and_routers() {
    let (mut sw, p) = switch(&[
        "name=vm,vlan=1,mac=52:54:00:00:00:01,ip=10.0.0.1,guard=all",
        "name=up,vlan=1",
    ]);
    let me = mac(1);
    assert_eq!(send(&mut sw, p[0], &plain(BCAST, me, None)).len(), 1);
    assert!(send(&mut sw, p[0], &plain(BCAST, mac(66), None)).is_empty());
    assert_eq!(drops(&sw, "vm", "mac-spoofing"), 1);
    assert!(
        sw.mac_table(T0)
            .iter()
            .all(|r| r.mac != "52:54:00:00:00:42"),
        "a spoofed source is never learned"
    );
    let offer = dhcp_offer(me, Ipv4Addr::new(10, 0, 0, 1));
    assert!(send(&mut sw, p[0], &offer).is_empty());
    assert_eq!(drops(&sw, "vm", "dhcp-guard"), 1);
    assert_eq!(
        send(
            &mut sw,
            p[1],
            &dhcp_offer(mac(2), Ipv4Addr::new(10, 0, 0, 9))
        )
        .len(),
        1,
        "uplink may"
    );
    assert!(send(&mut sw, p[0], &icmpv6(me, 134)).is_empty());
    assert!(send(&mut sw, p[0], &icmpv6(me, 137)).is_empty());
    assert_eq!(
        send(&mut sw, p[0], &icmpv6(me, 135)).len(),
        1,
        "a neighbour solicitation is fine"
    );
    assert_eq!(drops(&sw, "vm", "router-guard"), 2);
    let (ip, other) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
    assert_eq!(send(&mut sw, p[0], &arp(me, 1, ip, [0; 6], other)).len(), 1);
    assert!(
        send(&mut sw, p[0], &arp(me, 2, other, mac(2), other)).is_empty(),
        "claims another IP"
    );
    let mut lying = arp(me, 1, ip, [0; 6], other);
    lying[14 + 8 + 5] = 0x99; // sender hardware address is not the port's
    assert!(send(&mut sw, p[0], &lying).is_empty());
    assert_eq!(drops(&sw, "vm", "arp-spoofing"), 2);
    let _ = (ETHERTYPE_IPV4, IPPROTO_ICMPV6);
}

/// An extension that records what it saw (capture) or drops every third frame and
/// mirrors to a port (forward), to prove the chain's order and reach.
struct Probe {
    stage: Stage,
    log: Arc<Mutex<Vec<String>>>,
    add: Option<PortId>,
}

impl Extension for Probe {
    fn name(&self) -> &str {
        "probe"
    }
    fn stage(&self) -> Stage {
        self.stage
    }
    fn ingress(&mut self, ctx: &FrameCtx<'_>) -> Verdict {
        self.log
            .lock()
            .unwrap()
            .push(format!("{:?} in {}", self.stage, ctx.port));
        if self.stage == Stage::Capture {
            Verdict::Drop(DropReason("ignored"))
        } else {
            Verdict::Pass
        }
    }
    fn forward(&mut self, _ctx: &FrameCtx<'_>, egress: &mut Vec<PortId>) {
        self.log.lock().unwrap().push(format!("forward {egress:?}"));
        egress.extend(self.add);
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[test]
fn the_chain_runs_capture_filter_forward_in_order_and_a_forwarder_can_add_ports() {
    let (mut sw, p) = switch(&[
        "name=a,vlan=1",
        "name=b,vlan=1",
        "name=mon,vlan=1",
        "name=x,vlan=2",
    ]);
    let log = Arc::new(Mutex::new(Vec::new()));
    // Added in reverse stage order: the chain sorts them.
    for (stage, add) in [
        (Stage::Forward, Some(p[2])),
        (Stage::Filter, None),
        (Stage::Capture, None),
    ] {
        sw.add_extension(Box::new(Probe {
            stage,
            log: log.clone(),
            add,
        }));
    }
    send(&mut sw, p[1], &plain(BCAST, mac(2), None));
    log.lock().unwrap().clear();
    // Known unicast a → b, the forwarder adds mon (and x would be refused: another VLAN).
    let out = send(&mut sw, p[0], &plain(mac(2), mac(1), None));
    assert_eq!(ports(&out), [p[1], p[2]]);
    assert_eq!(
        *log.lock().unwrap(),
        ["Capture in 1", "Filter in 1", "Forward in 1", "forward [2]"],
        "a capture's Drop is ignored; ingress reaches every stage"
    );
    let names: Vec<&str> = sw.extensions().map(|e| e.name()).collect();
    assert_eq!(
        names,
        ["mirror", "probe", "guards", "acl", "storm", "qos", "probe", "probe"]
    );
}

#[test]
fn ports_are_unique_by_name_and_interface() {
    let (mut sw, _) = switch(&["name=a,iface=tap0"]);
    let e = sw
        .add_port("name=a,iface=tap1".parse().unwrap())
        .unwrap_err();
    assert_eq!(e.to_string(), "a port named 'a' exists already");
    let e = sw
        .add_port("name=b,iface=tap0".parse().unwrap())
        .unwrap_err();
    assert_eq!(e.to_string(), "interface 'tap0' is port 'a' already");
    assert!(sw
        .remove_port("zz")
        .unwrap_err()
        .to_string()
        .contains("no port 'zz'"));
}
