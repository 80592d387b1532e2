//! The open image: parsing and validating every structure, the in-memory BAT,
//! header updates, and closing cleanly.

use crate::bat::{self, Geometry};
use crate::bytes::*;
use crate::error::{Error, Result};
use crate::header::{self, Header, HEADER_OFFSETS};
use crate::log::{self, LogOp, LogScanStats, Replay};
use crate::metadata::{DiskParams, Metadata, ParentLocator, PARENT_LOCATOR};
use crate::region::{
    RegionTable, BAT_GUID, METADATA_GUID, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE,
};
use crate::storage::{self, FileStorage, Storage};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use uuid::Uuid;

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open read-only: nothing is ever written, a pending log is replayed in memory.
    pub read_only: bool,
    /// Do not take the OFD lock (for tools that inspect an image in use, and
    /// for file systems without OFD locks, where an open without this fails).
    pub no_lock: bool,
    /// Open a differencing disk without opening its parent (reads of sectors
    /// the child does not hold return zeros). For tools such as commit.
    pub skip_parent: bool,
    /// Payload I/O that is 4 KiB-aligned (offset, length, buffers) bypasses
    /// the page cache (`O_DIRECT`); metadata I/O stays buffered. Ignored where
    /// the file system has no `O_DIRECT`. Parents are opened the same way.
    pub direct: bool,
    /// How a differencing disk's parents are opened (None: by path, as the locator
    /// finds them). A VMM confines them with this: see [`ParentOpener`].
    pub parent_opener: Option<ParentOpener>,
}

/// The result of a [`ParentOpener`]: the opened file, `None` when nothing is at that
/// path (the next locator candidate is tried), or a reason to refuse it.
pub type ParentOpen = std::result::Result<Option<std::fs::File>, String>;

/// Opens a candidate parent `(child_path, candidate_path)` read-only: the caller decides
/// what a parent may be (e.g. beneath its storage roots, no symlinks) and the check is
/// the open itself, so the file that was checked is the one read.
#[derive(Clone)]
pub struct ParentOpener(pub Arc<ParentOpenFn>);

/// `(child_path, candidate_path) -> ParentOpen`.
pub type ParentOpenFn = dyn Fn(&Path, &Path) -> ParentOpen + Send + Sync;

impl std::fmt::Debug for ParentOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ParentOpener")
    }
}

pub(crate) struct State {
    pub bat: Vec<u64>,
    pub dirty_bat: BTreeSet<usize>,
    pub bitmaps: HashMap<u64, Vec<u8>>,
    pub dirty_bitmap: BTreeSet<(u64, usize)>,
    /// Whole pages (metadata region, region tables) waiting for the log.
    pub dirty_raw: BTreeMap<u64, Vec<u8>>,
    /// Next free 1 MiB-aligned offset at the end of the file.
    pub eof: u64,
    /// Current file length as this engine has set it (may lie past `eof`:
    /// the file grows ahead of need).
    pub file_len: u64,
    /// Bytes allocated since the last flush took the dirty pages.
    pub alloc_since_flush: u64,
}

pub(crate) struct HeaderState {
    pub headers: [Header; 2],
    pub current: usize,
    pub session_started: bool,
    pub log_active: bool,
    pub log_guid: Uuid,
    pub log_seq: u64,
    /// Log sector where the next entry goes (entries of one log GUID are
    /// written one after the other from sector 0 and never wrap).
    pub log_head: usize,
    /// Log sector of the oldest entry whose in-place writes may not be durable
    /// yet (the tail of the next entry); `None` when every entry is applied.
    pub pending_tail: Option<usize>,
    /// File length as of the last completed fdatasync.
    pub durable_len: u64,
}

/// An open VHDX image. `Send + Sync`: reads and writes may come from many threads.
pub struct Vhdx {
    pub(crate) path: PathBuf,
    pub(crate) pstr: String,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) read_only: bool,
    pub(crate) geo: Geometry,
    pub(crate) params: DiskParams,
    pub(crate) bat_offset: u64,
    pub(crate) bat_region_len: u64,
    pub(crate) meta_offset: u64,
    pub(crate) meta_len: u64,
    pub(crate) log_offset: u64,
    pub(crate) log_len: u64,
    pub(crate) regions: RegionTable,
    pub(crate) metadata: Metadata,
    pub(crate) locator: Option<ParentLocator>,
    pub(crate) parent: Option<Box<Vhdx>>,
    pub(crate) state: RwLock<State>,
    pub(crate) hdr: Mutex<HeaderState>,
    pub(crate) flush_lock: Mutex<()>,
    pub(crate) overlay: Option<Vec<LogOp>>,
    pub(crate) replayed_entries: usize,
    pub(crate) log_scan: LogScanStats,
    pub(crate) creator: String,
    pub(crate) closed: AtomicBool,
    /// `HeaderState::session_started`, readable without the header lock (which
    /// a flush holds across its fdatasync): writes after the first do not wait.
    pub(crate) session_open: AtomicBool,
}

