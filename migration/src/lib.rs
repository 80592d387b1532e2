//! Moving a VM in time and space.
//!
//! - [`snapshot`]: a paused VM as a directory — its configuration, its device and vCPU
//!   state (versioned JSON, written by the VMM), and its memory as a sparse image.
//! - [`memory`]: guest memory to and from files, skipping zero pages.
//! - [`protocol`]: the live-migration wire protocol (framed messages, page runs).
//! - [`transport`]: migration URLs (unix, TCP) with timeouts and keepalives.
//! - [`pem`]: PEM certificates, keys, CA roots and CRLs, certificate names.
//! - [`tls`]: mutual TLS (rustls) on top of either, with an allow-list of sources and
//!   the CA's revocation list.
//! - [`allowlist`]: the client certificate verifier with a host allow-list (used by
//!   the migration listener and vireod's peer listener).
//! - [`auth`]: every stream proves it knows the migration's one-time secret.
//!
//! This crate knows the formats, not the VM: the VMM decides what the state contains.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod allowlist;
pub mod auth;
pub mod memory;
pub mod pem;
pub mod protocol;
pub mod snapshot;
pub mod tls;
pub mod transport;

pub use snapshot::{Snapshot, SnapshotError, SNAPSHOT_VERSION};
