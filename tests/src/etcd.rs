//! A real etcd cluster for tests: `n` members of Debian's `etcd` on loopback ports (or
//! each in its own network namespace, as on separate hosts), each with its own data
//! directory in a temporary directory, killed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use crate::netns::NetNs;
use std::time::{Duration, Instant};

/// One member of a test cluster.
struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// The network namespace it runs in (its "host"), if not the test's.
    netns: Option<Arc<NetNs>>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    tls: Option<EtcdTlsFiles>,
    _dir: tempfile::TempDir,
}

/// Mutual TLS for a cluster's members (clients and peers): the CA every certificate
/// comes from, and member i's certificate and key (naming its address), which etcdctl
/// presents as a client too.
#[derive(Clone, Debug)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub members: Vec<(PathBuf, PathBuf)>,
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// Where members keep their data: tmpfs when the machine has one.
fn data_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Whether etcd is installed (scripts/setup installs it).
pub fn have_etcd() -> bool {
    Path::new("/usr/bin/etcd").exists() && Path::new("/usr/bin/etcdctl").exists()
}

impl EtcdCluster {
    /// Starts `n` members on `ip` (e.g. "127.0.0.1") and waits until every one is healthy.
    pub fn start(n: usize) -> Self {
        Self::start_on("127.0.0.1", n)
    }

    /// As [`EtcdCluster::start`], listening on `ip` (an address of this namespace).
    /// Ports are picked free and bound by etcd a moment later: when another process
    /// took one meanwhile ("address already in use"), the cluster starts again on new
    /// ports (at most three times).
    pub fn start_on(ip: &str, n: usize) -> Self {
        Self::start_members((0..n).map(|_| (ip.to_string(), None)).collect(), None)
    }

    /// One member per `(address, namespace)`: member i listens on ports 2379/2380 of
    /// its address inside its namespace.
    pub fn start_in_namespaces(hosts: &[(String, Arc<NetNs>)]) -> Self {
        Self::start_members(
            hosts
                .iter()
                .map(|(ip, ns)| (ip.clone(), Some(ns.clone())))
                .collect(),
            None,
        )
    }

    /// [`EtcdCluster::start_in_namespaces`] over mutual TLS (`https://`, clients and
    /// peers must present a certificate of `tls.ca`): as a cluster's etcd runs.
    pub fn start_in_namespaces_tls(hosts: &[(String, Arc<NetNs>)], tls: EtcdTlsFiles) -> Self {
        assert_eq!(tls.members.len(), hosts.len(), "one certificate per member");
        Self::start_members(
            hosts
                .iter()
                .map(|(ip, ns)| (ip.clone(), Some(ns.clone())))
                .collect(),
            Some(tls),
        )
    }

    fn start_members(hosts: Vec<(String, Option<Arc<NetNs>>)>, tls: Option<EtcdTlsFiles>) -> Self {
        assert!(have_etcd(), "etcd is not installed: run scripts/setup");
        for _ in 0..2 {
            let cluster = Self::launch(hosts.clone(), tls.clone());
            if cluster.wait_healthy_unless_a_port_was_taken() {
                return cluster;
            }
        }
        let cluster = Self::launch(hosts, tls);
        cluster.wait_healthy();
        cluster
    }

