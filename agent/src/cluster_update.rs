//! vireod's part of Cluster-Aware Updating (`cluster::update`): the hooks an
//! administrator installed (`--update-hooks DIR`), running one on this node when its
//! step has drained it, and the API that starts a run and reports it.
//!
//! Trust: no command text travels. A run names a hook (a plain file name) and bounded
//! arguments; this vireod runs only an executable of its own hooks directory, which
//! like the hook must be owned by root (or vireod's own user) and writable by no group
//! or other user — checked at startup and again before each run. The hook gets its
//! arguments as argv (no shell), a cleared environment (`PATH`, `VIREO_NODE`,
//! `VIREO_UPDATE_RUN`, `VIREO_SOCKET`: this vireod's API socket, to ask it what runs),
//! its own process group (killed at the run's timeout), and its stdout and stderr go
//! to a bounded log (`STATE/updates/RUN-NODE.log`, the last 64 KiB; the last 4 KiB
//! into the run's record).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cluster::update::{self, HookOutcome, NodeAction, Phase, UpdateError, UpdateRequest};
use cluster::{ClusterStore, EtcdStore};
use serde::Deserialize;
use tracing::{info, warn};
use vireo_util::sync::lock;

use crate::cluster_node::ClusterNode;
use crate::supervisor::Supervisor;

/// How often a node looks at the run.
const TICK: Duration = Duration::from_millis(300);
/// How long a node is registered under one lease after its hook returned before it
/// counts as back: a hook may have vireod restarted right after it exits.
const SETTLE: Duration = Duration::from_secs(3);
/// The hook's output kept in its log file.
const LOG_KEEP: usize = 64 * 1024;
/// How long the output is read after the hook exited (a child it left behind may
/// hold the pipe open).
const DRAIN_OUTPUT: Duration = Duration::from_secs(2);

/// Why a hooks directory or a hook is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Untrusted { path: PathBuf, why: String },
    #[error(transparent)]
    Name(#[from] UpdateError),
}

/// What a trusted path must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    Executable,
}

/// Whether a path with this owner, mode and type may hold or be a hook: owned by root
/// or `me` (vireod's own user), writable by no group or other user, a directory or an
/// executable regular file (a symlink is neither).
pub fn trusted(
    owner: u32,
    me: u32,
    mode: u32,
    ft: std::fs::FileType,
    kind: Kind,
) -> Result<(), String> {
    match kind {
        Kind::Dir if !ft.is_dir() => return Err("not a directory".into()),
        Kind::Executable if !ft.is_file() => {
            return Err("not a regular file (symlinks are refused)".into())
        }
        _ => {}
    }
    if owner != 0 && owner != me {
        return Err(format!("owned by uid {owner}, not root"));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "mode {:o}: writable by its group or others",
            mode & 0o7777
        ));
    }
    if kind == Kind::Executable && mode & 0o100 == 0 {
        return Err("not executable by its owner".into());
    }
    Ok(())
}

