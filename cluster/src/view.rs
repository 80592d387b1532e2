//! Watch-maintained views of part of the cluster's keys, as Kubernetes' informers keep
//! them: a consistent read of the part at one revision, then one watch of its prefix
//! from the next revision, applied whole batch by whole batch (a transaction is never
//! shown half applied); when the watch ends (connection lost, its start revision
//! compacted), read again. At every moment a view is its part of the cluster exactly as
//! it was at [`View::revision`], which only grows.
//!
//! Two parts are followed: the inventory (`inventory::Inventory`: nodes, VM
//! definitions, owners, admin records; lists answer from it) and the moves
//! (`drain::MoveTable`: each node's move executor wakes on their changes instead of
//! reading them every turn). Who may use a view for what (docs/cluster.md, "The
//! inventory view"): an answer from it says its revision; a caller that must see what
//! is committed now (or its own write) first waits until the view reaches etcd's
//! current revision ([`View::catch_up`]) or its write's ([`View::wait_for`]).
//! Decisions are still made by transactions whose comparisons check the store itself.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};

use crate::store::{ClusterStore, Revision, StoreError, StoreResult, WatchEvent};

/// How long a view waits before reading again after a failed read or watch.
const RETRY: Duration = Duration::from_millis(200);

/// What a [`View`] keeps: read whole at one revision, then kept up by watch batches.
pub trait Followed: Clone + Send + Sync + 'static {
    /// The prefix of the keys it holds (the watch's).
    const PREFIX: &'static str;

    /// A consistent read of its keys, at the revision it returns.
    fn read<S: ClusterStore>(store: &S) -> impl Future<Output = StoreResult<Self>> + Send;

    /// The revision it is exactly.
    fn revision(&self) -> Revision;

    /// Applies one watch batch. Events at or below its revision are already in it and
    /// are skipped (see [`apply_batch`]), so the revision never goes back. Returns
    /// whether anything was applied.
    fn apply(&mut self, batch: &[WatchEvent]) -> bool;
}

/// The revision of the last write a batch holds (0: none).
pub fn batch_revision(batch: &[WatchEvent]) -> Revision {
    batch
        .iter()
        .map(|e| match e {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        })
        .max()
        .unwrap_or(0)
}

/// The part of [`Followed::apply`] every view shares: each event of `batch` newer than
/// `revision` goes to `apply`, in order; `revision` then moves to the batch's. Returns
/// whether any event was newer.
pub fn apply_batch(
    revision: &mut Revision,
    batch: &[WatchEvent],
    mut apply: impl FnMut(&WatchEvent),
) -> bool {
    let mut applied = false;
    for event in batch {
        let at = match event {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        };
        if at > *revision {
            apply(event);
            applied = true;
        }
    }
    *revision = (*revision).max(batch_revision(batch));
    applied
}

/// Why a view could not answer as asked.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("the view is at revision {at}, not yet at {wanted}")]
    Behind { at: Revision, wanted: Revision },
    #[error("the view has not read the cluster yet")]
    NotReady,
    #[error("the view stopped")]
    Stopped,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a view did since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ViewStats {
    /// Consistent reads of its keys (the first, and one per ended watch).
    pub lists: u64,
    /// Watch batches applied.
    pub batches: u64,
}

struct Shared<T> {
    state: RwLock<Option<T>>,
    stats: RwLock<ViewStats>,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A handle on a view kept by a task of its own; the task ends when the last handle is
/// dropped.
pub struct View<T> {
    shared: Arc<Shared<T>>,
    /// `None` until the first read.
    revision: watch::Receiver<Option<Revision>>,
}

impl<T> Clone for View<T> {
    fn clone(&self) -> Self {
        View {
            shared: self.shared.clone(),
            revision: self.revision.clone(),
        }
    }
}

impl<T: Followed> View<T> {
    /// Starts the view's task on the current tokio runtime.
    pub fn start<S: ClusterStore + Clone + 'static>(store: S) -> View<T> {
        let shared = Arc::new(Shared {
            state: RwLock::new(None),
            stats: RwLock::new(ViewStats::default()),
        });
        let (tx, rx) = watch::channel(None);
        tokio::spawn(follow(store, shared.clone(), tx));
        View {
            shared,
            revision: rx,
        }
    }

