//! The host's migration records and its queue: at most `limit` migrations run at once
//! (outgoing ones; an incoming one is the other host's slot), the rest wait in the
//! order they were asked for (tokio's semaphore is fair: first come, first served).
//! Records live in memory and, at every state change, in the inventory (the
//! supervisor writes them), so they survive a restart of vireod.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::model::{MigrationDirection, MigrationRecord, MigrationState};
use crate::{now_ms, AgentError};

/// How many finished records are kept (the oldest go first).
pub const KEEP_FINISHED: usize = 1000;

struct Entry {
    rec: MigrationRecord,
    /// Fires the migration's cancellation (taken by the first cancel).
    cancel: Option<oneshot::Sender<()>>,
}

pub struct Migrations {
    records: Mutex<BTreeMap<String, Entry>>,
    slots: Arc<Semaphore>,
    limit: usize,
}

use vireo_util::sync::lock;

/// Progress of a migration from the VMM's counters: pages sent over pages sent plus
/// the pages still to send (during round 0, the rest of memory; after it, the pages
/// dirty again). Below 100 until the VMM reports the migration completed.
pub fn percent(info: &api::MigrationInfo) -> f64 {
    match info.status {
        api::MigrationStatus::Completed => 100.0,
        _ => {
            let sent = info.pages_sent as f64;
            let total = sent + info.remaining_pages as f64;
            if total == 0.0 {
                0.0
            } else {
                (sent / total * 100.0).clamp(0.0, 99.9)
            }
        }
    }
}