fn check(path: &Path, kind: Kind) -> Result<(), HookError> {
    let meta = std::fs::symlink_metadata(path).map_err(|source| HookError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    trusted(
        meta.uid(),
        me,
        meta.permissions().mode(),
        meta.file_type(),
        kind,
    )
    .map_err(|why| HookError::Untrusted {
        path: path.to_path_buf(),
        why,
    })
}

/// `--update-hooks DIR`, checked.
#[derive(Clone, Debug)]
pub struct HookDir {
    dir: PathBuf,
}

impl HookDir {
    /// The directory, if it and every directory above it is trusted (an untrusted
    /// parent could swap the directory).
    pub fn open(dir: &Path) -> Result<Self, HookError> {
        let dir = std::fs::canonicalize(dir).map_err(|source| HookError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        for d in dir.ancestors() {
            // `/tmp`-style sticky directories above are the administrator's choice
            // only when root owns them and nobody else may rename in them.
            check_ancestor(d)?;
        }
        check(&dir, Kind::Dir)?;
        Ok(Self { dir })
    }

    /// Hook `name`'s path, checked now (name, directory, file).
    pub fn hook(&self, name: &str) -> Result<PathBuf, HookError> {
        update::check_hook_name(name)?;
        check(&self.dir, Kind::Dir)?;
        let path = self.dir.join(name);
        check(&path, Kind::Executable)?;
        Ok(path)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

fn check_ancestor(d: &Path) -> Result<(), HookError> {
    let meta = std::fs::symlink_metadata(d).map_err(|source| HookError::Io {
        path: d.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode();
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let sticky_root = mode & 0o1000 != 0 && meta.uid() == 0;
    if sticky_root {
        return Ok(());
    }
    trusted(meta.uid(), me, mode, meta.file_type(), Kind::Dir).map_err(|why| HookError::Untrusted {
        path: d.to_path_buf(),
        why: format!("a directory above the hooks: {why}"),
    })
}

/// Keeps the last `cap` bytes written.
struct Tail {
    buf: Vec<u8>,
    cap: usize,
}

impl Tail {
    fn push(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
        if self.buf.len() > self.cap {
            let cut = self.buf.len() - self.cap;
            self.buf.drain(..cut);
        }
    }
}

fn tail_text(b: &[u8], n: usize) -> String {
    let from = b.len().saturating_sub(n);
    String::from_utf8_lossy(&b[from..]).into_owned()
}

/// What a hook run gets besides its arguments.
pub struct HookEnv<'a> {
    pub node: &'a str,
    pub run: u64,
    pub socket: &'a Path,
    pub log: PathBuf,
    pub timeout: Duration,
}

/// Runs hook `path` with `args`; its output (stdout and stderr, interleaved as read)
/// is kept bounded and written to `env.log`. On a thread of its own (std's process
/// API: tokio's would enable tokio's signal driver, whose socketpair the VMM's seccomp
/// filter refuses, and tokio's features are one set for the whole workspace).
pub async fn run_hook(path: &Path, args: &[String], env: &HookEnv<'_>) -> HookOutcome {
    let (path, args) = (path.to_path_buf(), args.to_vec());
    let (node, run, socket, log, timeout) = (
        env.node.to_string(),
        env.run,
        env.socket.to_path_buf(),
        env.log.clone(),
        env.timeout,
    );
    tokio::task::spawn_blocking(move || {
        let env = HookEnv {
            node: &node,
            run,
            socket: &socket,
            log,
            timeout,
        };
        run_hook_blocking(&path, &args, &env)
    })
    .await
    .unwrap_or_else(|e| HookOutcome {
        error: Some(format!("hook: its thread ended: {e}")),
        ..Default::default()
    })
}

fn run_hook_blocking(path: &Path, args: &[String], env: &HookEnv<'_>) -> HookOutcome {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(path);
    cmd.args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("VIREO_NODE", env.node)
        .env("VIREO_UPDATE_RUN", env.run.to_string())
        .env("VIREO_SOCKET", env.socket)
        .current_dir(path.parent().unwrap_or(Path::new("/")))
        .stdin(std::process::Stdio::null())
        .process_group(0);
    let cannot_run = |e: std::io::Error| HookOutcome {
        error: Some(format!("hook {}: cannot run it: {e}", path.display())),
        ..Default::default()
    };
    // One pipe for stdout and stderr (as `2>&1`): the log keeps the order the hook
    // wrote in (two pipes read by two threads interleave at random).
    let (output, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return cannot_run(e),
    };
    match writer.try_clone() {
        Ok(w) => cmd.stdout(w).stderr(writer),
        Err(e) => return cannot_run(e),
    };
    let spawned = cmd.spawn();
    // The command holds the pipe's write ends: dropped, the hook's end is the last
    // one, and the reader sees end-of-file when the hook (and what it started) ends.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return cannot_run(e),
    };
    let pgid = child.id() as i32;
    let out = Arc::new(Mutex::new(Tail {
        buf: Vec::new(),
        cap: LOG_KEEP,
    }));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let readers = 1;
    {
        let out = out.clone();
        std::thread::spawn(move || {
            pump(output, &out);
            let _ = done_tx.send(());
        });
    }
    let deadline = Instant::now() + env.timeout;
    let mut outcome = HookOutcome::default();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                outcome.exit_code = st.code();
                break;
            }
            Ok(None) if Instant::now() >= deadline => {
                // SAFETY: kill(2) of the process group the hook leads (its own, from
                // process_group(0)); nothing else is in it.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                let _ = child.wait();
                outcome.error = Some(format!(
                    "hook did not end within {} s: killed",
                    env.timeout.as_secs()
                ));
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                outcome.error = Some(format!("hook: waiting for it: {e}"));
                break;
            }
        }
    }
    let until = Instant::now() + DRAIN_OUTPUT;
    for _ in 0..readers {
        if done_rx
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .is_err()
        {
            break;
        }
    }
    let bytes = lock(&out).buf.clone();
    if let Some(dir) = env.log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&env.log, &bytes) {
        warn!(log = %env.log.display(), error = %e, "cannot write the hook's log");
    }
    outcome.output_tail = tail_text(&bytes, update::OUTPUT_TAIL);
    outcome
}

