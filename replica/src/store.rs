//! The replica server's store of one replicated VM: its raw disk images, each disk's
//! applied state ([`ReplicaDisk`]), segments staged before they are applied, and the
//! VM-wide recovery point.
//!
//! A recovery point is a cut id at which *every* disk of the VM is applied. Because
//! the images are updated in place, applying a point is a redo transaction:
//!
//! 1. each disk's segments are staged first (decompressed into `disk-N/SEQ.part`,
//!    verified to the trailer, fsynced, renamed to `SEQ.vlog`, the directory fsynced);
//! 2. `commit` checks that every disk has its segments up to one whose trailer names
//!    the cut, and verifies them all again;
//! 3. it writes the intent (`committing`: the cut id and each disk's sequence number)
//!    atomically, applies each disk's segments in order (image synced, disk state
//!    recorded), writes the VM's state with the new point, and removes the intent and
//!    the applied segments.
//!
//! A crash anywhere in step 3 leaves the intent; the next open finishes it (applying a
//! segment again writes the same absolute bytes), so the point read after a crash is
//! always one whose bytes are all on the images. While an intent is pending the images
//! are between two points; nothing reads them before it is finished.
//!
//! Layout of the VM's directory: `vm.state` (checksummed JSON), `committing`,
//! `disk-N.img` (raw), `disk-N/` (the disk's `applied` state and staged segments).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::log::sync_dir;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use crate::apply::{ApplyError, ApplyOutcome, ReplicaDisk};
use crate::error::SegmentError;
use crate::format::segment_file_name;
use crate::history::{self, PointInfo, MAX_HISTORY};

/// The longest spacing of kept points: a week.
pub const MAX_SPACING_S: u64 = 7 * 24 * 3600;
use crate::resync::{self, BlockHash};
use crate::segment::{SegmentReader, Trailer};

const STATE_FILE: &str = "vm.state";
const INTENT_FILE: &str = "committing";
/// A failover to an older kept point in progress (its cut id).
const ROLLBACK_FILE: &str = "rolling-back";
/// The undo files of the kept points (`history.rs`).
const HISTORY_DIR: &str = "history";
/// At most this many disks per replicated VM.
pub const MAX_DISKS: usize = 16;
/// At most this many bytes in one chunk of the initial copy.
pub const MAX_BASE_CHUNK: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("replica store: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("segment {seq} of disk {disk} refused: {source}")]
    Segment {
        disk: usize,
        seq: u64,
        #[source]
        source: SegmentError,
    },
    #[error("the undo data of point {cut_id}, disk {disk}: {source}")]
    Undo {
        cut_id: u64,
        disk: usize,
        #[source]
        source: SegmentError,
    },
    /// The request contradicts what the replica holds (409).
    #[error("replica store: {0}")]
    Conflict(String),
    /// The request itself is wrong (400).
    #[error("replica store: {0}")]
    Invalid(String),
    /// A body beyond its bound (413).
    #[error("replica store: {what} exceeds {limit} bytes")]
    TooLarge { what: &'static str, limit: u64 },
    #[error("replica store: no replica of this VM")]
    NotFound,
    #[error("replica store: the state file {0} is damaged")]
    Damaged(&'static str),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

/// A VM-wide recovery point: the cut id and, per disk, the segment that ends at it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    pub cut_id: u64,
    pub seqs: Vec<u64>,
}

/// What the VM's state file records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct VmState {
    disk_sizes: Vec<u64>,
    base_complete: bool,
    point: Option<Point>,
    /// The replica was failed over: a VM runs on its images now, nothing of the
    /// primary is taken any more.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    failed_over: bool,
    /// The kept recovery points, oldest first; the last is `point`. Every one after
    /// the first has its undo files (they lead back to the one before it).
    #[serde(default)]
    history: Vec<PointInfo>,
    /// How many points to keep (1: only the latest).
    #[serde(default = "one")]
    keep: u32,
    /// Thinning: seconds at least between two kept points other than the latest (0:
    /// every point is kept until `keep` drops it). Hyper-V's "hourly" is 3600.
    #[serde(default, skip_serializing_if = "is_zero")]
    spacing_s: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn one() -> u32 {
    1
}

/// What the commit intent records: the point and what its listing shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Intent {
    cut_id: u64,
    seqs: Vec<u64>,
    #[serde(default)]
    time_s: u64,
    #[serde(default)]
    changed_bytes: u64,
    /// The latest point this commit folds into the new one (thinning): its undo data
    /// was merged into the new point's, and it leaves the history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    folds: Option<u64>,
}

/// What the rollback intent records.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Rollback {
    cut_id: u64,
}

/// What a primary stores beside its replica for a failover, besides the disks: the
/// VM's definition and its boot payload (a failover on this host boots these, never
/// files of this host the primary names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extra {
    Definition,
    Kernel,
    Initramfs,
}

impl Extra {
    pub fn file_name(self) -> &'static str {
        match self {
            Extra::Definition => "definition.json",
            Extra::Kernel => "kernel",
            Extra::Initramfs => "initramfs",
        }
    }

    /// The most bytes each may have.
    pub fn limit(self) -> u64 {
        match self {
            Extra::Definition => 1 << 20,
            Extra::Kernel | Extra::Initramfs => 512 << 20,
        }
    }
}

/// One disk as the status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStatus {
    pub size: u64,
    pub applied_seq: u64,
    pub applied_cut_id: u64,
    /// Segments staged and not yet applied.
    pub staged: Vec<u64>,
}

/// What the replica holds of a VM: a primary resumes from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub base_complete: bool,
    /// A VM was started from this replica (it takes nothing from the primary now).
    #[serde(default)]
    pub failed_over: bool,
    /// The newest recovery point (none before the first commit).
    pub point: Option<Point>,
    pub disks: Vec<DiskStatus>,
    /// How many recovery points the replica keeps.
    #[serde(default = "one")]
    pub keep: u32,
    /// Seconds at least between kept points other than the latest (0: every point).
    #[serde(default)]
    pub spacing_s: u64,
    /// The kept points, oldest first (the last is `point`).
    #[serde(default)]
    pub points: Vec<PointInfo>,
}

/// The answer to staging a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Staged {
    /// Verified and kept for the commit of its cut.
    Staged(Trailer),
    /// Applied already (a re-send): nothing was kept.
    AlreadyApplied,
}

