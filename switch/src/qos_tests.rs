//! QoS through the whole switch, on a clock moved by hand: caps both ways, weights
//! under contention, minimums, bounded queues, refusals.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::frame::build::ethernet;
use crate::port::PortConfig;
use crate::qos::QosSpec;
use crate::tests::{drops, mac, T0};
use crate::{Egress, PortId, Switch, SwitchConfig};

/// A source port offering `rate` bits/s of `len`-byte frames to `dst`.
struct Offer {
    port: PortId,
    src: u8,
    dst: u8,
    len: usize,
    rate: u64,
}

fn lab(specs: &[&str], cfg: SwitchConfig) -> (Switch, Vec<PortId>) {
    let mut sw = Switch::new(cfg);
    let ids: Vec<PortId> = specs
        .iter()
        .map(|s| sw.add_port(s.parse::<PortConfig>().unwrap()).unwrap())
        .collect();
    // Every port announces its address (mac(i + 1)): unicast then goes to one port.
    for (i, id) in ids.iter().enumerate() {
        let mut out = Vec::new();
        let f = ethernet([0xff; 6], mac(i as u8 + 1), None, 0x88b5, b"hello");
        sw.process(*id, &f, T0, &mut out);
        sw.poll_egress(T0, &mut out);
    }
    (sw, ids)
}

fn frame(o: &Offer) -> Vec<u8> {
    ethernet(
        mac(o.dst),
        mac(o.src),
        None,
        0x88b5,
        &vec![o.src; o.len - 14],
    )
}

/// Bytes delivered per (egress port, source address byte) while the sources offer
/// evenly spaced frames for `secs` seconds from `start`, queued frames leaving at
/// each deadline the switch names.
fn simulate(
    sw: &mut Switch,
    offers: &[Offer],
    start: Duration,
    secs: u64,
) -> BTreeMap<(PortId, u8), u64> {
    let end = start + Duration::from_secs(secs);
    let frames: Vec<Vec<u8>> = offers.iter().map(frame).collect();
    let interval: Vec<Duration> = offers
        .iter()
        .map(|o| Duration::from_nanos(o.len as u64 * 8 * 1_000_000_000 / o.rate))
        .collect();
    let mut next: Vec<Duration> = vec![start; offers.len()];
    let mut got = BTreeMap::new();
    let mut out: Vec<Egress> = Vec::new();
    loop {
        let t = next
            .iter()
            .copied()
            .chain(sw.next_deadline())
            .min()
            .unwrap_or(end);
        if t >= end {
            break;
        }
        out.clear();
        sw.poll_egress(t, &mut out);
        for (i, o) in offers.iter().enumerate() {
            if next[i] <= t {
                sw.process(o.port, &frames[i], t, &mut out);
                next[i] += interval[i];
            }
        }
        for e in &out {
            *got.entry((e.port, e.frame[11])).or_default() += e.frame.len() as u64;
        }
    }
    // What is still queued leaves uncounted: the next run starts with empty queues.
    while let Some(d) = sw.next_deadline() {
        out.clear();
        sw.poll_egress(d, &mut out);
    }
    got
}

/// `got` over `want`, checked within `tolerance` (relative).
fn within(what: &str, got: f64, want: f64, tolerance: f64) {
    let ratio = got / want;
    eprintln!(
        "{what}: {got:.0} of {want:.0} ({:+.2} %)",
        (ratio - 1.0) * 100.0
    );
    assert!(
        (ratio - 1.0).abs() <= tolerance,
        "{what}: {got} against {want} ({ratio:.3})"
    );
}

