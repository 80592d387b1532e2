//! One VM on KVM: memory, vCPUs, boot, buses, devices and lifecycle.
//!
//! [`vmm::Vmm`] is the control loop; [`vm::Vm`] one VM built from an
//! [`api::VmConfig`]; [`kvm`] the only module that speaks ioctls for VM set-up.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod activator;
pub mod arch;
pub mod boot;
pub mod cgroup2;
pub mod coalesced;
pub mod confinement;
pub mod control;
pub mod device_manager;
pub mod events;
pub mod fencing;
pub mod file_broker;
pub mod guest_agent;
pub mod jail;
pub mod kvm;
pub mod landlock;
pub mod layout;
pub mod lease_slot;
pub mod live;
pub mod memory;
pub mod notify;
pub mod panic;
pub mod pidns;
pub mod replica;
pub mod seccomp;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
pub mod vcpu;
pub mod vm;
pub mod vmm;
pub mod watchdog;
