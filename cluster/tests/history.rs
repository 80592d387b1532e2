//! Pruning of the cluster's history on `SimStore`: old events, finished moves and done
//! bulk requests go; what is running, young, or needed for a fail-back stays.

use std::time::Duration;

use cluster::history::{prune, Pruned, Pruner, Retention};
use cluster::keys::{
    self, BulkOp, BulkRecord, MoveReason, MoveRecord, MoveState, NodeAdmin, NodeRecord, NodeState,
    Priority, Resources,
};
use cluster::{ClusterStore, SimStore};

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

const DAY_MS: u64 = 24 * 3600 * 1000;
/// "Now" in these tests: day 100 since the epoch.
const NOW: u64 = 100 * DAY_MS;

fn retention() -> Retention {
    Retention {
        events: 5,
        finished: Duration::from_millis(7 * DAY_MS),
    }
}

fn a_move(vm: &str, state: MoveState, reason: MoveReason, drain_of: &str) -> MoveRecord {
    MoveRecord {
        vm: vm.into(),
        from: "a".into(),
        to: "b".into(),
        priority: Priority::Medium,
        reason,
        drain_of: drain_of.into(),
        request: None,
        state,
        concurrency: 1,
        token_before: None,
        token_after: None,
        error: None,
        started_ms: Some(NOW - 30 * DAY_MS),
        finished_ms: None,
    }
}

fn ended(mut m: MoveRecord, days_ago: u64) -> MoveRecord {
    m.finished_ms = Some(NOW - days_ago * DAY_MS);
    m
}

async fn put<T: serde::Serialize>(s: &SimStore, key: &str, record: &T) {
    s.put(key, keys::encode(record), 0).await.unwrap();
}

async fn names(s: &SimStore, prefix: &str) -> Vec<String> {
    let (kvs, _) = s.get_prefix(prefix).await.unwrap();
    kvs.iter()
        .filter_map(|kv| keys::name_of(prefix, &kv.key).map(str::to_string))
        .collect()
}

fn request(id: &str, created_days_ago: u64) -> BulkRecord {
    BulkRecord {
        id: id.into(),
        op: BulkOp::Migrate,
        selection: "priority=low".into(),
        to: Some("b".into()),
        created_ms: NOW - created_days_ago * DAY_MS,
        concurrency: 2,
        vms: vec![],
        skipped: vec![],
        left: vec![],
        cancelled_ms: None,
    }
}

#[test]
fn only_the_newest_events_are_kept() {
    block(async {
        let s = SimStore::new();
        for rev in 1..=8i64 {
            for i in 0..2 {
                put(
                    &s,
                    &keys::event_key(rev, i),
                    &serde_json::json!({"vm": "v", "action": "x"}),
                )
                .await;
            }
        }
        let pruned = prune(&s, &retention(), NOW).await.unwrap();
        assert_eq!(pruned.events, 11);
        let left = names(&s, keys::EVENTS).await;
        // The five newest: revision 8's two, 7's two and 6's second.
        assert_eq!(
            left,
            [
                "00000000000000000006-001",
                "00000000000000000007-000",
                "00000000000000000007-001",
                "00000000000000000008-000",
                "00000000000000000008-001"
            ]
        );
        // Nothing beyond the limit: the next pass deletes nothing.
        assert_eq!(
            prune(&s, &retention(), NOW).await.unwrap(),
            Pruned::default()
        );
    });
}