fn pump(mut r: impl std::io::Read, out: &Mutex<Tail>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 {
            break;
        }
        lock(out).push(&buf[..n]);
    }
}

/// This node's part of update runs (see `cluster::update::advance`).
pub struct Updater {
    pub store: EtcdStore,
    pub node: String,
    pub sup: Arc<Supervisor>,
    pub hooks: Option<HookDir>,
    /// This vireod's API socket (the hook's `VIREO_SOCKET`).
    pub socket: PathBuf,
    /// The run whose hook this vireod runs now.
    running: Mutex<Option<u64>>,
    /// (run, lease) this vireod first saw its step returning under, and when.
    returning: Mutex<Option<(u64, i64, Instant)>>,
}

impl Updater {
    pub fn new(node: &ClusterNode, hooks: Option<HookDir>, socket: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            store: node.store.clone(),
            node: node.node.clone(),
            sup: node.sup.clone(),
            hooks,
            socket,
            running: Mutex::new(None),
            returning: Mutex::new(None),
        })
    }

    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(TICK).await;
            if let Err(e) = self.tick().await {
                warn!(error = %e, "cluster update: pass failed");
            }
        }
    }

    /// Whether this vireod has been registered under one lease for [`SETTLE`] since
    /// it first saw its step of run `id` returning.
    async fn settled(&self, id: u64) -> Result<bool, cluster::StoreError> {
        let lease = self
            .store
            .get(&cluster::keys::node_key(&self.node))
            .await?
            .map(|kv| kv.lease);
        let Some(lease) = lease else {
            *lock(&self.returning) = None;
            return Ok(false);
        };
        let mut r = lock(&self.returning);
        match *r {
            Some((run, l, since)) if run == id && l == lease => Ok(since.elapsed() >= SETTLE),
            _ => {
                *r = Some((id, lease, Instant::now()));
                Ok(false)
            }
        }
    }

    async fn tick(self: &Arc<Self>) -> Result<(), cluster::StoreError> {
        let current = update::read(&self.store).await?;
        let returning = current.as_ref().and_then(|(run, _)| {
            let i = run.current()?;
            let s = &run.steps[i];
            (s.node == self.node && s.phase == Phase::Returning).then_some(run.id)
        });
        let settled = match returning {
            Some(id) => self.settled(id).await?,
            None => false,
        };
        let local = update::Local {
            hook_running: lock(&self.running).is_some(),
            settled,
            running_here: self.sup.list().iter().filter(|s| s.pid.is_some()).count(),
        };
        let action =
            update::advance(&self.store, &self.node, local, cluster::keys::now_ms()).await?;
        if let NodeAction::RunHook(run) = action {
            *lock(&self.running) = Some(run.id);
            let me = self.clone();
            tokio::spawn(async move {
                me.hook(run).await;
                *lock(&me.running) = None;
            });
        }
        Ok(())
    }

    /// Runs the run's hook here and records how it ended (retried until written).
    async fn hook(&self, run: update::UpdateRun) {
        info!(run = run.id, hook = %run.hook, args = ?run.args, "cluster update: running the hook on this drained node");
        let outcome = match self.hooks.as_ref().map(|h| h.hook(&run.hook)) {
            None => HookOutcome {
                error: Some(format!(
                    "{} has no --update-hooks directory: no hook may run there",
                    self.node
                )),
                ..Default::default()
            },
            Some(Err(e)) => HookOutcome {
                error: Some(format!("hook refused: {e}")),
                ..Default::default()
            },
            Some(Ok(path)) => {
                let env = HookEnv {
                    node: &self.node,
                    run: run.id,
                    socket: &self.socket,
                    log: self
                        .sup
                        .cfg
                        .state_dir
                        .join("updates")
                        .join(format!("{}-{}.log", run.id, self.node)),
                    timeout: Duration::from_secs(run.timeout_s),
                };
                run_hook(&path, &run.args, &env).await
            }
        };
        info!(run = run.id, exit = ?outcome.exit_code, error = ?outcome.error, "cluster update: hook ended");
        loop {
            match update::hook_ended(
                &self.store,
                run.id,
                &self.node,
                outcome.clone(),
                cluster::keys::now_ms(),
            )
            .await
            {
                Ok(_) => return,
                Err(e) => {
                    warn!(error = %e, "cluster update: cannot record the hook's end; trying again");
                    tokio::time::sleep(TICK).await;
                }
            }
        }
    }
}

