//! Host networking for Vireo: the tap devices virtio-net sits on, and MAC addresses.
//!
//! A [`Tap`] is a Linux TAP interface opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`:
//! every frame read from or written to it is preceded by a 12-byte virtio-net header
//! (`struct virtio_net_hdr_mrg_rxbuf`, virtio 1.0), so a virtio-net device can move
//! frames between the guest's buffers and the tap without rewriting them.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod mac;
mod tap;

pub use mac::{MacAddr, MacParseError};
pub use tap::{validate_tap_name, Tap, TapError, IFNAMSIZ, VNET_HDR_LEN};