#[test]
fn a_capped_port_is_held_to_its_cap_both_ways() {
    let (mut sw, p) = lab(
        &["name=a,max=8M:out", "name=b,max=8M:in", "name=c"],
        SwitchConfig::default(),
    );
    let (a, b, c) = (p[0], p[1], p[2]);
    // a sends 3× its cap out for 10 s: 8 Mbit/s × 10 s = 10 MB reach c.
    let offer = Offer {
        port: a,
        src: 1,
        dst: 3,
        len: 1000,
        rate: 24_000_000,
    };
    let got = simulate(&mut sw, &[offer], T0, 10);
    within("cap out", got[&(c, 1)] as f64, 10_000_000.0, 0.05);
    let offered = sw.counters("a").unwrap().rx_packets - 1;
    let passed = got[&(c, 1)] / 1000;
    assert_eq!(drops(&sw, "a", "qos-max") + passed, offered);
    assert!(sw.queued(c) == 0, "a cap out queues nothing");
    // c sends 3× b's cap in: shaped to 8 Mbit/s, the excess dropped at b's queue.
    let start = T0 + Duration::from_secs(20);
    let offer = Offer {
        port: c,
        src: 3,
        dst: 2,
        len: 1000,
        rate: 24_000_000,
    };
    let got = simulate(&mut sw, &[offer], start, 10);
    within("cap in", got[&(b, 3)] as f64, 10_000_000.0, 0.05);
    let cb = sw.counters("b").unwrap().clone();
    let queued = sw.queued(b) as u64;
    assert!(queued <= 128, "bounded: {queued}");
    assert_eq!(
        cb.tx_dropped["qos-queue"] + cb.tx_packets - 2 + queued,
        sw.counters("c").unwrap().rx_packets - 1,
        "every frame from c sent, queued or counted: {cb:?}"
    );
    let st = sw.qos_status("b").unwrap();
    assert_eq!(st.scheduled_rate, Some(8_000_000));
    assert_eq!(st.sources["c"].dropped, cb.tx_dropped["qos-queue"]);
    // b's cap is `in` only: what b sends is not limited.
    assert!(sw.qos_status("b").unwrap().policer_credit.is_none());
    let offer = Offer {
        port: b,
        src: 2,
        dst: 3,
        len: 1000,
        rate: 24_000_000,
    };
    let got = simulate(&mut sw, &[offer], start + Duration::from_secs(20), 1);
    within("b uncapped out", got[&(c, 2)] as f64, 3_000_000.0, 0.01);
}

#[test]
fn weights_share_a_rated_port_under_contention_and_do_not_cap() {
    let (mut sw, p) = lab(
        &["name=a,weight=1", "name=c,weight=3", "name=up,rate=10M"],
        SwitchConfig::default(),
    );
    let (a, c, up) = (p[0], p[1], p[2]);
    let offers = [
        Offer {
            port: a,
            src: 1,
            dst: 3,
            len: 1000,
            rate: 20_000_000,
        },
        Offer {
            port: c,
            src: 2,
            dst: 3,
            len: 600,
            rate: 20_000_000,
        },
    ];
    let got = simulate(&mut sw, &offers, T0, 10);
    let (ga, gc) = (got[&(up, 1)] as f64, got[&(up, 2)] as f64);
    within("rate used", ga + gc, 12_500_000.0, 0.05);
    within("weight 1 share", ga / (ga + gc), 0.25, 0.10);
    within("weight 3 share", gc / (ga + gc), 0.75, 0.10);
    // Alone, a takes the whole rate: weights do not cap.
    let got = simulate(&mut sw, &offers[..1], T0 + Duration::from_secs(20), 10);
    within("a alone", got[&(up, 1)] as f64, 12_500_000.0, 0.05);
    // Live: equal weights share equally.
    sw.qos_set(
        "c",
        &QosSpec {
            weight: Some(1),
            ..QosSpec::default()
        },
        T0,
    )
    .unwrap();
    let got = simulate(&mut sw, &offers, T0 + Duration::from_secs(40), 10);
    let (ga, gc) = (got[&(up, 1)] as f64, got[&(up, 2)] as f64);
    within("equal weights", ga / gc, 1.0, 0.10);
}

