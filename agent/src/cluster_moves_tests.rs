use super::*;
use cluster::keys::{MoveReason, Priority};
use cluster::SimStore;

fn queued(vm: &str) -> MoveRecord {
    MoveRecord {
        vm: vm.into(),
        from: "a".into(),
        to: "b".into(),
        priority: Priority::High,
        reason: MoveReason::Drain,
        drain_of: "a".into(),
        request: None,
        state: MoveState::Queued,
        concurrency: 2,
        token_before: None,
        token_after: None,
        error: None,
        started_ms: None,
        finished_ms: None,
    }
}

fn migrating(vm: &str, started_ms: u64) -> MoveRecord {
    MoveRecord {
        state: MoveState::Migrating,
        started_ms: Some(started_ms),
        ..queued(vm)
    }
}

async fn put(store: &SimStore, m: &MoveRecord) -> Revision {
    store
        .put(&keys::move_key(&m.vm), keys::encode(m), 0)
        .await
        .unwrap()
}

async fn read(store: &SimStore, vm: &str) -> MoveRecord {
    let kv = store.get(&keys::move_key(vm)).await.unwrap().unwrap();
    keys::decode(&kv.value).unwrap()
}

#[tokio::test]
async fn a_failure_is_recorded_over_the_record_this_execution_read() {
    let store = SimStore::new();
    let rev = put(&store, &queued("vm")).await;
    record_failed(&store, queued("vm"), rev, "no".into()).await;
    let m = read(&store, "vm").await;
    assert_eq!(m.state, MoveState::Failed);
    assert_eq!(m.error.as_deref(), Some("no"));
}

#[tokio::test]
async fn a_failure_is_not_recorded_over_another_executions_migration() {
    let store = SimStore::new();
    let rev = put(&store, &queued("vm")).await;
    // Another execution of the same move won and migrates.
    put(&store, &migrating("vm", 1_000)).await;
    let mut mine = queued("vm");
    mine.started_ms = Some(2_000);
    record_failed(&store, mine, rev, "lost the race".into()).await;
    let m = read(&store, "vm").await;
    assert_eq!(m, migrating("vm", 1_000));
}

#[tokio::test]
async fn a_failure_is_recorded_over_this_executions_own_write_whose_answer_was_lost() {
    let store = SimStore::new();
    let rev = put(&store, &queued("vm")).await;
    // The execution's Migrating write landed; it saw only an error.
    put(&store, &migrating("vm", 3_000)).await;
    record_failed(&store, migrating("vm", 3_000), rev, "store timeout".into()).await;
    let m = read(&store, "vm").await;
    assert_eq!(m.state, MoveState::Failed);
    assert_eq!(m.error.as_deref(), Some("store timeout"));
}

#[tokio::test]
async fn a_start_whose_answer_was_lost_goes_on_only_when_its_write_landed() {
    let store = SimStore::new();
    put(&store, &queued("vm")).await;
    let mut mine = migrating("vm", 4_000);
    mine.token_before = Some(7);
    // Not landed: the record is still queued; the move waits for the next pass.
    assert_eq!(landed(&store, &mine).await.unwrap(), None);
    // Landed: the move goes on under the revision the write committed at.
    let rev = put(&store, &mine).await;
    assert_eq!(landed(&store, &mine).await.unwrap(), Some(rev));
    // Another execution's start (another time) is not this one's.
    let mut other = mine.clone();
    other.started_ms = Some(4_001);
    assert_eq!(landed(&store, &other).await.unwrap(), None);
}

#[test]
fn a_move_carried_out_already_is_not_started_again_and_low_waits_behind_it() {
    // Two at once: only the filter keeps hi from starting twice.
    let hi = queued("hi");
    let mut lo = queued("lo");
    lo.priority = Priority::Low;
    let moves: BTreeMap<String, (MoveRecord, Revision)> =
        [("hi".to_string(), (hi, 5)), ("lo".to_string(), (lo, 6))].into();
    let none = BTreeSet::new();
    let first: Vec<String> = moves_to_start(&moves, "a", &none)
        .into_iter()
        .map(|(m, _)| m.vm)
        .collect();
    assert_eq!(first, ["hi"]);
    // hi's execution runs; the store still shows it queued.
    let running: BTreeSet<String> = ["hi".to_string()].into();
    assert!(moves_to_start(&moves, "a", &running).is_empty());
}
