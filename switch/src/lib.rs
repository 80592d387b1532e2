//! `vireo-switch`'s switching core: a library with no I/O. Frames go in with the port
//! they came from and the time; the frames to send come out. See docs/switch.md.
//!
//! - [`frame`]: defensive parsing (Ethernet, 802.1Q, ARP, IPv4, IPv6 with its
//!   extension chain, TCP/UDP/ICMP); anything inconsistent is dropped and counted.
//! - [`port`]: a port's VLAN mode (access, trunk with allowed VLANs and a native one,
//!   private VLAN roles), its addresses and guards, and the CLI form of a port.
//! - [`fdb`]: the MAC table, per VLAN, with aging on a clock passed in and a
//!   per-port limit.
//! - [`extension`]: the ordered capture → filter → forward chain and its trait.
//! - [`acl`] (with [`conntrack`] for stateful rules), [`guards`], [`storm`]: the
//!   built-in filter extensions; [`mirror`]: port mirroring (capture stage).
//! - [`qos`] (with [`bucket`]): maximum bandwidth (a policer extension), weights and
//!   minimums; [`scheduler`]: the egress scheduler of ports with a known rate
//!   (deficit round robin, minimums first, shaped), polled by the I/O layer through
//!   [`Switch::poll_egress`] and [`Switch::next_deadline`].
//! - [`team`]: NIC teaming of uplinks (active-backup, address hash): the member
//!   selection, the failover state machine and the announces; the I/O is the
//!   binary's.
//! - [`Switch`]: ports, classification, learning, flooding, egress tagging.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod acl;
pub mod bucket;
pub mod conntrack;
pub mod extension;
pub mod fdb;
pub mod frame;
pub mod guards;
#[cfg(test)]
mod meter_tests;
pub mod mirror;
pub mod pcap;
#[cfg(test)]
mod policy_tests;
pub mod port;
pub mod qos;
#[cfg(test)]
mod qos_tests;
pub mod scheduler;
pub mod storm;
mod switch;
pub mod team;
#[cfg(test)]
mod tests;

/// A port's number inside one switch (never reused while it runs).
pub type PortId = u32;

pub use switch::{
    Egress, PortCounters, PortStatus, QosStatus, Switch, SwitchConfig, SwitchError, TraceRecord,
};
