//! The policy extensions frame by frame: stateful ACLs, mirroring, storm limits and
//! the ND guard, with a clock moved by hand.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::acl::AclRule;
use crate::frame::build::*;
use crate::frame::{ETHERTYPE_IPV6, IPPROTO_ICMPV6};
use crate::mirror::MirrorDirection;
use crate::port::PortConfig;
use crate::tests::{drops, mac, plain, ports, send, switch, BCAST, T0};
use crate::{Egress, PortId, Switch, SwitchConfig};

fn rule(json: &str) -> AclRule {
    serde_json::from_str(json).unwrap()
}

fn send_at(sw: &mut Switch, from: PortId, frame: &[u8], at: Duration) -> Vec<Egress> {
    let mut out = Vec::new();
    sw.process(from, frame, at, &mut out);
    out
}

fn tx_drops(sw: &Switch, port: &str, why: &str) -> u64 {
    sw.counters(port)
        .unwrap()
        .tx_dropped
        .get(why)
        .copied()
        .unwrap_or(0)
}

const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const SRV_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// vm → srv and srv → vm TCP segments between `vm_port` and `srv_port`.
fn out_tcp(vm_port: u16, srv_port: u16, flags: u8) -> Vec<u8> {
    tcp4_frame(mac(2), mac(1), VM_IP, SRV_IP, vm_port, srv_port, flags, b"")
}
fn in_tcp(srv_port: u16, vm_port: u16, flags: u8) -> Vec<u8> {
    tcp4_frame(
        mac(1),
        mac(2),
        SRV_IP,
        VM_IP,
        srv_port,
        vm_port,
        flags,
        b"ok",
    )
}