#[test]
fn finished_moves_go_after_their_age_unless_a_fail_back_may_need_them() {
    block(async {
        let s = SimStore::new();
        let paused = NodeAdmin {
            state: NodeState::Paused,
            ..NodeAdmin::default()
        };
        put(&s, &keys::admin_key("p"), &paused).await;
        put(&s, &keys::admin_key("u"), &NodeAdmin::default()).await;
        let moves = [
            // Old and finished: pruned.
            ended(
                a_move("old-moved", MoveState::Moved, MoveReason::Bulk, ""),
                8,
            ),
            ended(
                a_move("old-failed", MoveState::Failed, MoveReason::Failback, "u"),
                30,
            ),
            ended(
                a_move("old-drain-of-up", MoveState::Moved, MoveReason::Drain, "u"),
                9,
            ),
            // Finished without an end time (an older writer): ages from its start.
            a_move("no-end", MoveState::Moved, MoveReason::Bulk, ""),
            // Kept: young, unfinished, or a paused node's drain (fail-back reads it).
            ended(a_move("young", MoveState::Moved, MoveReason::Bulk, ""), 6),
            a_move("queued", MoveState::Queued, MoveReason::Bulk, ""),
            a_move("migrating", MoveState::Migrating, MoveReason::Drain, "u"),
            ended(
                a_move("drain-of-paused", MoveState::Moved, MoveReason::Drain, "p"),
                60,
            ),
        ];
        for m in &moves {
            put(&s, &keys::move_key(&m.vm), m).await;
        }
        let pruned = prune(&s, &retention(), NOW).await.unwrap();
        assert_eq!(pruned.moves, 4, "{pruned:?}");
        assert_eq!(
            names(&s, keys::MOVES).await,
            ["drain-of-paused", "migrating", "queued", "young"]
        );
        // The paused node resumes (fail-back done): its drain's record goes at the next pass.
        put(&s, &keys::admin_key("p"), &NodeAdmin::default()).await;
        assert_eq!(prune(&s, &retention(), NOW).await.unwrap().moves, 1);
        assert!(!names(&s, keys::MOVES)
            .await
            .contains(&"drain-of-paused".to_string()));
    });
}

#[test]
fn a_bulk_request_goes_when_its_moves_are_done_and_its_last_activity_is_old() {
    block(async {
        let s = SimStore::new();
        // done: created long ago, its one move ended long ago.
        let mut done_move = ended(a_move("v1", MoveState::Moved, MoveReason::Bulk, ""), 20);
        done_move.request = Some("done".into());
        // running: created long ago, one move still queued.
        let mut running_move = a_move("v2", MoveState::Queued, MoveReason::Bulk, "");
        running_move.request = Some("running".into());
        // recent-end: created long ago, its move ended yesterday.
        let mut recent_move = ended(a_move("v3", MoveState::Failed, MoveReason::Bulk, ""), 1);
        recent_move.request = Some("recent-end".into());
        for m in [&done_move, &running_move, &recent_move] {
            put(&s, &keys::move_key(&m.vm), m).await;
        }
        put(&s, &keys::request_key("done"), &request("done", 30)).await;
        put(&s, &keys::request_key("running"), &request("running", 30)).await;
        put(
            &s,
            &keys::request_key("recent-end"),
            &request("recent-end", 30),
        )
        .await;
        // A start request (no moves), cancelled yesterday: kept; one of last month: pruned.
        let mut cancelled = request("cancelled", 30);
        cancelled.op = BulkOp::Start;
        cancelled.cancelled_ms = Some(NOW - DAY_MS);
        put(&s, &keys::request_key("cancelled"), &cancelled).await;
        let mut started = request("started", 30);
        started.op = BulkOp::Start;
        put(&s, &keys::request_key("started"), &started).await;

        let pruned = prune(&s, &retention(), NOW).await.unwrap();
        assert_eq!(pruned.requests, 2, "{pruned:?}");
        assert_eq!(
            names(&s, keys::REQUESTS).await,
            ["cancelled", "recent-end", "running"]
        );
        // v1's move went with its age too; the others stay.
        assert_eq!(names(&s, keys::MOVES).await, ["v2", "v3"]);
    });
}

#[test]
fn only_the_first_live_node_by_name_prunes_and_at_most_once_a_minute() {
    block(async {
        let s = SimStore::new();
        for node in ["b", "a"] {
            let lease = s.lease_grant(Duration::from_secs(60)).await.unwrap();
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
                peer_url: None,
            };
            s.put(&keys::node_key(node), keys::encode(&rec), lease)
                .await
                .unwrap();
        }
        let keep_none = Retention {
            events: 0,
            finished: Duration::ZERO,
        };
        put(&s, &keys::event_key(1, 0), &serde_json::json!({})).await;
        let mut b = Pruner::new("b", keep_none);
        assert_eq!(b.step(&s, Duration::ZERO).await.unwrap(), None);
        let mut a = Pruner::new("a", keep_none);
        let first = a.step(&s, Duration::from_secs(1)).await.unwrap();
        assert_eq!(first.map(|p| p.events), Some(1));
        put(&s, &keys::event_key(2, 0), &serde_json::json!({})).await;
        assert_eq!(a.step(&s, Duration::from_secs(59)).await.unwrap(), None);
        assert_eq!(
            names(&s, keys::EVENTS).await.len(),
            1,
            "pruned before its minute"
        );
        let again = a.step(&s, Duration::from_secs(61)).await.unwrap();
        assert_eq!(again.map(|p| p.events), Some(1));
    });
}
