//! Cluster-Aware Updating: one node at a time, drain → run an update hook on that
//! node → wait until it is healthy again → resume with fail-back → next node.
//!
//! The run is one record, `vireo/update` ([`UpdateRun`]), and its steps advance by
//! compare-and-swap on that key's revision. Each node carries out its own step (the
//! node's vireod: `agent/src/cluster_update.rs`), so the coordinator is no node: the
//! vireod that was asked only writes the record, and the run goes on while any node,
//! that one included, is drained, updated or restarted. A step that does not move on
//! within the run's timeout is failed by whichever node sees it first.
//!
//! What travels is a hook's *name* and bounded arguments, never command text: each
//! vireod runs only hooks an administrator installed in its own `--update-hooks`
//! directory.

use serde::{Deserialize, Serialize};

use crate::drain::{self, AdminError};
use crate::failover::Snapshot;
use crate::keys::{self, MoveReason, NodeState};
use crate::store::{ClusterStore, CmpOp, Compare, LeaseId, Op, Revision, StoreResult, Txn};

/// The key of the (one) update run.
pub const UPDATE_KEY: &str = "vireo/update";

/// At most this many arguments to a hook, each at most [`MAX_ARG_LEN`] bytes.
pub const MAX_ARGS: usize = 16;
pub const MAX_ARG_LEN: usize = 256;
/// A hook's name: at most this long.
pub const MAX_HOOK_NAME: usize = 64;
/// The output tail kept in the record.
pub const OUTPUT_TAIL: usize = 4096;
/// The default time each phase of a node's step may take (seconds).
pub const DEFAULT_TIMEOUT_S: u64 = 1800;
/// Beyond the timeout, what other nodes leave the step's node to record its own
/// outcome (it kills a hook at the timeout and writes the result).
pub const GRACE_MS: u64 = 10_000;

/// Where a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Succeeded,
    Failed,
}

/// Where one node's step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not started.
    Pending,
    /// Its drain's moves are under way.
    Draining,
    /// The hook runs on the node (the incarnation in `hook_lease`).
    Hook,
    /// The hook returned 0: waiting until the node is healthy (registered, fresh lease).
    Returning,
    /// Resumed; its fail-back moves are under way.
    FailingBack,
    Done,
    Failed,
}

/// One node's step of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStep {
    pub node: String,
    pub phase: Phase,
    /// When the phase began (ms since the epoch, the writer's clock).
    #[serde(default)]
    pub phase_since_ms: Option<u64>,
    /// The node's incarnation (lease) that runs the hook.
    #[serde(default)]
    pub hook_lease: Option<LeaseId>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The last [`OUTPUT_TAIL`] bytes of the hook's stdout and stderr.
    #[serde(default)]
    pub output_tail: String,
    #[serde(default)]
    pub error: Option<String>,
}

/// `vireo/update`: an update run and its steps, in the order the nodes go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRun {
    /// The run's id (ms since the epoch when it was asked for).
    pub id: u64,
    pub hook: String,
    #[serde(default)]
    pub args: Vec<String>,
    pub timeout_s: u64,
    pub state: RunState,
    pub steps: Vec<NodeStep>,
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// Why the run stopped (which node, what happened).
    #[serde(default)]
    pub error: Option<String>,
}

impl UpdateRun {
    /// The step under way (the first not done), while the run runs.
    pub fn current(&self) -> Option<usize> {
        if self.state != RunState::Running {
            return None;
        }
        self.steps.iter().position(|s| s.phase != Phase::Done)
    }

    /// Moves step `i` to `phase` now.
    pub fn enter(&mut self, i: usize, phase: Phase, now_ms: u64) {
        if let Some(s) = self.steps.get_mut(i) {
            s.phase = phase;
            s.phase_since_ms = Some(now_ms);
        }
        if phase == Phase::Done {
            match self.current() {
                // The next node's turn starts now (its timeout counts from here).
                Some(next) => self.steps[next].phase_since_ms = Some(now_ms),
                None => {
                    self.state = RunState::Succeeded;
                    self.finished_ms = Some(now_ms);
                }
            }
        }
    }

