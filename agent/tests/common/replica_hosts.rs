//! Two hosts for Vireo Replica's end-to-end tests: network namespaces joined by a
//! veth pair (10.77.0.1 ↔ 10.77.0.2), a replica vireod (host-b) and a primary vireod
//! (host-a) whose VM vm1 runs the writer guest on two raw disks with change logs and
//! replicates to host-b every second.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use vireo_e2e::netns::NetNs;

use super::pki::{tls_args, Pki};
use super::writer::start_writer_vm_on;
use super::{Daemon, T};

pub const A_IP: &str = "10.77.0.1";
pub const B_IP: &str = "10.77.0.2";
pub const PEER_PORT: u16 = 7443;

/// How [`Hosts`] are made beyond the defaults.
#[derive(Default)]
pub struct Options<'a> {
    /// host-a is a replica server too (for host-b, into this directory): the reverse
    /// direction.
    pub a_replicas: Option<&'a Path>,
    /// host-b's replica directory is a tmpfs of this many bytes of its own (a
    /// replica disk that can fill up).
    pub b_tmpfs: Option<u64>,
    /// Filler in each disk (bytes that do not compress, from `writer::FILL_FROM`).
    pub fill: bool,
    /// More arguments for `vireoctl replica enable vm1`.
    pub enable: &'a [&'a str],
    /// Do not enable replication (the test does, with [`Hosts::enable`]).
    pub skip_enable: bool,
    /// vm1's start priority on host-a (default Off: not started automatically).
    pub priority: Option<&'a str>,
    /// vm1's disks are dynamic VHDX images (`writer::start_writer_vm_on`).
    pub vhdx: bool,
}

/// A tmpfs mounted for a test, unmounted when dropped.
pub struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Two hosts: namespaces joined by a veth pair, a replica vireod in B, a primary
/// vireod in A with VM vm1 (two raw disks with change logs) running the writer guest.
pub struct Hosts {
    pub a: Daemon,
    pub b: Daemon,
    pub ns_a: Arc<NetNs>,
    pub ns_b: Arc<NetNs>,
    _pki: Pki,
    /// host-a's identity (the primary's).
    pub a_id: agent::hosttls::IdentityFiles,
    pub b_id: agent::hosttls::IdentityFiles,
    /// B's replica directory.
    pub replicas: PathBuf,
    /// The tmpfs under it, if any (dropped after the daemons).
    _mount: Option<Mount>,
    _store: tempfile::TempDir,
    /// vm1's disk images on A.
    pub images: Vec<PathBuf>,
}

/// Starts `args` as a vireod in `ns` and waits until its peer listener at `addr`
/// takes connections.
pub fn listening_daemon(args: &[String], ns: &Arc<NetNs>, addr: &str) -> Daemon {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_in_netns(&refs, ns.clone());
    ns.run(|| {
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                start.elapsed() < T,
                "the peer listener at {addr} never came up"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    });
    d
}

impl Hosts {
    pub fn new(tag: &str) -> Self {
        Self::build(tag, Options::default())
    }

    /// With `a_replicas`, host-a is a replica server too (for host-b, into that
    /// directory): the reverse direction.
    pub fn with(tag: &str, a_replicas: Option<&Path>) -> Self {
        Self::build(
            tag,
            Options {
                a_replicas,
                fill: a_replicas.is_some(),
                ..Default::default()
            },
        )
    }

