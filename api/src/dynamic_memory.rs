//! Dynamic Memory (Hyper-V's) of a vireod VM: its startup, minimum and maximum memory,
//! buffer and weight, how vireod maps them onto the VMM's memory devices, and what
//! `GET /api/v1/vms/{name}` says of a running VM's memory.
//!
//! The mapping (one VMM, no new device): boot RAM (`memory.size`) is `startup`; the
//! virtio-mem hotplug region (`memory.hotplug_size`) is `maximum - startup`, plugged to
//! grow above `startup`; the balloon (`balloon`, with statistics every second) gives
//! memory back below `startup`, down to `minimum`. A VM's assigned memory is
//! `startup + plugged - ballooned`.

use serde::{Deserialize, Serialize};

use crate::config::{BalloonConfig, HOTPLUG_BLOCK_SIZE, MIN_MEMORY};
use crate::host::ModelError;
use crate::VmConfig;

/// The buffer's default: 20 % above what the guest uses (Hyper-V's).
pub const DEFAULT_BUFFER_PCT: u32 = 20;
/// The buffer's range in percent (Hyper-V's).
pub const BUFFER_PCTS: std::ops::RangeInclusive<u32> = 5..=2000;
/// The memory weight's default (Hyper-V's "memory weight", the middle of its range).
pub const DEFAULT_MEMORY_WEIGHT: u32 = 5000;
/// The memory weight's range.
pub const MEMORY_WEIGHTS: std::ops::RangeInclusive<u32> = 0..=10_000;

fn default_buffer() -> u32 {
    DEFAULT_BUFFER_PCT
}

fn default_weight() -> u32 {
    DEFAULT_MEMORY_WEIGHT
}

/// A VM's Dynamic Memory settings (`dynamic_memory` of its definition). Sizes in bytes
/// (JSON may say `"2G"`), each a multiple of the 2 MiB virtio-mem block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicMemory {
    /// Memory at boot (the VMM's `memory.size`); default: the config's `memory.size`.
    #[serde(
        default,
        deserialize_with = "crate::json::size::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub startup: Option<u64>,
    /// The balancer never takes the VM below this.
    #[serde(deserialize_with = "crate::json::size::de")]
    pub minimum: u64,
    /// The balancer never gives the VM more than this.
    #[serde(deserialize_with = "crate::json::size::de")]
    pub maximum: u64,
    /// Percent above what the guest uses that it should have (5..=2000, default 20).
    #[serde(default = "default_buffer")]
    pub buffer: u32,
    /// Who keeps memory when the host is short (0..=10000, default 5000): the higher,
    /// the more.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn mib(b: u64) -> u64 {
    b >> 20
}

fn bad(msg: String) -> ModelError {
    ModelError::BadDefinition(format!("dynamic_memory: {msg}"))
}

impl DynamicMemory {
    /// The boot memory of a VM whose config says `config_size`.
    pub fn startup_or(&self, config_size: u64) -> u64 {
        self.startup.unwrap_or(config_size)
    }

    /// Checks the settings alone, with `startup` as the boot memory: one line each.
    pub fn check(&self, startup: u64) -> Result<(), ModelError> {
        for (what, v) in [
            ("startup", startup),
            ("minimum", self.minimum),
            ("maximum", self.maximum),
        ] {
            if !v.is_multiple_of(HOTPLUG_BLOCK_SIZE) {
                return Err(bad(format!(
                    "{what} ({v} bytes) must be a multiple of the {} MiB block",
                    mib(HOTPLUG_BLOCK_SIZE)
                )));
            }
        }
        if self.minimum < MIN_MEMORY {
            return Err(bad(format!(
                "minimum ({} MiB) must be at least {} MiB",
                mib(self.minimum),
                mib(MIN_MEMORY)
            )));
        }
        if !(self.minimum <= startup && startup <= self.maximum) {
            return Err(bad(format!(
                "needs minimum <= startup <= maximum, got {} MiB, {} MiB, {} MiB",
                mib(self.minimum),
                mib(startup),
                mib(self.maximum)
            )));
        }
        if !BUFFER_PCTS.contains(&self.buffer) {
            return Err(bad(format!(
                "buffer {} % is outside {}..={}",
                self.buffer,
                BUFFER_PCTS.start(),
                BUFFER_PCTS.end()
            )));
        }
        if !MEMORY_WEIGHTS.contains(&self.weight) {
            return Err(bad(format!(
                "weight {} is outside {}..={}",
                self.weight,
                MEMORY_WEIGHTS.start(),
                MEMORY_WEIGHTS.end()
            )));
        }
        Ok(())
    }

