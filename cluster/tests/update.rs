//! Cluster-Aware Updating runs on `SimStore` (etcd's semantics): the checks before a
//! run, each node moving its own step (drain → hook → back → resume), a failing hook
//! stopping the run at its node, and a step nobody moves failed by another node.

use std::time::Duration;

use cluster::keys::{self, NodeRecord, NodeState, Resources};
use cluster::update::{self, Local, NodeAction, Phase, RunState, UpdateError, UpdateRequest};
use cluster::{ClusterStore, SimStore};

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

async fn join(s: &SimStore, node: &str) {
    let lease = s.lease_grant(Duration::from_secs(2)).await.unwrap();
    let rec = NodeRecord {
        name: node.into(),
        version: "t".into(),
        capacity: Resources {
            memory_mib: 1024,
            vcpus: 8,
        },
        cpu_features: vec![],
        cpuid: None,
        state: NodeState::Up,
        peer_url: Some(format!("https://{node}:7443")),
    };
    s.put(&keys::node_key(node), keys::encode(&rec), lease)
        .await
        .unwrap();
}

fn req(nodes: &[&str]) -> UpdateRequest {
    UpdateRequest {
        hook: "upgrade".into(),
        args: vec!["--yes".into()],
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        timeout_s: Some(60),
    }
}

async fn admin_state(s: &SimStore, node: &str) -> NodeState {
    cluster::admin::read(s, node).await.unwrap().0.state
}

const IDLE: Local = Local {
    hook_running: false,
    settled: false,
    running_here: 0,
};

#[test]
fn each_node_moves_its_own_step_and_a_failing_hook_stops_the_run_there() {
    block(async {
        let s = SimStore::new();
        for n in ["a", "b", "c"] {
            join(&s, n).await;
        }
        let run = update::start(&s, &req(&["a", "b", "c"]), 1000)
            .await
            .unwrap();
        assert!(run.steps.iter().all(|st| st.phase == Phase::Pending));
        // One run at a time; named nodes must be up and named once.
        assert!(matches!(
            update::start(&s, &req(&["a"]), 1001).await,
            Err(UpdateError::Busy { .. })
        ));
        // Not a's turn for b: nothing happens.
        assert_eq!(
            update::advance(&s, "b", IDLE, 1002).await.unwrap(),
            NodeAction::Wait
        );
        // a: drained (nothing to move: paused at once), then its hook may run.
        update::advance(&s, "a", IDLE, 1003).await.unwrap();
        assert_eq!(admin_state(&s, "a").await, NodeState::Paused);
        let NodeAction::RunHook(r) = update::advance(&s, "a", IDLE, 1004).await.unwrap() else {
            panic!("a's hook should run");
        };
        assert_eq!(
            (r.hook.as_str(), r.args.clone()),
            ("upgrade", vec!["--yes".to_string()])
        );
        let running = Local {
            hook_running: true,
            ..IDLE
        };
        assert_eq!(
            update::advance(&s, "a", running, 1005).await.unwrap(),
            NodeAction::Wait
        );
        let ok = update::HookOutcome {
            exit_code: Some(0),
            output_tail: "done\n".into(),
            error: None,
        };
        update::hook_ended(&s, r.id, "a", ok, 1006).await.unwrap();
        // Back only once settled; then resumed, and done (no fail-back to wait for).
        update::advance(&s, "a", IDLE, 1007).await.unwrap();
        assert_eq!(admin_state(&s, "a").await, NodeState::Paused);
        let settled = Local {
            settled: true,
            ..IDLE
        };
        update::advance(&s, "a", settled, 1008).await.unwrap();
        assert_eq!(admin_state(&s, "a").await, NodeState::Up);
        update::advance(&s, "a", IDLE, 1009).await.unwrap();
        let (run, _) = update::read(&s).await.unwrap().unwrap();
        assert_eq!(run.steps[0].phase, Phase::Done);
        assert_eq!(run.current(), Some(1));
        // b's hook fails: the run stops at b, b stays paused, c is never touched.
        update::advance(&s, "b", IDLE, 1010).await.unwrap();
        let NodeAction::RunHook(r) = update::advance(&s, "b", IDLE, 1011).await.unwrap() else {
            panic!("b's hook should run");
        };
        let failed = update::HookOutcome {
            exit_code: Some(3),
            output_tail: "no space left\n".into(),
            error: None,
        };
        update::hook_ended(&s, r.id, "b", failed, 1012)
            .await
            .unwrap();
        let (run, _) = update::read(&s).await.unwrap().unwrap();
        assert_eq!(run.state, RunState::Failed);
        assert_eq!(
            run.error.as_deref(),
            Some("stopped at b: hook upgrade exited with status 3")
        );
        assert_eq!(run.steps[1].output_tail, "no space left\n");
        assert_eq!(run.steps[2].phase, Phase::Pending);
        assert_eq!(
            update::advance(&s, "c", IDLE, 1013).await.unwrap(),
            NodeAction::Wait
        );
        assert_eq!(admin_state(&s, "b").await, NodeState::Paused);
        assert_eq!(admin_state(&s, "c").await, NodeState::Up);
        // A new run may start now, but not with the paused node.
        assert!(matches!(
            update::start(&s, &req(&["b"]), 2000).await,
            Err(UpdateError::Node(n, _)) if n == "b"
        ));
    });
}