/// `POST /api/v1/cluster/update`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub hook: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub nodes: Vec<String>,
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

type N = State<Option<Arc<ClusterNode>>>;

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(serde_json::json!({ "error": msg }))).into_response()
}

fn not_clustered() -> Response {
    error(
        StatusCode::CONFLICT,
        "this vireod is not a cluster node (start it with --cluster-etcd and --node-name)".into(),
    )
}

pub async fn start(State(node): N, body: axum::body::Bytes) -> Response {
    let Some(node) = node else {
        return not_clustered();
    };
    let req: StartRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("update: {e}")),
    };
    for n in &req.nodes {
        if let Err(e) = crate::model::validate_name(n) {
            return error(StatusCode::BAD_REQUEST, format!("node {n:?}: {e}"));
        }
    }
    let req = UpdateRequest {
        hook: req.hook,
        args: req.args,
        nodes: req.nodes,
        timeout_s: req.timeout_s,
    };
    match update::start(&node.store, &req, cluster::keys::now_ms()).await {
        Ok(run) => {
            info!(run = run.id, hook = %run.hook, nodes = ?run.steps.iter().map(|s| &s.node).collect::<Vec<_>>(), "cluster update started");
            (StatusCode::ACCEPTED, Json(run)).into_response()
        }
        Err(e) => {
            let status = match &e {
                UpdateError::Busy { .. } | UpdateError::Raced => StatusCode::CONFLICT,
                UpdateError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_REQUEST,
            };
            error(status, e.to_string())
        }
    }
}