    /// Derives the VMM's memory devices from these settings: `memory.size` =
    /// startup, `memory.hotplug_size` = maximum - startup (none when equal), a balloon
    /// (the config's own if it has one, empty at start, with statistics every second
    /// unless it sets another interval) and fills in `startup`.
    pub fn apply(&mut self, config: &mut VmConfig) -> Result<(), ModelError> {
        let startup = self.startup_or(config.memory.size);
        self.check(startup)?;
        if let Some(b) = &config.balloon {
            if b.stats_interval_s == 0 {
                return Err(bad(
                    "needs the balloon's statistics (balloon.stats_interval_s > 0)".into(),
                ));
            }
        }
        self.startup = Some(startup);
        config.memory.size = startup;
        config.memory.hotplug_size = (self.maximum > startup).then(|| self.maximum - startup);
        config.balloon = Some(match config.balloon {
            Some(b) => BalloonConfig { size: 0, ..b },
            // No deflate on OOM: with it Linux counts ballooned pages as used, and
            // the balancer would read them as demand.
            None => BalloonConfig {
                size: 0,
                deflate_on_oom: false,
                free_page_reporting: false,
                stats_interval_s: 1,
            },
        });
        Ok(())
    }

    /// Checks that `config` is what [`Self::apply`] derives (a stored or arriving
    /// definition).
    pub fn check_config(&self, config: &VmConfig) -> Result<(), ModelError> {
        let startup = self.startup_or(config.memory.size);
        self.check(startup)?;
        let hotplug = (self.maximum > startup).then(|| self.maximum - startup);
        if config.memory.size != startup || config.memory.hotplug_size != hotplug {
            return Err(bad(format!(
                "memory.size and memory.hotplug_size must be startup ({} MiB) and maximum - \
                 startup ({} MiB)",
                mib(startup),
                mib(self.maximum - startup)
            )));
        }
        match &config.balloon {
            Some(b) if b.stats_interval_s > 0 => Ok(()),
            _ => Err(bad(
                "needs a balloon with statistics (balloon.stats_interval_s > 0)".into(),
            )),
        }
    }
}

/// A running VM's memory in `GET /api/v1/vms/{name}` (`memory`): what the balancer saw
/// at its last round, or what the last resize asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStatus {
    /// What the guest has: boot memory + plugged - ballooned.
    pub assigned_bytes: u64,
    /// What the guest uses (its statistics: total - available); none before it sent any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    /// What it needs: used × (1 + buffer), within [minimum, maximum] (dynamic VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand_bytes: Option<u64>,
    /// What the host asked the guest to have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_bytes: Option<u64>,
    /// The VMM did not answer the balancer's last round (it was skipped).
    #[serde(default, skip_serializing_if = "is_false")]
    pub unresponsive: bool,
    pub at_ms: u64,
}

