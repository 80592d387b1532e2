//! Staging a segment before its commit: decompressed, verified to its trailer,
//! synced and renamed into the disk's directory.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;

use crate::format::segment_file_name;
use crate::log::sync_dir;
use crate::segment::{SegmentReader, Trailer};

use super::layout::{part_name, rename_at};
use super::{io_err, ReplicaVm, StoreError};

/// The answer to staging a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Staged {
    /// Verified and kept for the commit of its cut.
    Staged(Trailer),
    /// Applied already (a re-send): nothing was kept.
    AlreadyApplied,
}

impl ReplicaVm {
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
}

/// Reads a segment through and returns its trailer.
pub(super) fn verify(f: &mut File, disk: usize, seq: u64) -> Result<Trailer, StoreError> {
    f.seek(SeekFrom::Start(0))
        .map_err(io_err("reading a staged segment"))?;
    SegmentReader::new(BufReader::new(&mut *f))
        .and_then(SegmentReader::verify_all)
        .map_err(|source| StoreError::Segment { disk, seq, source })
}