impl Migrations {
    /// `persisted`: the records of earlier runs; outgoing ones that had not finished
    /// were cut short by vireod's restart and are marked failed (returned for saving).
    pub fn new(limit: usize, persisted: Vec<MigrationRecord>) -> (Self, Vec<MigrationRecord>) {
        let mut interrupted = Vec::new();
        let mut records = BTreeMap::new();
        for mut rec in persisted {
            // An incoming one may be followed again if its receiver is still there
            // (the supervisor decides after re-adoption).
            if !rec.state.finished() && rec.direction == MigrationDirection::Outgoing {
                rec.state = MigrationState::Failed;
                rec.finished_at_ms = Some(now_ms());
                rec.error = Some(
                    "interrupted: vireod restarted during the migration (the VMMs finished or failed on their own; check both hosts)"
                        .into(),
                );
                interrupted.push(rec.clone());
            }
            records.insert(rec.id.clone(), Entry { rec, cancel: None });
        }
        let limit = limit.max(1);
        (
            Self {
                records: Mutex::new(records),
                slots: Arc::new(Semaphore::new(limit)),
                limit,
            },
            interrupted,
        )
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A new record (queued, or running for an incoming one) and the receiver of its
    /// cancellation. A VM with an unfinished migration gets no second one.
    pub fn create(
        &self,
        vm: &str,
        direction: MigrationDirection,
        peer: String,
    ) -> Result<(MigrationRecord, oneshot::Receiver<()>), AgentError> {
        let now = now_ms();
        let rec = MigrationRecord {
            id: uuid::Uuid::new_v4().to_string(),
            vm: vm.to_string(),
            direction,
            peer,
            peer_host: None,
            state: match direction {
                MigrationDirection::Outgoing => MigrationState::Queued,
                MigrationDirection::Incoming => MigrationState::Running,
            },
            queued_at_ms: now,
            started_at_ms: (direction == MigrationDirection::Incoming).then_some(now),
            finished_at_ms: None,
            receiver_url: None,
            peer_id: None,
            progress: None,
            percent: 0.0,
            error: None,
            streams: 0,
        };
        let (tx, rx) = oneshot::channel();
        let mut records = lock(&self.records);
        if let Some(e) = records
            .values()
            .find(|e| e.rec.vm == vm && !e.rec.state.finished())
        {
            return Err(AgentError::MigrationConflict {
                id: e.rec.id.clone(),
                reason: format!("VM {vm:?} is already being migrated ({:?})", e.rec.state)
                    .to_lowercase(),
            });
        }
        records.insert(
            rec.id.clone(),
            Entry {
                rec: rec.clone(),
                cancel: Some(tx),
            },
        );
        trim(&mut records);
        Ok((rec, rx))
    }

    /// A queued migration got its slot: it runs now and can no longer be cancelled.
    /// False if it was cancelled first.
    pub fn start(&self, id: &str) -> Option<MigrationRecord> {
        let mut records = lock(&self.records);
        let e = records.get_mut(id)?;
        if e.rec.state != MigrationState::Queued || e.cancel.take().is_none() {
            return None;
        }
        e.rec.state = MigrationState::Running;
        e.rec.started_at_ms = Some(now_ms());
        Some(e.rec.clone())
    }

    /// A fresh cancellation for an unfinished record of an earlier run that is
    /// followed again (an incoming migration whose receiver vireod re-adopted).
    pub fn rearm(&self, id: &str) -> Option<oneshot::Receiver<()>> {
        let mut records = lock(&self.records);
        let e = records.get_mut(id)?;
        if e.rec.state.finished() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        e.cancel = Some(tx);
        Some(rx)
    }

    /// Every record, oldest first.
    pub fn list(&self) -> Vec<MigrationRecord> {
        let mut v: Vec<MigrationRecord> = lock(&self.records)
            .values()
            .map(|e| e.rec.clone())
            .collect();
        v.sort_by(|a, b| (a.queued_at_ms, &a.id).cmp(&(b.queued_at_ms, &b.id)));
        v
    }

    pub fn get(&self, id: &str) -> Result<MigrationRecord, AgentError> {
        lock(&self.records)
            .get(id)
            .map(|e| e.rec.clone())
            .ok_or_else(|| AgentError::UnknownMigration(id.to_string()))
    }

    /// Changes a record; returns it as it is now.
    pub fn update(
        &self,
        id: &str,
        f: impl FnOnce(&mut MigrationRecord),
    ) -> Option<MigrationRecord> {
        let mut records = lock(&self.records);
        let e = records.get_mut(id)?;
        f(&mut e.rec);
        if e.rec.state.finished() {
            e.cancel = None;
        }
        Some(e.rec.clone())
    }

    /// The unfinished migration of `vm` in `direction`, if any.
    pub fn active_for(&self, vm: &str, direction: MigrationDirection) -> Option<String> {
        lock(&self.records)
            .values()
            .find(|e| e.rec.vm == vm && e.rec.direction == direction && !e.rec.state.finished())
            .map(|e| e.rec.id.clone())
    }

    /// Asks migration `id` to stop. The migration's own task decides what that means
    /// (a queued one leaves the queue; a running outgoing one cannot be stopped).
    pub fn cancel(&self, id: &str) -> Result<(), AgentError> {
        let mut records = lock(&self.records);
        let e = records
            .get_mut(id)
            .ok_or_else(|| AgentError::UnknownMigration(id.to_string()))?;
        if e.rec.state.finished() {
            return Err(AgentError::MigrationConflict {
                id: id.to_string(),
                reason: format!("it is {:?} already", e.rec.state).to_lowercase(),
            });
        }
        if e.rec.direction == MigrationDirection::Outgoing && e.rec.state == MigrationState::Running
        {
            return Err(AgentError::MigrationConflict {
                id: id.to_string(),
                reason:
                    "it is running (a VMM's migration cannot be called back; it completes or fails)"
                        .into(),
            });
        }
        if let Some(tx) = e.cancel.take() {
            let _ = tx.send(());
        }
        Ok(())
    }

    /// Waits for a free slot (in the order of the calls).
    pub async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }
}

/// Drops the oldest finished records beyond [`KEEP_FINISHED`].
fn trim(records: &mut BTreeMap<String, Entry>) {
    let mut finished: Vec<(u64, String)> = records
        .values()
        .filter(|e| e.rec.state.finished())
        .map(|e| (e.rec.queued_at_ms, e.rec.id.clone()))
        .collect();
    if finished.len() <= KEEP_FINISHED {
        return;
    }
    finished.sort();
    for (_, id) in finished.iter().take(finished.len() - KEEP_FINISHED) {
        records.remove(id);
    }
}

