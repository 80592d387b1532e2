//! What a primary stores beside the disks for a failover: the VM's definition and its
//! boot payload.

use std::os::fd::AsFd;

use crate::log::sync_dir;

use super::layout::read_opt;
use super::{io_err, ReplicaVm, StoreError};

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

impl ReplicaVm {
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
}