/// The answer to a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Committed {
    Committed(Point),
    /// This point or a newer one exists already (a re-send).
    AlreadyThere(Point),
}

/// One replicated VM's directory, opened.
pub struct ReplicaVm {
    dir: OwnedFd,
    history_dir: OwnedFd,
    state: VmState,
    images: Vec<File>,
    disks: Vec<ReplicaDisk<File>>,
    disk_dirs: Vec<OwnedFd>,
    /// Tests: the commit stops (as a killed process would) once disk `.0` applied
    /// segment `.1`.
    #[cfg(test)]
    pub(crate) crash_after_applying: Option<(usize, u64)>,
    /// A test's clock (seconds since the epoch) for the points' times.
    #[cfg(test)]
    pub(crate) clock_s: Option<u64>,
}

fn disk_image_name(i: usize) -> String {
    format!("disk-{i}.img")
}

fn disk_dir_name(i: usize) -> String {
    format!("disk-{i}")
}

fn part_name(seq: u64) -> String {
    format!("{seq:020}.part")
}

fn encode_state(s: &VmState) -> Vec<u8> {
    let json = serde_json::to_vec(s).unwrap_or_default();
    let mut b = format!("{:08x}\n", crc32c::crc32c(&json)).into_bytes();
    b.extend_from_slice(&json);
    b
}

fn decode_checked<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Option<T> {
    let (crc, json) = (b.get(..8)?, b.get(9..)?);
    let crc = u32::from_str_radix(std::str::from_utf8(crc).ok()?, 16).ok()?;
    if crc32c::crc32c(json) != crc || b.get(8) != Some(&b'\n') {
        return None;
    }
    serde_json::from_slice(json).ok()
}

fn encode_json<T: Serialize>(p: &T) -> Vec<u8> {
    let json = serde_json::to_vec(p).unwrap_or_default();
    let mut b = format!("{:08x}\n", crc32c::crc32c(&json)).into_bytes();
    b.extend_from_slice(&json);
    b
}

fn read_opt(dir: BorrowedFd<'_>, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
    match std::fs::read(confine::fd_path(dir, name.as_ref())) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(format!("reading {name}"))(e)),
    }
}

fn open_or_create_dir(parent: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    match confine::mkdir_private(parent, name.as_ref()) {
        Ok(fd) => Ok(fd),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            confine::open_dir_at(parent, name.as_ref())
        }
        Err(e) => Err(e),
    }
}

/// Opens `name` in `dir` for reading and writing without following a symlink.
/// Tells the kernel how an image is used: `POSIX_FADV_RANDOM` (no readahead: the
/// undo capture reads the old bytes of the ranges a segment overwrites; readahead
/// would cache them as large folios, and the segment's small writes would then dirty
/// whole folios: the replica wrote back ~64x the guest's bytes on ext4 with large
/// folios) or `POSIX_FADV_DONTNEED`. Advice only: a file system that ignores it loses
/// nothing but the saving.
fn advise(image: &File, advice: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise on an fd this File owns; no memory is passed.
    let r = unsafe { libc::posix_fadvise(image.as_raw_fd(), 0, 0, advice) };
    if r != 0 {
        tracing::debug!(advice, error = %io::Error::from_raw_os_error(r), "posix_fadvise on a replica image");
    }
}

fn open_rw_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_nofollow()
        .open(confine::fd_path(dir, name.as_ref()))
}

trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for std::fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOFOLLOW)
    }
}

impl ReplicaVm {
    /// Opens the replica of a VM in `parent/name`, creating it with disks of
    /// `disk_sizes` bytes (sparse raw images) if it does not exist. An existing
    /// replica with other disks is a conflict.
    pub fn create_or_open(
        parent: BorrowedFd<'_>,
        name: &str,
        disk_sizes: &[u64],
    ) -> Result<Self, StoreError> {
        Self::create_or_open_seeded(parent, name, disk_sizes, None)
    }

