//! Vireo's host agent: `vireod` owns a host's VMs (their definitions, their `vireo`
//! processes, their sockets, their metering) and serves a REST API on a unix socket;
//! `vireoctl` is its command-line client.
//!
//! One job per module:
//! - [`model`]: what a VM definition and a VM's status are (the API's types);
//! - [`inventory`]: definitions, exit records and metering in SQLite;
//! - [`launcher`]: starting (directly or as a systemd unit), adopting, signalling and
//!   watching one `vireo` process;
//! - [`cgroup`]: placement of the VMMs in cgroups (v1 cpu.shares; v2 cpu.weight,
//!   memory.max, pids.max);
//! - [`migrations`]: the migration records and the host's migration queue;
//! - [`migration_ports`]: the port range receiving VMMs listen on (`--migration-ports`);
//! - [`supervisor`]: the VMs' lifecycle, restart policy, auto start, host shutdown;
//! - [`balancer`]: Dynamic Memory: each round, every Dynamic Memory VM's memory
//!   follows its guest's use within the host's budget (virtio-mem, balloon);
//! - [`metering`]: sampling CPU, memory and disk I/O of every running VM;
//! - [`server`]: the REST API (axum on a unix socket), SSE events, Prometheus text;
//! - [`authz`]: who may call which route (roles from the caller's SO_PEERCRED);
//! - [`audit`]: the audit trail of every change asked for, allowed or refused;
//! - [`peer_server`]: the HTTPS peer listener for other hosts' vireods (mutual TLS,
//!   host-to-host routes only);
//! - [`replica_primary`]: a primary's rounds: cut, ship sealed segments, commit points;
//! - [`replication`]: the replication loop of each VM (cut, ship, retry with backoff)
//!   and its routes and events;
//! - [`replica_server`]: vireod as a replica server (`/peer/v1/replica/...` on the
//!   peer listener, `--replica-allow`, `--replica-dir`);
//! - [`hosttls`]: this host's identity and which peers it admits;
//! - [`pki`]: the host CA and host certificates (`vireoctl pki`);
//! - [`client`]: an HTTP/1.1 client over unix sockets (vireod → VMMs, vireoctl →
//!   vireod) and over mutual TLS (vireod → a peer's vireod);
//! - [`procfs`]: what the agent reads from /proc.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod audit;
pub mod authz;
pub mod balancer;
pub mod cgroup;
pub mod client;
pub mod cluster_bulk;
pub mod cluster_events;
pub mod cluster_lease;
pub mod cluster_moves;
pub mod cluster_node;
pub mod cluster_routes;
pub mod cluster_save;
pub mod cluster_shutdown;
pub mod cluster_update;
pub mod cluster_validate;
pub mod confinement;
pub mod error;
pub mod host_cpu;
pub mod hosttls;
pub mod inventory;
pub mod jailing;
pub mod launcher;
pub mod metering;
pub mod migration_ports;
pub mod migrations;
pub mod notify;
pub mod peer_scope;
pub mod peer_server;
pub mod pki;
pub mod procfs;
pub mod replica_catch_up;
pub mod replica_crash;
pub mod replica_failover;
pub mod replica_primary;
pub mod replica_reverse;
pub mod replica_server;
pub mod replica_upload;
pub mod replication;
pub mod server;
pub mod supervisor;
pub mod switches;
pub mod throttle;
pub mod tls_gateway;
pub mod vmm_events;
pub mod vmm_priority;

/// vireod's REST types, which live in `api` (`api::host`) so that they parse without the agent.
pub use api::host as model;
pub use error::AgentError;

/// The OpenAPI document of vireod's REST API.
pub const OPENAPI_YAML: &str = include_str!("../openapi/vireod.yaml");

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub use api::error_chain;