/// `PUT /api/v1/vms/{name}/memory`'s body: the memory the running VM should have now
/// (bytes, or text such as `"1G"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryResize {
    #[serde(deserialize_with = "crate::json::size::de")]
    pub memory: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dm(min: u64, max: u64) -> DynamicMemory {
        DynamicMemory {
            startup: None,
            minimum: min << 20,
            maximum: max << 20,
            buffer: DEFAULT_BUFFER_PCT,
            weight: DEFAULT_MEMORY_WEIGHT,
        }
    }

    fn config(size_mib: u64) -> VmConfig {
        let mut c: VmConfig = serde_json::from_str(r#"{"payload":{"kernel":"/k"}}"#).unwrap();
        c.memory.size = size_mib << 20;
        c
    }

    #[test]
    fn the_vmm_devices_are_derived() {
        let mut c = config(512);
        let mut d = dm(256, 2048);
        d.apply(&mut c).unwrap();
        assert_eq!(d.startup, Some(512 << 20));
        assert_eq!(c.memory.size, 512 << 20);
        assert_eq!(c.memory.hotplug_size, Some(1536 << 20));
        let b = c.balloon.unwrap();
        assert_eq!((b.size, b.stats_interval_s), (0, 1));
        d.check_config(&c).unwrap();
        c.validate().unwrap();
        // maximum == startup: no hotplug region, the balloon alone.
        let mut c = config(512);
        dm(256, 512).apply(&mut c).unwrap();
        assert_eq!(c.memory.hotplug_size, None);
        // An explicit startup replaces the config's size.
        let mut c = config(512);
        let mut d = dm(256, 2048);
        d.startup = Some(1024 << 20);
        d.apply(&mut c).unwrap();
        assert_eq!(c.memory.size, 1024 << 20);
        assert_eq!(c.memory.hotplug_size, Some(1024 << 20));
    }

    #[test]
    fn bad_settings_get_one_clear_line() {
        let cases = [
            (dm(1024, 2048), "minimum <= startup <= maximum"),
            (dm(256, 384), "minimum <= startup <= maximum"),
            (dm(8, 2048), "at least 16 MiB"),
            (
                DynamicMemory {
                    minimum: (256 << 20) + 4096,
                    ..dm(0, 2048)
                },
                "multiple of the 2 MiB block",
            ),
            (
                DynamicMemory {
                    buffer: 3,
                    ..dm(256, 2048)
                },
                "buffer 3 % is outside 5..=2000",
            ),
            (
                DynamicMemory {
                    weight: 10_001,
                    ..dm(256, 2048)
                },
                "weight 10001 is outside 0..=10000",
            ),
        ];
        for (mut d, want) in cases {
            let mut c = config(512);
            let before = c.clone();
            let e = d.apply(&mut c).unwrap_err().to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
            assert!(!e.contains('\n'), "{e}");
            assert_eq!(c, before, "a refused setting changes nothing");
        }
        let mut c = config(512);
        c.balloon = Some(BalloonConfig {
            size: 0,
            deflate_on_oom: false,
            free_page_reporting: false,
            stats_interval_s: 0,
        });
        let e = dm(256, 1024).apply(&mut c).unwrap_err().to_string();
        assert!(e.contains("statistics"), "{e}");
    }

    #[test]
    fn a_config_not_derived_from_the_settings_is_refused() {
        let mut c = config(512);
        let mut d = dm(256, 2048);
        d.apply(&mut c).unwrap();
        let mut other = c.clone();
        other.memory.hotplug_size = None;
        assert!(d.check_config(&other).is_err());
        let mut other = c.clone();
        other.balloon = None;
        assert!(d.check_config(&other).is_err());
    }

    #[test]
    fn sizes_read_as_text_and_defaults_apply() {
        let d: DynamicMemory =
            serde_json::from_str(r#"{"minimum":"256M","maximum":"2G"}"#).unwrap();
        assert_eq!((d.minimum, d.maximum), (256 << 20, 2 << 30));
        assert_eq!((d.buffer, d.weight), (20, 5000));
        assert!(serde_json::from_str::<DynamicMemory>(r#"{"minimum":"1G"}"#).is_err());
        assert!(
            serde_json::from_str::<DynamicMemory>(r#"{"minimum":1,"maximum":2,"x":1}"#).is_err()
        );
    }
}