/// A VM whose inbound IPv4 is denied but for replies to its outbound TCP to port 80.
fn stateful_lab(cfg: SwitchConfig) -> (Switch, Vec<PortId>, u64, u64) {
    let mut sw = Switch::new(cfg);
    let p: Vec<PortId> = ["name=vm,mac=52:54:00:00:00:01", "name=srv"]
        .iter()
        .map(|s| sw.add_port(s.parse::<PortConfig>().unwrap()).unwrap())
        .collect();
    // `dst_ip` makes the deny IPv4-only: ARP still comes in.
    let deny = sw
        .acl_add(
            "vm",
            rule(r#"{"action":"deny","direction":"inbound","dst_ip":"0.0.0.0/0"}"#),
        )
        .unwrap();
    let web = sw
        .acl_add(
            "vm",
            rule(
                r#"{"action":"allow","direction":"outbound","protocol":"tcp","dst_port":80,"stateful":true,"priority":10}"#,
            ),
        )
        .unwrap();
    (sw, p, deny, web)
}

#[test]
fn a_stateful_rule_lets_replies_to_the_vms_flows_in_and_nothing_else() {
    let (mut sw, p, deny, web) = stateful_lab(SwitchConfig::default());
    let (vm, srv) = (p[0], p[1]);
    // Before the VM opened anything, the server's segment is dropped at vm's egress.
    assert!(send(&mut sw, srv, &in_tcp(80, 40000, SYN | ACK)).is_empty());
    assert_eq!(tx_drops(&sw, "vm", "acl"), 1);
    // The VM opens 40000 → 80: out it goes, and the reply comes in, byte for byte.
    assert_eq!(ports(&send(&mut sw, vm, &out_tcp(40000, 80, SYN))), [srv]);
    let reply = in_tcp(80, 40000, SYN | ACK);
    let out = send(&mut sw, srv, &reply);
    assert_eq!(ports(&out), [vm]);
    assert_eq!(out[0].frame, reply);
    // Nothing else: another VM port, another server port, UDP on the same ports,
    // another source address, a connection the server opens.
    let other_src = tcp4_frame(
        mac(1),
        mac(2),
        Ipv4Addr::new(10, 0, 0, 3),
        VM_IP,
        80,
        40000,
        ACK,
        b"",
    );
    let udp = udp4_frame(mac(1), mac(2), None, SRV_IP, VM_IP, 80, 40000, b"u");
    for f in [
        in_tcp(80, 40001, ACK),
        in_tcp(81, 40000, ACK),
        udp,
        other_src,
        in_tcp(5555, 22, SYN),
    ] {
        assert!(send(&mut sw, srv, &f).is_empty());
    }
    assert_eq!(tx_drops(&sw, "vm", "acl"), 6);
    // Outbound to another port is not tracked (no rule matched: allowed, no state).
    assert_eq!(ports(&send(&mut sw, vm, &out_tcp(40002, 8080, SYN))), [srv]);
    assert!(send(&mut sw, srv, &in_tcp(8080, 40002, ACK)).is_empty());
    // Per rule: the stateful one counted its outbound segment and its one reply.
    let rules = sw.acl_list("vm").unwrap();
    assert_eq!(rules[0].id, web);
    assert_eq!((rules[0].packets, rules[0].return_packets), (1, 1));
    assert_eq!(rules[0].return_bytes, reply.len() as u64);
    assert_eq!((rules[1].id, rules[1].packets), (deny, 7));
    let flows = sw.acl_flows("vm").unwrap().unwrap();
    assert_eq!((flows.active, flows.opened, flows.refused), (1, 1, 0));
    assert_eq!(sw.acl_flows("srv").unwrap(), None, "no stateful rule there");
    // A higher-priority inbound deny still beats the flow.
    let block = sw
        .acl_add(
            "vm",
            rule(r#"{"action":"deny","direction":"inbound","src_ip":"10.0.0.2","priority":20}"#),
        )
        .unwrap();
    assert!(send(&mut sw, srv, &reply).is_empty());
    sw.acl_remove("vm", block).unwrap();
    assert_eq!(send(&mut sw, srv, &reply).len(), 1);
    // Idle for 300 s (TCP), the flow is forgotten; traffic refreshes it.
    let later = T0 + Duration::from_secs(299);
    assert_eq!(send_at(&mut sw, srv, &reply, later).len(), 1);
    let idle = later + Duration::from_secs(300);
    assert!(send_at(&mut sw, srv, &reply, idle).is_empty());
    // A FIN shortens it to 10 s.
    send_at(&mut sw, vm, &out_tcp(40000, 80, SYN), idle);
    assert_eq!(
        send_at(&mut sw, srv, &in_tcp(80, 40000, 0x11), idle).len(),
        1
    );
    assert!(send_at(&mut sw, srv, &reply, idle + Duration::from_secs(10)).is_empty());
    // Switch::expire sweeps aged flows.
    send_at(&mut sw, vm, &out_tcp(40003, 80, SYN), idle);
    sw.expire(idle + Duration::from_secs(301));
    assert_eq!(sw.acl_flows("vm").unwrap().unwrap().active, 0);
    // Removing the stateful rule forgets its flows: replies are dropped again.
    send_at(&mut sw, vm, &out_tcp(40004, 80, SYN), idle);
    sw.acl_remove("vm", web).unwrap();
    assert!(send_at(&mut sw, srv, &in_tcp(80, 40004, ACK), idle).is_empty());
    assert_eq!(sw.acl_flows("vm").unwrap(), None);
    // ARP is not IPv4: the deny (dst_ip) does not touch it.
    let arp_reply = arp(mac(2), 2, SRV_IP, mac(1), VM_IP);
    assert_eq!(ports(&send_at(&mut sw, srv, &arp_reply, idle)), [vm]);
}

#[test]
fn stateful_icmp_echo_and_a_full_flow_table() {
    let cfg = SwitchConfig {
        flows_per_port: 2,
        ..SwitchConfig::default()
    };
    let (mut sw, p, _, _) = stateful_lab(cfg);
    let (vm, srv) = (p[0], p[1]);
    sw.acl_add(
        "vm",
        rule(
            r#"{"action":"allow","direction":"outbound","protocol":"icmp","stateful":true,"priority":5}"#,
        ),
    )
    .unwrap();
    assert_eq!(
        send(
            &mut sw,
            vm,
            &icmp4_echo(mac(2), mac(1), VM_IP, SRV_IP, true, 7)
        )
        .len(),
        1
    );
    let echo_reply = |id| icmp4_echo(mac(1), mac(2), SRV_IP, VM_IP, false, id);
    assert_eq!(ports(&send(&mut sw, srv, &echo_reply(7))), [vm]);
    assert!(send(&mut sw, srv, &echo_reply(8)).is_empty(), "another id");
    assert!(
        send(
            &mut sw,
            srv,
            &icmp4_echo(mac(1), mac(2), SRV_IP, VM_IP, true, 7)
        )
        .is_empty(),
        "a request from outside is no reply"
    );
    // The table holds 2 flows: the echo and one TCP; a third is refused (its segment
    // still goes out, the rule allows it) and its reply stays outside.
    assert_eq!(send(&mut sw, vm, &out_tcp(1, 80, SYN)).len(), 1);
    assert_eq!(send(&mut sw, vm, &out_tcp(2, 80, SYN)).len(), 1);
    assert_eq!(send(&mut sw, srv, &in_tcp(80, 1, ACK)).len(), 1);
    assert!(send(&mut sw, srv, &in_tcp(80, 2, ACK)).is_empty());
    let flows = sw.acl_flows("vm").unwrap().unwrap();
    assert_eq!((flows.active, flows.refused, flows.limit), (2, 1, 2));
    // UDP and ICMP flows live 30 s: the echo's slot frees, the next flow fits.
    let t = T0 + Duration::from_secs(31);
    assert_eq!(send_at(&mut sw, vm, &out_tcp(3, 80, SYN), t).len(), 1);
    assert_eq!(send_at(&mut sw, srv, &in_tcp(80, 3, ACK), t).len(), 1);
    assert!(send_at(&mut sw, srv, &echo_reply(7), t).is_empty());
}

#[test]
fn bad_stateful_rules_are_refused_with_one_line() {
    let (mut sw, _) = switch(&["name=vm"]);
    for (json, want) in [
        (
            r#"{"action":"deny","direction":"outbound","stateful":true}"#,
            "ACL: a stateful rule must be an allow (a deny keeps no state)",
        ),
        (
            r#"{"action":"allow","stateful":true}"#,
            "ACL: a stateful rule needs a direction (outbound: flows the VM opens)",
        ),
    ] {
        assert_eq!(sw.acl_add("vm", rule(json)).unwrap_err().to_string(), want);
    }
    assert!(serde_json::from_str::<AclRule>(r#"{"action":"allow","stateful":"yes"}"#).is_err());
    assert_eq!(
        sw.acl_add("nope", rule(r#"{"action":"allow"}"#))
            .unwrap_err()
            .to_string(),
        "no port 'nope'"
    );
    // A stateful rule shows as such; others do not mention it.
    let r = rule(r#"{"action":"allow","direction":"outbound","stateful":true}"#);
    assert!(serde_json::to_string(&r)
        .unwrap()
        .contains(r#""stateful":true"#));
    let r = rule(r#"{"action":"allow"}"#);
    assert!(!serde_json::to_string(&r).unwrap().contains("stateful"));
}

#[test]
fn mirrors_copy_a_ports_frames_untouched_to_the_monitor_whatever_its_vlan() {
    let (mut sw, p) = switch(&[
        "name=mon,vlan=99",
        "name=a,vlan=10,mirror=mon",
        "name=b,vlan=10",
        "name=up,trunk=10",
        "name=x,vlan=10,mirror=mon:in",
    ]);
    let (mon, a, b, up, x) = (p[0], p[1], p[2], p[3], p[4]);
    // a's broadcast: mon gets it as received; x's copy (as sent to x) too.
    let f = plain(BCAST, mac(1), None);
    let out = send(&mut sw, a, &f);
    let got: Vec<(PortId, &[u8])> = out.iter().map(|e| (e.port, &e.frame[..])).collect();
    let tagged = {
        let mut t = f[..12].to_vec();
        t.extend_from_slice(&[0x81, 0, 0, 10]);
        t.extend_from_slice(&f[12..]);
        t
    };
    assert_eq!(
        got,
        [
            (mon, &f[..]),
            (b, &f[..]),
            (up, &tagged[..]),
            (x, &f[..]),
            (mon, &f[..])
        ]
    );
    // From the trunk, tagged, to a (learned): a gets it untagged, so does mon.
    let from_up = {
        let mut t = plain(mac(1), mac(7), None);
        t.splice(12..12, [0x81, 0, 0xa0, 10]);
        t
    };
    let out = send(&mut sw, up, &from_up);
    assert_eq!(ports(&out), [a, mon]);
    assert_eq!(out[1].frame, plain(mac(1), mac(7), None));
    assert_eq!(out[0].frame, out[1].frame);
    // x mirrors only what it receives: its own frames are not copied.
    assert_eq!(ports(&send(&mut sw, x, &plain(mac(7), mac(5), None))), [up]);
    let c = sw.counters("mon").unwrap();
    assert_eq!((c.mirror_packets, c.tx_packets), (3, 0));
    assert_eq!(c.mirror_bytes, 3 * f.len() as u64);
    // Dropped frames are not mirrored: neither a's denied one nor one a's egress drops.
    sw.acl_add(
        "a",
        rule(r#"{"action":"deny","direction":"outbound","dst_mac":"52:54:00:00:00:02"}"#),
    )
    .unwrap();
    sw.acl_add(
        "a",
        rule(r#"{"action":"deny","direction":"inbound","src_mac":"52:54:00:00:00:07"}"#),
    )
    .unwrap();
    assert!(send(&mut sw, a, &plain(mac(2), mac(1), None)).is_empty());
    assert!(send(&mut sw, up, &from_up).is_empty());
    assert_eq!(sw.counters("mon").unwrap().mirror_packets, 3);
    // Live: only `out`, then cleared.
    sw.mirror_set("a", "mon", MirrorDirection::Out).unwrap();
    let in_to_a = plain(mac(1), mac(2), None);
    assert_eq!(ports(&send(&mut sw, b, &in_to_a)), [a]);
    // A priority-tagged frame is copied with its tag, as received.
    let prio = plain(mac(5), mac(1), Some(0));
    let out = send(&mut sw, a, &prio);
    assert_eq!(ports(&out), [mon, x, mon], "x's copy (in) as x got it");
    assert_eq!(out[0].frame, prio);
    assert_eq!(out[2].frame, out[1].frame);
    assert_eq!(out[1].frame, plain(mac(5), mac(1), None));
    assert!(sw.mirror_clear("a").unwrap());
    assert!(!sw.mirror_clear("a").unwrap());
    assert_eq!(
        ports(&send(&mut sw, a, &plain(BCAST, mac(1), None))),
        [b, up, x, mon]
    );
    // Refused: to itself, to a missing port, from a missing port.
    let err = |r: Result<(), crate::SwitchError>| r.unwrap_err().to_string();
    assert_eq!(
        err(sw.mirror_set("a", "a", MirrorDirection::Both)),
        "port: port 'a' cannot mirror to itself"
    );
    assert_eq!(
        err(sw.mirror_set("a", "zz", MirrorDirection::Both)),
        "port 'a': mirror target 'zz' is no port"
    );
    assert_eq!(
        err(sw.mirror_set("zz", "mon", MirrorDirection::Both)),
        "no port 'zz'"
    );
    let e = sw
        .add_port("name=y,mirror=zz".parse().unwrap())
        .unwrap_err();
    assert_eq!(e.to_string(), "port 'y': mirror target 'zz' is no port");
    // Removing the monitor ends the mirrors to it (config and copies).
    sw.mirror_set("a", "mon", MirrorDirection::Both).unwrap();
    sw.remove_port("mon").unwrap();
    assert!(sw.ports().iter().all(|s| s.config.mirror.is_none()));
    assert_eq!(
        ports(&send(&mut sw, a, &plain(BCAST, mac(1), None))),
        [b, up, x]
    );
    // A new port of the same name is not a monitor until told.
    sw.add_port("name=mon,vlan=99".parse().unwrap()).unwrap();
    assert_eq!(
        ports(&send(&mut sw, a, &plain(BCAST, mac(1), None))),
        [b, up, x]
    );
}

#[test]
fn storm_limits_hold_a_ports_broadcasts_to_their_rate_and_spare_unicast() {
    let (mut sw, p) = switch(&[
        "name=a,storm=10",
        "name=b",
        "name=g,mac=52:54:00:00:00:03,guard=mac,storm=2",
    ]);
    let (a, b, g) = (p[0], p[1], p[2]);
    let bcast = plain(BCAST, mac(1), None);
    let passed = (0..25)
        .filter(|_| !send(&mut sw, a, &bcast).is_empty())
        .count();
    assert_eq!(passed, 10, "a full bucket: one second's worth");
    assert_eq!(drops(&sw, "a", "storm-limit"), 15);
    // Multicast counts; unicast (known or not) does not.
    let mcast = plain([0x33, 0x33, 0, 0, 0, 1], mac(1), None);
    assert!(send(&mut sw, a, &mcast).is_empty());
    for _ in 0..20 {
        assert_eq!(
            ports(&send(&mut sw, a, &plain(mac(9), mac(1), None))),
            [b, g]
        );
    }
    // Refilled at 10 per second: one frame per 100 ms.
    let t = |ms| T0 + Duration::from_millis(ms);
    assert_eq!(send_at(&mut sw, a, &bcast, t(100)).len(), 2);
    assert!(send_at(&mut sw, a, &bcast, t(150)).is_empty());
    assert_eq!(send_at(&mut sw, a, &bcast, t(200)).len(), 2);
    let later = (0..40)
        .filter(|_| !send_at(&mut sw, a, &bcast, t(60_000)).is_empty())
        .count();
    assert_eq!(later, 10, "never more than a second's worth at once");
    // Frames the guards drop take no token.
    for _ in 0..5 {
        assert!(send(&mut sw, g, &plain(BCAST, mac(66), None)).is_empty());
    }
    let own = plain(BCAST, mac(3), None);
    assert_eq!(
        (0..5)
            .filter(|_| !send(&mut sw, g, &own).is_empty())
            .count(),
        2
    );
    assert_eq!(
        (
            drops(&sw, "g", "mac-spoofing"),
            drops(&sw, "g", "storm-limit")
        ),
        (5, 3)
    );
    // Live: a new limit starts full; a cleared one limits nothing; 0 is refused.
    sw.storm_set("a", Some(1000)).unwrap();
    let n = (0..1200)
        .filter(|_| !send_at(&mut sw, a, &bcast, t(60_000)).is_empty())
        .count();
    assert_eq!(n, 1000);
    sw.storm_set("a", None).unwrap();
    assert!((0..2000).all(|_| !send_at(&mut sw, a, &bcast, t(60_000)).is_empty()));
    assert_eq!(
        sw.storm_set("a", Some(0)).unwrap_err().to_string(),
        "port: storm limit 0 is out of range (1-10000000 packets/s)"
    );
    assert_eq!(
        sw.storm_set("zz", Some(5)).unwrap_err().to_string(),
        "no port 'zz'"
    );
    assert_eq!(sw.port_config(a).unwrap().storm, None);
    assert_eq!(sw.port_config(g).unwrap().storm, Some(2));
}

const V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

/// The NA's ICMPv6 body inside `frame` (built by `neighbour_advert`).
fn na_body(frame: &[u8]) -> Vec<u8> {
    let len = usize::from(u16::from_be_bytes([frame[18], frame[19]]));
    frame[54..54 + len].to_vec()
}

/// An IPv6 frame from `src` carrying `next`/`l4` to all nodes.
fn v6_frame(src: [u8; 6], next: u8, l4: &[u8]) -> Vec<u8> {
    let all = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    ethernet(
        [0x33, 0x33, 0, 0, 0, 1],
        src,
        None,
        ETHERTYPE_IPV6,
        &ipv6(LL, all, next, l4),
    )
}

#[test]
fn the_nd_guard_drops_spoofed_and_unreadable_neighbour_advertisements() {
    let (mut sw, p) = switch(&[
        "name=vm,mac=52:54:00:00:00:01,ip=10.0.0.1,ip=2001:db8::1,ip=fe80::1,guard=nd",
        "name=any,mac=52:54:00:00:00:04,ip=10.0.0.4,guard=nd",
        "name=up",
    ]);
    let (vm, any, up) = (p[0], p[1], p[2]);
    let me = mac(1);
    let ok = |f: &[u8], sw: &mut Switch, from| send(sw, from, f).len() == 2;
    // Its own addresses, with or without a target link-layer address option, and an
    // unknown option of a good length.
    assert!(ok(
        &neighbour_advert(me, LL, V6, Some(me), &[]),
        &mut sw,
        vm
    ));
    assert!(ok(&neighbour_advert(me, LL, LL, None, &[]), &mut sw, vm));
    let nonce = [14, 1, 1, 2, 3, 4, 5, 6];
    assert!(ok(
        &neighbour_advert(me, LL, V6, Some(me), &nonce),
        &mut sw,
        vm
    ));
    // Spoofed: another target, another link-layer address (also after another option).
    let spoofed = [
        neighbour_advert(me, LL, OTHER6, Some(me), &[]),
        neighbour_advert(me, LL, V6, Some(mac(66)), &[]),
        neighbour_advert(me, LL, V6, None, &[&nonce[..], &[2, 1], &mac(66)].concat()),
    ];
    // Unreadable: an option of length 0, one running past the packet, one cut short,
    // an NA shorter than its target, an NA with a nonzero code.
    let short_na = v6_frame(
        me,
        IPPROTO_ICMPV6,
        &[136, 0, 0, 0, 0x60, 0, 0, 0, 0x20, 0x01],
    );
    let mut coded = neighbour_advert(me, LL, V6, Some(me), &[]);
    coded[54 + 1] = 1;
    let unreadable = [
        neighbour_advert(me, LL, V6, None, &[14, 0, 0, 0, 0, 0, 0, 0]),
        neighbour_advert(me, LL, V6, None, &[14, 2, 0, 0, 0, 0, 0, 0]),
        neighbour_advert(me, LL, V6, None, &[14]),
        short_na,
        coded,
    ];
    for f in spoofed.iter().chain(&unreadable) {
        assert!(send(&mut sw, vm, f).is_empty());
    }
    assert_eq!(drops(&sw, "vm", "nd-spoofing"), 8);
    // Behind a hop-by-hop header it is still an NA.
    let body = na_body(&spoofed[0]);
    let hbh = [&[IPPROTO_ICMPV6, 0, 1, 4, 0, 0, 0, 0][..], &body].concat();
    assert!(send(&mut sw, vm, &v6_frame(me, 0, &hbh)).is_empty());
    let body = na_body(&neighbour_advert(me, LL, V6, Some(me), &[]));
    let hbh = [&[IPPROTO_ICMPV6, 0, 1, 4, 0, 0, 0, 0][..], &body].concat();
    assert_eq!(send(&mut sw, vm, &v6_frame(me, 0, &hbh)).len(), 2);
    assert_eq!(drops(&sw, "vm", "nd-spoofing"), 9);
    // A port with no IPv6 address listed: any target, but still its own MAC.
    let m4 = mac(4);
    assert!(ok(
        &neighbour_advert(m4, LL, OTHER6, Some(m4), &[]),
        &mut sw,
        any
    ));
    assert!(send(
        &mut sw,
        any,
        &neighbour_advert(m4, LL, OTHER6, Some(me), &[])
    )
    .is_empty());
    // The ARP guard is not on: IPv6 addresses do not stop its ARP; the uplink has no guard.
    assert!(ok(
        &arp(
            m4,
            1,
            Ipv4Addr::new(10, 9, 9, 9),
            [0; 6],
            Ipv4Addr::new(10, 0, 0, 1)
        ),
        &mut sw,
        any
    ));
    assert_eq!(send(&mut sw, up, &spoofed[0]).len(), 2);
}

#[test]
fn the_arp_guard_checks_only_ipv4_addresses() {
    let (mut sw, p) = switch(&[
        "name=v6only,mac=52:54:00:00:00:01,ip=2001:db8::1,guard=arp",
        "name=both,mac=52:54:00:00:00:02,ip=2001:db8::2,ip=10.0.0.2,guard=arp",
        "name=up",
    ]);
    let target = Ipv4Addr::new(10, 0, 0, 9);
    // No IPv4 address listed: any sender IP.
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &arp(mac(1), 1, Ipv4Addr::new(10, 7, 7, 7), [0; 6], target)
        )
        .len(),
        2
    );
    assert_eq!(
        send(
            &mut sw,
            p[1],
            &arp(mac(2), 1, Ipv4Addr::new(10, 0, 0, 2), [0; 6], target)
        )
        .len(),
        2
    );
    assert!(send(
        &mut sw,
        p[1],
        &arp(mac(2), 1, Ipv4Addr::new(10, 7, 7, 7), [0; 6], target)
    )
    .is_empty());
    assert_eq!(drops(&sw, "both", "arp-spoofing"), 1);
}
