//! The VM description: one serde type for `--config vm.json`, the command-line flags
//! (parsed in Cloud Hypervisor's `key=value,key=value` style) and the REST API.
//!
//! The types live by topic (`vm`: the whole description and its payload; `cpus`,
//! `memory`, `balloon`, `disks`, `nets`, `user_devices`, `output`), each with its flag's parser;
//! `options` splits the `key=value` strings and reads their values, `validate` checks
//! what serde cannot. Everything public is re-exported here, as `api::config::...`.

mod balloon;
mod cpus;
mod disks;
mod flags;
mod memory;
mod nets;
mod options;
mod output;
mod user_devices;
mod validate;
mod vm;

pub use balloon::{parse_balloon, BalloonConfig};
pub use cpus::{parse_cpus, CpuTopology, CpusConfig, MAX_VCPUS};
pub use disks::{
    parse_disk, DiskConfig, DiskFormat, OnError, RateLimitConfig, TokenBucket, DEFAULT_POLL_US,
};
pub use flags::VmFlags;
pub use memory::{parse_memory, MemoryConfig, HOTPLUG_BLOCK_SIZE, MAX_MEMORY, MIN_MEMORY};
pub use nets::{parse_net, NetConfig};
pub use options::parse_size;
pub use output::{parse_output, parse_output_capped, OutputConfig, DEFAULT_OUTPUT_MAX_SIZE};
pub use user_devices::{parse_user_device, UserDeviceConfig};
pub use vm::{PayloadConfig, VmConfig};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{flag}: unknown option '{key}'")]
    UnknownKey { flag: &'static str, key: String },
    #[error("{flag}: '{item}' is not key=value")]
    NotKeyValue { flag: &'static str, item: String },
    #[error("{flag}: {key}={value}: {reason}")]
    BadValue {
        flag: &'static str,
        key: String,
        value: String,
        reason: String,
    },
    #[error("{flag}: missing required option '{key}'")]
    Missing {
        flag: &'static str,
        key: &'static str,
    },
    #[error("invalid VM config: {0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests;
