//! The writer: one change log per disk, in a directory of its own. The file with the
//! highest sequence number is the one being written; every lower one is sealed.
//!
//! Crash safety (argued in docs/replica.md): a record is appended (one `pwritev` of its
//! header and data) before the disk write it describes starts, so every write that
//! reached the disk — and so every write the guest saw completed — is in the log once
//! the VMM dies (kill -9 leaves completed writes in the page cache). A guest flush syncs
//! the log (and, once after a cut, its directory) before the disk. Opening after a
//! crash keeps every whole record and drops a torn last one, which belongs to a write
//! that never reached the disk.
//!
//! A cut holds the disk's writes only while it writes the trailer and starts the next
//! file ([`ChangeLog::seal`]); the sealed file is made durable after the disk is
//! released ([`PendingSeal::sync`]), before the cut reports the segment.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use crate::error::{LogError, SegmentError};
use crate::format::{
    parse_file_name, segment_file_name, Header, RecordHeader, RecordKind, TrailerFields,
    HEADER_LEN, MAX_RECORD_DATA, RECORD_HEADER_LEN, TRAILER_LEN,
};
use crate::segment::SegmentReader;

mod budget;
pub use budget::BUDGET_FILE;

/// What opening found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The sequence number now being written.
    pub seq: u64,
    /// Whole records kept in it (a fresh file: 0).
    pub kept_records: u64,
    /// Bytes of a torn last record that were cut off.
    pub dropped_bytes: u64,
    /// The cut id of the newest sealed segment (0: none yet).
    pub last_cut_id: u64,
}

/// A segment a cut closed: its file in the log's directory and its trailer's totals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedSegment {
    pub seq: u64,
    pub cut_id: u64,
    pub records: u64,
    pub data_bytes: u64,
    pub covered_bytes: u64,
    pub file_name: String,
}

/// A disk's change log (see the module doc). Not internally locked: its owner
/// serialises appends with the disk writes they describe.
pub struct ChangeLog {
    dir: OwnedFd,
    label: String,
    file: File,
    seq: u64,
    disk_size: u64,
    end: u64,
    crc: u32,
    records: u64,
    data_bytes: u64,
    covered_bytes: u64,
    last_cut_id: u64,
    /// Whether the directory entry of the file being written is known durable (a cut
    /// starts the next file without syncing the directory; the next guest flush does).
    entry_durable: bool,
    /// A seal that wrote its trailer but could not start the next file: every append
    /// fails until the log is opened again (which starts it).
    broken: Option<String>,
    /// At most this many bytes of segments (None: no bound); see [`budget`].
    budget: Option<u64>,
    /// Bytes of the directory's segment files other than the one being written, as
    /// last counted (at open, at each seal; the primary deletes applied ones between).
    held_bytes: u64,
    /// The live region bitmap and its file (a zero spare until the log degrades).
    map: Option<(crate::regions::RegionMap, File)>,
    /// Over budget: writes go to the bitmap, not the segments.
    degraded: bool,
}

/// A segment a cut sealed while it held the disk: its trailer is written, its bytes
/// are not yet known durable. The cut releases the disk, then calls [`Self::sync`]:
/// no guest write waits for the segment's `fdatasync`.
#[must_use = "a sealed segment is reported only once it is durable"]
pub struct PendingSeal {
    segment: SealedSegment,
    file: File,
    name: String,
}

impl PendingSeal {
    /// Makes the sealed segment durable and returns it.
    pub fn sync(self) -> Result<SealedSegment, LogError> {
        self.file.sync_data().map_err(|source| LogError::Io {
            file: self.name,
            source,
        })?;
        Ok(self.segment)
    }

    /// The segment (not yet durable).
    pub fn segment(&self) -> &SealedSegment {
        &self.segment
    }
}

/// A torn tail is at most one record and a trailer; more invalid bytes than that
/// are damage, not a crash, and the log is refused rather than cut.
const MAX_TORN_TAIL: u64 = (RECORD_HEADER_LEN + TRAILER_LEN) as u64 + MAX_RECORD_DATA;

impl ChangeLog {
    /// Opens the log in `dir` (made by the caller, beneath its storage root) for a disk
    /// of `disk_size` bytes; `label` names it in errors. Recovers from a crash: a torn
    /// last record is cut off, a file whose predecessor was sealed is started.
    pub fn open(dir: OwnedFd, label: &str, disk_size: u64) -> Result<(Self, Recovery), LogError> {
        let floor = budget::finish_restart(dir.as_fd(), label)?;
        let (mut log, mut recovery) = Self::open_segments(dir, label, disk_size)?;
        log.last_cut_id = log.last_cut_id.max(floor);
        recovery.last_cut_id = log.last_cut_id;
        log.after_open()?;
        Ok((log, recovery))
    }

