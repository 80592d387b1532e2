//! virtio-mem (virtio 1.2, section 5.15): memory the guest plugs and unplugs in blocks
//! of a device-managed region (the hotplug region after guest RAM), following the
//! host's `requested_size`. Unplugged blocks go back to the host with
//! `madvise(MADV_DONTNEED)`; which blocks are plugged is device state that snapshots
//! and migrations keep.

mod blocks;
mod device;
mod worker;

pub use blocks::{Blocks, BlocksError, Response};
pub use device::{MemState, VirtioMem, VirtioMemConfig, TYPE_MEM};

/// Request types (`VIRTIO_MEM_REQ_*`).
pub const REQ_PLUG: u16 = 0;
pub const REQ_UNPLUG: u16 = 1;
pub const REQ_UNPLUG_ALL: u16 = 2;
pub const REQ_STATE: u16 = 3;

/// Response types (`VIRTIO_MEM_RESP_*`).
pub const RESP_ACK: u16 = 0;
pub const RESP_NACK: u16 = 1;
pub const RESP_BUSY: u16 = 2;
pub const RESP_ERROR: u16 = 3;

/// Block states in a STATE response (`VIRTIO_MEM_STATE_*`).
pub const STATE_PLUGGED: u16 = 0;
pub const STATE_UNPLUGGED: u16 = 1;
pub const STATE_MIXED: u16 = 2;

/// The default block size (Cloud Hypervisor's and Linux's usual: 2 MiB).
pub const DEFAULT_BLOCK_SIZE: u64 = 2 << 20;
/// Size of a request (`struct virtio_mem_req`): le16 type, 6 bytes padding, le64 addr,
/// le16 nb_blocks, 6 bytes padding.
pub const REQ_LEN: usize = 24;
/// Size of a response (`struct virtio_mem_resp`): le16 type, 6 bytes padding, le16 state.
pub const RESP_LEN: usize = 10;
/// Size of the configuration space (`struct virtio_mem_config`).
pub const CONFIG_LEN: usize = 56;
