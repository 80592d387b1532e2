//! Device models for the Vireo VMM.
//!
//! - [`bus`]: port-I/O and MMIO dispatch of guest accesses to devices.
//! - [`legacy`]: 16550 serial, debug-exit port, i8042 reset, ACPI power management.
//! - [`pci`]: PCI configuration space, the root bus with ECAM, MSI-X.
//! - [`virtio`]: the virtio-pci transport and virtio devices (block, console, rng).
//! - [`rate_limiter`]: token buckets for per-device IOPS and bandwidth limits.
//! - [`output`]: size-capped guest output files (serial, console) with rotation.
//! - [`log_limit`]: rate-limited logging of guest-triggered warnings ([`guest_warn!`]).
//! - [`block`]: disk backends (raw, VHDX) behind one [`block::BlockBackend`] trait.
//!
//! Devices know nothing of KVM: interrupts leave through the [`interrupt`] traits,
//! which the VMM implements.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod block;
pub mod bus;
pub mod interrupt;
pub mod legacy;
pub mod log_limit;
pub mod output;
pub mod pci;
pub mod rate_limiter;
pub mod threads;
pub mod vfio_user;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