pub async fn status(State(node): N) -> Response {
    let Some(node) = node else {
        return not_clustered();
    };
    match update::read(&node.store).await {
        Ok(Some((run, _))) => Json(run).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "no update run in this cluster".into(),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn me() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }

    fn dir_type() -> std::fs::FileType {
        std::fs::symlink_metadata("/").unwrap().file_type()
    }

    #[test]
    fn the_trust_rule() {
        let d = dir_type();
        assert!(trusted(0, 1000, 0o755, d, Kind::Dir).is_ok());
        assert!(trusted(1000, 1000, 0o700, d, Kind::Dir).is_ok());
        assert!(trusted(1001, 1000, 0o755, d, Kind::Dir)
            .unwrap_err()
            .contains("uid 1001"));
        assert!(trusted(0, 0, 0o775, d, Kind::Dir)
            .unwrap_err()
            .contains("writable"));
        assert!(trusted(0, 0, 0o757, d, Kind::Dir)
            .unwrap_err()
            .contains("writable"));
        assert!(
            trusted(0, 0, 0o755, d, Kind::Executable).is_err(),
            "a directory is no hook"
        );
    }

    /// A hooks directory made here (owned by whoever runs the test, which the rule
    /// takes as vireod's user), in a parent nobody else may write.
    fn hooks() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = t.path().join("hooks");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        (t, dir)
    }

    fn script(dir: &Path, name: &str, body: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn hooks_are_files_of_a_trusted_directory_named_plainly() {
        let (_t, dir) = hooks();
        script(&dir, "ok", "#!/bin/sh\n", 0o755);
        script(&dir, "writable", "#!/bin/sh\n", 0o775);
        script(&dir, "not-exec", "#!/bin/sh\n", 0o644);
        symlink("/bin/true", dir.join("link")).unwrap();
        let h = HookDir::open(&dir).unwrap();
        assert!(h.hook("ok").is_ok());
        let err = |n: &str| h.hook(n).unwrap_err().to_string();
        assert!(
            err("writable").contains("writable by its group or others"),
            "{}",
            err("writable")
        );
        assert!(err("not-exec").contains("not executable"));
        assert!(err("link").contains("symlinks are refused"));
        assert!(err("../hooks/ok").contains("hook name"));
        assert!(err("/bin/true").contains("hook name"));
        assert!(err("missing").contains("No such file"));
        // The directory itself: writable by others is refused, at startup and later.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(HookDir::open(&dir)
            .unwrap_err()
            .to_string()
            .contains("writable"));
        assert!(err("ok").contains("writable"));
        assert!(me() == 0 || !dir.as_os_str().is_empty());
    }

    #[test]
    fn a_writable_parent_is_refused() {
        let (t, _) = hooks();
        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let dir = open.join("hooks");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = HookDir::open(&dir).unwrap_err().to_string();
        assert!(e.contains("a directory above the hooks"), "{e}");
    }

    #[tokio::test]
    async fn a_hook_gets_argv_not_a_shell_and_its_output_is_bounded() {
        let (t, dir) = hooks();
        let p = script(
            &dir,
            "h",
            "#!/bin/sh\nhead -c 100000 /dev/zero | tr '\\0' x\necho\necho \"node=$VIREO_NODE args=$# first=$1\" >&2\nexit 7\n",
            0o755,
        );
        let env = HookEnv {
            node: "a",
            run: 1,
            socket: Path::new("/nonexistent"),
            log: t.path().join("log/1-a.log"),
            timeout: Duration::from_secs(60),
        };
        let o = run_hook(&p, &["$(id); x".into(), "y".into()], &env).await;
        assert_eq!(o.exit_code, Some(7));
        assert!(o.error.is_none());
        assert!(
            o.output_tail.ends_with("node=a args=2 first=$(id); x\n"),
            "{:?}",
            &o.output_tail[o.output_tail.len().saturating_sub(80)..]
        );
        assert_eq!(o.output_tail.len(), update::OUTPUT_TAIL);
        assert_eq!(std::fs::metadata(&env.log).unwrap().len(), LOG_KEEP as u64);
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed() {
        let (t, dir) = hooks();
        let p = script(
            &dir,
            "slow",
            "#!/bin/sh\necho started\nexec sleep 600\n",
            0o755,
        );
        let env = HookEnv {
            node: "a",
            run: 1,
            socket: Path::new("/nonexistent"),
            log: t.path().join("slow.log"),
            timeout: Duration::from_millis(500),
        };
        let o = run_hook(&p, &[], &env).await;
        assert!(o.error.as_deref().unwrap_or("").contains("killed"), "{o:?}");
        assert_eq!(o.output_tail, "started\n");
    }
}
