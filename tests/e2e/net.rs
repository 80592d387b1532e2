//! virtio-net end to end: the real `vireo` on real KVM, its tap in a fresh network
//! namespace, frames checked byte for byte through an AF_PACKET socket on the tap,
//! the guest (virtio-drivers' VirtIONet) checksumming what the host sent, and
//! `vm.counters` agreeing with both. Needs root (namespaces, taps).

use std::process::{Command, Stdio};
use std::time::Duration;

use vireo_e2e::netframe::{self, ETHERTYPE};
use vireo_e2e::netns::{is_root, NetNs, PacketSocket};
use vireo_e2e::pattern::Crc32;
use vireo_e2e::{
    api, bin, guest, have_qemu, serial_line, skip_or_fail_under_ci, wait_for_socket,
    wait_with_timeout, Vireo,
};

const T: Duration = Duration::from_secs(60);
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0xfe];

/// True (after `skip_or_fail_under_ci`) when this host cannot make namespaces and taps.
fn skip_unless_root() -> bool {
    if !is_root() {
        skip_or_fail_under_ci("needs root (network namespaces and taps)");
        return true;
    }
    false
}

/// The value of `key=` in a serial line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Waits for a whole serial line starting with `prefix`; returns it.
fn wait_line(vm: &vireo_e2e::Running, prefix: &str) -> String {
    let start = std::time::Instant::now();
    loop {
        let text = vm.serial_text();
        let line = text
            .split_inclusive('\n')
            .find(|l| l.starts_with(prefix) && l.ends_with('\n'));
        if let Some(l) = line {
            return l.trim_end().to_string();
        }
        assert!(start.elapsed() < T, "no line {prefix:?} on serial:\n{text}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The frames the guest sends: (frames, total bytes, CRC-32).
fn guest_stream(seed: u64, n: u32, max_len: usize, mac: [u8; 6]) -> (Vec<Vec<u8>>, u64, u32) {
    let mut crc = Crc32::new();
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut f = vec![0u8; netframe::frame_len(i, max_len)];
            netframe::fill(&mut f, netframe::BROADCAST, mac, seed, i);
            crc.update(&f);
            f
        })
        .collect();
    let bytes = frames.iter().map(|f| f.len() as u64).sum();
    (frames, bytes, crc.finish())
}

/// The frames the host sends to the guest (seed + 1, to the guest's MAC).
fn host_stream(seed: u64, n: u32, max_len: usize) -> (Vec<Vec<u8>>, u64, u32) {
    let mut crc = Crc32::new();
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut f = vec![0u8; netframe::frame_len(i, max_len)];
            netframe::fill(&mut f, GUEST_MAC, HOST_MAC, seed + 1, i);
            crc.update(&f);
            f
        })
        .collect();
    let bytes = frames.iter().map(|f| f.len() as u64).sum();
    (frames, bytes, crc.finish())
}

/// Receives `expected` from the tap, in order and byte-exact.
fn expect_frames(sock: &PacketSocket, expected: &[Vec<u8>]) {
    for (i, want) in expected.iter().enumerate() {
        let got = sock
            .recv(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("guest frame {i} never reached the tap"));
        assert_eq!(got.len(), want.len(), "frame {i}: length");
        assert!(got == *want, "frame {i} differs from the seeded frame");
    }
}

