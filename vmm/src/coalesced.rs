//! KVM's coalesced MMIO ring: guest writes to registered zones are queued by the
//! kernel instead of exiting to user space; the VMM applies them, in order, before it
//! handles the next exit of any vCPU.
//!
//! Vireo coalesces one register per virtio-pci function: `queue_select` in the common
//! configuration. A write there only changes what later common-configuration
//! accesses address, and every such access is an exit, before which the ring is
//! drained, so delaying it changes nothing the guest can observe. It matters because
//! drivers that look up a queue's notify offset on every kick (virtio-drivers writes
//! `queue_select`, reads `queue_notify_off`, then notifies) pay two exits to user space
//! per request; with the write coalesced they pay one.
//!
//! The ring is one page per VM, mapped through any vCPU's descriptor; every vCPU
//! thread drains it, one at a time.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::Mutex;
use vireo_util::sync;

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};

pub struct CoalescedRing {
    page: NonNull<kvm_coalesced_mmio_ring>,
    page_size: usize,
    entries: u32,
    /// Held while draining: the ring has one consumer index for all vCPUs.
    drain: Mutex<()>,
}

// SAFETY: the page is shared memory that KVM and we access by the ring protocol
// (the kernel writes entries and `last`, we read entries and write `first`); every
// access from our side happens under `drain`.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Maps the VM's ring through a vCPU descriptor (KVM must have
    /// KVM_CAP_COALESCED_MMIO).
    pub fn map(vcpu: &impl AsRawFd) -> std::io::Result<Self> {
        // SAFETY: sysconf with a valid name has no preconditions.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => return Err(std::io::Error::last_os_error()),
        };
        let offset = libc::off_t::from(KVM_COALESCED_MMIO_PAGE_OFFSET) * page_size as libc::off_t;
        // SAFETY: a fresh shared mapping of one page of the vCPU descriptor at the
        // offset KVM documents for the coalesced MMIO ring; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let page = NonNull::new(addr.cast()).ok_or_else(std::io::Error::last_os_error)?;
        let entries = ((page_size - std::mem::size_of::<kvm_coalesced_mmio_ring>())
            / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;
        Ok(Self {
            page,
            page_size,
            entries,
            drain: Mutex::new(()),
        })
    }

    /// `first` and `last` as they are now.
    fn ends(&self) -> (u32, u32) {
        let ring = self.page.as_ptr();
        // SAFETY: `ring` points to the mapped page (it lives as long as `self`); `first`
        // and `last` are u32 fields at its start, read volatile because the kernel
        // writes `last` (and other vCPU threads `first`) concurrently.
        unsafe {
            (
                std::ptr::addr_of!((*ring).first).read_volatile(),
                std::ptr::addr_of!((*ring).last).read_volatile(),
            )
        }
    }

    /// Applies every queued write, oldest first, through `write(address, bytes)`.
    pub fn drain(&self, mut write: impl FnMut(u64, &[u8])) {
        // Almost every exit finds the ring empty: no lock then. An entry another vCPU
        // is applying still counts as queued (`first` moves only once it is applied),
        // so an empty ring means every write before this exit is in effect.
        let (first, last) = self.ends();
        if first == last {
            return;
        }
        let _one_at_a_time = sync::lock(&self.drain);
        let ring = self.page.as_ptr();
        loop {
            let (first, last) = self.ends();
            if first == last || first >= self.entries {
                return;
            }
            // The entry was written before the kernel advanced `last`.
            fence(Ordering::Acquire);
            // SAFETY: entry `first` < `entries` lies inside the page (the array follows
            // the header and `entries` is what fits in the page).
            let entry = unsafe {
                std::ptr::addr_of!((*ring).coalesced_mmio)
                    .cast::<kvm_coalesced_mmio>()
                    .add(first as usize)
                    .read_volatile()
            };
            let len = (entry.len as usize).min(entry.data.len());
            write(entry.phys_addr, &entry.data[..len]);
            // Done with the entry before the kernel may reuse its slot.
            fence(Ordering::Release);
            // SAFETY: as above; we are the ring's only consumer (under `drain`).
            unsafe {
                std::ptr::addr_of_mut!((*ring).first).write_volatile((first + 1) % self.entries)
            };
        }
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: unmapping the page `map` mapped; nothing uses it after drop.
        unsafe { libc::munmap(self.page.as_ptr().cast(), self.page_size) };
    }
}