    /// As [`Self::create_or_open`]; a new replica's images start as copies of
    /// `seed` (one file per disk, of the disk's size: an older copy of the disks, as
    /// the old primary's own disks for a reverse replication) instead of zero. The
    /// initial copy then is a resync that sends only the blocks that differ.
    pub fn create_or_open_seeded(
        parent: BorrowedFd<'_>,
        name: &str,
        disk_sizes: &[u64],
        seed: Option<&[File]>,
    ) -> Result<Self, StoreError> {
        if let Some(seed) = seed {
            if seed.len() != disk_sizes.len() {
                return Err(StoreError::Invalid(format!(
                    "{} seed images for {} disks",
                    seed.len(),
                    disk_sizes.len()
                )));
            }
        }
        if disk_sizes.is_empty() || disk_sizes.len() > MAX_DISKS {
            return Err(StoreError::Invalid(format!(
                "a replicated VM has 1 to {MAX_DISKS} disks, not {}",
                disk_sizes.len()
            )));
        }
        if let Some(&bad) = disk_sizes
            .iter()
            .find(|&&s| s == 0 || !s.is_multiple_of(512))
        {
            return Err(StoreError::Invalid(format!(
                "a disk of {bad} bytes (must be a non-zero multiple of 512)"
            )));
        }
        let dir = open_or_create_dir(parent, name).map_err(io_err(format!("directory {name}")))?;
        if let Some(b) = read_opt(dir.as_fd(), STATE_FILE)? {
            let state: VmState = decode_checked(&b).ok_or(StoreError::Damaged(STATE_FILE))?;
            if state.disk_sizes != disk_sizes {
                return Err(StoreError::Conflict(format!(
                    "the replica holds disks of {:?} bytes, not {disk_sizes:?}",
                    state.disk_sizes
                )));
            }
            return Self::open_dir(dir);
        }
        // New (or a creation a crash cut short: vm.state is written last).
        for (i, &size) in disk_sizes.iter().enumerate() {
            let image = match confine::create_private(dir.as_fd(), disk_image_name(i).as_ref()) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    open_rw_at(dir.as_fd(), &disk_image_name(i))
                        .map_err(io_err(disk_image_name(i)))?
                }
                Err(e) => return Err(io_err(disk_image_name(i))(e)),
            };
            image.set_len(0).map_err(io_err(disk_image_name(i)))?;
            image.set_len(size).map_err(io_err(disk_image_name(i)))?;
            if let Some(from) = seed.and_then(|s| s.get(i)) {
                copy_sparse(from, &image, size).map_err(io_err(format!(
                    "seeding {} from an existing copy",
                    disk_image_name(i)
                )))?;
            }
            image.sync_all().map_err(io_err(disk_image_name(i)))?;
            open_or_create_dir(dir.as_fd(), &disk_dir_name(i)).map_err(io_err(disk_dir_name(i)))?;
        }
        let state = VmState {
            disk_sizes: disk_sizes.to_vec(),
            base_complete: false,
            point: None,
            failed_over: false,
            history: Vec::new(),
            keep: 1,
            spacing_s: 0,
        };
        Self::save_state(dir.as_fd(), &state)?;
        tracing::info!(vm = name, disks = ?disk_sizes, "replica: new replicated VM");
        Self::open_dir(dir)
    }

    /// Opens the existing replica in `parent/name` (and finishes a commit a crash
    /// interrupted).
    pub fn open(parent: BorrowedFd<'_>, name: &str) -> Result<Self, StoreError> {
        let dir = match confine::open_dir_at(parent, name.as_ref()) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotFound),
            Err(e) => return Err(io_err(format!("directory {name}"))(e)),
        };
        Self::open_dir(dir)
    }

    fn open_dir(dir: OwnedFd) -> Result<Self, StoreError> {
        let b = read_opt(dir.as_fd(), STATE_FILE)?.ok_or(StoreError::NotFound)?;
        let mut state: VmState = decode_checked(&b).ok_or(StoreError::Damaged(STATE_FILE))?;
        if let (true, Some(p)) = (state.history.is_empty(), &state.point) {
            // A replica from before the history: its one point, time unknown.
            state.history.push(PointInfo {
                cut_id: p.cut_id,
                seqs: p.seqs.clone(),
                time_s: 0,
                changed_bytes: 0,
                undo_bytes: 0,
                folded: Vec::new(),
            });
        }
        let history_dir =
            open_or_create_dir(dir.as_fd(), HISTORY_DIR).map_err(io_err(HISTORY_DIR))?;
        let mut images = Vec::new();
        let mut disks = Vec::new();
        let mut disk_dirs = Vec::new();
        for i in 0..state.disk_sizes.len() {
            let image =
                open_rw_at(dir.as_fd(), &disk_image_name(i)).map_err(io_err(disk_image_name(i)))?;
            advise(&image, libc::POSIX_FADV_RANDOM);
            let ddir = confine::open_dir_at(dir.as_fd(), disk_dir_name(i).as_ref())
                .map_err(io_err(disk_dir_name(i)))?;
            let ddir2 = ddir.try_clone().map_err(io_err(disk_dir_name(i)))?;
            let image2 = image.try_clone().map_err(io_err(disk_image_name(i)))?;
            disks.push(ReplicaDisk::open(image2, ddir2)?);
            images.push(image);
            disk_dirs.push(ddir);
        }
        let mut vm = Self {
            dir,
            history_dir,
            state,
            images,
            disks,
            disk_dirs,
            #[cfg(test)]
            crash_after_applying: None,
            #[cfg(test)]
            clock_s: None,
        };
        if let Some(b) = read_opt(vm.dir.as_fd(), INTENT_FILE)? {
            let intent: Intent = decode_checked(&b).ok_or(StoreError::Damaged(INTENT_FILE))?;
            tracing::warn!(
                cut_id = intent.cut_id,
                "replica: finishing a commit a crash interrupted"
            );
            vm.finish_commit(&intent)?;
        }
        if let Some(b) = read_opt(vm.dir.as_fd(), ROLLBACK_FILE)? {
            let r: Rollback = decode_checked(&b).ok_or(StoreError::Damaged(ROLLBACK_FILE))?;
            tracing::warn!(
                cut_id = r.cut_id,
                "replica: finishing a failover to an older point a crash interrupted"
            );
            vm.finish_rollback(r.cut_id)?;
        }
        vm.drop_unkept_undo()?;
        Ok(vm)
    }

    fn save_state(dir: BorrowedFd<'_>, state: &VmState) -> Result<(), StoreError> {
        confine::write_private_atomic(dir, STATE_FILE.as_ref(), &encode_state(state))
            .and_then(|()| sync_dir(dir))
            .map_err(io_err("recording the VM's state"))
    }

    /// Refused once the replica was failed over (409).
    fn taking(&self) -> Result<(), StoreError> {
        if self.state.failed_over {
            return Err(StoreError::Conflict(
                "the replica was failed over: a VM runs on its disks, nothing more is taken".into(),
            ));
        }
        Ok(())
    }

    pub fn failed_over(&self) -> bool {
        self.state.failed_over
    }

    /// Marks the replica failed over (recorded before a VM may start on its images)
    /// and returns its point: the latest complete one, or the kept point `cut_id`
    /// (the images are rolled back to it in place; the newer points are dropped).
    /// Refused without a point. Idempotent.
    pub fn fail_over(&mut self, cut_id: Option<u64>) -> Result<Point, StoreError> {
        let point = self.state.point.clone().ok_or_else(|| {
            StoreError::Conflict("no recovery point yet: nothing to fail over to".into())
        })?;
        if let Some(want) = cut_id.filter(|&c| c != point.cut_id) {
            if self.state.failed_over {
                return Err(StoreError::Conflict(format!(
                    "failed over at point {} already, not {want}",
                    point.cut_id
                )));
            }
            self.kept(want)?;
            confine::write_private_atomic(
                self.dir.as_fd(),
                ROLLBACK_FILE.as_ref(),
                &encode_json(&Rollback { cut_id: want }),
            )
            .and_then(|()| sync_dir(self.dir.as_fd()))
            .map_err(io_err("recording the failover's point"))?;
            self.finish_rollback(want)?;
            return self
                .state
                .point
                .clone()
                .ok_or(StoreError::Damaged(STATE_FILE));
        }
        if !self.state.failed_over {
            let mut state = self.state.clone();
            state.failed_over = true;
            Self::save_state(self.dir.as_fd(), &state)?;
            self.state = state;
        }
        Ok(point)
    }

    /// Makes a failed-over replica a new one on the same images, for a reverse
    /// replication onto them (the VM that ran on them replicates back here): no
    /// point, no kept history, nothing applied or staged, the initial copy incomplete
    /// (a resync sends what differs). The state file is written last: a crash before
    /// it leaves the replica failed over, and the reset is done again.
    pub fn reset_for_resync(self) -> Result<Self, StoreError> {
        if !self.state.failed_over {
            return Err(StoreError::Conflict(
                "only a failed-over replica is reset for a reverse replication".into(),
            ));
        }
        self.reset("a failed-over replica reset for a reverse replication")
    }

    /// Resets a replica whose primary's host went down while the VM wrote (its images
    /// and change logs may disagree there): like [`ReplicaVm::reset_for_resync`], the
    /// images kept for a resync by block hashes, every point, staged segment and
    /// applied state dropped — the primary's change logs start again. Refused for a
    /// failed-over replica (it runs the VM now: its images are no longer the copy).
    pub fn reset_after_primary_crash(self) -> Result<Self, StoreError> {
        if self.state.failed_over {
            return Err(StoreError::Conflict(
                "the replica was failed over: it is not resynchronised from the old primary (reverse the replication instead)".into(),
            ));
        }
        self.reset("reset for a resync after the primary's host went down")
    }

    fn reset(self, why: &'static str) -> Result<Self, StoreError> {
        for (i, ddir) in self.disk_dirs.iter().enumerate() {
            for seq in self.staged(i)? {
                confine::unlink_at(ddir.as_fd(), segment_file_name(seq).as_ref())
                    .map_err(io_err(format!("disk {i}: removing segment {seq}")))?;
            }
            match confine::unlink_at(ddir.as_fd(), crate::apply::STATE_FILE.as_ref()) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err(format!("disk {i}: removing its applied state"))(e))
                }
                _ => {}
            }
            sync_dir(ddir.as_fd()).map_err(io_err(disk_dir_name(i)))?;
        }
        let state = VmState {
            disk_sizes: self.state.disk_sizes.clone(),
            base_complete: false,
            point: None,
            failed_over: false,
            history: Vec::new(),
            keep: self.state.keep,
            spacing_s: self.state.spacing_s,
        };
        Self::save_state(self.dir.as_fd(), &state)?;
        tracing::info!("replica: {why}");
        let reopened = Self::open_dir(self.dir)?;
        reopened.drop_unkept_undo()?;
        Ok(reopened)
    }

    /// Stores `bytes` as `which` (atomically replaced, synced).
    pub fn put_extra(&mut self, which: Extra, bytes: &[u8]) -> Result<(), StoreError> {
        self.taking()?;
        if bytes.len() as u64 > which.limit() {
            return Err(StoreError::TooLarge {
                what: which.file_name(),
                limit: which.limit(),
            });
        }
        let name = which.file_name();
        confine::write_private_atomic(self.dir.as_fd(), name.as_ref(), bytes)
            .and_then(|()| {
                // A jailed VMM reads its boot files as its own uid (bound read-only,
                // not chowned); the replica's directories stay private.
                if which != Extra::Definition {
                    use std::os::unix::fs::PermissionsExt;
                    confine::open_file_at(self.dir.as_fd(), name.as_ref())?
                        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
                }
                sync_dir(self.dir.as_fd())
            })
            .map_err(io_err(format!("storing {name}")))
    }

    /// The stored `which`, if the primary sent it.
    pub fn extra(&self, which: Extra) -> Result<Option<Vec<u8>>, StoreError> {
        read_opt(self.dir.as_fd(), which.file_name())
    }

    pub fn point(&self) -> Option<&Point> {
        self.state.point.as_ref()
    }

    /// The kept recovery points, oldest first (the last is the latest).
    pub fn points(&self) -> &[PointInfo] {
        &self.state.history
    }

    /// How many points are kept.
    pub fn keep(&self) -> u32 {
        self.state.keep
    }

    /// Keeps up to `keep` points (1 to [`MAX_HISTORY`]); fewer than held drops the
    /// oldest at once.
    pub fn set_keep(&mut self, keep: u32) -> Result<(), StoreError> {
        if keep == 0 || keep > MAX_HISTORY {
            return Err(StoreError::Invalid(format!(
                "a replica keeps 1 to {MAX_HISTORY} recovery points, not {keep}"
            )));
        }
        if keep == self.state.keep {
            return Ok(());
        }
        let mut state = self.state.clone();
        state.keep = keep;
        prune(&mut state);
        Self::save_state(self.dir.as_fd(), &state)?;
        self.state = state;
        self.drop_unkept_undo()
    }

    /// The index of kept point `cut_id` in the history.
    fn kept(&self, cut_id: u64) -> Result<usize, StoreError> {
        self.state
            .history
            .iter()
            .position(|p| p.cut_id == cut_id)
            .ok_or_else(|| {
                StoreError::Conflict(format!(
                    "no recovery point {cut_id} is kept (kept: {:?})",
                    self.state
                        .history
                        .iter()
                        .map(|p| p.cut_id)
                        .collect::<Vec<_>>()
                ))
            })
    }

    /// Applies to `images` (each at the latest point) the undo files of every point
    /// newer than kept point `cut_id`, newest first, and syncs them: they hold
    /// `cut_id`'s bytes.
    fn roll_back(&self, cut_id: u64, images: &[File]) -> Result<(), StoreError> {
        let at = self.kept(cut_id)?;
        for newer in self.state.history[at + 1..].iter().rev() {
            // A point's files (its own and those of points folded into it) hold
            // disjoint ranges: their order does not matter.
            for part in newer.undo_set() {
                for (i, image) in images.iter().enumerate() {
                    let name = history::undo_file_name(part, i);
                    let mut undo = confine::open_file_at(self.history_dir.as_fd(), name.as_ref())
                        .map_err(io_err(format!("the undo file {name}")))?;
                    history::apply_undo(image, &mut undo).map_err(|source| StoreError::Undo {
                        cut_id: part,
                        disk: i,
                        source,
                    })?;
                }
            }
        }
        for (i, image) in images.iter().enumerate() {
            image.sync_all().map_err(io_err(disk_image_name(i)))?;
        }
        Ok(())
    }

    /// Writes kept point `cut_id`'s images into `dest` as `name(i)` (new files, 0600;
    /// copies of the images rolled back there). The replica is not changed: a test
    /// failover runs on these while replication goes on.
    pub fn export_point(
        &self,
        cut_id: u64,
        dest: BorrowedFd<'_>,
        name: impl Fn(usize) -> String,
    ) -> Result<(), StoreError> {
        self.kept(cut_id)?;
        let mut copies = Vec::new();
        for (i, image) in self.images.iter().enumerate() {
            let n = name(i);
            let mut f = confine::create_private(dest, n.as_ref())
                .map_err(io_err(format!("creating {n}")))?;
            history::copy_image(image, &mut f).map_err(io_err(format!("copying to {n}")))?;
            copies.push(f);
        }
        self.roll_back(cut_id, &copies)
    }

    /// Rolls the images back to kept point `cut_id` in place, records it as the
    /// failed-over point (newer ones dropped) and removes the rollback intent.
    /// Idempotent: the undo chain writes absolute bytes.
    fn finish_rollback(&mut self, cut_id: u64) -> Result<(), StoreError> {
        let at = self.kept(cut_id)?;
        self.roll_back(cut_id, &self.images)?;
        let mut state = self.state.clone();
        state.history.truncate(at + 1);
        let p = &state.history[at];
        state.point = Some(Point {
            cut_id: p.cut_id,
            seqs: p.seqs.clone(),
        });
        state.failed_over = true;
        Self::save_state(self.dir.as_fd(), &state)?;
        self.state = state;
        confine::unlink_at(self.dir.as_fd(), ROLLBACK_FILE.as_ref()).ok();
        self.drop_unkept_undo()?;
        tracing::info!(
            cut_id,
            "replica: images rolled back to a kept recovery point"
        );
        Ok(())
    }

    /// The total length of the undo files of `cut_ids`; `None` if one is missing.
    fn undo_bytes(&self, cut_ids: impl Iterator<Item = u64>) -> Option<u64> {
        let mut total = 0;
        for cut_id in cut_ids {
            for i in 0..self.images.len() {
                let name = history::undo_file_name(cut_id, i);
                total += confine::open_file_at(self.history_dir.as_fd(), name.as_ref())
                    .and_then(|f| f.metadata())
                    .map(|m| m.len())
                    .ok()?;
            }
        }
        Some(total)
    }

    /// The ranges kept point `p`'s undo data covers on disk `disk`: its covered file,
    /// or (none, or damaged) the ranges of its undo files, read.
    fn covered(&self, p: &PointInfo, disk: usize) -> Result<Vec<(u64, u64)>, StoreError> {
        let hdir = self.history_dir.as_fd();
        let name = history::covered_file_name(p.cut_id, disk);
        if let Some(r) = read_opt(hdir, &name)?.and_then(|b| history::decode_ranges(&b)) {
            return Ok(r);
        }
        let mut ranges = Vec::new();
        for part in p.undo_set() {
            let name = history::undo_file_name(part, disk);
            let mut f = confine::open_file_at(hdir, name.as_ref())
                .map_err(io_err(format!("the undo file {name}")))?;
            ranges.extend(
                history::ranges_of(&mut f).map_err(|source| StoreError::Undo {
                    cut_id: part,
                    disk,
                    source,
                })?,
            );
        }
        Ok(history::merge_ranges(ranges))
    }

    /// Removes every undo file no kept point needs (a pruned point's, a `.part` or a
    /// capture a crash cut short before its commit's intent).
    fn drop_unkept_undo(&self) -> Result<(), StoreError> {
        let needed: Vec<u64> = self
            .state
            .history
            .iter()
            .skip(1)
            .flat_map(|p| p.undo_set())
            .collect();
        let path = confine::fd_path(self.history_dir.as_fd(), ".".as_ref());
        for e in std::fs::read_dir(&path).map_err(io_err(HISTORY_DIR))? {
            let e = e.map_err(io_err(HISTORY_DIR))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let keep = (name.ends_with(".undo") || name.ends_with(".covered"))
                && history::parse_undo_file_name(name).is_some_and(|c| needed.contains(&c));
            if !keep {
                confine::unlink_at(self.history_dir.as_fd(), name.as_ref()).ok();
            }
        }
        Ok(())
    }

    /// Seconds since the Unix epoch (a test sets the clock).
    fn now_s(&self) -> u64 {
        #[cfg(test)]
        if let Some(t) = self.clock_s {
            return t;
        }
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    /// Thinning: the latest point, when a commit at `now_s` supersedes it and it is
    /// closer than the spacing to the kept point before it (so it is no "hourly"
    /// point of its own) and its undo data exists to merge.
    fn fold_candidate(&self, now_s: u64) -> Option<u64> {
        let spacing = self.state.spacing_s;
        let [.., before, latest] = self.state.history.as_slice() else {
            return None;
        };
        let close = latest.time_s.saturating_sub(before.time_s) < spacing;
        // A clock that went back leaves the point where it is.
        (spacing > 0
            && close
            && now_s >= latest.time_s
            && self.undo_bytes(latest.undo_set()).is_some())
        .then_some(latest.cut_id)
    }

    /// Seconds at least between two kept points other than the latest (0: none);
    /// applies from the next commit. At most a week.
    pub fn set_spacing(&mut self, spacing_s: u64) -> Result<(), StoreError> {
        if spacing_s > MAX_SPACING_S {
            return Err(StoreError::Invalid(format!(
                "points are spaced by at most {MAX_SPACING_S} s (a week), not {spacing_s}"
            )));
        }
        if spacing_s == self.state.spacing_s {
            return Ok(());
        }
        let mut state = self.state.clone();
        state.spacing_s = spacing_s;
        Self::save_state(self.dir.as_fd(), &state)?;
        self.state = state;
        Ok(())
    }

    /// The spacing of kept points (0: every point).
    pub fn spacing_s(&self) -> u64 {
        self.state.spacing_s
    }

    /// Before a commit of `cut_id` changes the images: the bytes they hold now on
    /// every range its segments write, per disk, as `cut_id`'s undo files (synced);
    /// with `folds` (the latest point, to be thinned out), only the ranges its undo
    /// data does not cover. Returns their total length.
    fn capture_undo(
        &self,
        cut_id: u64,
        seqs: &[u64],
        folds: Option<&PointInfo>,
    ) -> Result<u64, StoreError> {
        let mut total = 0;
        for (i, &last) in seqs.iter().enumerate() {
            let mut ranges = Vec::new();
            for seq in self.disks[i].applied().seq + 1..=last {
                let mut f = confine::open_file_at(
                    self.disk_dirs[i].as_fd(),
                    segment_file_name(seq).as_ref(),
                )
                .map_err(io_err(format!("disk {i}: staged segment {seq}")))?;
                ranges.extend(history::ranges_of(&mut f).map_err(|source| {
                    StoreError::Segment {
                        disk: i,
                        seq,
                        source,
                    }
                })?);
            }
            let ranges = history::merge_ranges(ranges);
            // Folding the latest point: its undo files stay (they become part of the
            // new point's); the new file holds only the ranges they do not cover,
            // whose bytes at the point before are the image's now. What is kept is
            // what changed since that point, each range once, whatever the cuts.
            let (capture, covered) = match folds {
                Some(latest) => {
                    let covered = self.covered(latest, i)?;
                    let capture = history::subtract_ranges(&ranges, &covered);
                    let mut all = covered;
                    all.extend_from_slice(&ranges);
                    (capture, history::merge_ranges(all))
                }
                None => (ranges.clone(), ranges),
            };
            let hdir = self.history_dir.as_fd();
            let name = history::undo_file_name(cut_id, i);
            let part = format!("{name}.part");
            confine::unlink_at(hdir, part.as_ref()).ok();
            let f = confine::create_private(hdir, part.as_ref())
                .map_err(io_err(format!("creating {part}")))?;
            total += history::capture_undo(
                &self.images[i],
                self.state.disk_sizes[i],
                &capture,
                &f,
                cut_id,
            )
            .and_then(|n| f.sync_all().map(|()| n))
            .map_err(io_err(format!("writing {part}")))?;
            rename_at(hdir, part.as_ref(), name.as_ref())
                .map_err(io_err(format!("keeping {name}")))?;
            if self.state.spacing_s > 0 {
                // What the next fold subtracts without reading the undo files.
                let name = history::covered_file_name(cut_id, i);
                confine::write_private_atomic(
                    hdir,
                    name.as_ref(),
                    &history::encode_ranges(&covered),
                )
                .map_err(io_err(format!("keeping {name}")))?;
            }
            sync_dir(hdir).map_err(io_err(format!("keeping {name}")))?;
        }
        Ok(total)
    }

    pub fn disk_sizes(&self) -> &[u64] {
        &self.state.disk_sizes
    }

    /// The image of disk `i` (for reading a point back, or a failover).
    pub fn image(&self, i: usize) -> Option<&File> {
        self.images.get(i)
    }

    pub fn status(&self) -> Result<VmStatus, StoreError> {
        let mut disks = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            let applied = d.applied();
            disks.push(DiskStatus {
                size: self.state.disk_sizes[i],
                applied_seq: applied.seq,
                applied_cut_id: applied.cut_id,
                staged: self.staged(i)?,
            });
        }
        Ok(VmStatus {
            base_complete: self.state.base_complete,
            failed_over: self.state.failed_over,
            point: self.state.point.clone(),
            disks,
            keep: self.state.keep,
            spacing_s: self.state.spacing_s,
            points: self.state.history.clone(),
        })
    }

    /// The staged segments of disk `i`, in order.
    fn staged(&self, i: usize) -> Result<Vec<u64>, StoreError> {
        let path = confine::fd_path(self.disk_dirs[i].as_fd(), ".".as_ref());
        let mut seqs = Vec::new();
        for e in std::fs::read_dir(&path).map_err(io_err(disk_dir_name(i)))? {
            let e = e.map_err(io_err(disk_dir_name(i)))?;
            if let Some(seq) = e
                .file_name()
                .to_str()
                .and_then(crate::format::parse_file_name)
            {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        Ok(seqs)
    }

    fn disk_index(&self, disk: usize) -> Result<usize, StoreError> {
        if disk < self.disks.len() {
            Ok(disk)
        } else {
            Err(StoreError::Invalid(format!(
                "no disk {disk} (the VM has {})",
                self.disks.len()
            )))
        }
    }

    /// Writes one chunk of the initial copy of disk `disk` at `offset`. Refused once
    /// the initial copy is complete (a later chunk would break the recovery points).
    pub fn write_base(&mut self, disk: usize, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        self.taking()?;
        let i = self.disk_index(disk)?;
        if self.state.base_complete {
            return Err(StoreError::Conflict(
                "the initial copy is complete: no more of it is taken".into(),
            ));
        }
        let size = self.state.disk_sizes[i];
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|end| end > size) || !offset.is_multiple_of(512) {
            return Err(StoreError::Invalid(format!(
                "{} bytes at {offset} do not fit disk {disk} ({size} bytes, 512-byte aligned)",
                data.len()
            )));
        }
        self.images[i]
            .write_all_at(data, offset)
            .map_err(io_err(disk_image_name(i)))
    }

    /// The initial copy is all there: the images are synced and the fact recorded.
    pub fn complete_base(&mut self) -> Result<(), StoreError> {
        self.taking()?;
        if self.state.base_complete {
            return Ok(());
        }
        for (i, img) in self.images.iter().enumerate() {
            img.sync_all().map_err(io_err(disk_image_name(i)))?;
            // The copy's pages (clean once synced) leave the cache: kept, they are the
            // large folios its big writes made, and each 4 KiB write a segment applies
            // later would dirty (and write back) a whole folio.
            advise(img, libc::POSIX_FADV_DONTNEED);
        }
        let mut state = self.state.clone();
        state.base_complete = true;
        Self::save_state(self.dir.as_fd(), &state)?;
        self.state = state;
        tracing::info!("replica: initial copy complete");
        Ok(())
    }

    /// The replica's hashes of blocks `start..start+count` of disk `disk` (clipped to
    /// the disk), for a resync: only while the initial copy is not complete.
    pub fn block_hashes(
        &self,
        disk: usize,
        start: u64,
        count: u64,
    ) -> Result<Vec<BlockHash>, StoreError> {
        self.taking()?;
        let i = self.disk_index(disk)?;
        if self.state.base_complete {
            return Err(StoreError::Conflict(
                "the initial copy is complete: no block hashes are served".into(),
            ));
        }
        let blocks = resync::block_count(self.state.disk_sizes[i]);
        if count == 0 || count > resync::MAX_HASHES_PER_REQUEST || start >= blocks {
            return Err(StoreError::Invalid(format!(
                "hashes of blocks {start}..+{count}: disk {disk} has {blocks} blocks, at most {} per request",
                resync::MAX_HASHES_PER_REQUEST
            )));
        }
        resync::block_hashes(&self.images[i], self.state.disk_sizes[i], start, count)
            .map_err(io_err(format!("hashing {}", disk_image_name(i))))
    }

    /// The initial copy is all there if every image's SHA-256 equals the primary's
    /// (`hashes[i]`, the hash of the bytes it read): then as [`Self::complete_base`].
    /// A differing image leaves the copy incomplete (the primary resyncs again).
    pub fn complete_base_checked(&mut self, hashes: &[BlockHash]) -> Result<(), StoreError> {
        self.taking()?;
        if self.state.base_complete {
            return Ok(());
        }
        if hashes.len() != self.images.len() {
            return Err(StoreError::Invalid(format!(
                "{} image hashes for {} disks",
                hashes.len(),
                self.images.len()
            )));
        }
        for (i, img) in self.images.iter().enumerate() {
            img.sync_all().map_err(io_err(disk_image_name(i)))?;
            let mine = resync::image_hash(img, self.state.disk_sizes[i])
                .map_err(io_err(format!("hashing {}", disk_image_name(i))))?;
            if mine != hashes[i] {
                tracing::warn!(
                    disk = i,
                    "replica: the image differs from the primary's after the initial copy"
                );
                return Err(StoreError::Conflict(format!(
                    "disk {i}: the image's SHA-256 {} is not the primary's {}: the initial copy is not complete",
                    hex::encode(mine),
                    hex::encode(hashes[i])
                )));
            }
        }
        self.complete_base()
    }

    /// Stages segment `seq` of disk `disk` from its zstd-compressed bytes: decompressed
    /// (at most `max_bytes`), verified to its trailer, synced, kept for the commit of
    /// its cut. A segment already applied is taken as a re-send and not kept; a bad
    /// one is removed and nothing else changes.
    pub fn stage(
        &mut self,
        disk: usize,
        seq: u64,
        compressed: impl Read,
        max_bytes: u64,
    ) -> Result<Staged, StoreError> {
        self.taking()?;
        let i = self.disk_index(disk)?;
        if seq <= self.disks[i].applied().seq {
            return Ok(Staged::AlreadyApplied);
        }
        let ddir = self.disk_dirs[i].as_fd();
        let part = part_name(seq);
        confine::unlink_at(ddir, part.as_ref()).ok();
        let result = self.stage_into(i, seq, &part, compressed, max_bytes);
        if result.is_err() {
            confine::unlink_at(ddir, part.as_ref()).ok();
        }
        result
    }

    fn stage_into(
        &self,
        i: usize,
        seq: u64,
        part: &str,
        compressed: impl Read,
        max_bytes: u64,
    ) -> Result<Staged, StoreError> {
        let ddir = self.disk_dirs[i].as_fd();
        let mut f =
            confine::create_private(ddir, part.as_ref()).map_err(io_err("staging a segment"))?;
        let decoder = zstd::stream::read::Decoder::new(compressed)
            .map_err(io_err("starting to decompress"))?;
        let n = io::copy(&mut decoder.take(max_bytes + 1), &mut f).map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData || e.kind() == io::ErrorKind::Other {
                StoreError::Invalid(format!("segment {seq} of disk {i}: not zstd data: {e}"))
            } else {
                io_err("staging a segment")(e)
            }
        })?;
        if n > max_bytes {
            return Err(StoreError::TooLarge {
                what: "a decompressed segment",
                limit: max_bytes,
            });
        }
        f.flush().map_err(io_err("staging a segment"))?;
        f.seek(SeekFrom::Start(0))
            .map_err(io_err("staging a segment"))?;
        let trailer = verify(&mut f, i, seq)?;
        if trailer.seq != seq {
            return Err(StoreError::Invalid(format!(
                "the segment sent as {seq} of disk {i} is segment {}",
                trailer.seq
            )));
        }
        if trailer.disk_size != self.state.disk_sizes[i] {
            return Err(StoreError::Invalid(format!(
                "segment {seq} is for a disk of {} bytes, disk {i} has {}",
                trailer.disk_size, self.state.disk_sizes[i]
            )));
        }
        f.sync_all().map_err(io_err("syncing a staged segment"))?;
        let final_name = segment_file_name(seq);
        rename_at(ddir, part.as_ref(), final_name.as_ref())
            .and_then(|()| sync_dir(ddir))
            .map_err(io_err("keeping a staged segment"))?;
        tracing::debug!(
            disk = i,
            seq,
            cut_id = trailer.cut_id,
            "replica: segment staged"
        );
        Ok(Staged::Staged(trailer))
    }

    /// Makes `cut_id` the VM's recovery point: `seqs[i]` is disk i's segment that ends
    /// at the cut; every segment between the disk's applied one and it must be staged.
    /// All are verified before the first byte is applied.
    pub fn commit(&mut self, cut_id: u64, seqs: &[u64]) -> Result<Committed, StoreError> {
        self.taking()?;
        if let Some(p) = &self.state.point {
            if p.cut_id >= cut_id {
                return Ok(Committed::AlreadyThere(p.clone()));
            }
        }
        if !self.state.base_complete {
            return Err(StoreError::Conflict(
                "the initial copy is not complete: no recovery point yet".into(),
            ));
        }
        if seqs.len() != self.disks.len() {
            return Err(StoreError::Invalid(format!(
                "a point names {} disks, the VM has {}",
                seqs.len(),
                self.disks.len()
            )));
        }
        let mut changed_bytes = 0;
        for (i, &last) in seqs.iter().enumerate() {
            let applied = self.disks[i].applied();
            if last < applied.seq {
                return Err(StoreError::Conflict(format!(
                    "disk {i} is at segment {} already, past {last}",
                    applied.seq
                )));
            }
            if last == applied.seq && applied.cut_id != cut_id {
                return Err(StoreError::Conflict(format!(
                    "disk {i}'s segment {last} ends at cut {}, not {cut_id}",
                    applied.cut_id
                )));
            }
            for seq in applied.seq + 1..=last {
                let mut f = confine::open_file_at(
                    self.disk_dirs[i].as_fd(),
                    segment_file_name(seq).as_ref(),
                )
                .map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => {
                        StoreError::Conflict(format!("disk {i}: segment {seq} is not staged"))
                    }
                    _ => io_err("opening a staged segment")(e),
                })?;
                let t = verify(&mut f, i, seq)?;
                changed_bytes += t.covered_bytes;
                if seq == last && t.cut_id != cut_id {
                    return Err(StoreError::Conflict(format!(
                        "disk {i}'s segment {last} ends at cut {}, not {cut_id}",
                        t.cut_id
                    )));
                }
            }
        }
        // The previous point stays reachable: its bytes on every range this commit
        // writes are kept first (before the intent, so a crash before it leaves
        // only an unneeded file, dropped at the next open).
        let time_s = self.now_s();
        let mut folds = None;
        if self.state.keep > 1 && self.state.point.is_some() {
            folds = self.fold_candidate(time_s);
            let latest = folds.and_then(|_| self.state.history.last());
            self.capture_undo(cut_id, seqs, latest)?;
        }
        let intent = Intent {
            cut_id,
            seqs: seqs.to_vec(),
            time_s,
            changed_bytes,
            folds,
        };
        confine::write_private_atomic(
            self.dir.as_fd(),
            INTENT_FILE.as_ref(),
            &encode_json(&intent),
        )
        .and_then(|()| sync_dir(self.dir.as_fd()))
        .map_err(io_err("recording the commit's intent"))?;
        self.finish_commit(&intent)?;
        Ok(Committed::Committed(Point {
            cut_id,
            seqs: seqs.to_vec(),
        }))
    }

    /// Applies every disk up to the intent's segments, records the point (kept in
    /// the history, the oldest beyond `keep` dropped), removes the intent, the
    /// applied segments and the undo files no kept point needs. Idempotent.
    fn finish_commit(&mut self, intent: &Intent) -> Result<(), StoreError> {
        let point = Point {
            cut_id: intent.cut_id,
            seqs: intent.seqs.clone(),
        };
        for (i, &last) in point.seqs.iter().enumerate() {
            let ddir = self.disk_dirs[i].as_fd();
            for seq in self.disks[i].applied().seq + 1..=last {
                let f = confine::open_file_at(ddir, segment_file_name(seq).as_ref())
                    .map_err(io_err(format!("disk {i}: staged segment {seq}")))?;
                match self.disks[i].apply(f)? {
                    ApplyOutcome::Applied(_) | ApplyOutcome::AlreadyApplied { .. } => {}
                }
                #[cfg(test)]
                if self.crash_after_applying == Some((i, seq)) {
                    return Err(StoreError::Conflict("simulated crash".into()));
                }
            }
        }
        let mut state = self.state.clone();
        state.point = Some(point.clone());
        // The changes since the previous kept point: a folded point's count too.
        let mut changed_bytes = intent.changed_bytes;
        let mut folded = Vec::new();
        if let Some(latest) = intent.folds {
            // The folded point leaves the history; its undo files (and those folded
            // into it) become part of the new point's.
            if state.history.last().is_some_and(|p| p.cut_id == latest) {
                if let Some(gone) = state.history.pop() {
                    changed_bytes += gone.changed_bytes;
                    folded = gone.undo_set().collect();
                    tracing::debug!(cut_id = gone.cut_id, "replica: point thinned out");
                }
            }
        }
        if state.history.last().map(|p| p.cut_id) != Some(point.cut_id) {
            let set = folded.iter().copied().chain(std::iter::once(point.cut_id));
            let undo_bytes = self.undo_bytes(set);
            if undo_bytes.is_none() {
                // No way back from this point to the older ones: they are not kept.
                state.history.clear();
            }
            state.history.push(PointInfo {
                cut_id: point.cut_id,
                seqs: point.seqs.clone(),
                time_s: intent.time_s,
                changed_bytes,
                undo_bytes: undo_bytes.unwrap_or(0),
                folded,
            });
        }
        prune(&mut state);
        Self::save_state(self.dir.as_fd(), &state)?;
        self.state = state;
        confine::unlink_at(self.dir.as_fd(), INTENT_FILE.as_ref()).ok();
        self.drop_unkept_undo()?;
        for (i, &last) in point.seqs.iter().enumerate() {
            for seq in self.staged(i)? {
                if seq <= last {
                    confine::unlink_at(self.disk_dirs[i].as_fd(), segment_file_name(seq).as_ref())
                        .ok();
                }
            }
        }
        tracing::info!(cut_id = point.cut_id, seqs = ?point.seqs, "replica: recovery point");
        Ok(())
    }
}

