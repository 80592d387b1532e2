//! The per-frame cost of each policy stage of vireo-switch's core: ns/frame through
//! `Switch::process` (no I/O) for a 3-port switch with no policy, all guards,
//! 16 ACL rules none of which match, a stateful ACL (requests out, replies in over
//! 256 flows), a mirror (every frame copied), a storm limit (multicast frames, a
//! limit never reached) and QoS: a cap out never reached (the policer), a rated port
//! never full (the egress scheduler's queue-and-leave path) and a rated port two
//! sources (weights 1:3) offer twice its rate (queued, chosen by deficit round robin,
//! half dropped at the queues), each against its baseline. Several rounds; prints the
//! median and the spread (min–max).
//!
//! `cargo run --release -p switch --example policy_bench -- [--rounds N] [--frames N]`
//! (defaults 11 rounds of 200,000 frames). Run it on a quiet machine.
//!
//! `... --example policy_bench -- --accuracy [--seconds N]` (default 10): QoS accuracy
//! on the simulated clock (no timing involved, so any machine gives the same
//! figures): a cap out and a cap in held against 3× their rate, weight ratios under
//! contention, a minimum against a heavier weight; each figure against what it
//! should be.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use switch::frame::build;
use switch::port::PortConfig;
use switch::{Egress, PortId, Switch, SwitchConfig};

const VM: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const SRV: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const SRV_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// A switch set up for one scenario and the frames (ingress port, bytes) it cycles.
struct Scenario {
    name: &'static str,
    sw: Switch,
    frames: Vec<(PortId, Vec<u8>)>,
}

fn switch_with(vm_spec: &str) -> Result<(Switch, PortId, PortId), String> {
    let mut sw = Switch::new(SwitchConfig::default());
    let mut add = |spec: &str| -> Result<PortId, String> {
        let cfg: PortConfig = spec.parse().map_err(|e| format!("{spec}: {e}"))?;
        sw.add_port(cfg).map_err(|e| e.to_string())
    };
    add("name=mon,vlan=99")?;
    let srv = add("name=srv")?;
    let vm = add(vm_spec)?;
    Ok((sw, vm, srv))
}

fn udp(
    dst: [u8; 6],
    src: [u8; 6],
    from: Ipv4Addr,
    to: Ipv4Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    build::udp4_frame(dst, src, None, from, to, sport, dport, &[0u8; 64])
}

fn rule(sw: &mut Switch, json: &str) -> Result<(), String> {
    let r = serde_json::from_str(json).map_err(|e| e.to_string())?;
    sw.acl_add("vm", r).map(|_| ()).map_err(|e| e.to_string())
}

/// vm → srv known unicast (both addresses learned).
fn unicast(name: &'static str, vm_spec: &str) -> Result<Scenario, String> {
    let (mut sw, vm, srv) = switch_with(vm_spec)?;
    let mut out = Vec::new();
    sw.process(
        srv,
        &udp(VM, SRV, SRV_IP, VM_IP, 53, 5000),
        Duration::ZERO,
        &mut out,
    );
    let frames = (0..256)
        .map(|i| (vm, udp(SRV, VM, VM_IP, SRV_IP, 5000 + i, 53)))
        .collect();
    Ok(Scenario { name, sw, frames })
}

