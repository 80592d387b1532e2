//! The primary's side of Vireo Replica: ships a VM's sealed segments to its replica
//! server (`/peer/v1/replica/...`, see [`crate::replica_server`]) and commits recovery
//! points there.
//!
//! A round ([`Shipper::round`]): ask the replica what it holds (declaring the VM if it
//! is new); send the initial copy if it is not complete (a resync by block hashes of
//! each disk's virtual content: raw images, or VHDX read through the `vhdx` crate); cut (the caller's cut: `vm.replica-cut` in the VMM); send every sealed
//! segment the replica has not applied, zstd-compressed; commit the newest cut every
//! disk has a segment for; delete the segments the replica applied, except each disk's
//! newest (the VMM's log continues its cut ids from it after a restart).
//!
//! Everything is resumable: the replica's status says what it applied, a re-sent
//! segment is harmless, a commit is idempotent. A cut connection costs at most the
//! segments not yet applied — never a full copy.

use std::collections::{BTreeMap, HashMap};
use std::io::BufReader;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use replica::{
    segment_file_name, BlockHash, ChangeLog, DiskImage, Extra, PendingSeal, Resync, SegmentReader,
};
use serde_json::{json, Value};
use tracing::{debug, info};

use crate::client::{self, Endpoint};
use crate::throttle::Throttle;

/// How long one request to the replica may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// The initial copy goes in chunks of this size.
pub(crate) const BASE_CHUNK: usize = 4 << 20;
pub(crate) const ZSTD_LEVEL: i32 = 3;
/// The replica's block hashes are fetched this many at a time (1 GiB of disk).
const HASH_WINDOW: u64 = 1 << 14;

/// What a replica answers to a round it cannot store (507 Insufficient Storage).
pub const FULL: u16 = 507;

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// The replica's storage is full: replication pauses until resumed.
    #[error("replica {to} is full ({what}): {message}")]
    ReplicaFull {
        to: String,
        what: String,
        message: String,
    },
    #[error("replica {to}: {source}")]
    Transport {
        to: String,
        #[source]
        source: client::ClientError,
    },
    #[error("replica {to} answered {status} to {what}: {message}")]
    Refused {
        to: String,
        what: String,
        status: u16,
        message: String,
    },
    #[error("replica {to}: unexpected answer to {what}: {body}")]
    Answer {
        to: String,
        what: String,
        body: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sealed segment {path} is damaged: {source}")]
    Segment {
        path: PathBuf,
        #[source]
        source: replica::SegmentError,
    },
    #[error("replica {to}, disk {disk}: {source}")]
    Resync {
        to: String,
        disk: usize,
        #[source]
        source: replica::ResyncError,
    },
    #[error(transparent)]
    Image(#[from] replica::SourceError),
    #[error("disk {path} is {now} bytes now, {size} when its replication began")]
    Resized { path: PathBuf, now: u64, size: u64 },
    #[error("the cut failed: {0}")]
    Cut(String),
    /// The replica was failed over (an operator started the VM there from a recovery
    /// point): this host must not replicate, nor run the VM beside it.
    #[error("replica {to}: its replica of the VM was failed over (the VM runs there on its images): it takes nothing more from here")]
    FailedOverElsewhere { to: String },
    #[error("the change log of {label}: {source}")]
    Log {
        label: String,
        #[source]
        source: replica::LogError,
    },
}

/// What a failover on the replica boots, sent once per loop (before the first point
/// of this process): the VM's definition and its kernel and initramfs files.
#[derive(Debug, Default)]
pub struct Extras {
    pub definition: Option<Vec<u8>>,
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub(crate) sent: AtomicBool,
}

/// How a replicated disk's image is read for the initial copy.
#[derive(Clone, Debug, Default)]
pub enum ImageFormat {
    /// The file's bytes.
    #[default]
    Raw,
    /// The virtual content, through the `vhdx` crate (never the file's bytes): a
    /// differencing disk's parents opened by `parents` (the storage roots' rules;
    /// `None`: by the locator's paths).
    Vhdx { parents: Option<vhdx::ParentOpener> },
}

/// One replicated disk of the primary: its change log's directory, its image and the
/// size the guest sees (a VHDX's virtual size).
#[derive(Clone, Debug)]
pub struct DiskSource {
    pub log_dir: PathBuf,
    pub image: PathBuf,
    pub size: u64,
    pub format: ImageFormat,
}

impl DiskSource {
    /// The disk at `image`: a raw image's size is its file's length; a VHDX is opened
    /// (with its parent chain) to check that it reads, and its size is its virtual
    /// size. A VHDX that cannot be opened or is damaged is an error naming it.
    pub fn new(log_dir: PathBuf, image: PathBuf, format: ImageFormat) -> Result<Self, ShipError> {
        let mut d = DiskSource {
            log_dir,
            image,
            size: 0,
            format,
        };
        d.size = match &d.format {
            ImageFormat::Raw => std::fs::metadata(&d.image)
                .map_err(|source| ShipError::Io {
                    what: "reading the image",
                    path: d.image.clone(),
                    source,
                })?
                .len(),
            ImageFormat::Vhdx { parents } => d.open_vhdx(parents.clone())?.size(),
        };
        Ok(d)
    }

    fn open_vhdx(
        &self,
        parents: Option<vhdx::ParentOpener>,
    ) -> Result<replica::VhdxImage, ShipError> {
        let f = std::fs::File::open(&self.image).map_err(|source| ShipError::Io {
            what: "opening the VHDX disk",
            path: self.image.clone(),
            source,
        })?;
        Ok(replica::VhdxImage::open(f, &self.image, parents)?)
    }

    /// The disk as the guest sees it, for reading (a VHDX without its lock: the VMM
    /// holds it). A disk whose size changed since replication began is refused.
    pub fn open(&self) -> Result<Box<dyn DiskImage>, ShipError> {
        let image: Box<dyn DiskImage> = match &self.format {
            ImageFormat::Raw => {
                let f = std::fs::File::open(&self.image).map_err(|source| ShipError::Io {
                    what: "reading the image",
                    path: self.image.clone(),
                    source,
                })?;
                Box::new(replica::RawImage::new(f, self.size))
            }
            ImageFormat::Vhdx { parents } => Box::new(self.open_vhdx(parents.clone())?),
        };
        if image.size() != self.size {
            return Err(ShipError::Resized {
                path: self.image.clone(),
                now: image.size(),
                size: self.size,
            });
        }
        Ok(image)
    }
}

/// What one round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundStats {
    /// Bytes of the initial copy on the wire (compressed).
    pub base_bytes: u64,
    /// Bytes of the images the initial copy sent (the blocks that differed at the
    /// replica), before compression.
    pub base_differing_bytes: u64,
    pub segments_sent: u64,
    /// Bytes of segments on the wire (compressed).
    pub segment_bytes: u64,
    /// The recovery point committed in this round, if a new one.
    pub point: Option<u64>,
    pub segments_deleted: u64,
    /// A catch-up from the logs' region maps ran (and completed) in this round.
    pub caught_up: bool,
    /// Bytes of the catch-up on the wire (compressed), and of the disks it sent
    /// (the maps' regions) before compression.
    pub catch_up_bytes: u64,
    pub catch_up_region_bytes: u64,
}

