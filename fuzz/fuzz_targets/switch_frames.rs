//! Frames from hostile ports through vireo-switch's core: records of (port, clock
//! step, length, bytes) into a switch with access, trunk, private-VLAN and guarded
//! ports (every guard, ND included), an ACL with a stateful rule (a small flow
//! table), an ACL meter, a storm limit, mirrors to a monitor port and QoS (a cap out, a cap in, an
//! uplink with a rate, weights and a minimum: frames queue at the scheduled ports and
//! leave when the switch's deadline comes, polled on the fuzzed clock, and live
//! `qos-set`/`qos-clear` driven by the input). Besides "no panic", checks
//! what must hold for any input: a frame never goes back out of its own port, an
//! access port only ever sends untagged frames, a trunk only tags the VLANs it
//! carries, nothing grows by more than one tag (plus padding to the 60-byte
//! minimum) over the longest frame sent in, the monitor only gets copies untouched
//! (the frame as received, or as sent to another port), a deadline is never in the
//! past after a poll, and the queues stay within their bound.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use switch::frame::ETHERTYPE_VLAN;
use switch::mirror::MirrorDirection;
use switch::port::{PortConfig, VlanMode};
use switch::qos::QosSpec;
use switch::{Switch, SwitchConfig};
use vireo_fuzz::Input;

/// Indices matter: the seeds (fuzz/seeds/switch_frames) name ports by them.
const PORTS: [&str; 7] = [
    "name=vm1,vlan=10,mac=52:54:00:00:00:01,ip=10.0.0.1,ip=fe80::1,guard=all,storm=20,max=64k:out,min=20k",
    "name=vm2,vlan=10,pvlan=isolated,weight=3",
    "name=vm3,vlan=10,pvlan=community:7,storm=3,max=50k",
    "name=vm4,vlan=20,max=2k:in",
    "name=up,trunk=10:20:30,native=1,rate=100k",
    "name=gw,vlan=10,pvlan=promiscuous,weight=100,min=10k",
    "name=mon,vlan=99",
];
/// Frames one source may queue at a port here.
const QUEUE: usize = 4;
/// Live QoS changes a record's control byte may pick (`qos-set` bodies; `null`
/// clears).
const QOS: [(&str, &str); 6] = [
    ("up", r#"{"rate":"50k"}"#),
    ("up", "null"),
    ("vm4", r#"{"max":"1k:both"}"#),
    ("vm2", r#"{"weight":1,"min":"5k"}"#),
    ("gw", r#"{"min":"200k"}"#),
    ("vm1", "null"),
];

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let cfg = SwitchConfig {
        macs_per_port: 8,
        flows_per_port: 16,
        aging: Duration::from_secs(5),
        qos_queue_frames: QUEUE,
        ..SwitchConfig::default()
    };
    let mut sw = Switch::new(cfg);
    let ids: Vec<u32> = PORTS
        .iter()
        .map(|s| {
            sw.add_port(s.parse::<PortConfig>().expect("port"))
                .expect("add")
        })
        .collect();
    let rule = serde_json::from_str(
        r#"{"action":"deny","protocol":"udp","dst_port":"53","dst_ip":"10.0.0.0/8"}"#,
    )
    .expect("rule");
    sw.acl_add("vm1", rule).expect("acl");
    for r in [
        r#"{"action":"allow","direction":"outbound","protocol":"tcp","stateful":true,"priority":5}"#,
        r#"{"action":"allow","direction":"outbound","protocol":"icmp","stateful":true,"priority":5}"#,
        r#"{"action":"allow","direction":"outbound","protocol":"udp","stateful":true,"priority":5}"#,
        r#"{"action":"deny","direction":"inbound","dst_ip":"0.0.0.0/0"}"#,
    ] {
        let rule = serde_json::from_str(r).expect("rule");
        sw.acl_add("vm3", rule).expect("acl");
    }
    // A meter on vm2, both ways: one bucket on the fuzzed clock.
    let meter =
        serde_json::from_str(r#"{"action":"meter","rate":"64k","burst":2000}"#).expect("rule");
    sw.acl_add("vm2", meter).expect("acl");
    sw.mirror_set("vm2", "mon", MirrorDirection::Both)
        .expect("mirror");
    sw.mirror_set("up", "mon", MirrorDirection::In)
        .expect("mirror");
    let mon = ids[6];
    let mut now = Duration::ZERO;
    let mut out = Vec::new();
    // Frames that may still be queued: the longest sent in, and every one (a copy
    // of a queued frame leaves with it, later).
    let mut longest = 0;
    while !inp.is_empty() {
        let pick = inp.u8();
        let ingress = ids[usize::from(pick) % ids.len()];
        now += Duration::from_millis(u64::from(inp.u8()) * 40);
        let len = usize::from(inp.u16() % 2048);
        let frame = inp.bytes(len);
        longest = longest.max(frame.len());
        out.clear();
        // The high bit of the port byte: a QoS change first (refusals are fine).
        if pick & 0x80 != 0 {
            let (port, body) = QOS[usize::from(pick >> 4) % QOS.len()];
            match serde_json::from_str::<Option<QosSpec>>(body).expect("qos") {
                Some(q) => {
                    let _ = sw.qos_set(port, &q, now);
                }
                None => sw.qos_clear(port, now).expect("clear"),
            }
        }
        // Whatever was due leaves first, as the daemon's poll loop does.
        if sw.next_deadline().is_some_and(|d| d <= now) {
            sw.poll_egress(now, &mut out);
            if let Some(d) = sw.next_deadline() {
                assert!(d > now, "a deadline in the past after a poll");
            }
        }
        let polled = out.len();
        sw.process(ingress, frame, now, &mut out);
        for (i, e) in out.iter().enumerate() {
            // Frames the poll let leave went to their ports earlier; what `process`
            // sends (at once, or queued frames of the ports it queued to) never goes
            // back out of the ingress port.
            if i >= polled {
                assert_ne!(e.port, ingress, "hairpin");
            }
            if e.port == mon {
                // A copy leaves with its frame: as received, or as sent to a port.
                let untouched =
                    e.frame == frame || out.iter().any(|o| o.port != mon && o.frame == e.frame);
                assert!(untouched, "a mirrored copy was changed");
                continue;
            }
            assert!(e.frame.len() <= longest.max(56) + 4, "grew");
            let tagged = e.frame.len() >= 14 && e.frame[12..14] == ETHERTYPE_VLAN.to_be_bytes();
            match &sw.port_config(e.port).expect("port").vlan {
                VlanMode::Access { .. } => assert!(!tagged, "tag on an access port"),
                VlanMode::Trunk { allowed, .. } => {
                    if tagged {
                        let vid = u16::from_be_bytes([e.frame[14], e.frame[15]]) & 0xfff;
                        assert!(allowed.iter().any(|v| v.get() == vid), "VLAN {vid}");
                    }
                }
            }
        }
        for id in &ids {
            // A source's queue per scheduled port, every source but the port itself.
            assert!(sw.queued(*id) <= QUEUE * (ids.len() - 1), "unbounded queue");
        }
        if now.as_secs().is_multiple_of(7) {
            sw.expire(now);
        }
    }
});
