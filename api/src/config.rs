//! The VM description: one serde type for `--config vm.json`, the command-line flags
//! (parsed in Cloud Hypervisor's `key=value,key=value` style) and the REST API.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    pub kernel: PathBuf,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    pub boot: u8,
}

impl Default for CpusConfig {
    fn default() -> Self {
        Self { boot: 1 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes.
    pub size: u64,
    #[serde(default)]
    pub hugepages: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: 512 << 20,
            hugepages: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub direct: bool,
    /// Serial number the guest reads (default: the disk's id).
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default = "one")]
    pub num_queues: u16,
    /// Device id for the API (default: disk0, disk1, ...).
    #[serde(default)]
    pub id: Option<String>,
    /// IOPS and bandwidth limits (none by default).
    #[serde(default, skip_serializing_if = "RateLimitConfig::is_unlimited")]
    pub rate_limiter: RateLimitConfig,
    /// Microseconds a queue's worker keeps polling the ring after it ran dry
    /// (like QEMU's iothread `poll-max-ns`); 0 = sleep at once.
    #[serde(default = "default_poll_us")]
    pub poll_us: u32,
}

/// The default poll window of a disk queue's worker, in microseconds.
pub const DEFAULT_POLL_US: u32 = 50;

fn default_poll_us() -> u32 {
    DEFAULT_POLL_US
}

/// One token bucket: `size` tokens (bytes or operations), refilled from empty to full
/// in `refill_time` milliseconds (Cloud Hypervisor's and Firecracker's model).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    pub size: u64,
    pub refill_time: u64,
}

/// A device's I/O limits: bandwidth in bytes, ops in operations.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

impl RateLimitConfig {
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    fn validate(&self, what: &str) -> Result<(), ConfigError> {
        for (name, b) in [("bandwidth", self.bandwidth), ("ops", self.ops)] {
            if let Some(b) = b {
                if b.size == 0 || b.refill_time == 0 {
                    return Err(ConfigError::Invalid(format!(
                        "{what}: {name} rate limit needs size > 0 and refill_time > 0 (ms)"
                    )));
                }
            }
        }
        Ok(())
    }
}

fn one() -> u16 {
    1
}

/// Where a character device goes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase", tag = "mode", content = "file")]
pub enum OutputConfig {
    #[default]
    Off,
    Null,
    Tty,
    File(PathBuf),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub payload: PayloadConfig,
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default = "serial_default")]
    pub serial: OutputConfig,
    /// virtio-console: off (no device), null, tty (stdout, input from stdin) or file.
    #[serde(default)]
    pub console: OutputConfig,
    #[serde(default)]
    pub rng: bool,
}

fn serial_default() -> OutputConfig {
    OutputConfig::Tty
}

/// Largest vCPU count we configure (MADT uses 8-bit APIC IDs).
pub const MAX_VCPUS: u8 = 254;
pub const MIN_MEMORY: u64 = 16 << 20;

impl VmConfig {
    /// Checks what serde cannot: ranges and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus.boot == 0 || self.cpus.boot > MAX_VCPUS {
            return Err(ConfigError::Invalid(format!(
                "cpus.boot must be 1..={MAX_VCPUS}, got {}",
                self.cpus.boot
            )));
        }
        if self.memory.size < MIN_MEMORY {
            return Err(ConfigError::Invalid(format!(
                "memory.size must be at least 16M, got {} bytes",
                self.memory.size
            )));
        }
        if !self.memory.size.is_multiple_of(4096) {
            return Err(ConfigError::Invalid(
                "memory.size must be a multiple of 4 KiB".into(),
            ));
        }
        if self.serial == OutputConfig::Tty && self.console == OutputConfig::Tty {
            return Err(ConfigError::Invalid(
                "serial and console cannot both be tty (one of them owns the terminal)".into(),
            ));
        }
        for d in &self.disks {
            d.rate_limiter
                .validate(&format!("disk {}", d.path.display()))?;
            if d.num_queues == 0 || d.num_queues > 16 {
                return Err(ConfigError::Invalid(format!(
                    "disk {}: num_queues must be 1..=16",
                    d.path.display()
                )));
            }
        }
        Ok(())
    }
}