/// Ships one VM to one replica.
pub struct Shipper {
    pub to: Endpoint,
    pub vm: String,
    pub disks: Vec<DiskSource>,
    pub extras: Extras,
    /// How many recovery points the replica keeps (`--history`).
    pub history: u32,
    /// Seconds at least between the replica's kept points other than the latest.
    pub history_spacing_s: u64,
    /// A reverse replication: a replica the server does not hold yet is made from its
    /// own disks of the VM (`PUT .../reverse`), not new and empty.
    pub reverse: bool,
    /// The bandwidth limit every byte to the replica draws from (and their count).
    pub throttle: Arc<Throttle>,
    /// Segments already read whole and found sealed (a sealed file never changes).
    pub verified: VerifiedSegments,
}

/// A sealed segment of the primary's log: (sequence number, cut id).
type Sealed = BTreeMap<u64, u64>;

/// The segments a round verified, so the next reads each sealed file once, not every
/// round: (disk, sequence number) → the file's identity and length, and its cut id.
/// A file of the same name but another inode or length (the logs restarted after a
/// host crash) is read again.
#[derive(Default)]
pub struct VerifiedSegments(Mutex<HashMap<(usize, u64), VerifiedSegment>>);

#[derive(Clone, Copy, PartialEq, Eq)]
struct VerifiedSegment {
    ino: u64,
    len: u64,
    cut_id: u64,
}

impl Shipper {
    pub(crate) fn base_path(&self) -> String {
        format!("/peer/v1/replica/{}", self.vm)
    }