pub(crate) use vireo_util::sync::{lock as mlock, read as rlock, write as wlock};

const MAX_CHAIN_DEPTH: usize = 32;
const MAX_METADATA_REGION: u64 = 256 * MIB;

/// Reads structures of the file with the pending log (if any) applied in memory.
struct MetaReader<'a> {
    path: &'a str,
    storage: &'a dyn Storage,
    overlay: Option<&'a [LogOp]>,
}

impl MetaReader<'_> {
    fn read(&self, offset: u64, len: usize, what: &'static str) -> Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        storage::read_zero_padded_at(self.storage, &mut b, offset)
            .map_err(|e| Error::io(self.path, what, offset, e))?;
        if let Some(ops) = self.overlay {
            apply_overlay(ops, &mut b, offset);
        }
        Ok(b)
    }
}

/// Applies replayed log writes to a buffer holding file bytes at `offset`.
pub(crate) fn apply_overlay(ops: &[LogOp], buf: &mut [u8], offset: u64) {
    let end = offset + buf.len() as u64;
    for op in ops {
        let (o, l) = match op {
            LogOp::Data { offset, data } => (*offset, data.len() as u64),
            LogOp::Zero { offset, len } => (*offset, *len),
        };
        let s = o.max(offset);
        let e = (o.saturating_add(l)).min(end);
        if s >= e {
            continue;
        }
        let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
        match op {
            LogOp::Data { data, .. } => {
                dst.copy_from_slice(&data[(s - o) as usize..(e - o) as usize])
            }
            LogOp::Zero { .. } => dst.fill(0),
        }
    }
}

/// [`apply_overlay`] onto raw buffers (guest memory).
pub(crate) fn apply_overlay_iobufs(ops: &[LogOp], bufs: &crate::IoBufsMut<'_>, offset: u64) {
    let end = offset + bufs.len();
    for op in ops {
        let (o, l) = match op {
            LogOp::Data { offset, data } => (*offset, data.len() as u64),
            LogOp::Zero { offset, len } => (*offset, *len),
        };
        let s = o.max(offset);
        let e = (o.saturating_add(l)).min(end);
        if s >= e {
            continue;
        }
        match op {
            LogOp::Data { data, .. } => {
                bufs.write_at(s - offset, &data[(s - o) as usize..(e - o) as usize])
            }
            LogOp::Zero { .. } => bufs.sub(s - offset, e - s).fill_zero(),
        }
    }
}

impl Vhdx {
    /// Opens an image file (and, for a differencing disk, its parents read-only).
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Vhdx> {
        Self::open_depth(path, &opts, &mut Vec::new())
    }