/// Parses `key=value,key=value` into pairs.
fn pairs(flag: &'static str, s: &str) -> Result<Vec<(String, String)>, ConfigError> {
    s.split(',')
        .filter(|i| !i.is_empty())
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| ConfigError::NotKeyValue {
                    flag,
                    item: item.to_string(),
                })
        })
        .collect()
}

fn on_off(flag: &'static str, key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(ConfigError::BadValue {
            flag,
            key: key.into(),
            value: v.into(),
            reason: "expected on or off".into(),
        }),
    }
}

/// Parses a size with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 10),
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'G' | 'g') => (&s[..i], 30),
        (i, 'T' | 't') => (&s[..i], 40),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

pub fn parse_cpus(s: &str) -> Result<CpusConfig, ConfigError> {
    const F: &str = "--cpus";
    let mut c = CpusConfig::default();
    for (k, v) in pairs(F, s)? {
        match k.as_str() {
            "boot" => {
                c.boot = v.parse().map_err(|_| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason: "expected a number of vCPUs".into(),
                })?
            }
            _ => return Err(ConfigError::UnknownKey { flag: F, key: k }),
        }
    }
    Ok(c)
}

pub fn parse_memory(s: &str) -> Result<MemoryConfig, ConfigError> {
    const F: &str = "--memory";
    let mut m = MemoryConfig::default();
    for (k, v) in pairs(F, s)? {
        match k.as_str() {
            "size" => {
                m.size = parse_size(&v).ok_or_else(|| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason: "expected a size such as 512M or 2G".into(),
                })?
            }
            "hugepages" => m.hugepages = on_off(F, &k, &v)?,
            _ => return Err(ConfigError::UnknownKey { flag: F, key: k }),
        }
    }
    Ok(m)
}

pub fn parse_disk(s: &str) -> Result<DiskConfig, ConfigError> {
    const F: &str = "--disk";
    let mut path = None;
    let mut d = DiskConfig {
        path: PathBuf::new(),
        readonly: false,
        direct: false,
        serial: None,
        num_queues: 1,
        id: None,
        rate_limiter: RateLimitConfig::default(),
        poll_us: DEFAULT_POLL_US,
    };
    let mut bw = (None, None);
    let mut ops = (None, None);
    for (k, v) in pairs(F, s)? {
        match k.as_str() {
            "path" => path = Some(PathBuf::from(v)),
            "readonly" => d.readonly = on_off(F, &k, &v)?,
            "direct" => d.direct = on_off(F, &k, &v)?,
            "serial" => d.serial = Some(v),
            "id" => d.id = Some(v),
            "num_queues" => d.num_queues = number(F, &k, &v)?,
            "poll_us" => d.poll_us = number(F, &k, &v)?,
            "bw_size" => bw.0 = Some(number(F, &k, &v)?),
            "bw_refill_time" => bw.1 = Some(number(F, &k, &v)?),
            "ops_size" => ops.0 = Some(number(F, &k, &v)?),
            "ops_refill_time" => ops.1 = Some(number(F, &k, &v)?),
            _ => return Err(ConfigError::UnknownKey { flag: F, key: k }),
        }
    }
    d.rate_limiter = RateLimitConfig {
        bandwidth: bucket(F, "bw", bw)?,
        ops: bucket(F, "ops", ops)?,
    };
    d.path = path.ok_or(ConfigError::Missing {
        flag: F,
        key: "path",
    })?;
    Ok(d)
}

fn number<T: std::str::FromStr>(flag: &'static str, key: &str, v: &str) -> Result<T, ConfigError> {
    v.parse().map_err(|_| ConfigError::BadValue {
        flag,
        key: key.into(),
        value: v.into(),
        reason: "expected a number".into(),
    })
}

/// `<p>_size` and `<p>_refill_time` (ms) come together or not at all.
fn bucket(
    flag: &'static str,
    prefix: &str,
    (size, refill): (Option<u64>, Option<u64>),
) -> Result<Option<TokenBucket>, ConfigError> {
    match (size, refill) {
        (None, None) => Ok(None),
        (Some(size), Some(refill_time)) => Ok(Some(TokenBucket { size, refill_time })),
        _ => Err(ConfigError::Invalid(format!(
            "{flag}: {prefix}_size and {prefix}_refill_time (ms) must be given together"
        ))),
    }
}