#[test]
fn minimums_are_honoured_first_where_the_rate_is_known() {
    let (mut sw, p) = lab(
        &[
            "name=a,min=6M",
            "name=c,weight=9",
            "name=up,rate=10M",
            "name=capped,max=10M:in",
        ],
        SwitchConfig::default(),
    );
    let (a, c, up, capped) = (p[0], p[1], p[2], p[3]);
    let offer = |port, src, dst, rate| Offer {
        port,
        src,
        dst,
        len: 1000,
        rate,
    };
    // Both backlogged: a gets its 6 Mbit/s though its weight alone would give it 1.
    let got = simulate(
        &mut sw,
        &[offer(a, 1, 3, 20_000_000), offer(c, 2, 3, 20_000_000)],
        T0,
        10,
    );
    within("a's minimum", got[&(up, 1)] as f64, 7_500_000.0, 0.05);
    within("c the rest", got[&(up, 2)] as f64, 5_000_000.0, 0.05);
    // a offering less than its minimum: c gets the rest (nothing is kept idle).
    let got = simulate(
        &mut sw,
        &[offer(a, 1, 3, 2_000_000), offer(c, 2, 3, 20_000_000)],
        T0 + Duration::from_secs(20),
        10,
    );
    within("a's offer", got[&(up, 1)] as f64, 2_500_000.0, 0.02);
    within("c the rest", got[&(up, 2)] as f64, 10_000_000.0, 0.05);
    // A port with only a cap: no reservation there, weights alone (1:9).
    let got = simulate(
        &mut sw,
        &[offer(a, 1, 4, 20_000_000), offer(c, 2, 4, 20_000_000)],
        T0 + Duration::from_secs(40),
        10,
    );
    let (ga, gc) = (got[&(capped, 1)] as f64, got[&(capped, 2)] as f64);
    within("no reservation at a cap", ga / (ga + gc), 0.10, 0.10);
    let st = sw.qos_status("up").unwrap();
    assert_eq!(
        (st.sources["a"].min, st.sources["c"].min),
        (Some(6_000_000), None)
    );
    assert_eq!(sw.qos_status("capped").unwrap().sources["a"].min, None);
}

#[test]
fn bounded_queues_drop_and_count_and_queued_frames_leave_on_time() {
    let cfg = SwitchConfig {
        qos_queue_frames: 8,
        ..SwitchConfig::default()
    };
    let (mut sw, p) = lab(&["name=a", "name=up,rate=1M", "name=mon,vlan=99"], cfg);
    let (a, up, mon) = (p[0], p[1], p[2]);
    sw.mirror_set("up", "mon", crate::mirror::MirrorDirection::In)
        .unwrap();
    let t = T0 + Duration::from_secs(1);
    let f = ethernet(mac(2), mac(1), None, 0x88b5, &[7u8; 986]);
    assert_eq!(f.len(), 1000);
    let mut out = Vec::new();
    for _ in 0..20 {
        sw.process(a, &f, t, &mut out);
    }
    // 1 Mbit/s holds 1518 bytes: one frame leaves (with its mirror copy), 8 wait,
    // 11 are dropped and counted.
    assert_eq!(out.iter().map(|e| e.port).collect::<Vec<_>>(), [up, mon]);
    assert_eq!(sw.queued(up), 8);
    let c = sw.counters("up").unwrap();
    assert_eq!((c.tx_dropped["qos-queue"], c.tx_packets), (11, 2));
    assert_eq!(sw.qos_status("up").unwrap().sources["a"].dropped, 11);
    // Then one every 8 ms (1000 bytes at 125 bytes/ms), never early.
    let mut sent_at = Vec::new();
    let mut now = t;
    while let Some(d) = sw.next_deadline() {
        assert!(d > now, "a deadline in the future");
        out.clear();
        sw.poll_egress(d - Duration::from_nanos(1), &mut out);
        assert!(out.is_empty(), "early at {d:?}");
        sw.poll_egress(d, &mut out);
        assert_eq!(out.len(), 2, "the frame and its copy");
        assert!(out[0].frame == f && out[1].frame == f && out[1].port == mon);
        sent_at.push(d - t);
        now = d;
    }
    assert_eq!(sent_at.len(), 8);
    let gaps: Vec<_> = sent_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g == Duration::from_millis(8)),
        "{gaps:?}"
    );
    // Cleared, a queue leaves at the next poll; a removed source's frames are counted.
    for _ in 0..5 {
        sw.process(a, &f, now, &mut out);
    }
    sw.qos_clear("up", now).unwrap();
    assert_eq!(sw.next_deadline(), Some(now));
    out.clear();
    sw.poll_egress(now, &mut out);
    assert_eq!(out.iter().filter(|e| e.port == up).count(), 5);
    assert_eq!(sw.next_deadline(), None);
    sw.qos_set(
        "up",
        &QosSpec {
            rate: Some("1M".parse().unwrap()),
            ..QosSpec::default()
        },
        now,
    )
    .unwrap();
    for _ in 0..5 {
        sw.process(a, &f, now + Duration::from_secs(1), &mut out);
    }
    assert_eq!(sw.queued(up), 4);
    sw.remove_port("a").unwrap();
    assert_eq!(sw.queued(up), 0);
    assert_eq!(
        sw.counters("up").unwrap().tx_dropped["qos-source-removed"],
        4
    );
    assert_eq!(sw.next_deadline(), None);
}

