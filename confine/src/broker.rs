//! The file thread ("broker"): once a program is confined, the one thread that opens,
//! creates and removes files. Every other thread hands it a named job ([`FileOp`]) and
//! waits for the answer (a `File`, an `OwnedFd`, whatever the job returns: the same
//! process, so descriptors are handed over as values), so their seccomp filters have
//! no `openat`, `mkdir` or `unlink`.
//!
//! The mechanism lives here, beside the code that opens beneath the storage roots
//! ([`crate::Roots`], `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`), so the library
//! crates that open or remove files on a confined program's threads (migration sockets,
//! the API socket, snapshots, change logs) route through it without knowing the
//! program; the program ([`start`]) decides how the thread confines itself.
//!
//! Before [`start`] (a program starting, a library's tests), or on the file thread
//! itself (a job that calls [`run`] again), a job runs on the calling thread.
//!
//! Not a hard boundary by itself: every thread shares the address space. What it gains
//! is that the kernel refuses an `openat` on any other thread, and the file thread's
//! own filter refuses what it never needs (`ioctl`, sockets, starting threads).

use std::cell::Cell;
use std::fmt;
use std::sync::mpsc::{self, Sender};
use std::sync::OnceLock;

/// What a job does: named for the log and the reader; each names a file operation
/// a running program still needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileOp {
    /// A disk image (and a VHDX's parents, its O_DIRECT descriptor, a clustered
    /// disk's fencing record): `vm.create`, a restore, an incoming migration, a
    /// storage migration's destination, a disk taken back after a failed migration.
    OpenDisk,
    /// A kernel or initramfs (`vm.create`, a reboot).
    OpenPayload,
    /// A serial or console output file and its rotated copy.
    OpenOutput,
    /// `/dev/kvm` (a VM created after start).
    OpenKvm,
    /// `/dev/net/tun` (a tap attached after start; configured by the caller).
    OpenTun,
    /// A replicated disk's change log directory, opened and recovered.
    OpenChangeLog,
    /// Seals every replicated disk's log at a cut (a new segment file each).
    SealChangeLogs,
    /// Writes a snapshot directory (`vm.snapshot`).
    WriteSnapshot,
    /// Opens a snapshot directory and reads it (`vm.restore`).
    ReadSnapshot,
    /// Opens an existing directory beneath the roots (a receiver's `storage_dir`).
    OpenDir,
    /// Creates a directory (0700) beneath the roots.
    CreateDir,
    /// Opens the directory a new file is to be made in.
    OpenParent,
    /// Creates a new disk image (a storage migration's destination, a shared-nothing
    /// copy's image).
    CreateImage,
    /// Reads the TLS PEM files of a migration.
    ReadTlsFiles,
    /// Removes a file: the API socket, a unix migration socket, a storage migration's
    /// old or abandoned image, a failed shared-nothing copy.
    RemoveFile,
    /// Opens `/proc/self/pagemap` (which guest pages are populated).
    OpenPagemap,
    /// Reads host facts under `/sys` and `/proc` (NUMA nodes, huge pages, RAM).
    ReadHostInfo,
    /// A test hook's probe (`test-hooks` builds only).
    TestProbe,
}

impl fmt::Display for FileOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

type Job = Box<dyn FnOnce() + Send>;

struct Broker {
    jobs: Sender<(FileOp, Job)>,
}

static BROKER: OnceLock<Broker> = OnceLock::new();

