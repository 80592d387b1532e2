//! Frames from hostile ports through vireo-switch's core: records of (port, clock
//! step, length, bytes) into a switch with access, trunk, private-VLAN and guarded
//! ports (every guard, ND included), an ACL with a stateful rule (a small flow
//! table), a storm limit and mirrors to a monitor port. Besides "no panic", checks
//! what must hold for any input: a frame never goes back out of its own port, an
//! access port only ever sends untagged frames, a trunk only tags the VLANs it
//! carries, nothing grows by more than one tag (plus padding to the 60-byte
//! minimum), and the monitor only gets copies untouched (the frame as received, or
//! as sent to another port).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use switch::frame::ETHERTYPE_VLAN;
use switch::mirror::MirrorDirection;
use switch::port::{PortConfig, VlanMode};
use switch::{Switch, SwitchConfig};
use vireo_fuzz::Input;

/// Indices matter: the seeds (fuzz/seeds/switch_frames) name ports by them.
const PORTS: [&str; 7] = [
    "name=vm1,vlan=10,mac=52:54:00:00:00:01,ip=10.0.0.1,ip=fe80::1,guard=all,storm=20",
    "name=vm2,vlan=10,pvlan=isolated",
    "name=vm3,vlan=10,pvlan=community:7,storm=3",
    "name=vm4,vlan=20",
    "name=up,trunk=10:20:30,native=1",
    "name=gw,vlan=10,pvlan=promiscuous",
    "name=mon,vlan=99",
];

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let cfg = SwitchConfig {
        macs_per_port: 8,
        flows_per_port: 16,
        aging: Duration::from_secs(5),
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
    sw.mirror_set("vm2", "mon", MirrorDirection::Both)
        .expect("mirror");
    sw.mirror_set("up", "mon", MirrorDirection::In)
        .expect("mirror");
    let mon = ids[6];
    let mut now = Duration::ZERO;
    let mut out = Vec::new();
    while !inp.is_empty() {
        let ingress = ids[usize::from(inp.u8()) % ids.len()];
        now += Duration::from_millis(u64::from(inp.u8()) * 40);
        let len = usize::from(inp.u16() % 2048);
        let frame = inp.bytes(len);
        out.clear();
        sw.process(ingress, frame, now, &mut out);
        for e in &out {
            assert_ne!(e.port, ingress, "hairpin");
            if e.port == mon {
                let untouched =
                    e.frame == frame || out.iter().any(|o| o.port != mon && o.frame == e.frame);
                assert!(untouched, "a mirrored copy was changed");
                continue;
            }
            assert!(e.frame.len() <= frame.len().max(56) + 4, "grew");
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
        if now.as_secs().is_multiple_of(7) {
            sw.expire(now);
        }
    }
});