/// The sending VMM's final figures, from the result line it writes as it exits
/// ([`api::MIGRATION_RESULT_PREFIX`]) in its log's last lines (the newest such line).
pub fn final_result(log_tail: &[String]) -> Option<api::MigrationInfo> {
    log_tail.iter().rev().find_map(|line| {
        let json = line.split_once(api::MIGRATION_RESULT_PREFIX)?.1;
        serde_json::from_str(json.trim()).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_result_is_the_newest_result_line_of_the_log() {
        let line = |downtime: f64| {
            let i = api::MigrationInfo {
                status: api::MigrationStatus::Completed,
                pages_sent: 70_000,
                downtime_ms: downtime,
                ..Default::default()
            };
            format!(
                "{}{}",
                api::MIGRATION_RESULT_PREFIX,
                serde_json::to_string(&i).unwrap()
            )
        };
        let tail = vec![
            "2026-12-05T00:00:00Z INFO migration committed".to_string(),
            line(1.5),
            "INFO the VM runs at its migration destination".to_string(),
            line(2.5),
        ];
        let r = final_result(&tail).unwrap();
        assert_eq!(r.status, api::MigrationStatus::Completed);
        assert_eq!((r.pages_sent, r.downtime_ms), (70_000, 2.5));
        // No result line, or a torn one (the VMM died while writing it): none.
        assert_eq!(final_result(&tail[..1]), None);
        let torn = format!("{}{{\"status\":", api::MIGRATION_RESULT_PREFIX);
        assert_eq!(final_result(&[torn]), None);
    }

    #[test]
    fn percent_follows_pages_sent_and_left() {
        let mut i = api::MigrationInfo {
            status: api::MigrationStatus::Sending,
            ..Default::default()
        };
        assert_eq!(percent(&i), 0.0);
        // Round 0, a quarter of memory sent.
        i.pages_sent = 100;
        i.remaining_pages = 300;
        assert_eq!(percent(&i), 25.0);
        i.rounds = 1;
        i.pages_sent = 300;
        i.remaining_pages = 100;
        assert_eq!(percent(&i), 75.0);
        i.remaining_pages = 0;
        assert_eq!(percent(&i), 99.9, "not done until the VMM says so");
        i.status = api::MigrationStatus::Completed;
        assert_eq!(percent(&i), 100.0);
    }

    #[tokio::test]
    async fn slots_are_handed_out_in_order_up_to_the_limit() {
        let (m, _) = Migrations::new(2, Vec::new());
        let m = Arc::new(m);
        let a = m.slot().await.unwrap();
        let _b = m.slot().await.unwrap();
        // A third waits; a fourth queues behind it.
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..2 {
            let (m, order) = (m.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let p = m.slot().await;
                lock(&order).push(i);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                drop(p);
            }));
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(lock(&order).is_empty(), "no slot while two are taken");
        drop(a);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*lock(&order), [0, 1]);
    }

    #[test]
    fn cancel_refuses_finished_and_running_outgoing_migrations() {
        let (m, _) = Migrations::new(1, Vec::new());
        let (q, mut rx) = m
            .create("a", MigrationDirection::Outgoing, "x".into())
            .unwrap();
        // One unfinished migration per VM.
        assert!(matches!(
            m.create("a", MigrationDirection::Outgoing, "y".into()),
            Err(AgentError::MigrationConflict { .. })
        ));
        m.cancel(&q.id).unwrap();
        assert!(rx.try_recv().is_ok());
        // A cancelled one does not start (its task then records it cancelled).
        assert!(m.start(&q.id).is_none());
        m.update(&q.id, |r| r.state = MigrationState::Cancelled);
        let (r, _rx) = m
            .create("b", MigrationDirection::Outgoing, "x".into())
            .unwrap();
        assert_eq!(m.start(&r.id).unwrap().state, MigrationState::Running);
        assert!(matches!(
            m.cancel(&r.id),
            Err(AgentError::MigrationConflict { .. })
        ));
        m.update(&r.id, |r| r.state = MigrationState::Completed);
        assert!(matches!(
            m.cancel(&r.id),
            Err(AgentError::MigrationConflict { .. })
        ));
        assert!(matches!(
            m.cancel("nope"),
            Err(AgentError::UnknownMigration(_))
        ));
        assert_eq!(m.active_for("a", MigrationDirection::Outgoing), None);
        let (q2, _rx) = m
            .create("a", MigrationDirection::Outgoing, "x".into())
            .unwrap();
        assert_eq!(m.active_for("a", MigrationDirection::Outgoing), Some(q2.id));
    }

    #[test]
    fn unfinished_records_of_an_earlier_run_become_failed() {
        let (m, _) = Migrations::new(1, Vec::new());
        let (r, _) = m
            .create("a", MigrationDirection::Outgoing, "x".into())
            .unwrap();
        let (i, _) = m
            .create("b", MigrationDirection::Incoming, "y".into())
            .unwrap();
        let (m2, interrupted) = Migrations::new(1, vec![r.clone(), i.clone()]);
        assert_eq!(interrupted.len(), 1);
        // The incoming one is left for the supervisor to follow again or fail.
        assert_eq!(m2.get(&i.id).unwrap().state, MigrationState::Running);
        assert!(m2.rearm(&i.id).is_some());
        let r2 = m2.get(&r.id).unwrap();
        assert_eq!(r2.state, MigrationState::Failed);
        assert!(r2.error.unwrap().contains("interrupted"));
    }
}
