//! The agent's integration tests, one module per subject: a real vireod on a temporary
//! state and run directory, real `vireo` processes booting the PVH test guest, vireoctl,
//! and (cluster_hosts, replica_*) several hosts in network namespaces. One test binary
//! for all of them: the crate and its dependencies are linked once.

mod common;

mod api_doc;
mod authz;
mod bad_input;
mod cluster;
mod cluster_hosts;
mod cluster_save;
mod confinement;
mod console;
mod disk_full;
mod dynamic_memory;
mod hosts;
mod isolation;
mod jailed;
mod lifecycle;
mod metering;
mod migration;
mod operators;
mod replica;
mod replica_budget;
mod replica_failover;
mod replica_history;
mod replica_limits;
mod replica_vhdx;
mod saved_state;
mod supervision;
mod switches;
mod systemd;
mod systemd_pid1;
mod units;