thread_local! {
    static ON_FILE_THREAD: Cell<bool> = const { Cell::new(false) };
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot start the file thread {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the file thread {name} could not confine itself: {reason}")]
    Confine { name: String, reason: String },
    #[error("the file thread was already started")]
    AlreadyStarted,
}

/// Starts the file thread `name`. It runs `confine` first (its Landlock domain and
/// seccomp filter) and `start` returns once that is done: Err if `confine` failed (the
/// thread then ends and no broker is installed). From then on [`run`] hands every job
/// to it.
pub fn start(
    name: &str,
    confine: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> Result<(), BrokerError> {
    if BROKER.get().is_some() {
        return Err(BrokerError::AlreadyStarted);
    }
    let (jobs, queue) = mpsc::channel::<(FileOp, Job)>();
    let (confined, ready) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            ON_FILE_THREAD.with(|c| c.set(true));
            let outcome = confine();
            let ok = outcome.is_ok();
            let _ = confined.send(outcome);
            if !ok {
                return;
            }
            for (op, job) in queue {
                tracing::debug!(%op, "file thread: job");
                job();
            }
        })
        .map_err(|source| BrokerError::Spawn {
            name: name.to_string(),
            source,
        })?;
    match ready.recv() {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => {
            return Err(BrokerError::Confine {
                name: name.to_string(),
                reason,
            })
        }
        Err(_) => {
            return Err(BrokerError::Confine {
                name: name.to_string(),
                reason: "the thread ended".into(),
            })
        }
    }
    BROKER
        .set(Broker { jobs })
        .map_err(|_| BrokerError::AlreadyStarted)
}

/// Whether a file thread serves this process.
pub fn started() -> bool {
    BROKER.get().is_some()
}

/// Whether the calling thread is the file thread.
pub fn on_file_thread() -> bool {
    ON_FILE_THREAD.with(Cell::get)
}

/// Runs `f`, the file operation `op`, on the file thread and returns what it returned;
/// here when there is no file thread (yet) or this is it. If the file thread were gone
/// (it cannot be: it serves until the process ends, and a panic there aborts a
/// program that installs an aborting panic hook) the job runs here, where the calling
/// thread's filter has the last word.
pub fn run<R: Send + 'static>(op: FileOp, f: impl FnOnce() -> R + Send + 'static) -> R {
    let Some(broker) = BROKER.get().filter(|_| !on_file_thread()) else {
        return f();
    };
    let (tx, rx) = mpsc::sync_channel::<R>(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    if let Err(mpsc::SendError((_, job))) = broker.jobs.send((op, job)) {
        tracing::error!(%op, "the file thread is gone; running the job here");
        job();
    }
    match rx.recv() {
        Ok(r) => r,
        Err(_) => unanswered(op),
    }
}

/// The file thread dropped a job without answering: only possible if it panicked
/// mid-job without aborting the process (a library's tests). Ends the calling thread
/// the same way.
fn unanswered(op: FileOp) -> ! {
    panic!("the file thread did not answer {op}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn this_thread() -> String {
        std::thread::current().name().unwrap_or("").to_string()
    }

    /// One test: the file thread is process-wide (the other tests of this crate then
    /// run their jobs on it too, which changes nothing for them).
    #[test]
    fn jobs_run_on_the_file_thread_once_started_and_a_job_s_own_jobs_run_in_place() {
        // Before start: here.
        let here = run(FileOp::TestProbe, this_thread);
        assert_eq!(here, this_thread());
        assert!(!started());

        let refused = start("test-refused", || Err("no domain".into()));
        assert!(
            matches!(refused, Err(BrokerError::Confine { .. })),
            "{refused:?}"
        );
        assert!(
            !started(),
            "a thread that could not confine itself serves nothing"
        );

        start("test-files", || Ok(())).unwrap();
        assert!(started());
        assert!(matches!(
            start("test-files-2", || Ok(())),
            Err(BrokerError::AlreadyStarted)
        ));
        assert_eq!(run(FileOp::TestProbe, this_thread), "test-files");
        // A job that asks for another runs it itself (no deadlock on its own queue).
        let nested = run(FileOp::TestProbe, || {
            (on_file_thread(), run(FileOp::TestProbe, this_thread))
        });
        assert_eq!(nested, (true, "test-files".to_string()));
        // What a job opens comes back as a value.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"data").unwrap();
        let file = run(FileOp::TestProbe, move || std::fs::File::open(path)).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut &file, &mut text).unwrap();
        assert_eq!(text, "data");
    }
}
