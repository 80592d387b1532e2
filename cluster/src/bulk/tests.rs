//! Selectors, plans and the queue's order.

use super::*;
use crate::keys::{MoveReason, Priority};

#[test]
fn selectors_parse_combine_and_refuse_unknown_keys_naming_them() {
    let s = Selector::parse("priority=low, class=web").unwrap();
    assert_eq!(
        s.terms,
        [Term::Priority(Priority::Low), Term::Class("web".into())]
    );
    assert_eq!(
        Selector::parse("node=b").unwrap().terms,
        [Term::Node("b".into())]
    );
    let e = Selector::parse("priority=low,colour=red").unwrap_err();
    assert!(
        matches!(&e, BulkError::UnknownKey(k) if k == "colour"),
        "{e}"
    );
    assert!(e.to_string().contains("\"colour\""), "{e}");
    for bad in ["priority", "priority=", "priority=urgent", "", "node=b,,"] {
        assert!(
            matches!(Selector::parse(bad), Err(BulkError::BadSelector { .. })),
            "{bad:?} accepted"
        );
    }
}

#[test]
fn the_queue_lists_running_then_queued_high_first_then_finished_latest_first() {
    let m = |vm: &str, state, priority, finished| MoveRecord {
        vm: vm.into(),
        from: "a".into(),
        to: "b".into(),
        priority,
        reason: MoveReason::Bulk,
        drain_of: String::new(),
        request: Some("r".into()),
        state,
        concurrency: 1,
        token_before: None,
        token_after: None,
        error: None,
        started_ms: None,
        finished_ms: finished,
    };
    let mut q = vec![
        m("old", MoveState::Moved, Priority::High, Some(1)),
        m("lo", MoveState::Queued, Priority::Low, None),
        m("new", MoveState::Failed, Priority::Low, Some(5)),
        m("hi", MoveState::Queued, Priority::High, None),
        m("run", MoveState::Migrating, Priority::Low, None),
    ];
    sort_queue(&mut q);
    let order: Vec<&str> = q.iter().map(|m| m.vm.as_str()).collect();
    assert_eq!(order, ["run", "hi", "lo", "new", "old"]);
}