/// Drops the oldest points beyond `keep`; the new oldest needs no undo file.
fn prune(state: &mut VmState) {
    let keep = state.keep.max(1) as usize;
    if state.history.len() > keep {
        let drop = state.history.len() - keep;
        state.history.drain(..drop);
    }
    if let Some(oldest) = state.history.first_mut() {
        oldest.undo_bytes = 0;
        oldest.folded.clear();
    }
}

/// Copies the first `size` bytes of `from` into `to` (new and zero: all-zero
/// chunks are left as holes). `from` must hold `size` bytes.
fn copy_sparse(from: &File, to: &File, size: u64) -> io::Result<()> {
    let len = from.metadata()?.len();
    if len != size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the seed has {len} bytes, the disk {size}"),
        ));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        from.read_exact_at(&mut buf[..n], at)?;
        if buf[..n].iter().any(|&b| b != 0) {
            to.write_all_at(&buf[..n], at)?;
        }
        at += n as u64;
    }
    Ok(())
}

/// Reads a segment through and returns its trailer.
fn verify(f: &mut File, disk: usize, seq: u64) -> Result<Trailer, StoreError> {
    f.seek(SeekFrom::Start(0))
        .map_err(io_err("reading a staged segment"))?;
    SegmentReader::new(BufReader::new(&mut *f))
        .and_then(SegmentReader::verify_all)
        .map_err(|source| StoreError::Segment { disk, seq, source })
}

fn rename_at(dir: BorrowedFd<'_>, from: &OsStr, to: &OsStr) -> io::Result<()> {
    std::fs::rename(confine::fd_path(dir, from), confine::fd_path(dir, to))
}