    /// The revision the view is at (`None`: not read yet).
    pub fn revision(&self) -> Option<Revision> {
        *self.revision.borrow()
    }

    /// A receiver that sees the view's revision move: what a task that acts on the
    /// view's changes waits on.
    pub fn changes(&self) -> watch::Receiver<Option<Revision>> {
        self.revision.clone()
    }

    /// `f` of the state as it is now, under a read lock (keep it short: the view waits
    /// for it to apply the next batch); `None` before the first read.
    pub fn with<R>(&self, f: impl FnOnce(&T) -> R) -> Option<R> {
        read(&self.shared.state).as_ref().map(f)
    }

    /// A copy of the state as it is now.
    pub fn get(&self) -> Option<T> {
        self.with(T::clone)
    }

    pub fn stats(&self) -> ViewStats {
        *read(&self.shared.stats)
    }

    /// Waits until the view reflects `revision` (a write's: read-your-writes), at most
    /// `timeout`.
    pub async fn wait_for(&self, revision: Revision, timeout: Duration) -> Result<(), ViewError> {
        let mut rx = self.revision.clone();
        let reached = tokio::time::timeout(timeout, async {
            rx.wait_for(|r| r.is_some_and(|r| r >= revision))
                .await
                .is_ok()
        })
        .await;
        match reached {
            Ok(true) => Ok(()),
            Ok(false) => Err(ViewError::Stopped),
            Err(_) => match self.revision() {
                None => Err(ViewError::NotReady),
                Some(at) => Err(ViewError::Behind {
                    at,
                    wanted: revision,
                }),
            },
        }
    }

    /// Waits until the view reflects everything committed before this call: the
    /// store's current revision read once (a count-only read), then
    /// [`View::wait_for`]. Returns that revision. A view of every cluster key
    /// (`vireo/`) reaches any revision of an etcd the cluster has to itself; writes
    /// outside its prefix move the revision without an event, and the wait then ends
    /// [`ViewError::Behind`] (the caller reads the store instead).
    pub async fn catch_up<S: ClusterStore>(
        &self,
        store: &S,
        timeout: Duration,
    ) -> Result<Revision, ViewError> {
        let now = store.current_revision().await?;
        self.wait_for(now, timeout).await?;
        Ok(now)
    }
}

/// The view's task: read, follow, read again when the watch ends; until every
/// [`View`] is dropped.
async fn follow<S: ClusterStore, T: Followed>(
    store: S,
    shared: Arc<Shared<T>>,
    tx: watch::Sender<Option<Revision>>,
) {
    let prefix = T::PREFIX;
    loop {
        let state = tokio::select! {
            () = tx.closed() => return,
            r = T::read(&store) => match r {
                Ok(r) => r,
                Err(e) => {
                    warn!(prefix, error = %e, "view: cannot read the cluster; trying again");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            },
        };
        let at = state.revision();
        write(&shared.stats).lists += 1;
        let shown = read(&shared.state).as_ref().map(T::revision);
        if shown.is_some_and(|shown| at < shown) {
            // The revision only grows: a read older than what the view shows (etcd's
            // reads are linearizable, so not expected) is not shown; read again.
            warn!(
                prefix,
                at,
                ?shown,
                "view: a read older than the view; reading again"
            );
            tokio::time::sleep(RETRY).await;
            continue;
        }
        let watch = tokio::select! {
            () = tx.closed() => return,
            w = store.watch_prefix(prefix, at + 1) => w,
        };
        let mut watch = match watch {
            Ok(w) => w,
            Err(e) => {
                warn!(prefix, error = %e, "view: cannot watch the cluster; reading again");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        *write(&shared.state) = Some(state);
        tx.send_replace(Some(at));
        debug!(
            prefix,
            revision = at,
            "view: read the cluster, following it"
        );
        loop {
            let batch = tokio::select! {
                () = tx.closed() => return,
                b = watch.next_batch() => b,
            };
            let Some(batch) = batch else {
                debug!(prefix, "view: the watch ended; reading again");
                break;
            };
            let mut state = write(&shared.state);
            let Some(state) = state.as_mut() else { break };
            state.apply(&batch);
            write(&shared.stats).batches += 1;
            tx.send_replace(Some(state.revision()));
        }
    }
}