    fn open_segments(
        dir: OwnedFd,
        label: &str,
        disk_size: u64,
    ) -> Result<(Self, Recovery), LogError> {
        let io_err = |source: io::Error| LogError::Io {
            file: label.to_string(),
            source,
        };
        let mut seqs = Vec::new();
        let listing =
            std::fs::read_dir(confine::fd_path(dir.as_fd(), "".as_ref())).map_err(io_err)?;
        for entry in listing {
            let entry = entry.map_err(io_err)?;
            if let Some(seq) = entry.file_name().to_str().and_then(parse_file_name) {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        let Some(&newest) = seqs.last() else {
            let file = create_segment(&dir, label, 1)?;
            let mut log = Self::new(dir, label, file, 1, disk_size);
            log.write_header()?;
            log.sync_dir()?;
            let r = log.recovery(0);
            return Ok((log, r));
        };
        let file = open_segment(&dir, label, newest)?;
        let mut log = Self::new(dir, label, file, newest, disk_size);
        match log.recover(disk_size)? {
            None => {
                // The newest is sealed (its trailer holds the last cut): start the next.
                log.start(newest + 1)?;
                let r = log.recovery(0);
                Ok((log, r))
            }
            Some(dropped) => {
                if let Some(&previous) = seqs.iter().rev().nth(1) {
                    log.last_cut_id = log.trailer_of(previous)?.cut_id;
                }
                if dropped > 0 {
                    tracing::warn!(log = %log.label, seq = log.seq, dropped, "change log: cut off a torn last record");
                }
                let r = log.recovery(dropped);
                Ok((log, r))
            }
        }
    }

    fn new(dir: OwnedFd, label: &str, file: File, seq: u64, disk_size: u64) -> Self {
        Self {
            dir,
            label: label.to_string(),
            file,
            seq,
            disk_size,
            end: 0,
            crc: 0,
            records: 0,
            data_bytes: 0,
            covered_bytes: 0,
            last_cut_id: 0,
            entry_durable: true,
            broken: None,
            budget: None,
            held_bytes: 0,
            map: None,
            degraded: false,
        }
    }

    fn sync_dir(&mut self) -> Result<(), LogError> {
        sync_dir(self.dir.as_fd()).map_err(|e| self.io(e))?;
        self.entry_durable = true;
        Ok(())
    }

    fn recovery(&self, dropped_bytes: u64) -> Recovery {
        Recovery {
            seq: self.seq,
            kept_records: self.records,
            dropped_bytes,
            last_cut_id: self.last_cut_id,
        }
    }

    fn name(&self, seq: u64) -> String {
        format!("{}/{}", self.label, segment_file_name(seq))
    }

    fn io(&self, source: io::Error) -> LogError {
        LogError::Io {
            file: self.name(self.seq),
            source,
        }
    }

    /// The verified trailer of sealed segment `seq` (only its last bytes are read).
    fn trailer_of(&self, seq: u64) -> Result<TrailerFields, LogError> {
        let f = open_segment(&self.dir, &self.label, seq)?;
        let len = f.metadata().map_err(|e| self.io(e))?.len();
        let mut t = [0u8; TRAILER_LEN];
        if len < (HEADER_LEN + TRAILER_LEN) as u64 {
            return Err(self.corrupt(seq, "too short to be a sealed segment".into()));
        }
        f.read_exact_at(&mut t, len - TRAILER_LEN as u64)
            .map_err(|e| self.io(e))?;
        TrailerFields::decode(&t).map_err(|r| self.corrupt(seq, r))
    }

    fn corrupt(&self, seq: u64, reason: String) -> LogError {
        LogError::Corrupt {
            file: self.name(seq),
            reason,
        }
    }

    /// Reads the newest file: `None` if it is sealed, else the bytes cut off its end
    /// (the file is then ready for appends).
    fn recover(&mut self, disk_size: u64) -> Result<Option<u64>, LogError> {
        let len = self.file.metadata().map_err(|e| self.io(e))?.len();
        if len < HEADER_LEN as u64 {
            // Created, header not (wholly) written: nothing was logged in it.
            self.file.set_len(0).map_err(|e| self.io(e))?;
            self.write_header()?;
            return Ok(Some(len));
        }
        let mut reader = match SegmentReader::new(BufReader::new(&self.file)) {
            Ok(r) => r,
            Err(e) => return Err(self.corrupt(self.seq, e.to_string())),
        };
        if reader.seq() != self.seq {
            return Err(self.corrupt(
                self.seq,
                format!("its header says sequence {}", reader.seq()),
            ));
        }
        if reader.disk_size() != disk_size {
            return Err(LogError::DiskSize {
                logged: reader.disk_size(),
                actual: disk_size,
            });
        }
        let mut buf = Vec::new();
        let stop = loop {
            match reader.next_record(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    self.last_cut_id = reader.trailer().map_or(0, |t| t.cut_id);
                    return Ok(None);
                }
                Err(SegmentError::Io(e)) => return Err(self.io(e)),
                Err(e) => break e,
            }
        };
        let keep = reader.position();
        let dropped = len - keep;
        if dropped > MAX_TORN_TAIL {
            return Err(self.corrupt(
                self.seq,
                format!("{dropped} bytes after byte {keep} are not records ({stop}); refusing to cut them off"),
            ));
        }
        (self.crc, self.records, self.data_bytes, self.covered_bytes) = reader.running();
        drop(reader);
        self.end = keep;
        if dropped > 0 {
            self.file.set_len(keep).map_err(|e| self.io(e))?;
            self.file.sync_data().map_err(|e| self.io(e))?;
        }
        Ok(Some(dropped))
    }

    fn write_header(&mut self) -> Result<(), LogError> {
        self.write_header_unsynced()?;
        self.file.sync_data().map_err(|e| self.io(e))
    }

    /// Writes the header of the file being written (not synced: a cut's next file is
    /// synced by the first guest flush, or the next cut, after it).
    fn write_header_unsynced(&mut self) -> Result<(), LogError> {
        let h = Header {
            seq: self.seq,
            disk_size: self.disk_size,
        }
        .encode();
        self.file.write_all_at(&h, 0).map_err(|e| self.io(e))?;
        self.end = HEADER_LEN as u64;
        self.crc = crc32c::crc32c(&h);
        self.records = 0;
        self.data_bytes = 0;
        self.covered_bytes = 0;
        Ok(())
    }

    /// Creates segment file `seq` (durably: its directory entry is synced) and makes it
    /// the one being written.
    fn start(&mut self, seq: u64) -> Result<(), LogError> {
        let file = create_segment(&self.dir, &self.label, seq)?;
        self.file = file;
        self.seq = seq;
        self.write_header()?;
        self.sync_dir()?;
        self.broken = None;
        Ok(())
    }

    /// A cut's start of segment `seq`: created and its header written, nothing synced
    /// (the disk is held meanwhile). Returns the file it replaced.
    fn start_after_cut(&mut self, seq: u64) -> Result<File, LogError> {
        let file = create_segment(&self.dir, &self.label, seq)?;
        let previous = std::mem::replace(&mut self.file, file);
        self.seq = seq;
        self.entry_durable = false;
        self.write_header_unsynced()?;
        Ok(previous)
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), LogError> {
        if let Some(why) = &self.broken {
            return Err(self.corrupt(self.seq, why.clone()));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.disk_size => Ok(()),
            _ => Err(LogError::OutOfRange {
                offset,
                len,
                size: self.disk_size,
            }),
        }
    }

    fn append(&mut self, h: RecordHeader, data: &[u8]) -> Result<(), LogError> {
        let hb = h.encode();
        write_all_vectored_at(&self.file, &hb, data, self.end).map_err(|e| self.io(e))?;
        self.end += (RECORD_HEADER_LEN + data.len()) as u64;
        self.crc = crc32c::crc32c_append(crc32c::crc32c_append(self.crc, &hb), data);
        self.records += 1;
        self.data_bytes += h.data_len();
        self.covered_bytes += h.len;
        Ok(())
    }

    /// Records that the guest writes `data` at `offset` (call before the disk write).
    pub fn append_data(&mut self, offset: u64, data: &[u8]) -> Result<(), LogError> {
        let len = data.len() as u64;
        self.check(offset, len)?;
        if self.bitmap_instead(offset, len, len)? {
            return Ok(());
        }
        // A request larger than a record holds is logged as several records.
        let mut done = 0usize;
        for chunk in data.chunks(MAX_RECORD_DATA as usize) {
            let h = RecordHeader {
                kind: RecordKind::Data,
                offset: offset + done as u64,
                len: chunk.len() as u64,
                data_crc: crc32c::crc32c(chunk),
            };
            self.append(h, chunk)?;
            done += chunk.len();
        }
        Ok(())
    }

    /// Records that `offset..offset+len` reads as zeros (write-zeroes, discard).
    pub fn append_zeroes(&mut self, offset: u64, len: u64) -> Result<(), LogError> {
        self.check(offset, len)?;
        if self.bitmap_instead(offset, len, 0)? {
            return Ok(());
        }
        let h = RecordHeader {
            kind: RecordKind::Zeroes,
            offset,
            len,
            data_crc: 0,
        };
        self.append(h, &[])
    }

    /// Makes every appended record durable (a guest flush; before the disk's), with
    /// the file's directory entry if a cut started it.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.sync_bitmap()?;
        self.file.sync_data().map_err(|e| self.io(e))?;
        if !self.entry_durable {
            self.sync_dir()?;
        }
        Ok(())
    }

