//! Vireo's failover cluster (see README.md and docs/cluster.md).

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod endpoints;
pub mod etcd;
pub mod hooked;
pub mod sim;
pub mod store;

pub use etcd::{EtcdSecurity, EtcdStore, EtcdTls};
pub use sim::SimStore;
pub use store::{ClusterStore, StoreError};
pub mod admin;
pub mod bulk;
pub mod drain;
pub mod failover;
pub mod history;
pub mod intake;
pub mod inventory;
pub mod keys;
pub mod membership;
pub mod placement;
pub mod saved;
pub mod update;
pub mod view;
