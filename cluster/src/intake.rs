//! A destination's limit on moves arriving at once, held by the store: every start of a
//! move into node N rewrites `vireo/intake/N` (the VMs migrating into N) in the same
//! transaction that marks the move migrating, comparing the record's revision as read.
//! Two sources that both saw N's last slot free cannot both take it: the second's
//! transaction loses, and its move stays queued for its next pass.
//!
//! An entry counts only while its move is still migrating into N: entries of moves
//! that ended (or whose source died) are dropped by the next start, so nothing has to
//! remove them.

use crate::keys::{self, Intake, MoveRecord, MoveState};
use crate::store::{ClusterStore, CmpOp, Compare, Op, Revision, StoreResult};

/// The comparison and write a move's start adds to its transaction, taking a slot of
/// its destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub compare: Compare,
    pub put: Op,
    /// The intake record's revision as read.
    pub revision: Revision,
}

/// A slot for `m` at its destination, or `None` while as many moves as its concurrency
/// migrate into it.
pub async fn reserve<S: ClusterStore>(store: &S, m: &MoveRecord) -> StoreResult<Option<Slot>> {
    let key = keys::intake_key(&m.to);
    let (intake, revision) = match store.get(&key).await? {
        Some(kv) => (
            keys::decode::<Intake>(&kv.value).unwrap_or_default(),
            kv.mod_revision,
        ),
        None => (Intake::default(), 0),
    };
    let mut now = Intake::default();
    for vm in intake.vms.iter().filter(|vm| **vm != m.vm) {
        let arriving = store
            .get(&keys::move_key(vm))
            .await?
            .and_then(|kv| keys::decode::<MoveRecord>(&kv.value))
            .is_some_and(|o| o.state == MoveState::Migrating && o.to == m.to);
        if arriving {
            now.vms.push(vm.clone());
        }
    }
    if now.vms.len() >= m.concurrency.max(1) as usize {
        return Ok(None);
    }
    now.vms.push(m.vm.clone());
    Ok(Some(Slot {
        compare: Compare::ModRevision {
            key: key.clone(),
            op: CmpOp::Equal,
            revision,
        },
        put: Op::Put {
            key,
            value: keys::encode(&now),
            lease: 0,
        },
        revision,
    }))
}

/// Whether `node`'s intake record moved past `revision` (another start took a slot).
pub async fn moved<S: ClusterStore>(
    store: &S,
    node: &str,
    revision: Revision,
) -> StoreResult<bool> {
    let now = store
        .get(&keys::intake_key(node))
        .await?
        .map_or(0, |kv| kv.mod_revision);
    Ok(now != revision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{MoveReason, Priority};
    use crate::store::Txn;
    use crate::SimStore;

    fn mv(vm: &str, state: MoveState) -> MoveRecord {
        MoveRecord {
            vm: vm.into(),
            from: "a".into(),
            to: "b".into(),
            priority: Priority::Low,
            reason: MoveReason::Bulk,
            drain_of: String::new(),
            request: None,
            state,
            concurrency: 1,
            token_before: None,
            token_after: None,
            error: None,
            started_ms: None,
            finished_ms: None,
        }
    }

    async fn start(s: &SimStore, m: &MoveRecord, slot: Slot) -> bool {
        let mut migrating = m.clone();
        migrating.state = MoveState::Migrating;
        s.txn(Txn {
            when: vec![slot.compare],
            then: vec![
                slot.put,
                Op::Put {
                    key: keys::move_key(&m.vm),
                    value: keys::encode(&migrating),
                    lease: 0,
                },
            ],
            otherwise: vec![],
        })
        .await
        .unwrap()
        .succeeded
    }

    #[tokio::test]
    async fn two_sources_cannot_both_take_a_destinations_last_slot_and_an_ended_move_frees_it() {
        let s = SimStore::new();
        let (v1, v2) = (mv("v1", MoveState::Queued), mv("v2", MoveState::Queued));
        // Both read the slot free, one after the other; the first start wins.
        let s1 = reserve(&s, &v1).await.unwrap().unwrap();
        let s2 = reserve(&s, &v2).await.unwrap().unwrap();
        assert!(start(&s, &v1, s1).await);
        assert!(
            !start(&s, &v2, s2.clone()).await,
            "two moves into b at once"
        );
        assert!(moved(&s, "b", s2.revision).await.unwrap());
        // Read again: b is full while v1 migrates.
        assert_eq!(reserve(&s, &v2).await.unwrap(), None);
        // v1 ended: its entry no longer counts.
        s.put(
            &keys::move_key("v1"),
            keys::encode(&mv("v1", MoveState::Moved)),
            0,
        )
        .await
        .unwrap();
        let s2 = reserve(&s, &v2).await.unwrap().unwrap();
        assert!(start(&s, &v2, s2).await);
        let kv = s.get(&keys::intake_key("b")).await.unwrap().unwrap();
        let now: Intake = keys::decode(&kv.value).unwrap();
        assert_eq!(now.vms, ["v2"]);
    }
}