    /// Closes the current segment with a trailer naming `cut_id` and starts the next;
    /// the caller holds new writes and has drained in-flight ones. The sealed file is
    /// made durable by [`PendingSeal::sync`], once the caller released the disk.
    pub fn seal(&mut self, cut_id: u64) -> Result<PendingSeal, LogError> {
        if let Some(why) = &self.broken {
            return Err(self.corrupt(self.seq, why.clone()));
        }
        if self.degraded {
            return Err(LogError::Degraded {
                file: self.label.clone(),
            });
        }
        let t = TrailerFields {
            seq: self.seq,
            cut_id,
            records: self.records,
            data_bytes: self.data_bytes,
            covered_bytes: self.covered_bytes,
            body_crc: self.crc,
        };
        self.file
            .write_all_at(&t.encode(), self.end)
            .map_err(|e| self.io(e))?;
        let segment = SealedSegment {
            seq: self.seq,
            cut_id,
            records: self.records,
            data_bytes: self.data_bytes,
            covered_bytes: self.covered_bytes,
            file_name: segment_file_name(self.seq),
        };
        let name = self.name(self.seq);
        self.last_cut_id = cut_id;
        let file = match self.start_after_cut(self.seq + 1) {
            Ok(previous) => previous,
            Err(e) => {
                self.broken = Some(format!(
                    "segment {} is sealed but the next could not start: {e}",
                    segment.seq
                ));
                return Err(e);
            }
        };
        tracing::debug!(log = %self.label, seq = segment.seq, cut_id, records = segment.records, "change log: segment sealed");
        self.count_held();
        Ok(PendingSeal {
            segment,
            file,
            name,
        })
    }

