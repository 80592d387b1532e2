//! End-to-end tests of the `vireo` binary, one module per subject: the VMM driven as a
//! user drives it (its CLI and REST API), booting the PVH test guest (tests/guest/),
//! with QEMU as the reference where one is named. One test binary for all of them.

mod api;
mod bad_input;
mod balloon;
mod boot;
mod cgroup2;
mod confinement;
mod disk;
mod disk_full;
mod fencing;
mod guest_agent;
mod guest_output;
mod linux_boot;
mod mobility;
mod net;
mod numa;
mod qemu_reference;
mod replica;
mod storage_roots;
mod vcpus;
mod vfio_user;
mod virtio_mem;