    /// Waits as [`EtcdCluster::wait_healthy`] does; false as soon as a member could not
    /// bind its port.
    fn wait_healthy_unless_a_port_was_taken(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.logs().contains("address already in use") {
                return false;
            }
            let out = self.etcdctl(&self.endpoints_arg(), &["endpoint", "health"]);
            if out.status.success() {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn launch(hosts: Vec<(String, Option<Arc<NetNs>>)>, tls: Option<EtcdTlsFiles>) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let n = hosts.len();
        // In memory: etcd fsyncs its log on every write, and on this shared machine's
        // busy disk one fsync can stall the leader's raft loop for over a second (its
        // log: "failed to send out heartbeat on time ... 1.3s"), which no lease
        // renewal survives. Production etcd wants a fast dedicated disk for the same
        // reason (docs/cluster.md).
        let dir = tempfile::Builder::new()
            .prefix("vireo-etcd")
            .tempdir_in(data_root())
            .expect("tempdir");
        let members: Vec<Member> = hosts
            .into_iter()
            .enumerate()
            .map(|(i, (ip, netns))| {
                let (client, peer) = match netns {
                    Some(_) => (2379, 2380),
                    None => (free_port(), free_port()),
                };
                Member {
                    name: format!("m{i}"),
                    client_url: format!("{scheme}://{ip}:{client}"),
                    peer_url: format!("{scheme}://{ip}:{peer}"),
                    data_dir: dir.path().join(format!("m{i}")),
                    log: dir.path().join(format!("m{i}.log")),
                    child: None,
                    netns,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            tls,
            _dir: dir,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("etcd log");
        let token = format!("vireo-test-{}", std::process::id());
        // At a real-time priority, as a host would reserve CPU for its etcd (etcd's
        // tuning guide: raise its CPU priority under contention): on this shared
        // 2-core machine a normal-priority leader can go 1.3 s without running, which
        // no 2 s lease survives.
        // (Root only: a normal user may not.)
        let mut cmd = if crate::netns::is_root() {
            let mut c = Command::new("/usr/bin/chrt");
            c.args(["--rr", "5", "/usr/bin/etcd"]);
            c
        } else {
            Command::new("/usr/bin/etcd")
        };
        if let Some(ns) = &m.netns {
            ns.enter_on_exec(&mut cmd);
        }
        if m.netns.is_some() {
            // Members on "separate hosts" elect a new leader within the nodes' fencing
            // window (TTL 2 s − margin 0.5 s − one renewal period = 1 s at worst):
            // heartbeat 50 ms, election timeout 300 ms (a follower campaigns after
            // 300–600 ms). etcd's defaults (100/1000 ms) leave too little, and so did
            // 500 ms: an election 1.25 s after the kill missed a renewal by 3 ms
            // (docs/cluster.md). Safe from spurious elections only because the members
            // run at real-time priority (above).
            cmd.args(["--heartbeat-interval", "50", "--election-timeout", "300"]);
        }
        if let Some(tls) = &self.tls {
            let (cert, key) = &tls.members[i];
            cmd.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--peer-client-cert-auth")
                .arg("--peer-trusted-ca-file")
                .arg(&tls.ca)
                .arg("--peer-cert-file")
                .arg(cert)
                .arg("--peer-key-file")
                .arg(key);
        }
        let child = cmd
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &token])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        m.child = Some(child);
    }

    /// The members' client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The client URLs joined with commas (what `--cluster-etcd` takes).
    pub fn endpoints_arg(&self) -> String {
        self.endpoints().join(",")
    }

    fn etcdctl(&self, endpoints: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("/usr/bin/etcdctl");
        // From a member's namespace (the others are reachable from there, as long as
        // the namespaces are joined).
        if let Some(ns) = self
            .members
            .iter()
            .find(|m| m.client_url == endpoints.split(',').next().unwrap_or(""))
            .and_then(|m| m.netns.as_ref())
        {
            ns.enter_on_exec(&mut cmd);
        }
        if let Some(tls) = &self.tls {
            let (cert, key) = &tls.members[0];
            cmd.arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(cert)
                .arg("--key")
                .arg(key);
        }
        cmd.env("ETCDCTL_API", "3")
            .args(["--endpoints", endpoints, "--command-timeout=2s"])
            .args(args)
            .output()
            .expect("run etcdctl")
    }

    /// Waits (up to a minute: a loaded machine is slow, never a timing assertion) until
    /// every running member answers healthy.
    pub fn wait_healthy(&self) {
        let running: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client_url.clone())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.etcdctl(&running.join(","), &["endpoint", "health"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The index of the current leader among the members.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() {
                    continue;
                }
                let out = self.etcdctl(&m.client_url, &["endpoint", "status", "-w", "json"]);
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                    continue;
                };
                let st = &v[0]["Status"];
                if st["leader"].as_u64().is_some() && st["leader"] == st["header"]["member_id"] {
                    return i;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no etcd leader:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every running member's `endpoint status` (etcdctl's JSON: `Status.dbSize`,
    /// `Status.dbSizeInUse`, `Status.header.revision`, ...).
    pub fn status(&self) -> Vec<serde_json::Value> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .filter_map(|m| {
                let out = self.etcdctl(&m.client_url, &["endpoint", "status", "-w", "json"]);
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                Some(v[0]["Status"].clone())
            })
            .collect()
    }

    /// How many keys start with `prefix`.
    pub fn key_count(&self, prefix: &str) -> u64 {
        let out = self.etcdctl(
            &self.endpoints_arg(),
            // etcd 3.4's etcdctl has no --count-only; a range's count is its total
            // whatever the limit.
            &[
                "get",
                prefix,
                "--prefix",
                "--keys-only",
                "--limit=1",
                "-w",
                "json",
            ],
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["count"].as_u64())
            .unwrap_or(0)
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops member `i` (SIGSTOP): its connections stay open and it answers nothing, as
    /// a member on a stalled host does, until [`EtcdCluster::thaw`].
    pub fn freeze(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    /// Lets a frozen member go on (SIGCONT).
    pub fn thaw(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    fn signal(&self, i: usize, signal: libc::c_int) {
        let child = self.members[i].child.as_ref().expect("member running");
        let pid = libc::pid_t::try_from(child.id()).expect("a pid");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            r,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Restarts a killed member from its data directory.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_healthy();
    }

    /// Every member's log (for assertion messages).
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let text = std::fs::read_to_string(&m.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {} ---\n{}", m.name, tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
