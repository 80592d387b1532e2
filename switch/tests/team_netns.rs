//! Teaming of uplinks end to end: the real `vireo-switch` in a namespace with a "VM"
//! port (a veth whose far end is a namespace with a raw socket) and a team of two
//! veth members whose far ends are joined by a Linux bridge in a "peer" namespace,
//! behind which a host namespace sits. Frames go through raw AF_PACKET sockets and
//! are checked byte for byte; which member carried a frame is seen on the bridge
//! side of each member; the team's state and counters come from the control socket.
//! Needs root.
//!
//! Negative checks ("never got a second copy") read after a positive marker sent
//! behind the frame: the switch handles one frame completely before the next, and the
//! bridge and veths keep order, so nothing is waited for in silence.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::mem::{size_of, zeroed};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use switch::frame::build;
use switch::team::hash::rarp_announce;
use vireo_e2e::netns::{is_root, NetNs};
use vireo_e2e::{skip_or_fail_under_ci, wait_for_socket};

const T: Duration = Duration::from_secs(30);
const VM: [u8; 6] = [0x52, 0x54, 0, 0, 0x20, 1];
const HOST: [u8; 6] = [0x52, 0x54, 0, 0, 0x20, 9];
const BCAST: [u8; 6] = [0xff; 6];
const ETHERTYPE: u16 = 0x88b5;

fn skip_unless_root() -> bool {
    if !is_root() {
        skip_or_fail_under_ci("needs root (network namespaces, veth pairs, AF_PACKET)");
        return true;
    }
    false
}

/// A raw socket on one interface of a namespace: every frame (incoming, and
/// outgoing ones marked as such), and sends.
struct Sock {
    fd: OwnedFd,
}

impl Sock {
    fn open(ns: &NetNs, iface: &str) -> Self {
        let iface = std::ffi::CString::new(iface).unwrap();
        ns.run(move || {
            // SAFETY: plain socket(2), owned at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    i32::from(3u16.to_be()),
                )
            };
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            // SAFETY: fresh fd.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(iface.as_ptr()) };
            assert!(index > 0, "no interface {iface:?}");
            // SAFETY: zeroed, then filled.
            let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = 3u16.to_be();
            sll.sll_ifindex = index as i32;
            // SAFETY: valid sockaddr_ll and length.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            Self { fd }
        })
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: send from a buffer we own.
        let r = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            r,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame and its packet type, waiting up to `timeout`.
    fn recv_any(&self, timeout: Duration) -> Option<(u8, Vec<u8>)> {
        let start = Instant::now();
        let mut buf = vec![0u8; 65_536];
        loop {
            // SAFETY: zeroed plain data.
            let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: recvfrom into a buffer and address we own.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n >= 0 {
                return Some((sll.sll_pkttype, buf[..n as usize].to_vec()));
            }
            // The interface went down (ENETDOWN, reported once): frames queued
            // before are still there.
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock {
                continue;
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The next frame that came in (not one sent out of this interface) and is
    /// one of ours (our ethertype, UDP/IPv4 or RARP), waiting up to `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let start = Instant::now();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            let (ty, f) = self.recv_any(left)?;
            if ty != libc::PACKET_OUTGOING && ours(&f) {
                return Some(f);
            }
        }
    }

    /// Every frame of ours that came in and is waiting now.
    fn drain(&self) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.recv(Duration::ZERO)).collect()
    }
}

/// Our ethertype, RARP, or our UDP flows (to port 7000): not the kernel's IGMP.
fn ours(f: &[u8]) -> bool {
    match f.get(12..14) {
        Some([0x88, 0xb5]) | Some([0x80, 0x35]) => true,
        Some([0x08, 0x00]) => f.get(23) == Some(&17) && f.get(36..38) == Some(&[0x1b, 0x58]),
        _ => false,
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], tag: &str, seq: u32) -> Vec<u8> {
    let mut p = tag.as_bytes().to_vec();
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend((0..40).map(|i| (i * 7 + 3) as u8));
    build::ethernet(dst, src, None, ETHERTYPE, &p)
}