    pub(crate) fn open_depth(
        path: &Path,
        opts: &OpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Vhdx> {
        let pstr = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .map_err(|e| Error::io(&pstr, "opening", 0, e))?;
        let storage: Arc<dyn Storage> = Arc::new(if opts.direct {
            FileStorage::with_direct(file, path, !opts.read_only)
        } else {
            FileStorage::new(file)
        });
        Self::open_storage_depth(storage, path, opts, chain)
    }

    /// Opens an image over any [`Storage`] (tests use this to inject faults).
    /// `path` names the image in errors and locates parents.
    pub fn open_storage(storage: Arc<dyn Storage>, path: &Path, opts: OpenOptions) -> Result<Vhdx> {
        Self::open_storage_depth(storage, path, &opts, &mut Vec::new())
    }

    pub(crate) fn open_storage_depth(
        storage: Arc<dyn Storage>,
        path: &Path,
        opts: &OpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Vhdx> {
        let pstr = path.display().to_string();
        let p = pstr.as_str();
        if opts.no_lock {
            tracing::info!(path = p, "opening without the image lock (locking=off)");
        } else {
            crate::lock::lock(&*storage, !opts.read_only, p)?;
        }
        let file_len = storage
            .len()
            .map_err(|e| Error::io(p, "getting the length", 0, e))?;
        let raw = MetaReader {
            path: p,
            storage: &*storage,
            overlay: None,
        };
        let ident = raw.read(0, 64 * 1024, "reading the file identifier")?;
        if &ident[0..8] != header::FILE_ID_SIGNATURE {
            return Err(Error::NotVhdx { path: pstr.clone() });
        }
        if file_len < 2 * MIB {
            return Err(Error::corrupt(
                p,
                "file",
                0,
                format!("file is {file_len} bytes, too short for a VHDX image"),
            ));
        }
        let creator = header::creator(&ident);
        let h0 =
            Header::parse(&raw.read(HEADER_OFFSETS[0], header::HEADER_SIZE, "reading header 1")?);
        let h1 =
            Header::parse(&raw.read(HEADER_OFFSETS[1], header::HEADER_SIZE, "reading header 2")?);
        let hs = [h0, h1];
        let current = header::select_current(p, &hs)?;
        let cur = match &hs[current] {
            Ok(h) => h.clone(),
            Err(e) => {
                return Err(Error::corrupt(
                    p,
                    "header",
                    HEADER_OFFSETS[current],
                    e.clone(),
                ))
            }
        };
        let other = match &hs[1 - current] {
            Ok(h) => h.clone(),
            Err(_) => cur.clone(),
        };
        let headers = if current == 0 {
            [cur.clone(), other]
        } else {
            [other, cur.clone()]
        };

        // The log region.
        let log_offset = cur.log_offset;
        let log_len = u64::from(cur.log_length);
        let bad_log = |r: String| Error::corrupt(p, "log region", log_offset, r);
        if log_len == 0 || log_len % MIB != 0 || log_offset % MIB != 0 || log_offset < MIB {
            return Err(bad_log(format!(
                "log at {log_offset} length {log_len} is not 1 MiB aligned past the header area"
            )));
        }
        if log_offset.saturating_add(log_len) > file_len {
            return Err(bad_log(format!(
                "log [{log_offset}, +{log_len}) extends past the end of the file ({file_len})"
            )));
        }
        if log_len > log::MAX_LOG_LEN {
            return Err(Error::unsupported(
                p,
                format!(
                    "log of {log_len} bytes (at most {} supported)",
                    log::MAX_LOG_LEN
                ),
            ));
        }
        let mut replay: Option<Replay> = None;
        let mut log_scan = LogScanStats::default();
        if !cur.log_guid.is_nil() {
            if cur.log_version != 0 {
                return Err(Error::unsupported(
                    p,
                    format!("log version {}", cur.log_version),
                ));
            }
            let buf = raw.read(log_offset, log_len as usize, "reading the log")?;
            let (found, stats) = log::find_replay(p, log_offset, &buf, &cur.log_guid, file_len)?;
            replay = found;
            log_scan = stats;
            if let Some(r) = &replay {
                tracing::info!(
                    path = p,
                    entries = r.entries,
                    ops = r.ops.len(),
                    "log has a pending sequence to replay"
                );
            }
        }
        let eff_len = replay
            .as_ref()
            .map_or(file_len, |r| r.last_file_offset.max(file_len));
        let mr = MetaReader {
            path: p,
            storage: &*storage,
            overlay: replay.as_ref().map(|r| r.ops.as_slice()),
        };

        // Region table: first valid copy.
        let rt0 = RegionTable::parse(&mr.read(
            REGION_TABLE_OFFSETS[0],
            REGION_TABLE_SIZE,
            "reading region table 1",
        )?);
        let regions = match rt0 {
            Ok(t) => t,
            Err(e0) => {
                match RegionTable::parse(&mr.read(
                    REGION_TABLE_OFFSETS[1],
                    REGION_TABLE_SIZE,
                    "reading region table 2",
                )?) {
                    Ok(t) => {
                        tracing::warn!(
                            path = p,
                            "region table 1 invalid ({e0}); using region table 2"
                        );
                        t
                    }
                    Err(e1) => {
                        return Err(Error::corrupt(
                            p,
                            "region table",
                            REGION_TABLE_OFFSETS[0],
                            format!("both copies invalid: 1: {e0}; 2: {e1}"),
                        ))
                    }
                }
            }
        };
        regions.validate(p, eff_len)?;
        let (Some(bat_re), Some(meta_re)) = (regions.find(&BAT_GUID), regions.find(&METADATA_GUID))
        else {
            return Err(Error::corrupt(
                p,
                "region table",
                REGION_TABLE_OFFSETS[0],
                "BAT or metadata region missing",
            ));
        };
        let (bat_offset, bat_region_len) = (bat_re.file_offset, u64::from(bat_re.length));
        let (meta_offset, meta_len) = (meta_re.file_offset, u64::from(meta_re.length));
        for (name, o, l) in [
            ("BAT", bat_offset, bat_region_len),
            ("metadata", meta_offset, meta_len),
        ] {
            if o < log_offset + log_len && log_offset < o + l {
                return Err(bad_log(format!("log overlaps the {name} region")));
            }
        }
        // Allocation caps: the metadata region and the BAT are read into
        // memory, so they must lie in bytes the file (or its log) holds; a
        // region table or log claiming a larger file cannot make open allocate
        // more than the file could hold.
        let held_end = replay
            .as_ref()
            .map_or(file_len, |r| r.data_end().max(file_len));
        for (name, o, l) in [
            ("metadata", meta_offset, meta_len),
            ("BAT", bat_offset, bat_region_len),
        ] {
            if o.saturating_add(l) > held_end {
                return Err(Error::corrupt(
                    p,
                    "region table",
                    REGION_TABLE_OFFSETS[0],
                    format!(
                        "{name} region [{o}, +{l}) lies past the {held_end} bytes the file holds"
                    ),
                ));
            }
        }
        if meta_len > MAX_METADATA_REGION {
            return Err(Error::unsupported(
                p,
                format!("metadata region of {meta_len} bytes"),
            ));
        }
        let meta_bytes = mr.read(
            meta_offset,
            meta_len as usize,
            "reading the metadata region",
        )?;
        let metadata = Metadata::parse(p, meta_offset, &meta_bytes)?;
        let params = metadata.params(p, meta_offset)?;
        let geo = Geometry::new(
            params.virtual_size,
            params.block_size,
            params.logical_sector_size,
            params.has_parent,
        );
        let entries = geo.bat_entries();
        if entries.saturating_mul(8) > bat_region_len {
            return Err(Error::corrupt(
                p,
                "BAT region",
                bat_offset,
                format!("{entries} entries needed for a {} byte disk do not fit in {bat_region_len} bytes", geo.virtual_size),
            ));
        }
        let bat_bytes = mr.read(bat_offset, (entries * 8) as usize, "reading the BAT")?;
        let bat: Vec<u64> = bat_bytes.chunks_exact(8).map(|c| le64(c, 0)).collect();
        validate_bat(
            p,
            &geo,
            &bat,
            bat_offset,
            eff_len,
            &[
                (0, MIB),
                (log_offset, log_len),
                (bat_offset, bat_region_len),
                (meta_offset, meta_len),
            ],
        )?;

        let locator = match metadata.get(&PARENT_LOCATOR) {
            Some(it) if params.has_parent => Some(ParentLocator::parse(p, meta_offset, &it.data)?),
            _ => None,
        };
        let parent = if opts.skip_parent {
            None
        } else if let Some(loc) = &locator {
            chain.push(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()));
            if chain.len() > MAX_CHAIN_DEPTH {
                return Err(Error::Parent {
                    path: pstr.clone(),
                    reason: format!("chain deeper than {MAX_CHAIN_DEPTH}"),
                });
            }
            let parent = crate::diff::open_parent(path, loc, &params, opts, chain)?;
            Some(Box::new(parent))
        } else {
            None
        };

        let eof = eff_len.div_ceil(MIB) * MIB;
        let mut me = Vhdx {
            path: path.to_path_buf(),
            pstr: pstr.clone(),
            storage,
            read_only: opts.read_only,
            geo,
            params,
            bat_offset,
            bat_region_len,
            meta_offset,
            meta_len,
            log_offset,
            log_len,
            regions,
            metadata,
            locator,
            parent,
            state: RwLock::new(State {
                bat,
                dirty_bat: BTreeSet::new(),
                bitmaps: HashMap::new(),
                dirty_bitmap: BTreeSet::new(),
                dirty_raw: BTreeMap::new(),
                eof,
                file_len: eff_len,
                alloc_since_flush: 0,
            }),
            hdr: Mutex::new(HeaderState {
                headers,
                current,
                session_started: false,
                log_active: false,
                log_guid: Uuid::nil(),
                log_seq: 0,
                log_head: 0,
                pending_tail: None,
                durable_len: eff_len,
            }),
            flush_lock: Mutex::new(()),
            overlay: None,
            replayed_entries: replay.as_ref().map_or(0, |r| r.entries),
            log_scan,
            creator,
            closed: AtomicBool::new(false),
            session_open: AtomicBool::new(false),
        };
        match replay {
            Some(r) if !opts.read_only => me.replay_to_disk(&r, file_len)?,
            Some(r) => me.overlay = Some(r.ops),
            None if !opts.read_only && !cur.log_guid.is_nil() => {
                // An empty log with a GUID: clear it so readers see a clean image.
                let mut hs = mlock(&me.hdr);
                me.update_header(&mut hs, |h| h.log_guid = Uuid::nil())?;
            }
            None => {}
        }
        Ok(me)
    }

    fn replay_to_disk(&mut self, r: &Replay, file_len: u64) -> Result<()> {
        let p = &self.pstr;
        let s = &*self.storage;
        if r.last_file_offset > file_len {
            s.set_len(r.last_file_offset)
                .map_err(|e| Error::io(p, "extending the file for log replay", file_len, e))?;
        }
        for op in &r.ops {
            match op {
                LogOp::Data { offset, data } => storage::write_all_at(s, data, *offset)
                    .map_err(|e| Error::io(p, "replaying the log", *offset, e))?,
                LogOp::Zero { offset, len } => storage::zero_range(s, *offset, *len)
                    .map_err(|e| Error::io(p, "replaying the log", *offset, e))?,
            }
        }
        s.sync_data()
            .map_err(|e| Error::io(p, "flushing the log replay", 0, e))?;
        let mut hs = mlock(&self.hdr);
        self.update_header(&mut hs, |h| h.log_guid = Uuid::nil())?;
        tracing::info!(path = p.as_str(), entries = r.entries, "replayed the log");
        Ok(())
    }

    /// Writes the non-current header with `f` applied and the next sequence number, then flushes.
    pub(crate) fn update_header(
        &self,
        hs: &mut HeaderState,
        f: impl FnOnce(&mut Header),
    ) -> Result<()> {
        let mut h = hs.headers[hs.current].clone();
        f(&mut h);
        h.sequence_number += 1;
        let idx = 1 - hs.current;
        let b = h.to_bytes();
        storage::write_all_at(&*self.storage, &b, HEADER_OFFSETS[idx])
            .map_err(|e| Error::io(&self.pstr, "writing a header", HEADER_OFFSETS[idx], e))?;
        self.storage
            .sync_data()
            .map_err(|e| Error::io(&self.pstr, "flushing a header", HEADER_OFFSETS[idx], e))?;
        hs.headers[idx] = h;
        hs.current = idx;
        Ok(())
    }

    /// Before the first write of this session: new file and data write GUIDs (MS-VHDX 2.2.2).
    pub(crate) fn begin_write(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.pstr.clone(),
            });
        }
        if self.session_open.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut hs = mlock(&self.hdr);
        if hs.session_started {
            return Ok(());
        }
        self.update_header(&mut hs, |h| {
            h.file_write_guid = Uuid::new_v4();
            h.data_write_guid = Uuid::new_v4();
        })?;
        hs.session_started = true;
        self.session_open.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether aligned payload I/O bypasses the page cache (opened with
    /// `direct` on a file system that has `O_DIRECT`).
    pub fn direct_io(&self) -> bool {
        self.storage.is_direct()
    }

    pub fn virtual_size(&self) -> u64 {
        self.geo.virtual_size
    }
    pub fn logical_sector_size(&self) -> u32 {
        self.params.logical_sector_size
    }
    pub fn physical_sector_size(&self) -> u32 {
        self.params.physical_sector_size
    }
    pub fn block_size(&self) -> u32 {
        self.params.block_size
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    pub fn has_parent(&self) -> bool {
        self.params.has_parent
    }
    pub fn parent(&self) -> Option<&Vhdx> {
        self.parent.as_deref()
    }
    pub fn parent_locator(&self) -> Option<&ParentLocator> {
        self.locator.as_ref()
    }
    pub fn leave_blocks_allocated(&self) -> bool {
        self.params.leave_blocks_allocated
    }
    pub fn page83(&self) -> Uuid {
        self.params.page83
    }
    pub fn creator(&self) -> &str {
        &self.creator
    }
    /// The metadata items, raw (user-defined items included).
    pub fn metadata_items(&self) -> &[crate::metadata::MetadataItem] {
        &self.metadata.items
    }
    /// The current header.
    pub fn header(&self) -> Header {
        let hs = mlock(&self.hdr);
        hs.headers[hs.current].clone()
    }
    pub fn data_write_guid(&self) -> Uuid {
        self.header().data_write_guid
    }
    /// Number of log entries replayed when the image was opened.
    pub fn replayed_log_entries(&self) -> usize {
        self.replayed_entries
    }
    /// What scanning the log cost when the image was opened (bytes
    /// checksummed and copied; zero when the log GUID was nil).
    pub fn log_scan_stats(&self) -> LogScanStats {
        self.log_scan
    }
    /// Raw BAT entry of payload block `block`.
    pub fn payload_entry(&self, block: u64) -> u64 {
        let st = rlock(&self.state);
        st.bat
            .get(self.geo.payload_index(block))
            .copied()
            .unwrap_or(0)
    }
    /// Geometry derived from the metadata.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }
    /// File size of the image.
    pub fn file_size(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| Error::io(&self.pstr, "getting the length", 0, e))
    }

    /// Flushes and marks the log clean; errors are reported (Drop would only log them).
    pub fn close(self) -> Result<()> {
        self.close_inner()
    }

    fn close_inner(&self) -> Result<()> {
        if self.read_only || self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.flush()?;
        self.retire_log()?;
        self.trim_growth()
    }
}

