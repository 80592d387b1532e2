//! Shared-nothing migration's disk mirror target: a "backend" whose writes become
//! [`DiskOp`]s queued for the sender thread, which puts them on the migration
//! connection in order. Used as the destination half of a `devices::block::Mirror`, so
//! the chunk locks order a guest write and the copy of its chunk, and the queue
//! keeps that order.

use std::io;
use std::sync::mpsc::Sender;
use std::sync::Mutex;
use vireo_util::sync;

use devices::block::{BlockBackend, IoBufs, IoBufsMut};
use migration::protocol::DiskOp;

pub struct RemoteDisk {
    index: u32,
    size: u64,
    logical: u32,
    physical: u32,
    ops: Mutex<Sender<DiskOp>>,
}

impl RemoteDisk {
    pub fn new(index: u32, like: &dyn BlockBackend, ops: Sender<DiskOp>) -> Self {
        Self {
            index,
            size: like.size(),
            logical: like.logical_block_size(),
            physical: like.physical_block_size(),
            ops: Mutex::new(ops),
        }
    }

    fn push(&self, op: DiskOp) -> io::Result<()> {
        sync::lock(&self.ops)
            .send(op)
            .map_err(|_| io::Error::other("the migration connection is gone"))
    }
}

impl BlockBackend for RemoteDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn logical_block_size(&self) -> u32 {
        self.logical
    }
    fn physical_block_size(&self) -> u32 {
        self.physical
    }
    fn read_vectored_at(&self, _: &IoBufsMut<'_>, _: u64) -> io::Result<()> {
        Err(io::Error::other("a remote disk is written, never read"))
    }
    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64) -> io::Result<()> {
        // The op outlives the request: the data is copied (volatile reads).
        let data = bufs.to_vec();
        self.push(DiskOp::Write {
            index: self.index,
            offset,
            data,
        })
    }
    /// The destination flushes everything before it acknowledges the VM.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.push(DiskOp::Zeroes {
            index: self.index,
            offset,
            len,
        })
    }
}