fn scenarios() -> Result<Vec<Scenario>, String> {
    let mut v = vec![
        unicast("no policy", "name=vm")?,
        unicast(
            "guards all",
            "name=vm,mac=52:54:00:00:00:01,ip=10.0.0.1,ip=fe80::1,guard=all",
        )?,
    ];
    let mut acl = unicast("16 ACL rules", "name=vm")?;
    for i in 0..16 {
        rule(
            &mut acl.sw,
            &format!(r#"{{"action":"deny","direction":"outbound","dst_ip":"192.168.{i}.0/24"}}"#),
        )?;
    }
    v.push(acl);
    // Requests out, replies in, over 256 flows: every frame looks the table up.
    let mut st = unicast("stateful ACL", "name=vm")?;
    rule(
        &mut st.sw,
        r#"{"action":"deny","direction":"inbound","dst_ip":"0.0.0.0/0"}"#,
    )?;
    rule(
        &mut st.sw,
        r#"{"action":"allow","direction":"outbound","protocol":"udp","stateful":true,"priority":10}"#,
    )?;
    let (vm, srv) = (
        st.frames[0].0,
        st.sw.port_id("srv").map_err(|e| e.to_string())?,
    );
    st.frames = (0..256u16)
        .flat_map(|i| {
            [
                (vm, udp(SRV, VM, VM_IP, SRV_IP, 5000 + i, 53)),
                (srv, udp(VM, SRV, SRV_IP, VM_IP, 53, 5000 + i)),
            ]
        })
        .collect();
    v.push(st);
    v.push(unicast("mirror (both)", "name=vm,mirror=mon")?);
    // Multicast from vm, with and without a limit it never reaches.
    for (name, spec) in [
        ("multicast, no policy", "name=vm"),
        ("storm limit", "name=vm,storm=10000000"),
    ] {
        let mut s = unicast(name, spec)?;
        let vm = s.frames[0].0;
        s.frames = (0..256)
            .map(|i| {
                (
                    vm,
                    udp([0x01, 0, 0x5e, 0, 0, 1], VM, VM_IP, SRV_IP, 5000 + i, 53),
                )
            })
            .collect();
        v.push(s);
    }
    v.push(unicast("qos cap out (policer)", "name=vm,max=1T:out")?);
    // srv's rate is never reached: every frame is queued and leaves at once.
    let mut rated = unicast("qos rated egress", "name=vm")?;
    qos(&mut rated.sw, "srv", r#"{"rate":"1T"}"#)?;
    v.push(rated);
    // Two sources, weights 1:3, offer ~850 Mbit/s (a ~106-byte frame per µs) to a
    // 400 Mbit/s port: queued, served by DRR, the excess dropped at the queues.
    let mut cont = unicast("qos contended 1:3", "name=vm,weight=3")?;
    qos(&mut cont.sw, "srv", r#"{"rate":"400M"}"#)?;
    let cfg: PortConfig = "name=vm2,weight=1".parse().map_err(|e| format!("{e}"))?;
    let vm2 = cont.sw.add_port(cfg).map_err(|e| e.to_string())?;
    let vm = cont.frames[0].0;
    let vm2_mac = [0x52, 0x54, 0, 0, 0, 9];
    cont.frames = (0..256u16)
        .flat_map(|i| {
            [
                (vm, udp(SRV, VM, VM_IP, SRV_IP, 5000 + i, 53)),
                (vm2, udp(SRV, vm2_mac, VM_IP, SRV_IP, 5000 + i, 53)),
            ]
        })
        .collect();
    v.push(cont);
    Ok(v)
}

fn qos(sw: &mut Switch, port: &str, json: &str) -> Result<(), String> {
    let q = serde_json::from_str(json).map_err(|e| e.to_string())?;
    sw.qos_set(port, &q, Duration::ZERO)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// ns per frame of one round of `n` frames, the clock moving 1 µs per frame.
fn round(s: &mut Scenario, n: usize, clock: &mut Duration) -> f64 {
    let mut out = Vec::with_capacity(4);
    let start = Instant::now();
    for i in 0..n {
        let (port, f) = &s.frames[i % s.frames.len()];
        *clock += Duration::from_micros(1);
        out.clear();
        s.sw.poll_egress(*clock, &mut out);
        s.sw.process(*port, black_box(f), *clock, &mut out);
        black_box(&out);
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn arg(args: &[String], name: &str, default: usize) -> Result<usize, String> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{name} needs a positive number")),
        None => Ok(default),
    }
}

/// A source port offering `rate` bits/s of `len`-byte frames from `src` to `dst`.
struct Offer {
    port: PortId,
    src: [u8; 6],
    dst: [u8; 6],
    len: usize,
    rate: u64,
}

/// Bytes delivered per (egress port, source address) while `offers` send evenly
/// spaced frames for `secs` simulated seconds, queued frames leaving at each
/// deadline the switch names.
fn simulate(
    sw: &mut Switch,
    offers: &[Offer],
    start: Duration,
    secs: u64,
) -> BTreeMap<(PortId, [u8; 6]), u64> {
    let end = start + Duration::from_secs(secs);
    let frames: Vec<Vec<u8>> = offers
        .iter()
        .map(|o| build::ethernet(o.dst, o.src, None, 0x88b5, &vec![0; o.len - 14]))
        .collect();
    let gap: Vec<Duration> = offers
        .iter()
        .map(|o| Duration::from_nanos(o.len as u64 * 8_000_000_000 / o.rate))
        .collect();
    let mut next = vec![start; offers.len()];
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
                next[i] += gap[i];
            }
        }
        for e in &out {
            let mut src = [0u8; 6];
            src.copy_from_slice(&e.frame[6..12]);
            *got.entry((e.port, src)).or_default() += e.frame.len() as u64;
        }
    }
    while let Some(d) = sw.next_deadline() {
        out.clear();
        sw.poll_egress(d, &mut out);
    }
    got
}

fn report(what: &str, got: f64, want: f64) {
    println!(
        "{what:<40} {got:>14.3} {want:>14.3} {:>+8.2} %",
        (got / want - 1.0) * 100.0
    );
}

/// QoS accuracy on the simulated clock.
fn accuracy(secs: u64) -> Result<(), String> {
    let (a_mac, c_mac, up_mac) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]);
    let lab = |specs: [&str; 3]| -> Result<(Switch, [PortId; 3]), String> {
        let mut sw = Switch::new(SwitchConfig::default());
        let mut ids = [0; 3];
        for (i, spec) in specs.iter().enumerate() {
            let cfg: PortConfig = spec.parse().map_err(|e| format!("{spec}: {e}"))?;
            ids[i] = sw.add_port(cfg).map_err(|e| e.to_string())?;
        }
        // up announces itself: frames to it go to it alone.
        let mut out = Vec::new();
        sw.process(
            ids[2],
            &build::ethernet([0xff; 6], up_mac, None, 0x88b5, &[0; 46]),
            Duration::ZERO,
            &mut out,
        );
        Ok((sw, ids))
    };
    let offer = |port, src, rate| Offer {
        port,
        src,
        dst: up_mac,
        len: 1000,
        rate,
    };
    let t0 = Duration::from_secs(1);
    let bytes = |bps: f64| bps / 8.0 * secs as f64;
    println!(
        "vireo-switch QoS accuracy on the simulated clock, {secs} s per figure, 1000-byte frames"
    );
    println!(
        "{:<40} {:>14} {:>14} {:>10}",
        "figure", "got", "want", "error"
    );
    // Caps, offered 3×.
    let (mut sw, [a, _, up]) = lab(["name=a,max=8M:out", "name=c", "name=up"])?;
    let got = simulate(&mut sw, &[offer(a, a_mac, 24_000_000)], t0, secs);
    report(
        "cap out 8M (bytes delivered)",
        got[&(up, a_mac)] as f64,
        bytes(8e6),
    );
    let (mut sw, [a, _, up]) = lab(["name=a", "name=c", "name=up,max=8M:in"])?;
    let got = simulate(&mut sw, &[offer(a, a_mac, 24_000_000)], t0, secs);
    report(
        "cap in 8M (bytes delivered)",
        got[&(up, a_mac)] as f64,
        bytes(8e6),
    );
    // Weights: both sources offer twice the rate.
    for (wa, wc) in [(1, 1), (1, 3), (1, 9), (10, 90)] {
        let (mut sw, [a, c, up]) = lab([
            &format!("name=a,weight={wa}"),
            &format!("name=c,weight={wc}"),
            "name=up,rate=10M",
        ])?;
        let got = simulate(
            &mut sw,
            &[offer(a, a_mac, 20_000_000), offer(c, c_mac, 20_000_000)],
            t0,
            secs,
        );
        let (ga, gc) = (got[&(up, a_mac)] as f64, got[&(up, c_mac)] as f64);
        report(
            &format!("weights {wa}:{wc} at 10M, share of a"),
            ga / (ga + gc),
            f64::from(wa) / f64::from(wa + wc),
        );
        report(
            &format!("weights {wa}:{wc} at 10M, rate used"),
            ga + gc,
            bytes(10e6),
        );
    }
    // A lone source takes the whole rate.
    let (mut sw, [a, _, up]) = lab(["name=a,weight=1", "name=c,weight=99", "name=up,rate=10M"])?;
    let got = simulate(&mut sw, &[offer(a, a_mac, 20_000_000)], t0, secs);
    report(
        "weight 1 alone at 10M (bytes)",
        got[&(up, a_mac)] as f64,
        bytes(10e6),
    );
    // A minimum beats a heavier weight.
    let (mut sw, [a, c, up]) = lab(["name=a,min=6M", "name=c,weight=9", "name=up,rate=10M"])?;
    let got = simulate(
        &mut sw,
        &[offer(a, a_mac, 20_000_000), offer(c, c_mac, 20_000_000)],
        t0,
        secs,
    );
    report(
        "min 6M against weight 9 at 10M (bytes a)",
        got[&(up, a_mac)] as f64,
        bytes(6e6),
    );
    report(
        "min 6M against weight 9 at 10M (bytes c)",
        got[&(up, c_mac)] as f64,
        bytes(4e6),
    );
    Ok(())
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--accuracy") {
        return accuracy(arg(&args, "--seconds", 10)? as u64);
    }
    let rounds = arg(&args, "--rounds", 11)?;
    let frames = arg(&args, "--frames", 200_000)?;
    println!("vireo-switch policy stages: ns/frame through Switch::process, {rounds} rounds of {frames} frames");
    println!("{:<22} {:>9} {:>17}", "stage", "median", "min-max");
    for mut s in scenarios()? {
        let mut clock = Duration::from_secs(1);
        round(&mut s, frames.min(10_000), &mut clock); // warm-up
        let mut ns: Vec<f64> = (0..rounds)
            .map(|_| round(&mut s, frames, &mut clock))
            .collect();
        ns.sort_by(f64::total_cmp);
        let (min, max) = (ns[0], ns[ns.len() - 1]);
        println!(
            "{:<22} {:>9.1} {:>8.1}-{:<8.1}",
            s.name,
            ns[ns.len() / 2],
            min,
            max
        );
        // Every stage must still switch: a bench of dropped frames measures nothing.
        let sent: u64 = s.sw.ports().iter().map(|p| p.counters.tx_packets).sum();
        let dropped: u64 =
            s.sw.ports()
                .iter()
                .flat_map(|p| p.counters.rx_dropped.values())
                .sum();
        if dropped > 0 || sent == 0 {
            return Err(format!("{}: {dropped} frames dropped, {sent} sent", s.name));
        }
    }
    Ok(())
}
