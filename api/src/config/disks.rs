//! Disks: the image, its declared format, locking, queues, I/O limits, error policy
//! and replication log, and the `--disk` flag.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::options::{number, on_off, pairs, parse_size};
use super::ConfigError;

/// A disk image's format. It is declared, never guessed from the content: a guest
/// that writes a VHDX header into its raw disk must not turn it into a VHDX.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[serde(expecting = "a disk format: \"raw\" or \"vhdx\"")]
pub enum DiskFormat {
    Raw,
    Vhdx,
}

impl DiskFormat {
    /// The format a file name declares: `.vhdx`, or `.raw`/`.img` (None otherwise).
    pub fn from_extension(path: &std::path::Path) -> Option<DiskFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "vhdx" => Some(DiskFormat::Vhdx),
            "raw" | "img" => Some(DiskFormat::Raw),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Vhdx => "vhdx",
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "vhdx" => Ok(DiskFormat::Vhdx),
            _ => Err(format!("format '{s}': expected raw or vhdx")),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a disk: an object with path, and optionally format, readonly, id, ...")]
pub struct DiskConfig {
    pub path: PathBuf,
    /// raw or vhdx. A configuration written before formats were declared has none:
    /// it then opens as raw unless the file name ends in `.vhdx` (never by content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub direct: bool,
    /// Take the image's OFD lock (default). `false` (`locking=off`) is only for
    /// file systems without OFD locks where nothing else can open the image:
    /// with locking on, such a file system refuses the disk.
    #[serde(default = "locking_on", skip_serializing_if = "is_on")]
    pub locking: bool,
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
    /// The disk's size in bytes, as the guest sees it. Optional; when given, the image
    /// must have it. An incoming shared-nothing migration needs it: the copy is made
    /// this size, and the source may not write beyond it.
    #[serde(
        default,
        deserialize_with = "crate::json::size::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub size: Option<u64>,
    /// What a host I/O error does (QEMU's werror/rerror). Unset: `stop` for ENOSPC and
    /// EDQUOT (the host can free space), `report` for the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<OnError>,
    /// A clustered VM's fencing token (its ownership revision in the cluster store):
    /// the disk is refused if `DISK.fence` beside it records a newer one, else the
    /// token is recorded there (vmm/src/fencing.rs, docs/cluster.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<u64>,
    /// Replication: the directory of this disk's change log (Vireo Replica). Every
    /// completed write is recorded there; `vm.replica-cut` seals it into segments.
    /// Created if missing (beneath a storage root when the VMM has them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_log: Option<PathBuf>,
}

/// A disk's policy for host I/O errors.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[serde(expecting = "on_error: \"report\" or \"stop\"")]
pub enum OnError {
    /// The guest sees VIRTIO_BLK_S_IOERR.
    Report,
    /// ENOSPC, EDQUOT and EIO pause the VM (the request is kept and runs again on
    /// resume); other errors are reported.
    Stop,
}

impl DiskConfig {
    /// The format to open the image in: as declared, else (an old configuration) raw
    /// unless the file name ends in `.vhdx`.
    pub fn effective_format(&self) -> DiskFormat {
        self.format
            .unwrap_or(match DiskFormat::from_extension(&self.path) {
                Some(DiskFormat::Vhdx) => DiskFormat::Vhdx,
                _ => DiskFormat::Raw,
            })
    }
}

fn locking_on() -> bool {
    true
}

fn is_on(b: &bool) -> bool {
    *b
}

/// The default poll window of a disk queue's worker, in microseconds: longer than one
/// notification exit on a nested (PVM) host (~100-130 µs), so that a worker that served
/// a kicked request is still polling when the guest, back from its exit, submits the
/// next one without a kick (measured: QD1 4K reads 7.3-7.8k IOPS at 50 µs, 318-332k at
/// 200 µs, docs/benchmarks.md). The window adapts down on idle queues (`poll.rs`).
pub const DEFAULT_POLL_US: u32 = 200;

fn default_poll_us() -> u32 {
    DEFAULT_POLL_US
}

/// One token bucket: `size` tokens (bytes or operations), refilled from empty to full
/// in `refill_time` milliseconds (Cloud Hypervisor's and Firecracker's model).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a token bucket: an object with size and refill_time_ms")]
pub struct TokenBucket {
    pub size: u64,
    pub refill_time: u64,
}

/// A device's I/O limits: bandwidth in bytes, ops in operations.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a rate limiter: an object with bandwidth and/or ops token buckets")]
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