impl Drop for Vhdx {
    fn drop(&mut self) {
        if let Err(e) = self.close_inner() {
            tracing::error!(path = self.pstr.as_str(), "closing the image failed: {e}");
        }
    }
}

/// Every allocated payload and sector bitmap block lies inside the file, past
/// the header area, clear of the regions and of each other.
fn validate_bat(
    p: &str,
    geo: &Geometry,
    bat: &[u64],
    bat_offset: u64,
    file_len: u64,
    fixed: &[(u64, u64)],
) -> Result<()> {
    let mut spans: Vec<(u64, u64, usize)> = Vec::new();
    let stride = geo.chunk_ratio + 1;
    for (i, &e) in bat.iter().enumerate() {
        let is_bitmap = (i as u64) % stride == geo.chunk_ratio;
        let st = bat::state(e);
        let at = bat_offset + 8 * i as u64;
        let bad = |r: String| Error::corrupt(p, "BAT entry", at, r);
        let len = if is_bitmap {
            match st {
                bat::SB_NOT_PRESENT => continue,
                bat::SB_PRESENT => {
                    if !geo.has_parent {
                        // Allowed by the spec only for differencing disks; tolerate but ignore.
                        continue;
                    }
                    bat::SECTOR_BITMAP_SIZE
                }
                s => {
                    return Err(bad(format!(
                        "sector bitmap entry {i} has invalid state {s}"
                    )))
                }
            }
        } else {
            match st {
                bat::PAYLOAD_NOT_PRESENT
                | bat::PAYLOAD_UNDEFINED
                | bat::PAYLOAD_ZERO
                | bat::PAYLOAD_UNMAPPED => continue,
                bat::PAYLOAD_FULLY_PRESENT => geo.block_size,
                bat::PAYLOAD_PARTIALLY_PRESENT => {
                    if !geo.has_parent {
                        return Err(bad(format!(
                            "entry {i} is PARTIALLY_PRESENT in a disk without a parent"
                        )));
                    }
                    let chunk = (i as u64) / stride;
                    let sb = bat.get(geo.bitmap_index(chunk)).copied().unwrap_or(0);
                    if bat::state(sb) != bat::SB_PRESENT {
                        return Err(bad(format!(
                            "entry {i} is PARTIALLY_PRESENT but its sector bitmap is not present"
                        )));
                    }
                    geo.block_size
                }
                s => return Err(bad(format!("payload entry {i} has invalid state {s}"))),
            }
        };
        let off = bat::offset(e);
        if off < MIB {
            return Err(bad(format!(
                "entry {i} points into the header area (offset {off})"
            )));
        }
        if off.saturating_add(len) > file_len {
            return Err(bad(format!(
                "entry {i} block [{off}, +{len}) lies beyond the end of the file ({file_len})"
            )));
        }
        spans.push((off, len, i));
    }
    let mut all: Vec<(u64, u64, String)> = spans
        .iter()
        .map(|&(o, l, i)| (o, l, format!("BAT entry {i}")))
        .collect();
    for &(o, l) in fixed {
        all.push((o, l, "header/log/BAT/metadata".to_string()));
    }
    all.sort_by_key(|x| x.0);
    for w in all.windows(2) {
        if w[1].0 < w[0].0 + w[0].1 {
            return Err(Error::corrupt(
                p,
                "BAT",
                bat_offset,
                format!("{} at {} overlaps {} at {}", w[1].2, w[1].0, w[0].2, w[0].0),
            ));
        }
    }
    Ok(())
}
