//! Guest RAM: anonymous mappings (optionally huge pages), or with `shared` one sealed
//! memfd per region mapped shared (so a vhost-user backend can map it too), with a
//! dirty bitmap that devices fill when they write guest memory.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::mmap::{MmapRegionBuilder, NewBitmap};
use vm_memory::{FileOffset, GuestAddress, GuestRegionCollection};

use devices::virtio::dirty_bitmap::DirtyBitmap;
use devices::virtio::{GuestMemoryMmap, GuestRegionMmap};

use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "guest memory of {requested} MiB exceeds this host's {host} MiB of RAM \
         (--memory ...,overcommit=on backs only what the guest touches)"
    )]
    MoreThanHost { requested: u64, host: u64 },
    #[error("cannot map {size} MiB of guest memory at {addr:#x}{hint}: {reason}")]
    Map {
        size: u64,
        addr: u64,
        hint: &'static str,
        reason: String,
    },
    #[error("guest memory regions overlap or are invalid: {0}")]
    Regions(String),
    #[error(
        "guest memory needs {needed} huge pages of {page_kib} KiB; this host's pool has \
         {available} free (raise /sys/kernel/mm/hugepages/hugepages-{page_kib}kB/nr_hugepages)"
    )]
    HugePagesShort {
        needed: u64,
        available: u64,
        page_kib: u64,
    },
    #[error("this host has no huge pages of {page_kib} KiB (no /sys/kernel/mm/hugepages/hugepages-{page_kib}kB)")]
    NoSuchHugePageSize { page_kib: u64 },
}

/// Huge pages of `page` bytes this host's pool can still give: free minus reserved
/// (`None`: the host has no pool of that size).
fn hugepages_available(page: u64) -> Option<u64> {
    crate::file_broker::run(crate::file_broker::FileOp::ReadHostInfo, move || {
        read_hugepages_available(page)
    })
}

fn read_hugepages_available(page: u64) -> Option<u64> {
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page >> 10);
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("{dir}/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(read("free_hugepages")?.saturating_sub(read("resv_hugepages").unwrap_or(0)))
}

/// mmap's MAP_HUGE_* encoding of a huge page size (log2 in bits 26..31).
fn map_huge_flag(page: u64) -> i32 {
    (page.trailing_zeros() as i32) << libc::MAP_HUGE_SHIFT
}

/// Total RAM of the host in bytes (MemTotal of /proc/meminfo).
fn host_ram() -> Option<u64> {
    let s = crate::file_broker::run(crate::file_broker::FileOp::ReadHostInfo, || {
        std::fs::read_to_string("/proc/meminfo")
    })
    .ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A memfd of `len` bytes for the region at `start`, sealed against shrinking (a
/// backend that maps it must never see it cut under its mapping) and against new seals.
fn region_memfd(start: u64, len: u64) -> std::io::Result<File> {
    let name = std::ffi::CString::new(format!("vireo-ram-{start:x}"))
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: memfd_create with a valid C string; the fd is owned at once.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    // SAFETY: fcntl on our own fd with integer arguments.
    let r = unsafe {
        libc::fcntl(
            fd,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Maps `size` bytes of guest RAM laid out by [`layout::ram_ranges`]. Normal pages
/// reserve nothing (`MAP_NORESERVE`): a page is backed when the guest first touches it.
/// Huge pages (`hugepages`: their size in bytes) are reserved from the host's pool up
/// front, so a pool too small is a clear error now rather than a SIGBUS when the guest
/// reaches the page the pool could not give. A guest larger than the host is refused
/// unless `overcommit`. With `shared` (not with huge pages: the configuration refuses
/// it) each region is a memfd mapped `MAP_SHARED`, for a vhost-user backend.
///
/// `hotplug` bytes of virtio-mem region (at [`layout::hotplug_region`]) are one more
/// region, private and `MAP_NORESERVE` always (the configuration refuses it with huge
/// pages or shared memory): nothing of it is backed until the guest plugs a block and
/// touches it; it counts against the host's RAM as RAM does (the guest may plug it all).
pub fn create_guest_memory(
    size: u64,
    hugepages: Option<u64>,
    overcommit: bool,
    shared: bool,
    hotplug: Option<u64>,
) -> Result<GuestMemoryMmap, MemoryError> {
    // The hotplug region counts: the guest may plug all of it.
    let total = size.saturating_add(hotplug.unwrap_or(0));
    if let Some(host) = host_ram().filter(|_| !overcommit) {
        if total > host {
            return Err(MemoryError::MoreThanHost {
                requested: total >> 20,
                host: host >> 20,
            });
        }
    }
    let mut flags = if shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
    };
    match hugepages {
        Some(page) => {
            let page_kib = page >> 10;
            let available =
                hugepages_available(page).ok_or(MemoryError::NoSuchHugePageSize { page_kib })?;
            let needed = size.div_ceil(page);
            if needed > available {
                return Err(MemoryError::HugePagesShort {
                    needed,
                    available,
                    page_kib,
                });
            }
            flags |= libc::MAP_HUGETLB | map_huge_flag(page);
        }
        None => flags |= libc::MAP_NORESERVE,
    }
    let mut regions = Vec::new();
    for (start, len) in layout::ram_ranges(size) {
        let map_err = |reason: String| MemoryError::Map {
            size: len >> 20,
            addr: start,
            hint: if hugepages.is_some() {
                " (are enough huge pages reserved in /proc/sys/vm/nr_hugepages?)"
            } else {
                ""
            },
            reason,
        };
        let mut builder =
            MmapRegionBuilder::new_with_bitmap(len as usize, DirtyBitmap::with_len(len as usize))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags);
        if shared {
            let file = region_memfd(start, len).map_err(|e| map_err(format!("memfd: {e}")))?;
            builder = builder.with_file_offset(FileOffset::new(file, 0));
        }
        let mapping = builder.build().map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| map_err("region wraps the address space".into()))?;
        regions.push(region);
    }
    if let Some((start, len)) = layout::hotplug_region(size, hotplug) {
        let map_err = |reason: String| MemoryError::Map {
            size: len >> 20,
            addr: start,
            hint: " (the virtio-mem hotplug region)",
            reason,
        };
        let mapping =
            MmapRegionBuilder::new_with_bitmap(len as usize, DirtyBitmap::with_len(len as usize))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| map_err("region wraps the address space".into()))?;
        regions.push(region);
    }
    GuestRegionCollection::from_regions(regions).map_err(|e| MemoryError::Regions(e.to_string()))
}