pub fn parse_output(flag: &'static str, s: &str) -> Result<OutputConfig, ConfigError> {
    match s {
        "off" => Ok(OutputConfig::Off),
        "null" => Ok(OutputConfig::Null),
        "tty" => Ok(OutputConfig::Tty),
        _ => match s.split_once('=') {
            Some(("file", p)) if !p.is_empty() => Ok(OutputConfig::File(PathBuf::from(p))),
            _ => Err(ConfigError::BadValue {
                flag,
                key: "mode".into(),
                value: s.into(),
                reason: "expected off, null, tty or file=PATH".into(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags_in_cloud_hypervisor_style() {
        assert_eq!(parse_cpus("boot=4").unwrap().boot, 4);
        assert_eq!(parse_memory("size=512M").unwrap().size, 512 << 20);
        assert_eq!(parse_memory("size=2G,hugepages=on").unwrap().size, 2 << 30);
        let d = parse_disk("path=/a.vhdx,readonly=on,serial=abc").unwrap();
        assert_eq!(d.path, PathBuf::from("/a.vhdx"));
        assert!(d.readonly && !d.direct);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert_eq!(
            parse_output("--serial", "file=/tmp/x").unwrap(),
            OutputConfig::File("/tmp/x".into())
        );
    }

    #[test]
    fn rejects_bad_flags_with_a_clear_reason() {
        assert!(matches!(
            parse_disk("readonly=on"),
            Err(ConfigError::Missing { key: "path", .. })
        ));
        assert!(matches!(
            parse_disk("path=/a,colour=red"),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(matches!(
            parse_disk("path=/a,readonly=maybe"),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            parse_memory("size=lots"),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            parse_cpus("boot"),
            Err(ConfigError::NotKeyValue { .. })
        ));
        assert!(parse_output("--serial", "file=").is_err());
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("99999999999999T"), None);
    }

    #[test]
    fn disk_rate_limits_parse_in_pairs_and_validate() {
        let d = parse_disk(
            "path=/a,ops_size=100,ops_refill_time=1000,bw_size=1048576,bw_refill_time=100",
        )
        .unwrap();
        assert_eq!(
            d.rate_limiter.ops,
            Some(TokenBucket {
                size: 100,
                refill_time: 1000
            })
        );
        assert_eq!(d.rate_limiter.bandwidth.map(|b| b.size), Some(1 << 20));
        assert!(matches!(
            parse_disk("path=/a,ops_size=100"),
            Err(ConfigError::Invalid(m)) if m.contains("ops_refill_time")
        ));
        assert!(matches!(
            parse_disk("path=/a,bw_size=fast,bw_refill_time=1"),
            Err(ConfigError::BadValue { .. })
        ));
        let json = r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/d",
                      "rate_limiter":{"ops":{"size":0,"refill_time":10}}}]}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        assert!(
            matches!(c.validate(), Err(ConfigError::Invalid(m)) if m.contains("ops rate limit"))
        );
        // An unlimited disk serializes without the field (older readers accept it).
        let plain = serde_json::to_value(parse_disk("path=/a").unwrap()).unwrap();
        assert!(plain.get("rate_limiter").is_none());
    }

    #[test]
    fn json_config_round_trips_and_validates() {
        let json = r#"{"payload":{"kernel":"/k"},"cpus":{"boot":2},"memory":{"size":268435456},
                      "disks":[{"path":"/d.vhdx"}],"serial":{"mode":"file","file":"/s"}}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        c.validate().unwrap();
        assert_eq!(c.disks[0].num_queues, 1);
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let mut bad = c.clone();
        bad.cpus.boot = 0;
        assert!(bad.validate().is_err());
        assert!(
            serde_json::from_str::<VmConfig>(r#"{"payload":{"kernel":"/k"},"cpu":{}}"#).is_err()
        );
    }
}
