//! The pure parts of virtio-net: descriptor chains as lists of guest segments, the
//! virtio-net header, how a received frame spreads over merged buffers.

use virtio_bindings::virtio_net;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::virtio::GuestMemoryMmap;

/// `struct virtio_net_hdr_mrg_rxbuf` (VERSION_1: `num_buffers` is always there).
pub(super) const VNET_HDR_LEN: usize = net::VNET_HDR_LEN;
/// The largest Ethernet frame without offloads: a 64 KiB MTU, the Ethernet header and
/// a VLAN tag (Firecracker's and QEMU's bound).
pub(super) const MAX_FRAME_LEN: usize = 65_550;
/// `num_buffers` sits at the end of the header.
const NUM_BUFFERS_OFFSET: usize = 10;
const HDR_F_NEEDS_CSUM: u8 = virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
const GSO_NONE: u8 = virtio_net::VIRTIO_NET_HDR_GSO_NONE as u8;

/// Why a chain is not a usable buffer (the driver's bug: reported, returned empty).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum ChainError {
    #[error("receive buffer has a device-readable descriptor")]
    ReadableRx,
    #[error("transmit buffer has a device-writable descriptor")]
    WritableTx,
    #[error("buffer of {0} bytes is shorter than the 12-byte virtio-net header")]
    TooShort(u64),
    #[error("transmit frame of {0} bytes or more exceeds {MAX_FRAME_LEN}")]
    TooLong(u64),
    #[error("buffer has more than {MAX_SEGMENTS} segments")]
    TooManySegments,
}

/// The most segments a buffer may have: what one readv/writev takes (UIO_MAXIOV).
/// Linux drivers use at most MAX_SKB_FRAGS + 2 (19) for a frame.
pub(super) const MAX_SEGMENTS: usize = 1024;

/// A buffer of the guest: its head (for the used ring) and its segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Chain {
    pub head: u16,
    pub segments: Vec<(GuestAddress, u32)>,
    /// Sum of the segment lengths.
    pub len: u64,
}

impl Chain {
    /// The chain's segments, checked as they are walked: the direction of each, their
    /// count, and (`max_len`) their total length, so a hostile chain is refused at the
    /// first descriptor that breaks a bound rather than after all of them.
    fn parse(
        chain: DescriptorChain<&GuestMemoryMmap>,
        want_writable: bool,
        max_len: Option<u64>,
    ) -> Result<Self, (u16, ChainError)> {
        let head = chain.head_index();
        let mut segments = Vec::new();
        let mut len = 0u64;
        for d in chain {
            if d.is_write_only() != want_writable {
                let e = if want_writable {
                    ChainError::ReadableRx
                } else {
                    ChainError::WritableTx
                };
                return Err((head, e));
            }
            if d.len() == 0 {
                continue;
            }
            if segments.len() == MAX_SEGMENTS {
                return Err((head, ChainError::TooManySegments));
            }
            segments.push((d.addr(), d.len()));
            // At most MAX_SEGMENTS u32 lengths: no overflow.
            len += u64::from(d.len());
            if max_len.is_some_and(|max| len > max) {
                return Err((head, ChainError::TooLong(len - VNET_HDR_LEN as u64)));
            }
        }
        if len < VNET_HDR_LEN as u64 {
            return Err((head, ChainError::TooShort(len)));
        }
        Ok(Self {
            head,
            segments,
            len,
        })
    }

    /// A receive buffer: device-writable segments, room for at least the header.
    pub fn rx(chain: DescriptorChain<&GuestMemoryMmap>) -> Result<Self, (u16, ChainError)> {
        Self::parse(chain, true, None)
    }

    /// A frame to send: device-readable segments, the header then the frame.
    pub fn tx(chain: DescriptorChain<&GuestMemoryMmap>) -> Result<Self, (u16, ChainError)> {
        Self::parse(chain, false, Some((VNET_HDR_LEN + MAX_FRAME_LEN) as u64))
    }

