//! Dirty pages of guest RAM, per region: bit i of a region's bitmap = its page i.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use devices::virtio::GuestMemoryMmap;

pub const PAGE_SIZE: u64 = 4096;

/// Reads and clears both dirty records. KVM's log must be on (the control loop turns it
/// on before the sender starts).
pub struct DirtyLog {
    mem: Arc<GuestMemoryMmap>,
    vm: Arc<VmFd>,
}

/// One bitmap per region (same order as the guest memory's regions).
pub type Bitmaps = Vec<Vec<u64>>;

impl DirtyLog {
    pub fn new(mem: Arc<GuestMemoryMmap>, vm: Arc<VmFd>) -> Self {
        Self { mem, vm }
    }

    /// Pages written since the last call, by vCPUs or by devices.
    pub fn take(&self) -> Result<Bitmaps, String> {
        let mut out = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let mut kvm = self
                .vm
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|e| format!("KVM_GET_DIRTY_LOG (slot {slot}): {e}"))?;
            // The mapping's own bitmap (the region-level `bitmap()` is a slice view).
            let devices = std::ops::Deref::deref(region).bitmap().get_and_reset();
            for (k, d) in kvm.iter_mut().zip(devices) {
                *k |= d;
            }
            out.push(kvm);
        }
        Ok(out)
    }
}

/// Every page of every region (round 0).
pub fn all_pages(mem: &GuestMemoryMmap) -> Bitmaps {
    mem.iter()
        .map(|r| {
            let pages = r.len().div_ceil(PAGE_SIZE) as usize;
            let mut v = vec![u64::MAX; pages.div_ceil(64)];
            if !pages.is_multiple_of(64) {
                if let Some(last) = v.last_mut() {
                    *last = (1u64 << (pages % 64)) - 1;
                }
            }
            v
        })
        .collect()
}

pub fn count(b: &Bitmaps) -> u64 {
    b.iter()
        .flat_map(|r| r.iter())
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// `a |= b`.
pub fn merge(a: &mut Bitmaps, b: &Bitmaps) {
    for (ra, rb) in a.iter_mut().zip(b) {
        for (wa, wb) in ra.iter_mut().zip(rb) {
            *wa |= wb;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_helpers() {
        let mut a: Bitmaps = vec![vec![0b1010, 0], vec![1]];
        let b: Bitmaps = vec![vec![0b0101, 1 << 63], vec![0]];
        merge(&mut a, &b);
        assert_eq!(a, vec![vec![0b1111, 1 << 63], vec![1]]);
        assert_eq!(count(&a), 6);
    }
}