    pub fn build(tag: &str, opts: Options) -> Self {
        let a_replicas = opts.a_replicas;
        let ns_a = Arc::new(NetNs::new(&format!("{tag}a")));
        let ns_b = Arc::new(NetNs::new(&format!("{tag}b")));
        // The veth ends are made in the namespaces: no name is shared with another test.
        let out = std::process::Command::new("ip")
            .args(["link", "add", "va", "netns", ns_a.name(), "type", "veth"])
            .args(["peer", "name", "vb", "netns", ns_b.name()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (ns, dev, ip) in [(&ns_a, "va", A_IP), (&ns_b, "vb", B_IP)] {
            ns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", dev]);
            ns.exec(&["ip", "link", "set", dev, "up"]);
            ns.exec(&["ip", "link", "set", "lo", "up"]);
        }
        let pki = Pki::new();
        let store = tempfile::Builder::new()
            .prefix("replicas")
            .tempdir()
            .unwrap();
        let replicas = store.path().join("replicas");
        let mount = opts.b_tmpfs.map(|size| {
            std::fs::create_dir(&replicas).unwrap();
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0700"))
                .arg("tmpfs")
                .arg(&replicas)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Mount(replicas.clone())
        });
        let addr = format!("{B_IP}:{PEER_PORT}");
        let mut args = vec![
            "--no-autostart".to_string(),
            "--listen".into(),
            addr.clone(),
        ];
        let b_id = pki.host("host-b");
        args.extend(tls_args(&b_id));
        args.extend(["--peer".into(), "host-a".into()]);
        args.extend(["--replica-dir".into(), replicas.display().to_string()]);
        args.extend(["--replica-allow".into(), "host-a".into()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let b = Daemon::start_in_netns(&refs, ns_b.clone());
        ns_b.run(|| {
            let start = std::time::Instant::now();
            while std::net::TcpStream::connect(&addr).is_err() {
                assert!(start.elapsed() < T, "B's peer listener never came up");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        });

        let a_id = pki.host("host-a");
        let mut args = tls_args(&a_id);
        args.push("--no-autostart".into());
        let a = match a_replicas {
            None => {
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                Daemon::start_in_netns(&refs, ns_a.clone())
            }
            Some(dir) => {
                let a_addr = format!("{A_IP}:{PEER_PORT}");
                args.extend(["--listen".into(), a_addr.clone()]);
                args.extend(["--peer".into(), "host-b".into()]);
                args.extend(["--replica-dir".into(), dir.display().to_string()]);
                args.extend(["--replica-allow".into(), "host-b".into()]);
                listening_daemon(&args, &ns_a, &a_addr)
            }
        };
        let disks_dir = a.dir.path().join("disks");
        let images = start_writer_vm_on(&a, &disks_dir, false, opts.fill, opts.priority, opts.vhdx);
        let h = Hosts {
            a,
            b,
            ns_a,
            ns_b,
            _pki: pki,
            a_id,
            b_id,
            replicas,
            _mount: mount,
            _store: store,
            images,
        };
        if !opts.skip_enable {
            h.ctl_ok(h.enable_args(opts.enable));
        }
        h
    }

    /// `vireoctl replica enable vm1 --to host-b ... --interval 1s` and `extra`.
    pub fn enable_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "replica",
            "enable",
            "vm1",
            "--to",
            &format!("{B_IP}:{PEER_PORT}"),
            "--to-name",
            "host-b",
            "--interval",
            "1s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Runs vireoctl against host-a, which must succeed.
    pub fn ctl_ok(&self, args: Vec<String>) -> String {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.a.ctl_ok(&refs)
    }

    /// Bytes host-a's end of the link has sent (the kernel's count, TCP/IP headers
    /// included).
    pub fn a_tx_bytes(&self) -> u64 {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", self.ns_a.name()])
            .args(["cat", "/sys/class/net/va/statistics/tx_bytes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    /// host-a's TCP counters (/proc/net/snmp in its namespace): connections opened,
    /// segments sent and retransmitted, and its link's packets: what explains the
    /// link's bytes beyond the limiter's.
    pub fn a_tcp_counters(&self) -> TcpCounters {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", self.ns_a.name()])
            .args([
                "cat",
                "/proc/net/snmp",
                "/sys/class/net/va/statistics/tx_packets",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next().unwrap_or(""), tcp.next().unwrap_or(""));
        let field = |name: &str| -> u64 {
            names
                .split_whitespace()
                .position(|n| n == name)
                .and_then(|i| values.split_whitespace().nth(i))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        TcpCounters {
            opens: field("ActiveOpens"),
            out_segs: field("OutSegs"),
            retrans_segs: field("RetransSegs"),
            tx_packets: text
                .lines()
                .last()
                .and_then(|l| l.trim().parse().ok())
                .unwrap_or(0),
        }
    }

    /// Bytes host-a's TCP sockets hold unacknowledged or unsent (`tx_queue` of
    /// /proc/net/tcp{,6} in its namespace): written before a limit changed, they go out
    /// at the link's speed whatever the new limit.
    pub fn a_tcp_send_queue(&self) -> u64 {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", self.ns_a.name()])
            .args(["cat", "/proc/net/tcp", "/proc/net/tcp6"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let queues = l.split_whitespace().nth(4)?;
                let (tx, _) = queues.split_once(':')?;
                u64::from_str_radix(tx, 16).ok()
            })
            .sum()
    }

    pub fn replication(&self) -> Value {
        self.a.ok("GET", "/api/v1/vms/vm1/replication", None)
    }

    /// Waits until A's replication of vm1 satisfies `done`.
    pub fn wait(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let start = std::time::Instant::now();
        loop {
            let v = self.replication();
            if done(&v) {
                return v;
            }
            assert!(
                start.elapsed() < T * 3,
                "{what}: {v}\nA's log:\n{}",
                self.a.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn replica_image(&self, disk: usize) -> Vec<u8> {
        std::fs::read(
            self.replicas
                .join("host-a/vm1")
                .join(format!("disk-{disk}.img")),
        )
        .unwrap()
    }

    /// The last `rw n=N` A's guest printed.
    pub fn last_write(&self) -> u64 {
        last_rw(&self.a.serial("vm1"))
    }
}

pub fn last_rw(serial: &str) -> u64 {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("rw n="))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// host-a's TCP counters, see [`Hosts::a_tcp_counters`].
#[derive(Debug, Clone, Copy)]
pub struct TcpCounters {
    pub opens: u64,
    pub out_segs: u64,
    pub retrans_segs: u64,
    pub tx_packets: u64,
}

impl std::ops::Sub for TcpCounters {
    type Output = TcpCounters;
    fn sub(self, o: TcpCounters) -> TcpCounters {
        TcpCounters {
            opens: self.opens.saturating_sub(o.opens),
            out_segs: self.out_segs.saturating_sub(o.out_segs),
            retrans_segs: self.retrans_segs.saturating_sub(o.retrans_segs),
            tx_packets: self.tx_packets.saturating_sub(o.tx_packets),
        }
    }
}

/// The replication status of vm1 on `d` once it satisfies `done`.
pub fn wait_on(d: &Daemon, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = std::time::Instant::now();
    loop {
        let (s, body) = d.api("GET", "/api/v1/vms/vm1/replication", None);
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if s == 200 && done(&v) {
            return v;
        }
        assert!(start.elapsed() < T * 3, "{what}: {body}\nlog:\n{}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// vm1's disk paths in `d`'s definition.
pub fn disk_paths(d: &Daemon) -> Vec<PathBuf> {
    let def = d.ok("GET", "/api/v1/vms/vm1", None);
    def["definition"]["config"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d["path"].as_str().unwrap()))
        .collect()
}