    /// Fails step `i` and with it the run (the nodes after it are left untouched).
    pub fn fail(&mut self, i: usize, why: String, now_ms: u64) {
        let node = self
            .steps
            .get(i)
            .map(|s| s.node.clone())
            .unwrap_or_default();
        if let Some(s) = self.steps.get_mut(i) {
            s.phase = Phase::Failed;
            s.phase_since_ms = Some(now_ms);
            s.error = Some(why.clone());
        }
        self.state = RunState::Failed;
        self.finished_ms = Some(now_ms);
        self.error = Some(format!("stopped at {node}: {why}"));
    }

    /// Whether step `i` has been in its phase longer than the run allows (plus the
    /// grace left to the node itself), at `now_ms`.
    pub fn overdue(&self, i: usize, now_ms: u64) -> bool {
        let Some(s) = self.steps.get(i) else {
            return false;
        };
        let since = s.phase_since_ms.unwrap_or(self.id);
        now_ms > since + self.timeout_s * 1000 + GRACE_MS
    }
}

/// Why an update request is refused.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("hook name {0:?}: {1}")]
    HookName(String, &'static str),
    #[error("hook argument {0}: {1}")]
    Arg(usize, &'static str),
    #[error("at most {MAX_ARGS} hook arguments")]
    TooManyArgs,
    #[error("timeout {0} s: expected 1..=86400")]
    Timeout(u64),
    #[error("node {0}: {1}")]
    Node(String, String),
    #[error("no node to update")]
    NoNodes,
    #[error(
        "update run {id} is still running (at {at}); wait for it or see `cluster update status`"
    )]
    Busy { id: u64, at: String },
    #[error("the cluster changed while deciding; try again")]
    Raced,
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// A hook is named by a plain file name: letters, digits, `.`, `_`, `-`; not
/// starting with `.` (no `..`, no hidden file, no `/`).
pub fn check_hook_name(name: &str) -> Result<(), UpdateError> {
    let bad = |why| Err(UpdateError::HookName(name.to_string(), why));
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_HOOK_NAME {
        return bad("longer than 64 bytes");
    }
    if name.starts_with('.') || name.contains("..") {
        return bad("must not start with '.' or contain '..'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only letters, digits, '.', '_' and '-' (a file name in the hooks directory)");
    }
    Ok(())
}

/// At most [`MAX_ARGS`] arguments of at most [`MAX_ARG_LEN`] bytes, printable (no
/// control characters): passed to the hook as its argv, never through a shell.
pub fn check_args(args: &[String]) -> Result<(), UpdateError> {
    if args.len() > MAX_ARGS {
        return Err(UpdateError::TooManyArgs);
    }
    for (i, a) in args.iter().enumerate() {
        if a.len() > MAX_ARG_LEN {
            return Err(UpdateError::Arg(i, "longer than 256 bytes"));
        }
        if a.chars().any(char::is_control) {
            return Err(UpdateError::Arg(i, "control characters"));
        }
    }
    Ok(())
}

/// The run and its revision (None: no run was ever asked for, or it does not parse).
pub async fn read<S: ClusterStore>(store: &S) -> StoreResult<Option<(UpdateRun, Revision)>> {
    Ok(store
        .get(UPDATE_KEY)
        .await?
        .and_then(|kv| Some((keys::decode::<UpdateRun>(&kv.value)?, kv.mod_revision))))
}

/// Writes `run` if the record is still at `revision` (0: absent); false when it
/// changed meanwhile.
pub async fn write_if<S: ClusterStore>(
    store: &S,
    run: &UpdateRun,
    revision: Revision,
) -> StoreResult<bool> {
    let outcome = store
        .txn(Txn {
            when: vec![Compare::ModRevision {
                key: UPDATE_KEY.into(),
                op: CmpOp::Equal,
                revision,
            }],
            then: vec![Op::Put {
                key: UPDATE_KEY.into(),
                value: keys::encode(run),
                lease: 0,
            }],
            otherwise: vec![],
        })
        .await?;
    Ok(outcome.succeeded)
}

/// What an update asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpdateRequest {
    pub hook: String,
    pub args: Vec<String>,
    /// The nodes in the order they go (empty: every live node, by name).
    pub nodes: Vec<String>,
    pub timeout_s: Option<u64>,
}

