//! A real etcd cluster for tests: `n` members of Debian's `etcd` on loopback ports, each
//! with its own data directory in a temporary directory, killed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One member of a test cluster.
struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    _dir: tempfile::TempDir,
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
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
        assert!(have_etcd(), "etcd is not installed: run scripts/setup");
        for _ in 0..2 {
            let cluster = Self::launch(ip, n);
            if cluster.wait_healthy_unless_a_port_was_taken() {
                return cluster;
            }
        }
        let cluster = Self::launch(ip, n);
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

    fn launch(ip: &str, n: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("http://{ip}:{}", free_port()),
                peer_url: format!("http://{ip}:{}", free_port()),
                data_dir: dir.path().join(format!("m{i}")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
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
        let child = Command::new("/usr/bin/etcd")
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
        Command::new("/usr/bin/etcdctl")
            .env("ETCDCTL_API", "3")
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

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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
