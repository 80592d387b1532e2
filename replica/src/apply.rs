//! The replica's side of one disk: a segment is verified to its trailer before any of
//! it touches the image, then applied, the image synced, and only then is the segment
//! recorded as applied (a small state file, replaced atomically). Applying is
//! idempotent: every record writes absolute bytes, so a segment applied again from its
//! start — after a crash mid-apply, or a re-send after a cut connection — leaves the
//! same image; a segment already recorded is not applied again, one that skips a
//! sequence number is refused.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;

use crate::error::SegmentError;
use crate::format::RecordKind;
use crate::segment::{SegmentReader, Trailer};

/// The disk's applied state, in its directory.
pub(crate) const STATE_FILE: &str = "applied";
const STATE_MAGIC: &[u8; 8] = b"VIREOAPL";

/// What a replica image needs: the raw image is a `File`.
pub trait Image {
    fn size(&self) -> io::Result<u64>;
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    fn sync(&self) -> io::Result<()>;
}

impl Image for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(data, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_all_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error("replica: {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("replica: segment {got} does not follow the last applied one ({applied})")]
    Gap { applied: u64, got: u64 },
    #[error("replica: the segment is for a disk of {segment} bytes, the image has {image}")]
    DiskSize { segment: u64, image: u64 },
    #[error("replica: the state file is damaged")]
    State,
}

/// The newest segment applied and synced: the disk's recovery point.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub seq: u64,
    pub cut_id: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    Applied(Trailer),
    /// Already recorded (a re-send): nothing was written.
    AlreadyApplied {
        seq: u64,
    },
}

/// One replica disk: its image and the directory of its state file.
pub struct ReplicaDisk<I> {
    image: I,
    dir: OwnedFd,
    applied: Applied,
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ApplyError {
    move |source| ApplyError::Io { what, source }
}

impl<I: Image> ReplicaDisk<I> {
    /// Opens the replica of one disk; its state lives in `dir` (nothing applied yet if
    /// there is no state file).
    pub fn open(image: I, dir: OwnedFd) -> Result<Self, ApplyError> {
        let path = confine::fd_path(dir.as_fd(), STATE_FILE.as_ref());
        let applied = match std::fs::read(&path) {
            Ok(b) => decode_state(&b).ok_or(ApplyError::State)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Applied::default(),
            Err(e) => return Err(io_err("reading the state file")(e)),
        };
        Ok(Self {
            image,
            dir,
            applied,
        })
    }

    pub fn applied(&self) -> Applied {
        self.applied
    }

    /// Verifies `segment` to its trailer, then applies it, syncs the image and records
    /// it. On any error before the record, the state is unchanged (re-sending the same
    /// segment is always safe).
    pub fn apply<R: Read + Seek>(&mut self, mut segment: R) -> Result<ApplyOutcome, ApplyError> {
        let trailer = SegmentReader::new(BufReader::new(&mut segment))?.verify_all()?;
        if trailer.seq <= self.applied.seq {
            return Ok(ApplyOutcome::AlreadyApplied { seq: trailer.seq });
        }
        if trailer.seq != self.applied.seq + 1 {
            return Err(ApplyError::Gap {
                applied: self.applied.seq,
                got: trailer.seq,
            });
        }
        let image_size = self.image.size().map_err(io_err("the image's size"))?;
        if trailer.disk_size != image_size {
            return Err(ApplyError::DiskSize {
                segment: trailer.disk_size,
                image: image_size,
            });
        }
        segment
            .seek(SeekFrom::Start(0))
            .map_err(io_err("rewinding the segment"))?;
        let mut reader = SegmentReader::new(BufReader::new(&mut segment))?;
        let mut buf = Vec::new();
        while let Some(rec) = reader.next_record(&mut buf)? {
            match rec.kind {
                RecordKind::Data => self.image.write_at(&buf, rec.offset),
                RecordKind::Zeroes => self.image.write_zeroes(rec.offset, rec.len),
            }
            .map_err(io_err("writing the image"))?;
        }
        self.image.sync().map_err(io_err("syncing the image"))?;
        let applied = Applied {
            seq: trailer.seq,
            cut_id: trailer.cut_id,
        };
        confine::write_private_atomic(
            self.dir.as_fd(),
            STATE_FILE.as_ref(),
            &encode_state(applied),
        )
        .map_err(io_err("recording the segment"))?;
        File::open(confine::fd_path(self.dir.as_fd(), ".".as_ref()))
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing the state directory"))?;
        self.applied = applied;
        tracing::info!(
            seq = applied.seq,
            cut_id = applied.cut_id,
            "replica: segment applied"
        );
        Ok(ApplyOutcome::Applied(trailer))
    }
}

fn encode_state(a: Applied) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(STATE_MAGIC);
    b.extend_from_slice(&a.seq.to_le_bytes());
    b.extend_from_slice(&a.cut_id.to_le_bytes());
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn decode_state(b: &[u8]) -> Option<Applied> {
    if b.len() != 28 || &b[..8] != STATE_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(b[24..28].try_into().ok()?);
    if crc32c::crc32c(&b[..24]) != crc {
        return None;
    }
    Some(Applied {
        seq: u64::from_le_bytes(b[8..16].try_into().ok()?),
        cut_id: u64::from_le_bytes(b[16..24].try_into().ok()?),
    })
}