#[test]
fn frames_cross_between_guest_and_tap_byte_exact_and_are_counted() {
    if skip_unless_root() {
        return;
    }
    let ns = NetNs::new("net-e2e");
    ns.add_tap("vtap0");
    let sock = PacketSocket::open(&ns, "vtap0", ETHERTYPE);
    let (seed, out_n, in_n, max_len) = (77u64, 40u32, 50u32, 1514usize);
    let dir = tempfile::tempdir().unwrap();
    let api_sock = dir.path().join("vm.sock");
    let mut vm = Vireo::guest(
        &format!("test=net send={out_n} recv={in_n} seed={seed} len={max_len} hold=1"),
        &[
            "--net",
            "tap=vtap0,mac=52:54:00:12:34:56,id=lan0",
            "--api-socket",
            api_sock.to_str().unwrap(),
        ],
    );
    ns.enter_on_exec(&mut vm.cmd);
    let vm = vm.spawn();
    wait_for_socket(&api_sock, T);

    // Guest → host: every frame arrives, in order, byte for byte.
    let (out_frames, out_bytes, out_crc) = guest_stream(seed, out_n, max_len, GUEST_MAC);
    expect_frames(&sock, &out_frames);
    assert_eq!(wait_line(&vm, "net mac="), "net mac=52:54:00:12:34:56");
    let sent = &wait_line(&vm, "net sent=");
    assert_eq!(field(sent, "bytes"), out_bytes.to_string());
    assert_eq!(field(sent, "crc32"), format!("{out_crc:08x}"));

    // Host → guest: more frames than the guest has buffers (16): the device must
    // hold the rest in the tap until the guest gives buffers back.
    let (in_frames, in_bytes, in_crc) = host_stream(seed, in_n, max_len);
    for f in &in_frames {
        sock.send(f);
    }
    let serial = vm.wait_serial("net holding", T);
    let got = serial_line(&serial, "net received=");
    assert_eq!(field(got, "received"), in_n.to_string(), "{got}");
    assert_eq!(field(got, "bytes"), in_bytes.to_string(), "{got}");
    assert_eq!(field(got, "crc32"), format!("{in_crc:08x}"), "{got}");
    assert_eq!(field(got, "bad"), "0");
    let ignored: u64 = field(got, "ignored").parse().unwrap();

    let (s, body) = api(&api_sock, "GET", "vm.counters", None);
    assert_eq!(s, 200, "{body}");
    let c: serde_json::Value = serde_json::from_str(&body).unwrap();
    let lan = &c["lan0"];
    assert_eq!(lan["tx_packets"], out_n, "{body}");
    assert_eq!(lan["tx_bytes"], out_bytes, "{body}");
    assert_eq!(lan["tx_dropped"], 0, "{body}");
    // Only our frames travel in this namespace (IPv6 off, no addresses), but count
    // whatever the guest saw and ignored.
    assert_eq!(lan["rx_packets"], u64::from(in_n) + ignored, "{body}");
    assert!(lan["rx_bytes"].as_u64().unwrap() >= in_bytes, "{body}");
    if ignored == 0 {
        assert_eq!(lan["rx_bytes"], in_bytes, "{body}");
    }
    assert_eq!(lan["rx_dropped"], 0, "{body}");

    assert_eq!(api(&api_sock, "PUT", "vm.shutdown", None).0, 204);
    assert_eq!(vm.wait(T).status.code(), Some(0));
}

