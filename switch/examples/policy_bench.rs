//! The per-frame cost of each policy stage of vireo-switch's core: ns/frame through
//! `Switch::process` (no I/O) for a 3-port switch with no policy, all guards,
//! 16 ACL rules none of which match, a stateful ACL (requests out, replies in over
//! 256 flows), a mirror (every frame copied) and a storm limit (multicast frames, a
//! limit never reached), each against its baseline. Several rounds; prints the median
//! and the spread (min–max).
//!
//! `cargo run --release -p switch --example policy_bench -- [--rounds N] [--frames N]`
//! (defaults 11 rounds of 200,000 frames). Run it on a quiet machine.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use switch::frame::build;
use switch::port::PortConfig;
use switch::{PortId, Switch, SwitchConfig};

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
    Ok(v)
}

/// ns per frame of one round of `n` frames, the clock moving 1 µs per frame.
fn round(s: &mut Scenario, n: usize, clock: &mut Duration) -> f64 {
    let mut out = Vec::with_capacity(4);
    let start = Instant::now();
    for i in 0..n {
        let (port, f) = &s.frames[i % s.frames.len()];
        *clock += Duration::from_micros(1);
        out.clear();
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

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
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