    pub(crate) async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Value), ShipError> {
        // A limited link takes longer for a large body: the time it needs at the
        // limit (a quarter more for TLS and HTTP) on top of the usual bound.
        let len = body.as_ref().map_or(0, Vec::len) as u64;
        let timeout = REQUEST_TIMEOUT + self.throttle.time_for(len + len / 4);
        let r = client::request_via(&self.to, Some(&self.throttle), method, path, body, timeout)
            .await
            .map_err(|source| ShipError::Transport {
                to: self.to.to_string(),
                source,
            })?;
        Ok((r.status, r.json().unwrap_or(Value::Null)))
    }

    pub(crate) async fn ok(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Value, ShipError> {
        let (status, v) = self.call(method, path, body).await?;
        if status == FULL {
            return Err(ShipError::ReplicaFull {
                to: self.to.to_string(),
                what: format!("{method} {path}"),
                message: v["error"].as_str().unwrap_or_default().to_string(),
            });
        }
        if status != 200 {
            return Err(ShipError::Refused {
                to: self.to.to_string(),
                what: format!("{method} {path}"),
                status,
                message: v["error"].as_str().unwrap_or_default().to_string(),
            });
        }
        Ok(v)
    }

    /// The replica's status, declaring the VM first if the replica does not know it
    /// (or keeps another number of recovery points than asked).
    pub async fn status(&self) -> Result<replica::VmStatus, ShipError> {
        let path = self.base_path();
        let (status, v) = self.call("GET", &path, None).await?;
        let declare = || {
            let sizes: Vec<u64> = self.disks.iter().map(|d| d.size).collect();
            let mut body = json!({ "disks": sizes, "history": self.history.max(1) });
            if self.history_spacing_s > 0 {
                body["history_spacing_s"] = json!(self.history_spacing_s);
            }
            body.to_string().into_bytes()
        };
        let failed_over = v["failed_over"] == true;
        let reverse_path = format!("{path}/reverse");
        let v = match status {
            // A reverse replica is made (or a failed-over one reset) by the old
            // primary, which checks that this host may.
            404 if self.reverse => self.ok("PUT", &reverse_path, Some(declare())).await?,
            200 if self.reverse && failed_over => {
                self.ok("PUT", &reverse_path, Some(declare())).await?
            }
            200 if failed_over
                || v["keep"].as_u64() == Some(u64::from(self.history.max(1)))
                    && v["spacing_s"].as_u64().unwrap_or(0) == self.history_spacing_s =>
            {
                v
            }
            200 | 404 => self.ok("PUT", &path, Some(declare())).await?,
            _ => {
                return Err(ShipError::Refused {
                    to: self.to.to_string(),
                    what: format!("GET {path}"),
                    status,
                    message: v["error"].as_str().unwrap_or_default().to_string(),
                })
            }
        };
        serde_json::from_value(v.clone()).map_err(|_| ShipError::Answer {
            to: self.to.to_string(),
            what: format!("GET {path}"),
            body: v.to_string(),
        })
    }

    /// Sends the initial copy of every disk as a resync by block hashes (the replica's
    /// images may hold an older copy, or be new and zero): per disk the replica's
    /// hashes are fetched a window at a time, the image is read once and only the
    /// differing blocks are sent; then the copy is closed with each image's SHA-256
    /// (the replica refuses it if its image differs). Returns (bytes on the wire,
    /// bytes of the images sent before compression).
    async fn send_base(&self) -> Result<(u64, u64), ShipError> {
        let mut sent = 0;
        let mut differing = 0;
        let mut whole = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            let io = |source| ShipError::Io {
                what: "reading the image",
                path: d.image.clone(),
                source,
            };
            let image = d.open()?;
            let mut pass = Resync::new(&*image, BASE_CHUNK);
            while !pass.done() {
                let start = pass.next_block();
                let theirs = self.hashes(i, d.size, start).await?;
                while let Some(run) = pass.next_run(&theirs, start).map_err(io)? {
                    let body = zstd::encode_all(&run.data[..], ZSTD_LEVEL).map_err(io)?;
                    sent += body.len() as u64;
                    let path = format!("{}/disks/{i}/base/{}", self.base_path(), run.offset);
                    self.ok("PUT", &path, Some(body)).await?;
                }
            }
            differing += pass.differing_bytes;
            debug!(vm = %self.vm, disk = i, read = pass.read_bytes, unallocated = pass.unallocated_bytes,
                differing = pass.differing_bytes, "replica: disk read for the initial copy");
            whole.push(hex::encode(pass.finish()));
        }
        let body = json!({ "image_sha256": whole }).to_string().into_bytes();
        self.ok(
            "POST",
            &format!("{}/base-complete", self.base_path()),
            Some(body),
        )
        .await?;
        info!(vm = %self.vm, bytes = sent, differing, "replica: initial copy sent (resync by block hashes)");
        Ok((sent, differing))
    }

    /// The replica's hashes of disk `i`'s blocks from `start` (a window of at most
    /// [`HASH_WINDOW`]), checked: a list of the wrong length or block size is refused.
    async fn hashes(&self, i: usize, size: u64, start: u64) -> Result<Vec<BlockHash>, ShipError> {
        let path = format!(
            "{}/disks/{i}/hashes?start={start}&count={HASH_WINDOW}",
            self.base_path()
        );
        let v = self.ok("GET", &path, None).await?;
        let block_size = v["block_size"].as_u64().unwrap_or(0);
        let list = v["hashes"].as_str().unwrap_or_default();
        replica::check_hash_list(size, block_size, start, HASH_WINDOW, list).map_err(|source| {
            ShipError::Resync {
                to: self.to.to_string(),
                disk: i,
                source,
            }
        })
    }

    /// Sends [`Extras`] unless this shipper sent them already.
    async fn send_extras(&self) -> Result<(), ShipError> {
        if self.extras.sent.load(Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(def) = &self.extras.definition {
            let path = format!("{}/extras/definition", self.base_path());
            self.ok("PUT", &path, Some(def.clone())).await?;
        }
        for (which, file) in [
            (Extra::Kernel, &self.extras.kernel),
            (Extra::Initramfs, &self.extras.initramfs),
        ] {
            let Some(file) = file else { continue };
            let bytes = std::fs::read(file).map_err(|source| ShipError::Io {
                what: "reading the VM's boot file",
                path: file.clone(),
                source,
            })?;
            let name = match which {
                Extra::Kernel => "kernel",
                _ => "initramfs",
            };
            let path = format!("{}/extras/{name}", self.base_path());
            self.ok("PUT", &path, Some(bytes)).await?;
        }
        self.extras.sent.store(true, Ordering::Relaxed);
        debug!(vm = %self.vm, "replica: definition and boot files sent");
        Ok(())
    }

    /// After the VMM is gone (a planned failover shut it down): opens each disk's
    /// change log from its directory `dirs[i]` (a torn tail cut off as after a crash),
    /// seals every open segment at one new cut id and returns it. The next round then
    /// sends everything the VM wrote and commits that cut: no write is lost.
    pub fn seal_after_stop(&self, dirs: Vec<OwnedFd>) -> Result<u64, ShipError> {
        let mut logs = Vec::new();
        for (dir, d) in dirs.into_iter().zip(&self.disks) {
            let label = d.log_dir.display().to_string();
            let (log, _) = ChangeLog::open(dir, &label, d.size)
                .map_err(|source| ShipError::Log { label, source })?;
            logs.push(log);
        }
        // A log over its budget seals nothing: every log restarts for a catch-up
        // first (the VM is stopped: one moment for all), and the round sends the maps'
        // regions before the (empty) segments sealed here.
        if logs.iter().any(ChangeLog::degraded) {
            for (log, d) in logs.iter_mut().zip(&self.disks) {
                log.restart_for_catch_up()
                    .map_err(|source| ShipError::Log {
                        label: d.log_dir.display().to_string(),
                        source,
                    })?;
            }
        }
        let cut = logs.iter().map(ChangeLog::last_cut_id).max().unwrap_or(0) + 1;
        for (log, d) in logs.iter_mut().zip(&self.disks) {
            log.seal(cut)
                .and_then(PendingSeal::sync)
                .map_err(|source| ShipError::Log {
                    label: d.log_dir.display().to_string(),
                    source,
                })?;
        }
        info!(vm = %self.vm, cut, "replica: the stopped VM's logs sealed");
        Ok(cut)
    }

    /// Asks the replica to define the VM from its latest point and, with `start`,
    /// start it (planned failover).
    pub async fn request_failover(&self, start: bool) -> Result<Value, ShipError> {
        let body = json!({ "start": start }).to_string().into_bytes();
        self.ok(
            "POST",
            &format!("{}/failover", self.base_path()),
            Some(body),
        )
        .await
    }

    /// Bytes the disks' change logs hold (every segment, the open one too): what the
    /// replica still has to take, at most.
    pub fn backlog_bytes(&self) -> u64 {
        self.disks
            .iter()
            .filter_map(|d| std::fs::read_dir(&d.log_dir).ok())
            .flat_map(|entries| entries.filter_map(Result::ok))
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.ends_with(replica::SEGMENT_SUFFIX))
            })
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    /// The sealed segments of disk `i` (the newest file is the open one when it has no
    /// trailer).
    fn sealed(&self, i: usize) -> Result<Sealed, ShipError> {
        let dir = &self.disks[i].log_dir;
        let io = |source| ShipError::Io {
            what: "listing the change log",
            path: dir.clone(),
            source,
        };
        let mut seqs: Vec<u64> = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io)? {
            let e = e.map_err(io)?;
            if let Some(seq) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(replica::SEGMENT_SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        let newest = seqs.last().copied();
        let mut sealed = Sealed::new();
        let mut known = vireo_util::sync::lock(&self.verified.0);
        for seq in seqs {
            let path = dir.join(segment_file_name(seq));
            let opening = |source| ShipError::Io {
                what: "opening a segment",
                path: path.clone(),
                source,
            };
            let f = std::fs::File::open(&path).map_err(opening)?;
            let meta = f.metadata().map_err(opening)?;
            let seen = VerifiedSegment {
                ino: meta.ino(),
                len: meta.len(),
                cut_id: 0,
            };
            if let Some(v) = known
                .get(&(i, seq))
                .filter(|v| v.ino == seen.ino && v.len == seen.len)
            {
                sealed.insert(seq, v.cut_id);
                continue;
            }
            // The segment being written has no trailer yet: not read whole every round.
            if Some(seq) == newest && !replica::ends_with_trailer(&f, seq).map_err(opening)? {
                continue;
            }
            match SegmentReader::new(BufReader::new(f)).and_then(SegmentReader::verify_all) {
                Ok(t) => {
                    sealed.insert(seq, t.cut_id);
                    known.insert(
                        (i, seq),
                        VerifiedSegment {
                            cut_id: t.cut_id,
                            ..seen
                        },
                    );
                }
                // The open segment: not sealed yet.
                Err(_) if Some(seq) == newest => {}
                Err(source) => return Err(ShipError::Segment { path, source }),
            }
        }
        known.retain(|&(disk, seq), _| disk != i || sealed.contains_key(&seq));
        Ok(sealed)
    }

    /// Sends disk `i`'s sealed segments after `applied` (and up to `upto`).
    async fn send_segments(
        &self,
        i: usize,
        sealed: &Sealed,
        applied: u64,
        upto: u64,
        stats: &mut RoundStats,
    ) -> Result<(), ShipError> {
        for (&seq, _) in sealed.range(applied + 1..=upto) {
            let path = self.disks[i].log_dir.join(segment_file_name(seq));
            let raw = std::fs::read(&path).map_err(|source| ShipError::Io {
                what: "reading a segment",
                path: path.clone(),
                source,
            })?;
            let body = zstd::encode_all(&raw[..], ZSTD_LEVEL).map_err(|source| ShipError::Io {
                what: "compressing a segment",
                path: path.clone(),
                source,
            })?;
            stats.segments_sent += 1;
            stats.segment_bytes += body.len() as u64;
            let url = format!("{}/disks/{i}/segments/{seq}", self.base_path());
            self.ok("PUT", &url, Some(body)).await?;
            debug!(vm = %self.vm, disk = i, seq, "replica: segment sent");
        }
        Ok(())
    }

    /// Deletes disk `i`'s segments the replica applied, but its newest one.
    fn delete_applied(&self, i: usize, sealed: &Sealed, applied: u64) -> u64 {
        let mut deleted = 0;
        for (&seq, _) in sealed.range(..applied) {
            let path = self.disks[i].log_dir.join(segment_file_name(seq));
            if std::fs::remove_file(&path).is_ok() {
                deleted += 1;
            }
        }
        deleted
    }

    /// If the change logs were restarted after a host crash
    /// ([`crate::replica_crash`]), has the replica reset for a resync (its points
    /// dropped, its images kept); the round's initial copy then sends what differs.
    /// The marks go only once the replica answered: a round that fails before asks
    /// again. A replica that does not know the VM yet needs no reset.
    async fn resync_after_a_host_crash(&self) -> Result<(), ShipError> {
        let marked: Vec<&DiskSource> = self
            .disks
            .iter()
            .filter(|d| crate::replica_crash::resync_required(&d.log_dir))
            .collect();
        if marked.is_empty() {
            return Ok(());
        }
        let path = format!("{}/resync", self.base_path());
        let (status, v) = self.call("POST", &path, None).await?;
        if status != 200 && status != 404 {
            return Err(ShipError::Refused {
                to: self.to.to_string(),
                what: format!("POST {path}"),
                status,
                message: v["error"].as_str().unwrap_or_default().to_string(),
            });
        }
        tracing::warn!(vm = %self.vm, "replica reset for a resync after a host crash");
        for d in marked {
            crate::replica_crash::resync_requested(&d.log_dir);
        }
        Ok(())
    }

    /// One round: the initial copy if needed, `cut`, every sealed segment not applied
    /// yet, the newest common cut committed, applied segments deleted.
    pub async fn round<F, Fut>(&self, cut: F) -> Result<RoundStats, ShipError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<u64, String>>,
    {
        self.round_with(cut, || async {
            Err("a change log is degraded and this round cannot restart it".to_string())
        })
        .await
    }

    /// [`Self::round`], with `catch_up` (the VMM's `vm.replica-cut` with `catch_up`)
    /// asked first when a change log is over its budget (degraded to a region map):
    /// the round then catches up from the maps ([`crate::replica_catch_up`]).
    pub async fn round_with<F, Fut, C, CFut>(
        &self,
        cut: F,
        catch_up: C,
    ) -> Result<RoundStats, ShipError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<u64, String>>,
        C: FnOnce() -> CFut,
        CFut: std::future::Future<Output = Result<(), String>>,
    {
        let mut stats = RoundStats::default();
        self.resync_after_a_host_crash().await?;
        let mut status = self.status().await?;
        if status.failed_over && !self.reverse {
            return Err(ShipError::FailedOverElsewhere {
                to: self.to.to_string(),
            });
        }
        if self.log_degraded() {
            catch_up().await.map_err(ShipError::Cut)?;
        }
        let maps = self.catch_up_maps()?;
        if !maps.is_empty() && (status.base_complete || self.catch_up_started()) {
            (stats.catch_up_bytes, stats.catch_up_region_bytes) = self.catch_up(&maps).await?;
            stats.caught_up = true;
            // The reset dropped the replica's applied segments: the logs' new ones
            // (from 1) go next.
            status = self.status().await?;
        } else if !status.base_complete {
            // The initial copy never completed: the maps do not tell what the replica
            // lacks; a resync by block hashes reads after the logs restarted.
            self.drop_catch_up_maps()?;
            (stats.base_bytes, stats.base_differing_bytes) = self.send_base().await?;
        }
        self.send_extras().await?;
        // A point is only consistent for a cut made after the initial copy was read.
        cut().await.map_err(ShipError::Cut)?;
        // The logs restarted after a host crash while this round was under way (the VM
        // started after the status above): the replica's applied segments are of the
        // old logs, so nothing of the new ones may be sent, committed or deleted by
        // them. The next round resets the replica first.
        if self
            .disks
            .iter()
            .any(|d| crate::replica_crash::resync_required(&d.log_dir))
        {
            return Err(ShipError::Cut(
                "the change logs restarted after a host crash: the replica is reset first".into(),
            ));
        }
        let sealed: Vec<Sealed> = (0..self.disks.len())
            .map(|i| self.sealed(i))
            .collect::<Result<_, _>>()?;
        // The newest cut id every disk has a segment for.
        let newest = sealed[0]
            .values()
            .rev()
            .copied()
            .find(|c| sealed.iter().all(|s| s.values().any(|x| x == c)));
        let current = status.point.as_ref().map(|p| p.cut_id).unwrap_or(0);
        let mut applied: Vec<u64> = status.disks.iter().map(|d| d.applied_seq).collect();
        if let Some(cut_id) = newest.filter(|&c| c > current) {
            let seqs: Vec<u64> = sealed
                .iter()
                .map(|s| {
                    s.iter()
                        .find(|(_, &c)| c == cut_id)
                        .map(|(&seq, _)| seq)
                        .unwrap_or(0)
                })
                .collect();
            for (i, s) in sealed.iter().enumerate() {
                self.send_segments(i, s, applied[i], seqs[i], &mut stats)
                    .await?;
            }
            let body = json!({ "cut_id": cut_id, "seqs": seqs })
                .to_string()
                .into_bytes();
            self.ok("POST", &format!("{}/points", self.base_path()), Some(body))
                .await?;
            stats.point = Some(cut_id);
            applied = seqs;
        }
        for (i, s) in sealed.iter().enumerate() {
            stats.segments_deleted += self.delete_applied(i, s, applied[i]);
        }
        Ok(stats)
    }
}