    pub(super) fn validate(&self, what: &str) -> Result<(), ConfigError> {
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

pub fn parse_disk(s: &str) -> Result<DiskConfig, ConfigError> {
    const F: &str = "--disk";
    let mut path = None;
    let mut d = DiskConfig {
        path: PathBuf::new(),
        format: None,
        readonly: false,
        direct: false,
        locking: true,
        serial: None,
        num_queues: 1,
        id: None,
        rate_limiter: RateLimitConfig::default(),
        poll_us: DEFAULT_POLL_US,
        size: None,
        on_error: None,
        fencing_token: None,
        replica_log: None,
    };
    let mut bw = (None, None);
    let mut ops = (None, None);
    for (k, v) in pairs(F, s)? {
        match k.as_str() {
            "path" => path = Some(PathBuf::from(v)),
            "format" => {
                d.format = Some(v.parse().map_err(|reason| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason,
                })?)
            }
            "readonly" => d.readonly = on_off(F, &k, &v)?,
            "direct" => d.direct = on_off(F, &k, &v)?,
            "locking" => d.locking = on_off(F, &k, &v)?,
            "serial" => d.serial = Some(v),
            "id" => d.id = Some(v),
            "num_queues" => d.num_queues = number(F, &k, &v)?,
            "poll_us" => d.poll_us = number(F, &k, &v)?,
            "fencing_token" => d.fencing_token = Some(number(F, &k, &v)?),
            "size" => {
                d.size = Some(parse_size(&v).ok_or_else(|| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason: "expected a size such as 64M".into(),
                })?)
            }
            "on_error" => {
                d.on_error = Some(match v.as_str() {
                    "report" => OnError::Report,
                    "stop" => OnError::Stop,
                    _ => {
                        return Err(ConfigError::BadValue {
                            flag: F,
                            key: k.clone(),
                            value: v.clone(),
                            reason: "expected report or stop".into(),
                        })
                    }
                })
            }
            "replica_log" => d.replica_log = Some(PathBuf::from(v)),
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
    if d.readonly && d.replica_log.is_some() {
        return Err(ConfigError::BadValue {
            flag: F,
            key: "replica_log".into(),
            value: d
                .replica_log
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            reason: "a read-only disk has no writes to replicate".into(),
        });
    }
    Ok(d)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmConfig;

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
    fn disk_formats_are_declared_and_old_configs_follow_the_extension_rule() {
        let d = parse_disk("path=/a.img,format=vhdx").unwrap();
        assert_eq!(d.format, Some(DiskFormat::Vhdx));
        assert_eq!(d.effective_format(), DiskFormat::Vhdx);
        assert!(matches!(
            parse_disk("path=/a,format=qcow2"),
            Err(ConfigError::BadValue { reason, .. }) if reason.contains("expected raw or vhdx")
        ));
        // An old configuration (no format): raw unless the name ends in .vhdx.
        for (path, want) in [
            ("/d/x.vhdx", DiskFormat::Vhdx),
            ("/d/x.VHDX", DiskFormat::Vhdx),
            ("/d/x.img", DiskFormat::Raw),
            ("/d/x", DiskFormat::Raw),
        ] {
            let d = parse_disk(&format!("path={path}")).unwrap();
            assert_eq!((d.format, d.effective_format()), (None, want), "{path}");
        }
        let c: VmConfig = serde_json::from_str(
            r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/d","format":"raw"}]}"#,
        )
        .unwrap();
        assert_eq!(c.disks[0].format, Some(DiskFormat::Raw));
    }
}