#[test]
fn a_snapshot_restores_onto_the_same_tap_and_traffic_continues() {
    if skip_unless_root() {
        return;
    }
    let ns = NetNs::new("net-snap");
    ns.add_tap("vtap1");
    let sock = PacketSocket::open(&ns, "vtap1", ETHERTYPE);
    let (seed, out_n, in_n) = (5u64, 4u32, 20u32);
    let dir = tempfile::tempdir().unwrap();
    let (a_sock, b_sock) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let snap = dir.path().join("snap");
    let mut a = Vireo::guest(
        &format!("test=net send={out_n} recv={in_n} seed={seed} len=600 ms=60000"),
        &[
            "--net",
            "tap=vtap1,mac=52:54:00:12:34:56",
            "--api-socket",
            a_sock.to_str().unwrap(),
        ],
    );
    ns.enter_on_exec(&mut a.cmd);
    let a = a.spawn();
    wait_for_socket(&a_sock, T);
    let (out_frames, _, _) = guest_stream(seed, out_n, 600, GUEST_MAC);
    expect_frames(&sock, &out_frames);
    wait_line(&a, "net sent=");
    // The guest now waits for frames: snapshot it there, on a paused VM.
    wait_line(&a, "net receiving");
    assert_eq!(api(&a_sock, "PUT", "vm.pause", None).0, 204);
    let body = format!(r#"{{"destination_url":"file://{}"}}"#, snap.display());
    let (s, r) = api(&a_sock, "PUT", "vm.snapshot", Some(&body));
    assert_eq!(s, 204, "{r}");
    drop(a); // The tap takes one process at a time: the first VMM goes.

    let serial_b = dir.path().join("b.serial");
    let mut b = Command::new(bin("vireo"));
    b.arg("--restore")
        .arg(format!("source_url=file://{},resume=on", snap.display()))
        .arg("--serial")
        .arg(format!("file={}", serial_b.display()))
        .arg("--api-socket")
        .arg(&b_sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    ns.enter_on_exec(&mut b);
    let b = b.spawn().unwrap();
    wait_for_socket(&b_sock, T);
    // The API answers before the restore is done; frames sent to a tap nobody has
    // open are dropped by the kernel, so wait until the VM runs again.
    let start = std::time::Instant::now();
    while !api(&b_sock, "GET", "vm.info", None)
        .1
        .contains("\"Running\"")
    {
        assert!(start.elapsed() < T, "the restored VM never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (in_frames, in_bytes, in_crc) = host_stream(seed, in_n, 600);
    for f in &in_frames {
        sock.send(f);
    }
    let out = wait_with_timeout(b, T);
    let serial = std::fs::read_to_string(&serial_b).unwrap_or_default();
    assert!(
        serial.contains("vireo-guest: result ok"),
        "restored guest: {serial}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = serial_line(&serial, "net received=");
    assert_eq!(field(got, "bytes"), in_bytes.to_string(), "{got}");
    assert_eq!(field(got, "crc32"), format!("{in_crc:08x}"), "{got}");
    assert_eq!(out.status.code(), Some(0));
}

fn vireo_error(ns: Option<&NetNs>, args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(bin("vireo"));
    cmd.arg("--kernel")
        .arg(guest())
        .args(args)
        .args(["--serial", "null"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = ns {
        ns.enter_on_exec(&mut cmd);
    }
    let out = wait_with_timeout(cmd.spawn().unwrap(), T);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn assert_one_line_error(code: i32, stderr: &str, needles: &[&str]) {
    assert_ne!(code, 0, "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("vireo: error:") || l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "exactly one error line:\n{stderr}");
    for n in needles {
        assert!(errors[0].contains(n), "{n:?} not in {:?}", errors[0]);
    }
}

#[test]
fn bad_network_input_is_one_clear_error() {
    for (arg, needles) in [
        (
            "tap=vtap-name-too-long",
            vec!["--net", "longer than 15 bytes"],
        ),
        ("tap=", vec!["--net", "empty"]),
        (
            "tap=v0,mac=52:54:00:zz:00:01",
            vec!["mac=52:54:00:zz:00:01", "six hex bytes"],
        ),
        ("tap=v0,mac=01:00:5e:00:00:01", vec!["multicast"]),
        (
            "mac=52:54:00:00:00:01",
            vec!["missing required option 'tap (or vhost-user)'"],
        ),
        ("tap=v0,queues=2", vec!["only one queue pair"]),
    ] {
        let (code, err) = vireo_error(None, &["--net", arg]);
        assert_one_line_error(code, &err, &needles);
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.json");
    std::fs::write(
        &cfg,
        r#"{"payload":{"kernel":"/k"},"nets":[{"tap":"v0","mac":"52:54"}]}"#,
    )
    .unwrap();
    let mut cmd = Command::new(bin("vireo"));
    cmd.arg("--config")
        .arg(&cfg)
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    let out = wait_with_timeout(cmd.spawn().unwrap(), T);
    assert_one_line_error(
        out.status.code().unwrap_or(-1),
        &String::from_utf8_lossy(&out.stderr),
        &["vm.json", "not a MAC address"],
    );
}

/// `--net vhost-user=`: a socket that is missing (after the connect deadline), a path
/// that is not a socket, guest memory that is not shared, several queues: one line each.
#[test]
fn bad_vhost_user_input_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nobody.sock");
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a socket").unwrap();
    let shared = ["--memory", "size=64M,shared=on"];
    let net = |p: &std::path::Path| format!("vhost-user={}", p.display());
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec!["--net".into(), net(&missing)],
            vec!["needs shared guest memory", "shared=on"],
        ),
        (
            vec![
                shared[0].into(),
                shared[1].into(),
                "--net".into(),
                net(&missing),
            ],
            vec!["nobody.sock", "no backend accepted a connection within 5 s"],
        ),
        (
            vec![
                shared[0].into(),
                shared[1].into(),
                "--net".into(),
                net(&file),
            ],
            vec!["plain-file", "not a unix socket"],
        ),
        (
            vec![
                shared[0].into(),
                shared[1].into(),
                "--net".into(),
                format!("{},queues=2", net(&missing)),
            ],
            vec!["only one queue pair"],
        ),
        (
            vec!["--net".into(), "vhost-user=relative.sock".into()],
            vec!["absolute"],
        ),
        (
            vec!["--net".into(), format!("tap=v0,{}", net(&missing))],
            vec!["either tap= or vhost-user="],
        ),
        (
            vec!["--memory".into(), "size=64M,shared=on,hugepages=on".into()],
            vec!["shared", "hugepages"],
        ),
    ];
    for (args, needles) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = vireo_error(None, &args);
        assert_one_line_error(code, &err, &needles);
    }
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"not a socket",
        "the file is untouched"
    );
}

#[test]
fn a_tap_that_cannot_be_opened_is_one_clear_error() {
    if skip_unless_root() {
        return;
    }
    let ns = NetNs::new("net-bad");
    // An interface of that name that is not a tap.
    ns.exec(&["ip", "tuntap", "add", "dev", "vtun0", "mode", "tun"]);
    let (code, err) = vireo_error(Some(&ns), &["--net", "tap=vtun0"]);
    assert_one_line_error(
        code,
        &err,
        &["tap vtun0", "TUNSETIFF", "not a single-queue tap"],
    );
    // A tap another VMM holds.
    ns.add_tap("vbusy0");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut first = Vireo::guest(
        "test=counter",
        &[
            "--net",
            "tap=vbusy0",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
    ns.enter_on_exec(&mut first.cmd);
    let first = first.spawn();
    wait_for_socket(&sock, T);
    let (code, err) = vireo_error(Some(&ns), &["--net", "tap=vbusy0"]);
    assert_one_line_error(code, &err, &["tap vbusy0", "in use by another process"]);
    drop(first);
}

#[test]
fn qemu_runs_the_same_guest_on_a_tap_with_the_same_results() {
    if skip_unless_root() {
        return;
    }
    if !have_qemu() {
        panic!("qemu-system-x86_64 is required (scripts/setup installs it)");
    }
    let ns = NetNs::new("net-qemu");
    ns.add_tap("vtapq");
    let sock = PacketSocket::open(&ns, "vtapq", ETHERTYPE);
    let (seed, out_n, in_n, max_len) = (31u64, 12u32, 24u32, 1514usize);
    let cmdline = format!("test=net send={out_n} recv={in_n} seed={seed} len={max_len}");
    let mut q = Command::new("qemu-system-x86_64");
    q.args([
        "-M",
        "microvm,pcie=on",
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
    ])
    .args([
        "-m",
        "256",
        "-smp",
        "1",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
    ])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
    .arg("-kernel")
    .arg(guest())
    .args(["-append", &cmdline])
    .args(["-netdev", "tap,id=n0,ifname=vtapq,script=no,downscript=no"])
    .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    ns.enter_on_exec(&mut q);
    let child = q.spawn().expect("run qemu-system-x86_64");
    let (out_frames, _, _) = guest_stream(seed, out_n, max_len, GUEST_MAC);
    expect_frames(&sock, &out_frames);
    let (in_frames, _, _) = host_stream(seed, in_n, max_len);
    for f in &in_frames {
        sock.send(f);
    }
    let out = wait_with_timeout(child, T);
    let qemu = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "QEMU run failed:\n{qemu}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(sock);

    // The same guest and streams under Vireo print the same lines.
    let sock = PacketSocket::open(&ns, "vtapq", ETHERTYPE);
    let mut vm = Vireo::guest(&cmdline, &["--net", "tap=vtapq,mac=52:54:00:12:34:56"]);
    ns.enter_on_exec(&mut vm.cmd);
    let vm = vm.spawn();
    expect_frames(&sock, &out_frames);
    for f in &in_frames {
        sock.send(f);
    }
    let serial = vm.wait_serial("vireo-guest: result", T);
    for prefix in [
        "net mac=",
        "net sent=",
        "net received=",
        "vireo-guest: result",
    ] {
        assert_eq!(
            serial_line(&serial, prefix),
            serial_line(&qemu, prefix),
            "{prefix}"
        );
    }
}

#[test]
fn a_live_migration_hands_the_tap_to_the_destination_and_traffic_continues() {
    if skip_unless_root() {
        return;
    }
    let ns = NetNs::new("net-mig");
    ns.add_tap("vtapm");
    let sock = PacketSocket::open(&ns, "vtapm", ETHERTYPE);
    let (seed, out_n, in_n) = (9u64, 6u32, 30u32);
    let dir = tempfile::tempdir().unwrap();
    let (src_sock, dst_sock) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    let mut src = Vireo::guest(
        &format!("test=net send={out_n} recv={in_n} seed={seed} len=900 ms=60000"),
        // No mac=: the VMM picks one, and the migration must keep it.
        &[
            "--net",
            "tap=vtapm,id=lan0",
            "--api-socket",
            src_sock.to_str().unwrap(),
        ],
    );
    ns.enter_on_exec(&mut src.cmd);
    let src = src.spawn();
    wait_for_socket(&src_sock, T);
    let mac_of = |sock: &std::path::Path| {
        let (_, info) = api(sock, "GET", "vm.info", None);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        v["config"]["nets"][0]["mac"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let mac = mac_of(&src_sock);
    assert!(mac.starts_with("52:54:00:"), "{mac}");
    assert_eq!(wait_line(&src, "net mac="), format!("net mac={mac}"));
    let mut mac_bytes = [0u8; 6];
    for (b, h) in mac_bytes.iter_mut().zip(mac.split(':')) {
        *b = u8::from_str_radix(h, 16).unwrap();
    }
    let (out_frames, _, _) = guest_stream(seed, out_n, 900, mac_bytes);
    expect_frames(&sock, &out_frames);
    wait_line(&src, "net sent=");

    let dst_serial = dir.path().join("dst.log");
    let mut dst = Command::new(bin("vireo"));
    dst.arg("--api-socket")
        .arg(&dst_sock)
        .arg("--serial")
        .arg(format!("file={}", dst_serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    ns.enter_on_exec(&mut dst);
    let dst = dst.spawn().unwrap();
    wait_for_socket(&dst_sock, T);
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    let (s, b) = api(
        &dst_sock,
        "PUT",
        "vm.receive-migration",
        Some(&format!(
            r#"{{"receiver_url":"{url}"{}}}"#,
            vireo_e2e::config_field_of(&src_sock)
        )),
    );
    assert_eq!(s, 204, "{b}");
    let (s, b) = api(
        &src_sock,
        "PUT",
        "vm.send-migration",
        Some(&format!(r#"{{"destination_url":"{url}"}}"#)),
    );
    assert_eq!(s, 204, "{b}");
    let src_out = src.wait(T);
    assert_eq!(
        src_out.status.code(),
        Some(0),
        "source: {}",
        String::from_utf8_lossy(&src_out.stderr)
    );
    let start = std::time::Instant::now();
    while !api(&dst_sock, "GET", "vm.info", None)
        .1
        .contains("\"Running\"")
    {
        assert!(start.elapsed() < T, "the migrated VM never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The destination owns the tap now: the guest gets the host's frames there.
    let (in_frames, in_bytes, in_crc) = host_stream(seed, in_n, 900);
    for f in &in_frames {
        sock.send(f);
    }
    let out = wait_with_timeout(dst, T);
    let serial = std::fs::read_to_string(&dst_serial).unwrap_or_default();
    assert!(
        serial.contains("vireo-guest: result ok"),
        "destination guest: {serial}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !serial.contains("net mac="),
        "the guest must not start over"
    );
    let got = serial_line(&serial, "net received=");
    assert_eq!(field(got, "bytes"), in_bytes.to_string(), "{got}");
    assert_eq!(field(got, "crc32"), format!("{in_crc:08x}"), "{got}");
    assert_eq!(out.status.code(), Some(0));
}