#[test]
fn bad_qos_configs_are_refused_with_one_line() {
    let (mut sw, _) = lab(
        &["name=a,min=6M", "name=up,rate=10M"],
        SwitchConfig::default(),
    );
    let add = |sw: &mut Switch, spec: &str| {
        sw.add_port(spec.parse::<PortConfig>().unwrap())
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        add(&mut sw, "name=c,min=5M"),
        "QoS: minimums on port 'up' would total 11M, over its rate 10M (from a 6M, c 5M)"
    );
    assert_eq!(
        add(&mut sw, "name=up2,rate=5M"),
        "QoS: minimums on port 'up2' would total 6M, over its rate 5M (from a 6M)"
    );
    // A rated port's cap in lowers the rate the minimums must fit.
    let e = sw
        .qos_set(
            "up",
            &serde_json::from_str(r#"{"max":"5M:in"}"#).unwrap(),
            T0,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("over its rate 5M"), "{e}");
    let e = sw
        .qos_set("a", &serde_json::from_str(r#"{"min":"11M"}"#).unwrap(), T0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("would total 11M, over its rate 10M"), "{e}");
    let e = sw
        .qos_set(
            "a",
            &QosSpec {
                weight: Some(0),
                ..QosSpec::default()
            },
            T0,
        )
        .unwrap_err()
        .to_string();
    assert_eq!(e, "QoS: weight 0 is out of range (1-100)");
    let e = sw
        .qos_set(
            "a",
            &serde_json::from_str(r#"{"max":"1M:out"}"#).unwrap(),
            T0,
        )
        .unwrap_err()
        .to_string();
    assert_eq!(e, "QoS: port 'a': min 6M is above its own max 1M out");
    assert_eq!(
        sw.qos_set("zz", &QosSpec::default(), T0)
            .unwrap_err()
            .to_string(),
        "no port 'zz'"
    );
    for bad in [
        r#"{"max":"fast"}"#,
        r#"{"rate":0}"#,
        r#"{"weight":"x"}"#,
        r#"{"min":"1M","colour":1}"#,
    ] {
        assert!(serde_json::from_str::<QosSpec>(bad).is_err(), "{bad}");
    }
    // Refused changes changed nothing; a fitting one applies.
    let st = sw.qos_status("a").unwrap();
    assert_eq!(
        (st.spec.min.map(|m| m.bits_per_s()), st.spec.max),
        (Some(6_000_000), None)
    );
    sw.qos_set(
        "a",
        &serde_json::from_str(r#"{"min":"10M","weight":5}"#).unwrap(),
        T0,
    )
    .unwrap();
    assert_eq!(sw.qos_status("a").unwrap().spec.weight, Some(5));
    assert!(sw
        .port_config(sw.port_id("up").unwrap())
        .unwrap()
        .qos
        .rate
        .is_some());
}