/// Records a new run: checked (hook name, arguments, each node live and `up`, no
/// run under way) and written with every step pending.
pub async fn start<S: ClusterStore>(
    store: &S,
    req: &UpdateRequest,
    now_ms: u64,
) -> Result<UpdateRun, UpdateError> {
    check_hook_name(&req.hook)?;
    check_args(&req.args)?;
    let timeout_s = req.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
    if !(1..=86_400).contains(&timeout_s) {
        return Err(UpdateError::Timeout(timeout_s));
    }
    let snap = Snapshot::read(store).await?;
    let nodes: Vec<String> = if req.nodes.is_empty() {
        snap.nodes.keys().cloned().collect()
    } else {
        req.nodes.clone()
    };
    if nodes.is_empty() {
        return Err(UpdateError::NoNodes);
    }
    for (i, n) in nodes.iter().enumerate() {
        if nodes[..i].contains(n) {
            return Err(UpdateError::Node(n.clone(), "named twice".into()));
        }
        match snap.nodes.get(n) {
            None => return Err(UpdateError::Node(n.clone(), "not in the cluster".into())),
            Some((r, _)) if r.state != NodeState::Up => {
                return Err(UpdateError::Node(
                    n.clone(),
                    format!("is {:?}, not up", r.state).to_lowercase(),
                ))
            }
            Some(_) => {}
        }
    }
    let existing = read(store).await?;
    if let Some((run, _)) = &existing {
        if let Some(i) = run.current() {
            return Err(UpdateError::Busy {
                id: run.id,
                at: run.steps[i].node.clone(),
            });
        }
    }
    // The key's revision as read: absent compares as 0; one that does not parse is
    // replaced too (its revision).
    let rev = match store.get(UPDATE_KEY).await? {
        Some(kv) => kv.mod_revision,
        None => 0,
    };
    let run = UpdateRun {
        id: now_ms,
        hook: req.hook.clone(),
        args: req.args.clone(),
        timeout_s,
        state: RunState::Running,
        steps: nodes
            .into_iter()
            .map(|node| NodeStep {
                node,
                phase: Phase::Pending,
                phase_since_ms: Some(now_ms),
                hook_lease: None,
                exit_code: None,
                output_tail: String::new(),
                error: None,
            })
            .collect(),
        finished_ms: None,
        error: None,
    };
    if write_if(store, &run, rev).await? {
        Ok(run)
    } else {
        Err(UpdateError::Raced)
    }
}

/// What the node whose step is current should do next (see [`advance`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeAction {
    /// Nothing now (not its turn, or waiting for moves or the settle time).
    Wait,
    /// Run the hook: the step is now `Hook` under this node's lease (written).
    RunHook(UpdateRun),
}

/// What the step's node knows about itself beyond the store.
#[derive(Clone, Copy, Debug, Default)]
pub struct Local {
    /// This vireod runs the hook of the current run now.
    pub hook_running: bool,
    /// This vireod has been registered (same lease) long enough after the hook to
    /// count as healthy (a hook may have a restart of vireod follow its exit).
    pub settled: bool,
    /// VMs that still run on this host (by name).
    pub running_here: usize,
}