#[test]
fn a_step_its_node_never_moves_is_failed_by_another_node() {
    block(async {
        let s = SimStore::new();
        for n in ["a", "b"] {
            join(&s, n).await;
        }
        update::start(&s, &req(&["a", "b"]), 1000).await.unwrap();
        // Within the timeout and its grace, b waits for a.
        let limit = 1000 + 60_000 + update::GRACE_MS;
        update::advance(&s, "b", IDLE, limit).await.unwrap();
        assert_eq!(
            update::read(&s).await.unwrap().unwrap().0.state,
            RunState::Running
        );
        update::advance(&s, "b", IDLE, limit + 1).await.unwrap();
        let (run, _) = update::read(&s).await.unwrap().unwrap();
        assert_eq!(run.state, RunState::Failed);
        assert_eq!(
            run.error.as_deref(),
            Some("stopped at a: a did not come back within 60 s (while pending)")
        );
        assert_eq!(run.steps[1].phase, Phase::Pending);
    });
}

#[test]
fn a_hook_whose_vireod_restarted_fails_the_step() {
    block(async {
        let s = SimStore::new();
        join(&s, "a").await;
        update::start(&s, &req(&["a"]), 1000).await.unwrap();
        update::advance(&s, "a", IDLE, 1001).await.unwrap();
        let NodeAction::RunHook(_) = update::advance(&s, "a", IDLE, 1002).await.unwrap() else {
            panic!("a's hook should run");
        };
        // A later pass that runs no hook (a new vireod): the outcome is unknown.
        update::advance(&s, "a", IDLE, 1003).await.unwrap();
        let (run, _) = update::read(&s).await.unwrap().unwrap();
        assert_eq!(run.state, RunState::Failed);
        assert!(run
            .error
            .unwrap()
            .contains("vireod restarted while the hook ran"));
        assert_eq!(admin_state(&s, "a").await, NodeState::Paused);
    });
}

#[test]
fn requests_are_checked_before_anything_is_written() {
    block(async {
        let s = SimStore::new();
        join(&s, "a").await;
        let bad = |hook: &str, nodes: &[&str]| UpdateRequest {
            hook: hook.into(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        };
        for (r, want) in [
            (bad("../bin/sh", &["a"]), "hook name"),
            (bad("ok", &["x"]), "node x: not in the cluster"),
            (bad("ok", &["a", "a"]), "node a: named twice"),
        ] {
            let e = update::start(&s, &r, 1).await.unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        assert!(update::read(&s).await.unwrap().is_none());
    });
}