fn seq_of(f: &[u8], tag: &str) -> Option<u32> {
    let p = f.get(14..)?;
    let rest = p.strip_prefix(tag.as_bytes())?;
    Some(u32::from_be_bytes(rest.get(..4)?.try_into().ok()?))
}

/// A UDP frame of flow `sport` with a valid IPv4 header checksum (the peer's bridge
/// runs br_netfilter, which drops bad ones).
fn udp(sport: u16, seq: u32) -> Vec<u8> {
    let mut f = build::udp4_frame(
        HOST,
        VM,
        None,
        Ipv4Addr::new(10, 9, 0, 1),
        Ipv4Addr::new(10, 9, 0, 9),
        sport,
        7000,
        &seq.to_be_bytes(),
    );
    let sum: u32 = f[14..34]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    f[24..26].copy_from_slice(&sum.to_be_bytes());
    f
}

/// Sets the flag when dropped: a sender thread stops also when the test panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn ctl(path: &Path, req: &str) -> Value {
    let mut s = UnixStream::connect(path).expect("connect control");
    s.set_read_timeout(Some(T)).unwrap();
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < T, "never: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The switch (`sw`), the VM (`vm`: its `eth0` is the switch's port `vm`), the peer
/// (`peer`: bridge `br0` over `p0`, `p1` — the far ends of members `m0`, `m1` — and
/// `ph`) and a host behind the bridge (`host`, its `eth0`).
struct TeamLab {
    child: Option<Child>,
    control: PathBuf,
    log: PathBuf,
    vm: Sock,
    host: Sock,
    /// Captures on the bridge side of each member.
    p: [Sock; 2],
    peer: NetNs,
    _host_ns: NetNs,
    _vm_ns: NetNs,
    sw: NetNs,
    dir: tempfile::TempDir,
}

impl TeamLab {
    fn start(tag: &str, team: &str) -> Self {
        let sw = NetNs::new(&format!("tm-{tag}-sw"));
        let vm_ns = NetNs::new(&format!("tm-{tag}-vm"));
        let peer = NetNs::new(&format!("tm-{tag}-peer"));
        let host_ns = NetNs::new(&format!("tm-{tag}-host"));
        sw.exec(&[
            "ip",
            "link",
            "add",
            "sw-vm",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            vm_ns.name(),
        ]);
        sw.exec(&["ip", "link", "set", "sw-vm", "up"]);
        vm_ns.exec(&["ip", "link", "set", "eth0", "up"]);
        peer.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        peer.exec(&["ip", "link", "set", "br0", "up"]);
        for i in 0..2 {
            let (m, p) = (format!("m{i}"), format!("p{i}"));
            sw.exec(&[
                "ip",
                "link",
                "add",
                &m,
                "type",
                "veth",
                "peer",
                "name",
                &p,
                "netns",
                peer.name(),
            ]);
            sw.exec(&["ip", "link", "set", &m, "up"]);
            peer.exec(&["ip", "link", "set", &p, "master", "br0"]);
            peer.exec(&["ip", "link", "set", &p, "up"]);
        }
        peer.exec(&[
            "ip",
            "link",
            "add",
            "ph",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            host_ns.name(),
        ]);
        peer.exec(&["ip", "link", "set", "ph", "master", "br0"]);
        peer.exec(&["ip", "link", "set", "ph", "up"]);
        host_ns.exec(&["ip", "link", "set", "eth0", "up"]);
        let (vm, host) = (Sock::open(&vm_ns, "eth0"), Sock::open(&host_ns, "eth0"));
        let p = [Sock::open(&peer, "p0"), Sock::open(&peer, "p1")];
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("switch.sock");
        let log = dir.path().join("switch.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vireo-switch"));
        cmd.args(["run", "--port", "name=vm,iface=sw-vm", "--port"])
            .arg(format!("name=up,{team}"))
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        sw.enter_on_exec(&mut cmd);
        let child = cmd.spawn().expect("start vireo-switch");
        let mut lab = Self {
            child: Some(child),
            control,
            log,
            vm,
            host,
            p,
            peer,
            _host_ns: host_ns,
            _vm_ns: vm_ns,
            sw,
            dir,
        };
        let start = Instant::now();
        while !lab.control.exists() {
            if let Some(st) = lab.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("vireo-switch exited ({st}): {}", lab.log());
            }
            assert!(start.elapsed() < T, "no control socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        wait_for_socket(&lab.control, T);
        lab.wait_team("every member up", |t| {
            t["members"]
                .as_array()
                .is_some_and(|m| m.iter().all(|m| m["up"] == true))
        });
        lab.wait_forwarding(&["p0", "p1", "ph"]);
        lab
    }

