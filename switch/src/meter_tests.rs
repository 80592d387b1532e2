//! ACL `meter` rules frame by frame: a token bucket per rule on a clock moved by
//! hand, exact counts.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::acl::AclRule;
use crate::frame::build::udp4_frame;
use crate::tests::{drops, mac, switch, T0};
use crate::{Egress, PortId, Switch};

fn rule(json: &str) -> AclRule {
    serde_json::from_str(json).unwrap()
}

/// A 100-byte UDP frame vm → srv to `dport`.
fn out_udp(dport: u16) -> Vec<u8> {
    let f = udp4_frame(
        mac(2),
        mac(1),
        None,
        Ipv4Addr::new(10, 0, 0, 1),
        Ipv4Addr::new(10, 0, 0, 2),
        4000,
        dport,
        &[7u8; 58],
    );
    assert_eq!(f.len(), 100);
    f
}

/// Sends `n` frames at `at`; how many were delivered.
fn offer(sw: &mut Switch, from: PortId, frame: &[u8], n: usize, at: Duration) -> usize {
    (0..n)
        .filter(|_| {
            let mut out: Vec<Egress> = Vec::new();
            sw.process(from, frame, at, &mut out);
            out.iter().any(|e| e.frame == frame)
        })
        .count()
}

#[test]
fn a_meter_rule_passes_its_rate_and_drops_and_counts_the_excess() {
    let (mut sw, p) = switch(&["name=vm", "name=srv"]);
    // Learn both, so frames are unicast to one port.
    let _ = offer(
        &mut sw,
        p[1],
        &udp4_frame(
            mac(1),
            mac(2),
            None,
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 1),
            9,
            4000,
            b"x",
        ),
        1,
        T0,
    );
    // 80 kbit/s = 10,000 bytes/s, a 1,000-byte bucket: ten 100-byte frames at once.
    let id = sw
        .acl_add(
            "vm",
            rule(r#"{"action":"meter","direction":"outbound","protocol":"udp","dst_port":9,"rate":"80k","burst":1000}"#),
        )
        .unwrap();
    let f = out_udp(9);
    assert_eq!(offer(&mut sw, p[0], &f, 15, T0), 10);
    assert_eq!(drops(&sw, "vm", "acl-meter"), 5);
    // 10 ms earn 100 bytes: one frame more.
    assert_eq!(
        offer(&mut sw, p[0], &f, 3, T0 + Duration::from_millis(10)),
        1
    );
    // A long pause fills the bucket, no more.
    assert_eq!(
        offer(&mut sw, p[0], &f, 20, T0 + Duration::from_secs(5)),
        10
    );
    // Over 2 s at the rate: 20,000 bytes earned → 200 frames, plus the burst's 10.
    let start = T0 + Duration::from_secs(5);
    let mut passed = 0;
    for ms in 1..=2000u64 {
        passed += offer(&mut sw, p[0], &f, 1, start + Duration::from_millis(ms));
    }
    assert_eq!(passed, 200, "one frame each 10 ms");
    // Traffic the rule does not match is not metered.
    assert_eq!(
        offer(
            &mut sw,
            p[0],
            &out_udp(10),
            50,
            start + Duration::from_secs(2)
        ),
        50
    );
    let r = sw
        .acl_list("vm")
        .unwrap()
        .into_iter()
        .find(|r| r.id == id)
        .unwrap();
    assert_eq!(r.packets, 15 + 3 + 20 + 2000);
    assert_eq!(r.metered_packets, 5 + 2 + 10 + 1800);
    assert_eq!(r.metered_bytes, 100 * r.metered_packets);
    assert_eq!(drops(&sw, "vm", "acl-meter"), r.metered_packets);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["action"], "meter");
    assert_eq!(json["rate"], 80_000);
    assert_eq!(json["metered_packets"], 1817);
}

#[test]
fn an_inbound_meter_drops_at_the_ports_egress_and_the_first_matching_rule_decides() {
    let (mut sw, p) = switch(&["name=vm", "name=srv"]);
    let _ = offer(&mut sw, p[0], &out_udp(1), 1, T0);
    // A higher-priority allow for port 7 wins over the meter of everything inbound.
    sw.acl_add(
        "vm",
        rule(r#"{"action":"meter","direction":"inbound","rate":"8k"}"#),
    )
    .unwrap();
    sw.acl_add(
        "vm",
        rule(r#"{"action":"allow","direction":"inbound","protocol":"udp","dst_port":7,"priority":5}"#),
    )
    .unwrap();
    let to_vm = |dport| {
        udp4_frame(
            mac(1),
            mac(2),
            None,
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 1),
            4000,
            dport,
            &[1u8; 58],
        )
    };
    // 8 kbit/s: the default burst is 1522 bytes (10 ms of it is less): 15 frames.
    assert_eq!(offer(&mut sw, p[1], &to_vm(9), 20, T0), 15);
    assert_eq!(
        sw.counters("vm").unwrap().tx_dropped.get("acl-meter"),
        Some(&5)
    );
    assert_eq!(offer(&mut sw, p[1], &to_vm(7), 20, T0), 20);
}

#[test]
fn bad_meter_rules_are_refused_with_one_line() {
    let (mut sw, _) = switch(&["name=vm"]);
    let cases = [
        (r#"{"action":"meter"}"#, "a meter rule needs a rate"),
        (
            r#"{"action":"allow","rate":"1M"}"#,
            "rate and burst are for meter rules only",
        ),
        (
            r#"{"action":"deny","burst":1000}"#,
            "rate and burst are for meter rules only",
        ),
        (
            r#"{"action":"meter","rate":"1M","burst":10}"#,
            "meter burst 10 is out of range",
        ),
        (
            r#"{"action":"meter","rate":"1M","direction":"outbound","stateful":true}"#,
            "a stateful rule must be an allow",
        ),
    ];
    for (json, want) in cases {
        let e = sw.acl_add("vm", rule(json)).unwrap_err().to_string();
        assert!(e.contains(want), "{json}: {e}");
        assert!(!e.contains('\n'));
    }
    let e = serde_json::from_str::<AclRule>(r#"{"action":"meter","rate":"fast"}"#).unwrap_err();
    assert!(e.to_string().contains("fast"), "{e}");
}
