//! virtio-balloon (virtio 1.2, section 5.5): the host asks the guest to give memory
//! back (inflate) or takes less (deflate); the guest reports free pages on its own
//! (free page reporting) and its memory statistics. Pages the guest gives are returned
//! to the host with `madvise(MADV_DONTNEED)`, so the VMM's RSS falls by what the guest
//! gave.

mod device;
mod worker;

pub use device::{Balloon, BalloonConfig, BalloonState, BalloonStats, TYPE_BALLOON};

/// Feature bits (Linux UAPI `virtio_balloon.h`).
pub const F_MUST_TELL_HOST: u64 = 1 << 0;
pub const F_STATS_VQ: u64 = 1 << 1;
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const F_REPORTING: u64 = 1 << 5;

/// Balloon pages are always 4 KiB, whatever the guest's page size (the PFNs in the
/// inflate and deflate queues are in these units).
pub const PAGE_SHIFT: u32 = 12;

/// Statistics tags (`VIRTIO_BALLOON_S_*`), in the order of the spec.
pub const STAT_NAMES: [&str; 16] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kills",
    "alloc_stalls",
    "async_scans",
    "direct_scans",
    "async_reclaims",
    "direct_reclaims",
];