    /// Waits until the bridge forwards on `ports` (it does once the kernel's link
    /// watch saw their carrier, up to a second after they came up).
    fn wait_forwarding(&self, ports: &[&str]) {
        wait_until("the bridge forwarding", || {
            let out = Command::new("ip")
                .args(["netns", "exec", self.peer.name(), "bridge", "link", "show"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            ports.iter().all(|p| {
                text.lines().any(|l| {
                    let name = l.split_whitespace().nth(1).unwrap_or("");
                    name.trim_end_matches(':').split('@').next() == Some(*p)
                        && l.contains("state forwarding")
                })
            })
        });
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn ctl(&self, req: &str) -> Value {
        ctl(&self.control, req)
    }

    /// The team's status (from `counters`).
    fn team(&self) -> Value {
        let v = self.ctl(r#"{"op":"counters","port":"up"}"#);
        assert_eq!(v["ok"], true, "{v}");
        v["team"].clone()
    }

    fn wait_team(&self, what: &str, cond: impl Fn(&Value) -> bool) {
        wait_until(what, || cond(&self.team()));
    }

    fn member(&self, i: usize, counter: &str) -> u64 {
        self.team()["members"][i]["counters"][counter]
            .as_u64()
            .unwrap()
    }

    fn port_counter(&self, port: &str, counter: &str) -> u64 {
        let v = self.ctl(&format!(r#"{{"op":"counters","port":"{port}"}}"#));
        v["counters"][counter].as_u64().unwrap()
    }

    /// Takes the bridge side of member `i` down (a pulled cable) or up.
    fn link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        self.peer
            .exec(&["ip", "link", "set", &format!("p{i}"), state]);
    }

    /// The host and the VM each send one frame, so the bridge and the switch know
    /// both; both arrive byte-exact.
    fn introduce(&self) {
        let hello = frame(BCAST, VM, "hello", 0);
        self.vm.send(&hello);
        let got = self.host.recv(T);
        assert!(
            got.as_deref() == Some(&hello[..]),
            "VM's hello at the host: {got:?}; {}",
            self.ctl(r#"{"op":"ports"}"#)
        );
        let reply = frame(VM, HOST, "reply", 0);
        self.host.send(&reply);
        assert_eq!(
            self.vm.recv(T).as_deref(),
            Some(&reply[..]),
            "host's reply at the VM"
        );
        for p in &self.p {
            p.drain();
        }
    }
}

impl Drop for TeamLab {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "switch log ({}):\n{}",
                self.dir.path().display(),
                self.log()
            );
        }
        let _ = &self.sw;
    }
}

#[test]
fn active_backup_fails_over_mid_stream_announces_and_the_member_rejoins() {
    if skip_unless_root() {
        return;
    }
    let lab = TeamLab::start("ab", "team=m0+m1,team-mode=active-backup");
    assert_eq!(lab.team()["active"], "m0");
    assert_eq!(lab.team()["mode"], "active-backup");
    lab.introduce();

    // A stream from the VM to the host, paced; m0's cable is pulled mid-stream.
    let stop = AtomicBool::new(false);
    let sent = AtomicU32::new(0);
    let mut got: Vec<u32> = Vec::new();
    let mut announce_seen = false;
    let mut observed_at = 0u32;
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                lab.vm.send(&frame(HOST, VM, "stream", seq));
                seq += 1;
                sent.store(seq, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        let _stop = StopOnDrop(&stop);
        let take = |got: &mut Vec<u32>, n: usize| {
            while got.len() < n {
                let f = lab.host.recv(T).expect("stream frame at the host");
                if f == rarp_announce(VM, None) {
                    // The failover's announce, flooded by the bridge.
                    continue;
                }
                let seq = seq_of(&f, "stream").expect("a stream frame");
                assert_eq!(f, frame(HOST, VM, "stream", seq), "byte-exact");
                got.push(seq);
            }
        };
        take(&mut got, 100);
        lab.link(0, false);
        lab.wait_team("m1 active", |t| t["active"] == "m1");
        // Every frame sent from now on must arrive.
        observed_at = sent.load(Ordering::Relaxed);
        while got.last().copied().unwrap_or(0) < observed_at + 100 {
            let n = got.len() + 1;
            take(&mut got, n);
        }
        stop.store(true, Ordering::Relaxed);
    });
    // The stream's tail, up to a marker sent behind it.
    let end = frame(HOST, VM, "end", 0);
    lab.vm.send(&end);
    loop {
        let f = lab.host.recv(T).expect("the stream's tail at the host");
        if f == end {
            break;
        }
        let seq = seq_of(&f, "stream").expect("a stream frame");
        assert_eq!(f, frame(HOST, VM, "stream", seq), "byte-exact");
        got.push(seq);
    }
    // In order, no duplicates; what was lost is one run, before the failover was seen.
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "reordered or duplicated"
    );
    let missing: Vec<u32> = (0..*got.last().unwrap())
        .filter(|s| got.binary_search(s).is_err())
        .collect();
    if let (Some(first), Some(last)) = (missing.first(), missing.last()) {
        assert_eq!(
            (last - first + 1) as usize,
            missing.len(),
            "lost frames not one run: {missing:?}"
        );
        assert!(
            *last < observed_at,
            "lost {last} after the failover was seen ({observed_at})"
        );
        assert!(*first >= 100, "lost before the cable was pulled");
    }
    println!(
        "active-backup failover: {} frames lost of {} (the failover seen after frame {observed_at})",
        missing.len(),
        got.last().unwrap() + 1
    );

    // The announce for the VM's address left on the new member, byte-exact.
    let want = rarp_announce(VM, None);
    for f in std::iter::from_fn(|| lab.p[1].recv(Duration::ZERO)) {
        announce_seen |= f == want;
    }
    assert!(announce_seen, "no RARP announce for the VM on p1");
    // So the bridge sends to the VM through m1 at once.
    let back = frame(VM, HOST, "after-failover", 1);
    lab.host.send(&back);
    assert_eq!(lab.vm.recv(T).as_deref(), Some(&back[..]));
    let t = lab.team();
    assert_eq!(t["failovers"], 1, "{t}");
    let c0 = &t["members"][0]["counters"];
    let c1 = &t["members"][1]["counters"];
    assert_eq!(
        (c0["failovers"].as_u64(), c1["takeovers"].as_u64()),
        (Some(1), Some(1)),
        "{t}"
    );
    assert!(c1["announces"].as_u64().unwrap() >= 1, "{t}");
    assert!(c0["tx_packets"].as_u64().unwrap() >= 100, "{t}");
    assert!(c1["tx_packets"].as_u64().unwrap() >= 100, "{t}");
    assert_eq!(c1["rx_packets"], 1, "{t}");

    // m0 comes back: it rejoins as a backup (no preemption); m1 then fails and the
    // traffic comes back to m0.
    lab.link(0, true);
    lab.wait_team("m0 back up", |t| t["members"][0]["up"] == true);
    lab.wait_forwarding(&["p0"]);
    assert_eq!(lab.team()["active"], "m1");
    for p in &lab.p {
        p.drain();
    }
    lab.link(1, false);
    lab.wait_team("m0 active again", |t| t["active"] == "m0");
    // The host gets the announce (the bridge floods it) before the frames.
    assert_eq!(lab.host.recv(T), Some(rarp_announce(VM, None)));
    for seq in 0..5 {
        let f = frame(HOST, VM, "again", seq);
        lab.vm.send(&f);
        assert_eq!(lab.host.recv(T).as_deref(), Some(&f[..]));
        let g = frame(VM, HOST, "again-back", seq);
        lab.host.send(&g);
        assert_eq!(lab.vm.recv(T).as_deref(), Some(&g[..]));
    }
    // Through p0, the announce first.
    let through_p0 = lab.p[0].drain();
    assert_eq!(through_p0.first(), Some(&rarp_announce(VM, None)));
    assert_eq!(
        through_p0.len(),
        1 + 5,
        "announce and 5 frames in through p0"
    );
    assert_eq!(lab.team()["failovers"], 2);
    // At the start, and now.
    assert_eq!(lab.member(0, "takeovers"), 2);
}

#[test]
fn hash_mode_spreads_flows_keeps_each_on_one_member_and_moves_them_on_failure() {
    if skip_unless_root() {
        return;
    }
    let lab = TeamLab::start("hash", "team=m0+m1,team-mode=hash");
    assert_eq!(lab.team()["mode"], "hash");
    lab.introduce();
    const FLOWS: u16 = 16;
    const ROUNDS: u32 = 10;
    let send_all = || {
        for round in 0..ROUNDS {
            for flow in 0..FLOWS {
                lab.vm.send(&udp(5000 + flow, round));
            }
        }
        // The host gets every frame once, each flow in order.
        let mut next = vec![0u32; FLOWS as usize];
        let mut n = 0;
        while n < ROUNDS * u32::from(FLOWS) {
            let f = lab.host.recv(T).expect("a flow's frame at the host");
            if f == rarp_announce(VM, None) {
                continue;
            }
            n += 1;
            let sport = u16::from_be_bytes([f[34], f[35]]);
            let seq = u32::from_be_bytes(f[42..46].try_into().unwrap());
            let i = usize::from(sport - 5000);
            // Byte-exact but for the Ethernet padding the peer's br_netfilter trims
            // to the IP packet's length.
            assert_eq!(f, udp(sport, seq)[..14 + 32], "byte-exact");
            assert_eq!(seq, next[i], "flow {sport} out of order");
            next[i] += 1;
        }
        // Which member each flow took, seen on the bridge side.
        let mut on = vec![[0u32; 2]; FLOWS as usize];
        for (m, p) in lab.p.iter().enumerate() {
            for f in p.drain() {
                if f.len() > 36 && f[12..14] == [8, 0] && f[..6] == HOST {
                    on[usize::from(u16::from_be_bytes([f[34], f[35]]) - 5000)][m] += 1;
                }
            }
        }
        on
    };
    let on = send_all();
    for (flow, counts) in on.iter().enumerate() {
        assert!(
            *counts == [ROUNDS, 0] || *counts == [0, ROUNDS],
            "flow {flow} not on exactly one member: {counts:?}"
        );
    }
    let on_m1 = on.iter().filter(|c| c[1] > 0).count();
    assert!(
        on_m1 > 0 && on_m1 < FLOWS as usize,
        "flows not spread: {on:?}"
    );
    println!("hash: {} of {FLOWS} flows on m1", on_m1);
    assert!(lab.member(0, "tx_packets") >= u64::from(ROUNDS));
    assert!(lab.member(1, "tx_packets") >= u64::from(ROUNDS));

    // m1's cable pulled: every flow goes through m0.
    lab.link(1, false);
    lab.wait_team("m1 down", |t| t["members"][1]["up"] == false);
    let on = send_all();
    assert!(on.iter().all(|c| *c == [ROUNDS, 0]), "{on:?}");
    assert_eq!(lab.member(1, "failovers"), 1);
    // Back: the flows hash as before.
    lab.link(1, true);
    lab.wait_team("m1 up", |t| t["members"][1]["up"] == true);
    lab.wait_forwarding(&["p1"]);
    let again = send_all();
    assert_eq!(again.iter().filter(|c| c[1] > 0).count(), on_m1);
}

#[test]
fn a_broadcast_is_neither_looped_nor_duplicated_through_the_team() {
    if skip_unless_root() {
        return;
    }
    for mode in ["hash", "active-backup"] {
        let lab = TeamLab::start(
            &format!("bc{}", &mode[..1]),
            &format!("team=m0+m1,team-mode={mode}"),
        );
        lab.introduce();
        let vm_tx = lab.port_counter("vm", "tx_packets");
        let dropped1 = lab.member(1, "rx_dropped") + lab.member(1, "rx_looped");
        // The VM's broadcast leaves on m0 only; the bridge floods it back into m1:
        // it does not come back to the VM.
        let b = frame(BCAST, VM, "vm-bcast", 1);
        lab.vm.send(&b);
        assert_eq!(lab.host.recv(T).as_deref(), Some(&b[..]), "{mode}");
        // The host's broadcast reaches the switch on both members: one copy enters.
        let hb = frame(BCAST, HOST, "host-bcast", 2);
        lab.host.send(&hb);
        let marker = frame(VM, HOST, "marker", 3);
        lab.host.send(&marker);
        assert_eq!(lab.vm.recv(T).as_deref(), Some(&hb[..]), "{mode}");
        assert_eq!(lab.vm.recv(T).as_deref(), Some(&marker[..]), "{mode}");
        assert_eq!(
            lab.vm.drain(),
            Vec::<Vec<u8>>::new(),
            "{mode}: nothing more at the VM"
        );
        assert_eq!(lab.port_counter("vm", "tx_packets") - vm_tx, 2, "{mode}");
        // On the bridge side: the VM's broadcast came in through p0 only.
        let vm_copies = |p: &Sock| p.drain().iter().filter(|f| **f == b).count();
        assert_eq!(
            (vm_copies(&lab.p[0]), vm_copies(&lab.p[1])),
            (1, 0),
            "{mode}"
        );
        // m1 received the VM's reflected broadcast and the host's broadcast; neither
        // entered the switch.
        wait_until("m1 counted both", || {
            lab.member(1, "rx_dropped") + lab.member(1, "rx_looped") >= dropped1 + 2
        });
        assert_eq!(
            lab.member(1, "rx_dropped") + lab.member(1, "rx_looped"),
            dropped1 + 2,
            "{mode}"
        );
    }
}

#[test]
fn bad_teams_are_refused_with_one_line_and_the_switch_serves_the_rest() {
    if skip_unless_root() {
        return;
    }
    let lab = TeamLab::start("bad", "team=m0,team-mode=active-backup");
    let add = |spec: &str| {
        let v = lab.ctl(&format!(r#"{{"op":"port-add","spec":"{spec}"}}"#));
        assert_eq!(v["ok"], false, "{spec}: {v}");
        v["error"].as_str().unwrap().to_string()
    };
    let cases = [
        ("name=t1,team=", "team 't1' has no members"),
        (
            "name=t2,team=nosuch0+m1",
            "interface 'nosuch0' does not exist",
        ),
        ("name=t3,team=m1+m0", "interface 'm0' is port 'up' already"),
        (
            "name=t4,team=m1,team-mode=lacp",
            "unknown team mode 'lacp' (known: active-backup, hash)",
        ),
        ("name=t5,iface=m0", "interface 'm0' is port 'up' already"),
        ("name=t6,team=m1+m1", "names member 'm1' twice"),
    ];
    for (spec, want) in cases {
        let e = add(spec);
        assert!(e.contains(want), "{spec}: {e}");
        assert!(!e.contains('\n'));
    }
    // A second team on m1 alone is fine, and then m1 is taken.
    let v = lab.ctl(r#"{"op":"port-add","spec":"name=t7,team=m1,team-mode=hash"}"#);
    assert_eq!(v["ok"], true, "{v}");
    assert!(add("name=t8,team=m1").contains("interface 'm1' is port 't7' already"));
    let v = lab.ctl(r#"{"op":"port-remove","port":"t7"}"#);
    assert_eq!(v["ok"], true, "{v}");
    // The switch serves the rest.
    let f = frame(HOST, VM, "still", 1);
    lab.vm.send(&f);
    assert_eq!(lab.host.recv(T).as_deref(), Some(&f[..]));
    // On the command line: one line, exit 2.
    for (spec, want) in [
        ("name=x,team=m0+m0", "names member 'm0' twice"),
        (
            "name=x,team=m0,team-mode=round-robin",
            "unknown team mode 'round-robin'",
        ),
        ("name=x,team-mode=hash", "team-mode= needs team="),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_vireo-switch"))
            .args(["run", "--control", "/nonexistent/x.sock", "--port", spec])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{spec}: {err}");
        assert!(err.contains(want), "{spec}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{spec}: {err}");
    }
}