/// One pass of node `me`'s part in the run: moves its step along (each change a
/// compare-and-swap on the run's revision), or fails a step that is overdue (any
/// node's). Returns what the node should do.
pub async fn advance<S: ClusterStore>(
    store: &S,
    me: &str,
    local: Local,
    now_ms: u64,
) -> StoreResult<NodeAction> {
    let Some((mut run, rev)) = read(store).await? else {
        return Ok(NodeAction::Wait);
    };
    let Some(i) = run.current() else {
        return Ok(NodeAction::Wait);
    };
    let step = run.steps[i].clone();
    if step.node != me {
        // Another node's step that does not move on: its node is gone or stuck.
        let mine_to_record = step.phase == Phase::Hook;
        if run.overdue(i, now_ms) {
            let why = if mine_to_record {
                format!(
                    "{} did not report its hook's end within {} s",
                    step.node, run.timeout_s
                )
            } else {
                format!(
                    "{} did not come back within {} s (while {})",
                    step.node,
                    run.timeout_s,
                    phase_name(step.phase)
                )
            };
            run.fail(i, why, now_ms);
            write_if(store, &run, rev).await?;
        }
        return Ok(NodeAction::Wait);
    }
    let snap = Snapshot::read(store).await?;
    let Some((record, lease)) = snap.nodes.get(me).cloned() else {
        // Not registered (yet, again): nothing to do until it is.
        return Ok(NodeAction::Wait);
    };
    let timed_out = now_ms > step.phase_since_ms.unwrap_or(run.id) + run.timeout_s * 1000;
    match step.phase {
        Phase::Pending => {
            match drain::drain(store, me, false, drain::DEFAULT_CONCURRENCY).await {
                Ok(_) => run.enter(i, Phase::Draining, now_ms),
                Err(AdminError::Store(e)) => return Err(e),
                Err(AdminError::Raced) => return Ok(NodeAction::Wait),
                // Drained already (this pass's write of the step was lost).
                Err(AdminError::WrongState {
                    state: NodeState::Draining | NodeState::Paused,
                    ..
                }) => run.enter(i, Phase::Draining, now_ms),
                Err(e) => run.fail(i, format!("drain refused: {e}"), now_ms),
            }
        }
        Phase::Draining => {
            if record.state == NodeState::Paused {
                let still = drain::owned_by(&snap, me);
                if !still.is_empty() || local.running_here > 0 {
                    let moves = drain::read_moves(store).await?;
                    let errors: Vec<String> = still
                        .iter()
                        .map(
                            |vm| match moves.get(vm).and_then(|(m, _)| m.error.clone()) {
                                Some(e) => format!("{vm} ({e})"),
                                None => vm.clone(),
                            },
                        )
                        .collect();
                    run.fail(
                        i,
                        format!(
                            "VMs still on the node after its drain: {} ({} running here)",
                            errors.join(", "),
                            local.running_here
                        ),
                        now_ms,
                    );
                } else {
                    run.enter(i, Phase::Hook, now_ms);
                    run.steps[i].hook_lease = Some(lease);
                    return Ok(if write_if(store, &run, rev).await? {
                        NodeAction::RunHook(run)
                    } else {
                        NodeAction::Wait
                    });
                }
            } else if timed_out {
                run.fail(
                    i,
                    format!("its drain did not end within {} s", run.timeout_s),
                    now_ms,
                );
            } else {
                return Ok(NodeAction::Wait);
            }
        }
        Phase::Hook => {
            if local.hook_running {
                return Ok(NodeAction::Wait);
            }
            // The hook's end was never recorded by the vireod that ran it.
            run.fail(
                i,
                "vireod restarted while the hook ran: its outcome is unknown".into(),
                now_ms,
            );
        }
        Phase::Returning => {
            if !local.settled {
                if timed_out {
                    run.fail(
                        i,
                        format!("did not come back within {} s", run.timeout_s),
                        now_ms,
                    );
                } else {
                    return Ok(NodeAction::Wait);
                }
            } else {
                match drain::resume(store, me, true, drain::DEFAULT_CONCURRENCY).await {
                    Ok(_) => run.enter(i, Phase::FailingBack, now_ms),
                    Err(AdminError::Store(e)) => return Err(e),
                    Err(AdminError::Raced) => return Ok(NodeAction::Wait),
                    // Resumed already (this pass's write of the step was lost).
                    Err(AdminError::WrongState {
                        state: NodeState::Up,
                        ..
                    }) => run.enter(i, Phase::FailingBack, now_ms),
                    Err(e) => run.fail(i, format!("resume refused: {e}"), now_ms),
                }
            }
        }
        Phase::FailingBack => {
            let moves = drain::read_moves(store).await?;
            let back: Vec<_> = moves
                .values()
                .filter(|(m, _)| m.drain_of == me && m.reason == MoveReason::Failback)
                .collect();
            if back.iter().all(|(m, _)| m.state.finished()) {
                // A failed fail-back leaves its VM running where it was: noted, the
                // run goes on (the node itself is updated and up).
                let failed: Vec<String> = back
                    .iter()
                    .filter(|(m, _)| m.state == keys::MoveState::Failed)
                    .map(|(m, _)| format!("{} ({})", m.vm, m.error.clone().unwrap_or_default()))
                    .collect();
                if !failed.is_empty() {
                    run.steps[i].error = Some(format!("not failed back: {}", failed.join(", ")));
                }
                run.enter(i, Phase::Done, now_ms);
            } else if timed_out {
                run.fail(
                    i,
                    format!("its fail-back did not end within {} s", run.timeout_s),
                    now_ms,
                );
            } else {
                return Ok(NodeAction::Wait);
            }
        }
        Phase::Done | Phase::Failed => return Ok(NodeAction::Wait),
    }
    write_if(store, &run, rev).await?;
    Ok(NodeAction::Wait)
}