    /// The guest ranges from byte `skip` on (what `guest_io` turns into iovecs).
    pub fn ranges(&self, skip: u64) -> Vec<(GuestAddress, u32)> {
        let mut skip = skip;
        let mut out = Vec::with_capacity(self.segments.len());
        for &(addr, len) in &self.segments {
            if skip >= u64::from(len) {
                skip -= u64::from(len);
                continue;
            }
            // Saturating: a range past the end of the address space is not guest
            // memory, and resolving it fails.
            out.push((GuestAddress(addr.0.saturating_add(skip)), len - skip as u32));
            skip = 0;
        }
        out
    }

    /// The segments from byte `skip` on, clipped to their guest-memory mappings
    /// (host pointer, length): what readv/writev use. A segment outside guest memory
    /// is an error. With `dirty`, the pages are marked in the dirty bitmap (call it
    /// after the device wrote them, so a migration round cannot miss the write).
    pub fn host_slices(
        &self,
        mem: &GuestMemoryMmap,
        skip: u64,
        dirty: bool,
        out: &mut Vec<(*mut u8, usize)>,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut skip = skip;
        for &(addr, len) in &self.segments {
            let len = u64::from(len);
            if skip >= len {
                skip -= len;
                continue;
            }
            // A segment near the top of the address space must not wrap
            // around to low guest memory.
            let start = addr
                .checked_add(skip)
                .ok_or(vm_memory::GuestMemoryError::InvalidGuestAddress(addr))?;
            let n = (len - skip) as usize;
            skip = 0;
            for slice in mem.get_slices(start, n) {
                let slice = slice?;
                if dirty {
                    slice.bitmap().mark_dirty(0, slice.len());
                }
                out.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
            }
        }
        Ok(())
    }

    /// Writes `bytes` at byte `offset` of the chain (the header may span segments).
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        bytes: &[u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut pos = 0u64; // chain offset of the current segment
        let mut done = 0usize;
        for &(addr, len) in &self.segments {
            let len = u64::from(len);
            let want = offset + done as u64;
            if done == bytes.len() {
                break;
            }
            if want < pos + len {
                let in_seg = want - pos;
                let n = ((len - in_seg) as usize).min(bytes.len() - done);
                let at = addr
                    .checked_add(in_seg)
                    .ok_or(vm_memory::GuestMemoryError::InvalidGuestAddress(addr))?;
                mem.write_slice(&bytes[done..done + n], at)?;
                done += n;
            }
            pos += len;
        }
        if done < bytes.len() {
            return Err(vm_memory::GuestMemoryError::PartialBuffer {
                expected: bytes.len(),
                completed: done,
            });
        }
        Ok(())
    }
}

/// The header the guest gets before a received frame: no checksum or GSO
/// information (none negotiated), `num_buffers` merged buffers.
pub(super) fn rx_header(num_buffers: u16) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[NUM_BUFFERS_OFFSET..].copy_from_slice(&num_buffers.to_le_bytes());
    h
}

/// Whether a header the tap wrote describes a frame we can hand to a guest that
/// negotiated no offloads (no partial checksum, no GSO). The tap was told so
/// (TUNSETOFFLOAD 0); this guards against a tap configured behind our back.
pub(super) fn plain_frame(tap_header: &[u8; VNET_HDR_LEN]) -> bool {
    tap_header[0] & HDR_F_NEEDS_CSUM == 0 && tap_header[1] == GSO_NONE
}

