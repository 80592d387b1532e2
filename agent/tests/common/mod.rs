//! Harness for the agent's end-to-end tests: a real vireod on a temporary state and
//! run directory, real `vireo` processes booting the PVH test guest, and vireoctl.
//! Everything a test starts is killed when its [`Daemon`] is dropped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod caller;
pub mod pki;
pub mod replica_hosts;
pub mod writer;

pub const T: Duration = Duration::from_secs(60);

pub struct Daemon {
    pub child: Option<Child>,
    /// This vireod's CPU cgroup root (removed on drop).
    pub cgroup_root: PathBuf,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub args: Vec<String>,
    /// The network namespace vireod (and so its VMMs) runs in, if not the host's.
    pub netns: Option<std::sync::Arc<vireo_e2e::netns::NetNs>>,
    /// Environment for vireod, which its VMMs inherit (e.g. `vireo`'s test hooks).
    pub env: Vec<(String, String)>,
    /// A program (and its arguments) that runs vireod: `wrapper... vireod ARGS`.
    pub wrapper: Vec<String>,
}

pub fn bin(name: &str) -> PathBuf {
    vireo_e2e::bin(name)
}

impl Daemon {
    /// vireod with a fast metering period and `extra` flags.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with_netns(extra, None)
    }

    /// [`Daemon::start`] with vireod run by `wrapper` (`wrapper... vireod ARGS`).
    pub fn start_wrapped(extra: &[&str], wrapper: &[&str]) -> Self {
        Self::make(extra, None, wrapper)
    }

    /// [`Daemon::start`] inside a network namespace (its VMMs' taps live there).
    pub fn start_in_netns(extra: &[&str], ns: std::sync::Arc<vireo_e2e::netns::NetNs>) -> Self {
        Self::start_with_netns(extra, Some(ns))
    }

    /// Two vireods of this host that may migrate VMs to each other (each names the
    /// other's socket with `--peer-socket`).
    pub fn pair(src_extra: &[&str], dst_extra: &[&str]) -> (Self, Self) {
        let mut src = Self::prepare(src_extra, None);
        let mut dst = Self::prepare(dst_extra, None);
        src.args.push("--peer-socket".into());
        src.args.push(dst.socket.display().to_string());
        dst.args.push("--peer-socket".into());
        dst.args.push(src.socket.display().to_string());
        src.spawn();
        dst.spawn();
        (src, dst)
    }

    /// [`Daemon::start_in_netns`] with vireod run by `wrapper` (`env VAR=...`).
    pub fn start_in_netns_wrapped(
        extra: &[&str],
        ns: std::sync::Arc<vireo_e2e::netns::NetNs>,
        wrapper: &[&str],
    ) -> Self {
        Self::make(extra, Some(ns), wrapper)
    }

    fn start_with_netns(
        extra: &[&str],
        netns: Option<std::sync::Arc<vireo_e2e::netns::NetNs>>,
    ) -> Self {
        Self::make(extra, netns, &[])
    }

    fn make(
        extra: &[&str],
        netns: Option<std::sync::Arc<vireo_e2e::netns::NetNs>>,
        wrapper: &[&str],
    ) -> Self {
        let mut d = Self::prepare(extra, netns);
        d.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        d.spawn();
        d
    }

    /// A vireod's directories and flags, not started yet.
    fn prepare(extra: &[&str], netns: Option<std::sync::Arc<vireo_e2e::netns::NetNs>>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vd")
            .tempdir()
            .expect("tempdir");
        // Each test's vireod has its own cgroup root, so that parallel tests with the
        // same VM names do not share cgroups.
        let cgroup_root = Path::new(CGROUP_TEST_ROOT).join(
            dir.path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        Daemon {
            child: None,
            cgroup_root,
            socket: dir.path().join("run/vireod.sock"),
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            dir,
            args: extra.iter().map(|s| s.to_string()).collect(),
            netns,
            env: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    /// (Re)starts the vireod process with the same directories and flags.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "vireod already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("vireod.log"))
            .expect("vireod log");
        let mut cgroup = Vec::new();
        if !self.args.iter().any(|a| a == "--cpu-cgroup-root") {
            realtime_budget_for_test_roots();
            cgroup.push("--cpu-cgroup-root".into());
            cgroup.push(self.cgroup_root.clone().into_os_string());
        }
        // Storage roots: this test's directory and the test guest's (its kernel).
        if !self.args.iter().any(|a| a == "--storage-root") {
            cgroup.push("--storage-root".into());
            cgroup.push(self.dir.path().as_os_str().to_owned());
            cgroup.push("--storage-root".into());
            cgroup.push(guest_dir().into_os_string());
        }
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("vireod"));
                c
            }
            None => Command::new(bin("vireod")),
        };
        if let Some(ns) = &self.netns {
            ns.enter_on_exec(&mut cmd);
        }
        // The VMM binary, unless the test gives its own (a wrapper).
        if !self.args.iter().any(|a| a == "--vireo-bin") {
            cmd.arg("--vireo-bin").arg(bin("vireo"));
        }
        let child = cmd
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("--meter-interval-ms")
            .arg("100")
            .args(&cgroup)
            .args(&self.args)
            .env("RUST_LOG", "info,cluster=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn vireod");
        self.child = Some(child);
        let start = Instant::now();
        while UnixStream::connect(&self.socket).is_err() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("vireod exited with {st}:\n{}", self.log());
                }
            }
            assert!(
                start.elapsed() < T,
                "vireod socket never came up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vireod.log")).unwrap_or_default()
    }

    /// The log once it holds `needle`: a server writes its line about a
    /// refusal after the client has already seen the refusal.
    pub fn wait_log(&self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(start.elapsed() < T, "no {needle:?} in the log:\n{log}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL to vireod (its VMs keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM to vireod; waits for it to exit and returns its status code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take().expect("vireod running");
        // SAFETY: kill on the pid of our own unreaped child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                panic!("vireod did not exit after SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        http(&self.socket, method, path, body)
    }

    /// An API call that must succeed; returns its JSON (Null for 204).
    pub fn ok(&self, method: &str, path: &str, body: Option<&str>) -> Value {
        let (s, b) = self.api(method, path, body);
        assert!(
            (200..300).contains(&s),
            "{method} {path}: {s} {b}\nvireod log:\n{}",
            self.log()
        );
        serde_json::from_str(&b).unwrap_or(Value::Null)
    }

    /// Asks for a live migration; returns the record (202).
    pub fn migrate(&self, name: &str, body: &Value) -> Value {
        let (s, b) = self.api(
            "PUT",
            &format!("/api/v1/vms/{name}/migrate"),
            Some(&body.to_string()),
        );
        assert_eq!(s, 202, "migrate {name}: {b}\nvireod log:\n{}", self.log());
        serde_json::from_str(&b).unwrap()
    }

    pub fn migration(&self, id: &str) -> Value {
        self.ok("GET", &format!("/api/v1/migrations/{id}"), None)
    }

    pub fn migrations(&self) -> Vec<Value> {
        self.ok("GET", "/api/v1/migrations", None)
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until migration `id` has finished; returns its record.
    pub fn wait_migration(&self, id: &str, timeout: Duration) -> Value {
        let start = Instant::now();
        loop {
            let m = self.migration(id);
            if ["completed", "failed", "cancelled"].contains(&m["state"].as_str().unwrap_or("")) {
                return m;
            }
            assert!(
                start.elapsed() < timeout,
                "migration {id} did not finish: {m}\nvireod log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// 404 for `name`: not defined here.
    pub fn absent(&self, name: &str) -> bool {
        self.api("GET", &format!("/api/v1/vms/{name}"), None).0 == 404
    }

    pub fn vm(&self, name: &str) -> Value {
        self.ok("GET", &format!("/api/v1/vms/{name}"), None)
    }

    pub fn state(&self, name: &str) -> String {
        self.vm(name)["state"].as_str().unwrap_or("").to_string()
    }

    pub fn pid(&self, name: &str) -> Option<i32> {
        self.vm(name)["pid"].as_i64().map(|p| p as i32)
    }

    /// Waits until `name` is in `state`.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Value {
        let start = Instant::now();
        loop {
            let v = self.vm(name);
            if v["state"] == state {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "{name} never became {state}: {v}\nvireod log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Defines a VM running the counter guest (32 MiB).
    pub fn define_counter(&self, name: &str, priority: &str, restart: &str) {
        let def = json!({
            "config": counter_config(),
            "priority": priority,
            "restart": restart,
        });
        self.ok(
            "PUT",
            &format!("/api/v1/vms/{name}"),
            Some(&def.to_string()),
        );
    }

    pub fn serial(&self, name: &str) -> String {
        std::fs::read_to_string(self.state_dir.join("vms").join(name).join("serial.log"))
            .unwrap_or_default()
    }

    /// Waits until the guest's serial output contains `needle`.
    pub fn wait_serial(&self, name: &str, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let s = self.serial(name);
            if s.contains(needle) {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "{name}: no {needle:?} on serial; got:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The tick numbers on the guest's serial (`tick N ...` lines of test=counter).
    /// Only complete lines count (the guest writes byte by byte; a migrated guest's
    /// new serial file may also start in the middle of a line).
    pub fn tick_numbers(&self, name: &str) -> Vec<u64> {
        let mut text = self.serial(name);
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
        text.lines()
            .filter_map(|l| l.strip_prefix("tick "))
            .filter_map(|r| r.split_whitespace().next().and_then(|n| n.parse().ok()))
            .collect()
    }

    pub fn ticks(&self, name: &str) -> usize {
        self.serial(name)
            .lines()
            .filter(|l| l.starts_with("tick "))
            .count()
    }

    /// Runs vireoctl against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("vireoctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run vireoctl")
    }

    /// vireoctl that must succeed; returns its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            o.status.success(),
            "vireoctl {args:?}: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Every process whose command line mentions this test's directory (vireod and
    /// the VMMs it started).
    pub fn processes(&self) -> Vec<i32> {
        processes_mentioning(&self.dir.path().to_string_lossy())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        let pids = self.processes();
        for &pid in &pids {
            // SAFETY: kill with a pid and a signal; the pid was just read from /proc.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for pid in pids {
            let start = Instant::now();
            while alive(pid) && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // A killed VMM leaves its cgroup only once it is reaped (by init, its parent
        // vireod being dead): retry for a while.
        let start = Instant::now();
        while self.cgroup_root.exists() && start.elapsed() < Duration::from_secs(10) {
            remove_cgroup_tree(&self.cgroup_root);
            if self.cgroup_root.exists() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Where the tests' vireods put their CPU cgroups.
pub const CGROUP_TEST_ROOT: &str = "/sys/fs/cgroup/cpu/vireo-test";

/// Gives [`CGROUP_TEST_ROOT`] a real-time budget to hand to each test vireod's root
/// (where the kernel schedules real-time threads by group, a group has none unless
/// its parent gives it some; a host's `--cpu-cgroup-root` sits directly under the
/// hierarchy's root, which has it). As much as the hierarchy lets it have, from 80 %
/// of each period down.
fn realtime_budget_for_test_roots() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        let root = Path::new(CGROUP_TEST_ROOT);
        let file = root.join("cpu.rt_runtime_us");
        if std::fs::create_dir_all(root).is_err() || !file.exists() {
            return;
        }
        for us in [800_000, 600_000, 400_000, 200_000] {
            if std::fs::write(&file, us.to_string()).is_ok() {
                return;
            }
        }
    });
}

/// Removes a cgroup directory and its children (cgroup directories are removed with
/// rmdir, deepest first; their files are not real files).
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let me = std::process::id() as i32;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me || !alive(pid) {
                continue;
            }
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}

/// Alive and not a zombie.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().chars().next()))
        .flatten()
        .is_some_and(|c| c != 'Z' && c != 'X')
}

/// Waits until every thread of `pid` is stopped (SIGSTOP takes effect on each thread
/// only when it next runs: on a loaded host, a while after `kill` returned).
pub fn wait_stopped(pid: i32, timeout: Duration) {
    let state = |stat: &str| {
        stat.rfind(')')
            .and_then(|i| stat[i + 1..].trim_start().chars().next())
    };
    let all_stopped = || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| state(&s))
                .is_some_and(|c| c == 'T' || c == 't')
        })
    };
    let start = Instant::now();
    while !all_stopped() {
        assert!(start.elapsed() < timeout, "pid {pid} never stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn wait_dead(pid: i32, timeout: Duration) {
    let start = Instant::now();
    while alive(pid) {
        assert!(start.elapsed() < timeout, "pid {pid} still alive");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The directory of the test guest kernel (a storage root of every test's vireod).
pub fn guest_dir() -> PathBuf {
    vireo_e2e::guest()
        .parent()
        .expect("guest kernel directory")
        .to_path_buf()
}

pub fn counter_config() -> Value {
    json!({
        "payload": {"kernel": vireo_e2e::guest(), "cmdline": "test=counter period_ms=10"},
        "memory": {"size": 32u64 << 20},
    })
}

/// One HTTP/1.1 exchange over a unix socket.
pub fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send request");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read response");
    parse_response(&String::from_utf8_lossy(&resp))
}

/// The status and the (de-chunked) body of an HTTP/1.1 response.
pub fn parse_response(resp: &str) -> (u16, String) {
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((resp, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A server-sent events subscription: yields the JSON of each event.
pub struct Events {
    reader: BufReader<UnixStream>,
}

impl Events {
    pub fn subscribe(socket: &Path, query: &str) -> Self {
        let mut s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(T)).ok();
        let req = format!("GET /api/v1/events{query} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        s.write_all(req.as_bytes()).expect("send");
        let mut reader = BufReader::new(s);
        // Skip the response head.
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line).expect("read head");
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        Events { reader }
    }

    /// The next event (chunk framing lines are skipped).
    pub fn next(&mut self) -> Value {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line).expect("read event");
            assert!(n > 0, "event stream closed");
            if let Some(data) = line.trim_end().strip_prefix("data:") {
                return serde_json::from_str(data.trim()).expect("event JSON");
            }
        }
    }

    /// Events until one with `event == until` for `vm`; returns all of them.
    pub fn until(&mut self, vm: &str, until: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let e = self.next();
            let done = e["vm"] == vm && e["event"] == until;
            seen.push(e);
            if done {
                return seen;
            }
        }
    }
}

/// A cluster node's vireod flags: no autostart, the etcd endpoints, its name, and the
/// shared directory and the test guests as storage roots.
pub fn cluster_node_args(eps: &str, name: &str, shared: &Path) -> Vec<String> {
    [
        "--no-autostart",
        "--cluster-etcd",
        eps,
        "--node-name",
        name,
        "--storage-root",
        &shared.display().to_string(),
        "--storage-root",
        &guest_dir().display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// [`cluster_node_args`] for a node of a loopback test cluster, whose etcd runs in clear
/// (`--cluster-etcd-insecure`; the three-host tests run theirs over mutual TLS).
pub fn loopback_cluster_node_args(eps: &str, name: &str, shared: &Path) -> Vec<String> {
    let mut args = cluster_node_args(eps, name, shared);
    args.push("--cluster-etcd-insecure".into());
    args
}

/// [`Daemon::start`] with owned arguments.
pub fn start_with(args: &[String]) -> Daemon {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start(&refs)
}