/// Records the hook's end on step `node` of run `id`: exit 0 → `Returning`;
/// otherwise the step and the run fail. Retried by the caller until written.
pub async fn hook_ended<S: ClusterStore>(
    store: &S,
    id: u64,
    node: &str,
    outcome: HookOutcome,
    now_ms: u64,
) -> StoreResult<bool> {
    let Some((mut run, rev)) = read(store).await? else {
        return Ok(true);
    };
    let Some(i) = run.current().filter(|&i| {
        run.id == id && run.steps[i].node == node && run.steps[i].phase == Phase::Hook
    }) else {
        // Failed meanwhile (overdue) or another run: nothing to record.
        return Ok(true);
    };
    run.steps[i].exit_code = outcome.exit_code;
    run.steps[i].output_tail = outcome.output_tail;
    match outcome.error {
        None if outcome.exit_code == Some(0) => run.enter(i, Phase::Returning, now_ms),
        None => {
            let why = match outcome.exit_code {
                Some(c) => format!("hook {} exited with status {c}", run.hook),
                None => format!("hook {} was killed by a signal", run.hook),
            };
            run.fail(i, why, now_ms)
        }
        Some(e) => run.fail(i, e, now_ms),
    }
    write_if(store, &run, rev).await
}

/// How a hook ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HookOutcome {
    pub exit_code: Option<i32>,
    pub output_tail: String,
    /// It could not run or did not end in time.
    pub error: Option<String>,
}

pub fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Pending => "pending",
        Phase::Draining => "draining",
        Phase::Hook => "running its hook",
        Phase::Returning => "returning",
        Phase::FailingBack => "failing back",
        Phase::Done => "done",
        Phase::Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_names_are_plain_file_names() {
        for ok in ["update", "apt-upgrade", "kernel_6.1", "a", "A9.sh"] {
            assert!(check_hook_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/bin/sh",
            ".hidden",
            "a..b",
            "a b",
            "x;rm",
            "é",
            "a\n",
            &"x".repeat(65),
        ] {
            assert!(check_hook_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn arguments_are_bounded() {
        assert!(check_args(&["--fast".into(), "6.1 lts".into()]).is_ok());
        assert!(check_args(&vec!["x".into(); MAX_ARGS]).is_ok());
        assert!(matches!(
            check_args(&vec!["x".into(); MAX_ARGS + 1]),
            Err(UpdateError::TooManyArgs)
        ));
        assert!(check_args(&["x".repeat(MAX_ARG_LEN + 1)]).is_err());
        assert!(check_args(&["a\nb".into()]).is_err());
        assert!(check_args(&["a\0b".into()]).is_err());
    }

    #[test]
    fn a_failed_step_fails_the_run_and_names_the_node() {
        let mut run = UpdateRun {
            id: 1,
            hook: "h".into(),
            args: vec![],
            timeout_s: 1,
            state: RunState::Running,
            steps: ["a", "b", "c"]
                .iter()
                .map(|n| NodeStep {
                    node: n.to_string(),
                    phase: Phase::Pending,
                    phase_since_ms: Some(1),
                    hook_lease: None,
                    exit_code: None,
                    output_tail: String::new(),
                    error: None,
                })
                .collect(),
            finished_ms: None,
            error: None,
        };
        run.enter(0, Phase::Done, 2);
        assert_eq!(run.current(), Some(1));
        assert_eq!(
            run.steps[1].phase_since_ms,
            Some(2),
            "b's turn starts when a's ends"
        );
        assert!(!run.overdue(1, 2 + 1000 + GRACE_MS));
        assert!(run.overdue(1, 3 + 1000 + GRACE_MS));
        run.fail(1, "hook h exited with status 3".into(), 3);
        assert_eq!(run.state, RunState::Failed);
        assert_eq!(run.current(), None);
        assert_eq!(run.steps[2].phase, Phase::Pending);
        assert_eq!(
            run.error.as_deref(),
            Some("stopped at b: hook h exited with status 3")
        );
    }
}