/// How `n` bytes (header + frame) spread over buffers of the given capacities, in
/// order: the bytes each buffer gets. None when they do not fit.
pub(super) fn spread(capacities: impl IntoIterator<Item = u64>, n: u64) -> Option<Vec<u32>> {
    let mut left = n;
    let mut out = Vec::new();
    for c in capacities {
        if left == 0 {
            break;
        }
        let take = c.min(left);
        out.push(take as u32);
        left -= take;
    }
    (left == 0 && !out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::GuestMemoryBackend;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// Puts one chain of (addr, len, flags) on a mock queue and pops it.
    fn with_chain<T>(
        descs: &[(u64, u32, u16)],
        f: impl FnOnce(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> T,
    ) -> T {
        let m = mem();
        let size = descs.len().next_power_of_two().max(16) as u16;
        let vq = MockSplitQueue::new(&m, size);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, fl))| {
                let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(a, l, fl | next, i as u16 + 1))
            })
            .collect();
        vq.add_desc_chains(&raw, 0).unwrap();
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&m).unwrap();
        f(&m, chain)
    }

    /// Found by the virtio_net fuzz target (fuzz/artifacts, 2026-12-05): a
    /// segment at the top of the address space made `addr + skip` overflow
    /// (a panic with debug assertions, a wrap to low guest memory without).
    #[test]
    fn segments_at_the_top_of_the_address_space_are_refused_not_wrapped() {
        let top = u64::MAX - 0xfff;
        with_chain(&[(top, 0x2000, 0)], |m, ch| {
            let c = Chain::tx(ch).unwrap();
            let mut out = Vec::new();
            assert!(c.host_slices(m, 0x1000, false, &mut out).is_err());
            assert!(out.is_empty(), "nothing below the segment was mapped");
        });
        with_chain(&[(top, 0x2000, F_WRITE)], |m, ch| {
            let c = Chain::rx(ch).unwrap();
            let mut before = [0u8; 16];
            m.read_slice(&mut before, GuestAddress(0)).unwrap();
            assert!(c.write_at(m, 0x1000, &[1u8; 16]).is_err());
            let mut after = [0u8; 16];
            m.read_slice(&mut after, GuestAddress(0)).unwrap();
            assert_eq!(before, after, "the write did not wrap to address 0");
        });
    }

    #[test]
    fn receive_chains_are_writable_segments() {
        let c = with_chain(&[(0x1000, 8, F_WRITE), (0x3000, 1600, F_WRITE)], |_, ch| {
            Chain::rx(ch).unwrap()
        });
        assert_eq!(
            c.segments,
            vec![(GuestAddress(0x1000), 8), (GuestAddress(0x3000), 1600)]
        );
        assert_eq!(c.len, 1608);
        let e = with_chain(&[(0x1000, 100, 0)], |_, ch| Chain::rx(ch).unwrap_err());
        assert_eq!(e.1, ChainError::ReadableRx);
        let e = with_chain(&[(0x1000, 11, F_WRITE)], |_, ch| Chain::rx(ch).unwrap_err());
        assert_eq!(e.1, ChainError::TooShort(11));
    }

    #[test]
    fn transmit_chains_are_readable_and_bounded() {
        let c = with_chain(&[(0x1000, 12, 0), (0x2000, 60, 0)], |_, ch| {
            Chain::tx(ch).unwrap()
        });
        assert_eq!(c.len, 72);
        let e = with_chain(&[(0x1000, 12, 0), (0x2000, 60, F_WRITE)], |_, ch| {
            Chain::tx(ch).unwrap_err()
        });
        assert_eq!(e.1, ChainError::WritableTx);
        let e = with_chain(&[(0x1000, 12, 0), (0x2_0000, 70_000, 0)], |_, ch| {
            Chain::tx(ch).unwrap_err()
        });
        assert_eq!(e.1, ChainError::TooLong(70_000));
    }

    /// Found in the issue-12 audit: the whole chain was collected before its length
    /// was checked. Now the first descriptor past the bound ends the walk (the
    /// device-writable one after it is never looked at).
    #[test]
    fn an_oversized_transmit_chain_is_refused_where_it_crosses_the_bound() {
        let e = with_chain(
            &[
                (0x1000, 12, 0),
                (0x2_0000, 70_000, 0),
                (0x3000, 10, F_WRITE),
            ],
            |_, ch| Chain::tx(ch).unwrap_err(),
        );
        assert_eq!(e.1, ChainError::TooLong(70_000));
    }

    /// Found in the issue-12 audit: a chain could hold as many segments as the queue
    /// has descriptors (up to 65,535 kept in memory, more iovecs than one readv takes).
    #[test]
    fn chains_of_more_than_max_segments_are_refused() {
        let many = |n: usize, flags: u16| -> Vec<(u64, u32, u16)> {
            (0..n)
                .map(|i| (0x8_0000 + 16 * i as u64, 16, flags))
                .collect()
        };
        let c = with_chain(&many(MAX_SEGMENTS, F_WRITE), |_, ch| Chain::rx(ch).unwrap());
        assert_eq!(c.segments.len(), MAX_SEGMENTS);
        let e = with_chain(&many(MAX_SEGMENTS + 1, F_WRITE), |_, ch| {
            Chain::rx(ch).unwrap_err()
        });
        assert_eq!(e.1, ChainError::TooManySegments);
        let e = with_chain(&many(MAX_SEGMENTS + 1, 0), |_, ch| {
            Chain::tx(ch).unwrap_err()
        });
        assert_eq!(e.1, ChainError::TooManySegments);
    }

    #[test]
    fn host_slices_skip_the_header_and_mark_written_pages_dirty() {
        with_chain(
            &[(0x1000, 8, F_WRITE), (0x5000, 0x2000, F_WRITE)],
            |m, ch| {
                let c = Chain::rx(ch).unwrap();
                let mut out = Vec::new();
                c.host_slices(m, 12, true, &mut out).unwrap();
                let total: usize = out.iter().map(|s| s.1).sum();
                assert_eq!(total, 0x2000 - 4, "the first 12 bytes are skipped");
                let region = m.iter().next().unwrap();
                let base = region.as_ptr();
                // SAFETY: (test) pointer arithmetic within the one region.
                let expected = unsafe { base.add(0x5004) };
                assert_eq!(out[0].0, expected);
                assert!(region.bitmap().dirty_at(0x5000) && region.bitmap().dirty_at(0x6000));
                assert!(
                    !region.bitmap().dirty_at(0x1000),
                    "skipped segment stays clean"
                );
                let mut none = Vec::new();
                c.host_slices(m, 0, false, &mut none).unwrap();
                assert_eq!(none.len(), 2);
            },
        );
    }

    #[test]
    fn header_writes_span_segments() {
        with_chain(&[(0x1000, 5, F_WRITE), (0x2000, 100, F_WRITE)], |m, ch| {
            let c = Chain::rx(ch).unwrap();
            c.write_at(m, 0, &rx_header(3)).unwrap();
            let mut a = [0u8; 5];
            let mut b = [0u8; 7];
            m.read_slice(&mut a, GuestAddress(0x1000)).unwrap();
            m.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
            assert_eq!([&a[..], &b[..]].concat(), rx_header(3));
            assert_eq!(rx_header(3)[10..], [3, 0]);
            assert!(c.write_at(m, 100, &[0u8; 12]).is_err(), "beyond the chain");
        });
    }

    #[test]
    fn frames_spread_over_merged_buffers_in_order() {
        assert_eq!(spread([1526], 1000), Some(vec![1000]));
        assert_eq!(spread([1526, 1526, 1526], 3000), Some(vec![1526, 1474]));
        assert_eq!(spread([100, 100], 201), None);
        assert_eq!(spread([], 12), None);
        assert_eq!(spread([4096], 4096), Some(vec![4096]));
    }

    #[test]
    fn only_plain_frames_pass_without_offloads() {
        assert!(plain_frame(&[0; 12]));
        let mut h = [0u8; 12];
        h[0] = 2; // DATA_VALID only: fine, the guest gets a clean header anyway
        assert!(plain_frame(&h));
        h[0] = HDR_F_NEEDS_CSUM;
        assert!(!plain_frame(&h));
        let mut g = [0u8; 12];
        g[1] = 1; // GSO TCPv4
        assert!(!plain_frame(&g));
    }
}
