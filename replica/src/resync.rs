//! Resynchronisation by block hashes: an initial copy that sends only the blocks in
//! which the replica's image differs from the primary's.
//!
//! The receiver (the replica) hashes its own image in [`HASH_BLOCK`]-sized blocks
//! (SHA-256; [`block_hashes`]) and sends the list; the sender (the primary) reads its
//! image once, block by block ([`Resync`]): a block whose hash equals the replica's is
//! skipped, a differing one joins a run of bytes to send. The sender hashes every byte
//! it read into one whole-image hash; the replica accepts the initial copy as complete
//! only if its image, after the runs were written, has exactly that hash
//! ([`image_hash`]). The replica keeps only bytes it computed or was sent: it trusts
//! no hash of the sender's for what it keeps.
//!
//! The sender reads its disk's virtual content ([`DiskImage`]): a block its image
//! has not allocated (a VHDX's unallocated or zero blocks) is not read but taken as
//! zeros, so a new (sparse, zero) replica is sent nothing for it and stays sparse.
//!
//! A list of the wrong length, or for another block size, is refused
//! ([`check_hash_list`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};

use crate::source::DiskImage;

/// The size of a hashed block (the last block of a disk may be shorter).
pub const HASH_BLOCK: u64 = 64 << 10;
/// At most this many hashes in one answer (4 GiB of disk, 2 MiB of hashes).
pub const MAX_HASHES_PER_REQUEST: u64 = 1 << 16;

/// The SHA-256 of one block.
pub type BlockHash = [u8; 32];

#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("resync: {0}")]
    Io(#[from] io::Error),
    #[error("resync: the replica's hash list for blocks {start}.. has {got} bytes, expected {expected} ({count} hashes of 32 bytes)")]
    WrongLength {
        start: u64,
        count: u64,
        got: usize,
        expected: usize,
    },
    #[error("resync: the replica hashes blocks of {got} bytes, this primary {HASH_BLOCK}")]
    BlockSize { got: u64 },
    #[error("resync: the replica's hash list is not hex: {0}")]
    NotHex(String),
}

/// How many hashed blocks a disk of `size` bytes has.
pub fn block_count(size: u64) -> u64 {
    size.div_ceil(HASH_BLOCK)
}

/// The hashes of blocks `start..start+count` of `image` (a disk of `size` bytes),
/// clipped to the disk's end.
pub fn block_hashes(image: &File, size: u64, start: u64, count: u64) -> io::Result<Vec<BlockHash>> {
    let end = block_count(size).min(start.saturating_add(count));
    let mut buf = vec![0u8; HASH_BLOCK as usize];
    let mut out = Vec::with_capacity(end.saturating_sub(start) as usize);
    for b in start..end {
        let at = b * HASH_BLOCK;
        let n = (size - at).min(HASH_BLOCK) as usize;
        image.read_exact_at(&mut buf[..n], at)?;
        out.push(Sha256::digest(&buf[..n]).into());
    }
    Ok(out)
}

/// The SHA-256 of the first `size` bytes of `image`.
pub fn image_hash(image: &File, size: u64) -> io::Result<BlockHash> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        image.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.finalize().into())
}

/// Checks a replica's answer for blocks `start..` of a disk of `size` bytes: its block
/// size and that it holds exactly the hashes asked for (`count`, clipped to the disk).
pub fn check_hash_list(
    size: u64,
    block_size: u64,
    start: u64,
    count: u64,
    hex_list: &str,
) -> Result<Vec<BlockHash>, ResyncError> {
    if block_size != HASH_BLOCK {
        return Err(ResyncError::BlockSize { got: block_size });
    }
    let want = block_count(size)
        .min(start.saturating_add(count))
        .saturating_sub(start);
    let bytes = hex::decode(hex_list).map_err(|e| ResyncError::NotHex(e.to_string()))?;
    if bytes.len() as u64 != want * 32 {
        return Err(ResyncError::WrongLength {
            start,
            count: want,
            got: bytes.len(),
            expected: (want * 32) as usize,
        });
    }
    Ok(bytes
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect())
}

/// A run of differing blocks to send: the bytes the primary read at `offset`.
#[derive(Debug, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The sender's pass over its image: reads each block once, compares its hash with the
/// replica's and yields the differing bytes in runs of at most `max_run` bytes.
pub struct Resync<'a> {
    image: &'a dyn DiskImage,
    size: u64,
    next_block: u64,
    max_run: usize,
    whole: Sha256,
    /// Bytes of the image read so far.
    pub read_bytes: u64,
    /// Bytes taken as zeros without a read (ranges the image has not allocated).
    pub unallocated_bytes: u64,
    /// The hash of a whole block of zeros.
    zero_hash: BlockHash,
    /// Bytes in the runs yielded so far.
    pub differing_bytes: u64,
}

impl<'a> Resync<'a> {
    /// A pass over `image` (its [`DiskImage::size`] bytes).
    pub fn new(image: &'a dyn DiskImage, max_run: usize) -> Self {
        Resync {
            image,
            size: image.size(),
            next_block: 0,
            max_run: max_run.max(HASH_BLOCK as usize),
            whole: Sha256::new(),
            read_bytes: 0,
            unallocated_bytes: 0,
            zero_hash: Sha256::digest([0u8; HASH_BLOCK as usize]).into(),
            differing_bytes: 0,
        }
    }

    /// The next block this pass reads (the caller fetches the replica's hashes from
    /// there on).
    pub fn next_block(&self) -> u64 {
        self.next_block
    }

    pub fn done(&self) -> bool {
        self.next_block >= block_count(self.size)
    }

    /// Reads on from [`Self::next_block`] against `theirs` (the replica's hashes of
    /// the blocks from there) and returns the next run of differing blocks, or `None`
    /// once `theirs` is used up without one. A run ends at an equal block, at
    /// `max_run` bytes or at the end of `theirs`.
    pub fn next_run(&mut self, theirs: &[BlockHash], first: u64) -> io::Result<Option<Run>> {
        let mut run: Option<Run> = None;
        let mut buf = vec![0u8; HASH_BLOCK as usize];
        while !self.done() {
            let Some(their) = self
                .next_block
                .checked_sub(first)
                .and_then(|i| theirs.get(i as usize))
            else {
                break;
            };
            let at = self.next_block * HASH_BLOCK;
            let n = (self.size - at).min(HASH_BLOCK) as usize;
            if run
                .as_ref()
                .is_some_and(|r| r.data.len() + n > self.max_run)
            {
                break;
            }
            let mine: BlockHash = if self.image.reads_as_zero(at, n as u64)? {
                buf[..n].fill(0);
                self.unallocated_bytes += n as u64;
                if n == HASH_BLOCK as usize {
                    self.zero_hash
                } else {
                    Sha256::digest(&buf[..n]).into()
                }
            } else {
                self.image.read_exact_at(&mut buf[..n], at)?;
                self.read_bytes += n as u64;
                Sha256::digest(&buf[..n]).into()
            };
            self.whole.update(&buf[..n]);
            self.next_block += 1;
            if mine == *their {
                if run.is_some() {
                    break;
                }
                continue;
            }
            self.differing_bytes += n as u64;
            run.get_or_insert_with(|| Run {
                offset: at,
                data: Vec::new(),
            })
            .data
            .extend_from_slice(&buf[..n]);
        }
        Ok(run)
    }

    /// The hash of every byte this pass read (the image the replica must now hold).
    pub fn finish(self) -> BlockHash {
        self.whole.finalize().into()
    }
}
