//! The initial copy of the disks: chunks written, or a resync by block hashes, and
//! the copy recorded complete.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use crate::resync::{self, BlockHash};

use super::layout::{advise, disk_image_name};
use super::{io_err, ReplicaVm, StoreError};

impl ReplicaVm {
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
        write_sparse(&self.images[i], data, offset).map_err(io_err(disk_image_name(i)))
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
}

/// Writes `data` at `offset` of `image`, each [`resync::HASH_BLOCK`] of zeros (a block
/// the primary's disk has not allocated, or zeroed) punched as a hole instead, so an
/// image that held data there becomes sparse again (a file system without hole
/// punching gets the zeros written).
fn write_sparse(image: &std::fs::File, data: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let block = resync::HASH_BLOCK as usize;
    let mut at = 0;
    while at < data.len() {
        let end = (at + block).min(data.len());
        if data[at..end].iter().any(|&b| b != 0) {
            // A run of non-zero blocks goes in one write.
            let mut stop = end;
            while stop < data.len() {
                let next = (stop + block).min(data.len());
                if data[stop..next].iter().all(|&b| b == 0) {
                    break;
                }
                stop = next;
            }
            image.write_all_at(&data[at..stop], offset + at as u64)?;
            at = stop;
            continue;
        }
        // SAFETY: fallocate on a descriptor `image` owns; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                image.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (offset + at as u64) as libc::off_t,
                (end - at) as libc::off_t,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e);
            }
            image.write_all_at(&data[at..end], offset + at as u64)?;
        }
        at = end;
    }
    Ok(())
}
