//! Vireo's failover cluster (see README.md and docs/cluster.md).

pub mod endpoints;
pub mod etcd;
pub mod sim;
pub mod store;

pub use etcd::EtcdStore;
pub use sim::SimStore;
pub use store::{ClusterStore, StoreError};
pub mod admin;
pub mod drain;
pub mod failover;
pub mod keys;
pub mod membership;
pub mod placement;
pub mod update;