    /// The sequence number being written.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The cut id of the newest sealed segment (0: none).
    pub fn last_cut_id(&self) -> u64 {
        self.last_cut_id
    }

    /// Records in the segment being written.
    pub fn pending_records(&self) -> u64 {
        self.records
    }

    /// The log's directory (segment files are named by [`segment_file_name`]).
    pub fn dir(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

/// Makes a directory's entries durable: `fsync` of its descriptor, or, for an `O_PATH`
/// descriptor (which cannot be synced), of the directory opened again through it.
pub(crate) fn sync_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fsync on a descriptor the caller borrows; no memory is passed.
    if unsafe { libc::fsync(dir.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EBADF) {
        return Err(e);
    }
    File::open(confine::fd_path(dir, ".".as_ref()))?.sync_all()
}

/// Writes `head` then `body` at `offset` with as few `pwritev`s as the kernel allows
/// (one, in practice): a record is one system call on the guest's write path.
fn write_all_vectored_at(file: &File, head: &[u8], body: &[u8], offset: u64) -> io::Result<()> {
    let total = head.len() + body.len();
    let mut done = 0usize;
    while done < total {
        let (h, b) = if done < head.len() {
            (&head[done..], body)
        } else {
            (&[][..], &body[done - head.len()..])
        };
        let iov = [IoSlice::new(h), IoSlice::new(b)];
        let at = offset
            .checked_add(done as u64)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `IoSlice` is ABI-compatible with `iovec`; both slices outlive the
        // call, and the kernel only reads them.
        let n =
            unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr().cast::<libc::iovec>(), 2, at) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        done += n as usize;
    }
    Ok(())
}

fn segment_io(label: &str, seq: u64) -> impl FnOnce(io::Error) -> LogError {
    let file = format!("{label}/{}", segment_file_name(seq));
    move |source| LogError::Io { file, source }
}

fn open_segment(dir: &OwnedFd, label: &str, seq: u64) -> Result<File, LogError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(confine::fd_path(
            dir.as_fd(),
            segment_file_name(seq).as_ref(),
        ))
        .map_err(segment_io(label, seq))
}

fn create_segment(dir: &OwnedFd, label: &str, seq: u64) -> Result<File, LogError> {
    confine::create_private(dir.as_fd(), segment_file_name(seq).as_ref())
        .map_err(segment_io(label, seq))
}
