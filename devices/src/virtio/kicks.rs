//! Holding off a driver's notifications (kicks) while a device worker is busy with a
//! queue, under `VIRTIO_F_EVENT_IDX` (virtio 1.2 §2.7.10).
//!
//! With event indexes the device asks for a kick by writing `avail_event`, the available
//! index after which the driver must notify. `virtio-queue` leaves the last value in
//! place while notifications are "disabled", which a driver that compares as the spec
//! says (Linux's `vring_need_event`: notify only when the new index passes the event)
//! reads as "no kick"; a driver that compares `avail_idx >= avail_event + 1` (the
//! vendored virtio-drivers of our test guest) reads a stale event as "kick every
//! time", and each kick is a VM exit. A worker that is serving or polling the ring
//! needs no kick at all, so it moves the event a whole ring ahead of what it has
//! taken: no driver may reach it before the worker writes `avail_event` again — when it
//! takes more requests (a ring further), or when it goes to sleep and asks for kicks
//! again (`enable_notification`: `avail_event` = the next request it will take, then the
//! usual re-check of the ring).

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::GuestMemoryMmap;

/// Size of the used ring's header (flags, idx) and of one used element.
const USED_HEADER: u64 = 4;
const USED_ELEMENT: u64 = 8;

/// While the worker serves or polls `queue`: asks the driver not to kick it (a no-op
/// without event indexes, where `disable_notification` already set `NO_NOTIFY`).
pub(crate) fn hold_off(
    queue: &Queue,
    mem: &GuestMemoryMmap,
) -> Result<(), vm_memory::GuestMemoryError> {
    if !queue.event_idx_enabled() {
        return Ok(());
    }
    let ahead = queue.next_avail().wrapping_add(queue.size());
    let addr = queue
        .used_ring()
        .checked_add(USED_HEADER + USED_ELEMENT * u64::from(queue.size()))
        .ok_or(vm_memory::GuestMemoryError::InvalidGuestAddress(
            GuestAddress(queue.used_ring()),
        ))?;
    mem.store(ahead.to_le(), GuestAddress(addr), Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;

    /// Linux's `vring_need_event`: kick when the new index passes the event.
    fn linux_kicks(event: u16, new: u16, old: u16) -> bool {
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// virtio-drivers 0.13's `should_notify` (our test guest's driver).
    fn virtio_drivers_kicks(event: u16, new: u16) -> bool {
        new >= event.wrapping_add(1)
    }

    fn avail_event(
        mem: &GuestMemoryMmap,
        q: &MockSplitQueue<'_, GuestMemoryMmap>,
        size: u16,
    ) -> u16 {
        let addr = q.used_addr().0 + USED_HEADER + USED_ELEMENT * u64::from(size);
        mem.read_obj::<u16>(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn a_busy_worker_gets_no_kick_from_either_driver_and_a_sleeping_one_gets_the_next() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let size = 16;
        let mock = MockSplitQueue::new(&mem, size);
        let mut queue: Queue = mock.create_queue().unwrap();
        queue.set_event_idx(true);
        // The worker took 40 requests so far (and the driver had put them there).
        queue.set_next_avail(40);
        mock.avail().idx().store(40);
        hold_off(&queue, &mem).unwrap();
        assert_eq!(avail_event(&mem, &mock, size), 40 + size);
        // Every index the driver can reach while the worker holds 40 (a ring's worth).
        for new in 41..=40 + size {
            assert!(
                !linux_kicks(40 + size, new, new - 1),
                "linux kicks at {new}"
            );
            assert!(
                !virtio_drivers_kicks(40 + size, new),
                "virtio-drivers kicks at {new}"
            );
        }
        // Going to sleep: the event is the next request again, and both kick for it.
        assert!(!queue.enable_notification(&mem).unwrap());
        assert_eq!(avail_event(&mem, &mock, size), 40);
        assert!(linux_kicks(40, 41, 40));
        assert!(virtio_drivers_kicks(40, 41));
    }

    #[test]
    fn without_event_indexes_nothing_is_written() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let queue: Queue = mock.create_queue().unwrap();
        hold_off(&queue, &mem).unwrap();
        assert_eq!(avail_event(&mem, &mock, 16), 0);
    }
}
