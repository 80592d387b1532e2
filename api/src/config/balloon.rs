//! The virtio-balloon device and the `--balloon` flag.

use serde::{Deserialize, Serialize};

use super::options::{on_off, pairs, parse_size};
use super::ConfigError;

/// The balloon: how much memory the host asks back at start, and what the guest may do.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "balloon: an object such as {\"size\": \"256M\"}")]
pub struct BalloonConfig {
    /// Bytes the guest is asked to give back at start (`vm.resize` changes it).
    #[serde(default, deserialize_with = "crate::json::size::de")]
    pub size: u64,
    /// The guest may take pages back from the balloon when it runs out of memory.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// The guest reports free pages, which go back to the host.
    #[serde(default)]
    pub free_page_reporting: bool,
    /// Seconds between statistics requests (0: no statistics).
    #[serde(default = "default_stats_interval")]
    pub stats_interval_s: u32,
}

fn default_stats_interval() -> u32 {
    1
}

pub fn parse_balloon(s: &str) -> Result<BalloonConfig, ConfigError> {
    const F: &str = "--balloon";
    let mut b = BalloonConfig {
        size: 0,
        deflate_on_oom: false,
        free_page_reporting: false,
        stats_interval_s: default_stats_interval(),
    };
    for (k, v) in pairs(F, s)? {
        let bad = |reason: &str| ConfigError::BadValue {
            flag: F,
            key: k.clone(),
            value: v.clone(),
            reason: reason.into(),
        };
        match k.as_str() {
            "size" => b.size = parse_size(&v).ok_or_else(|| bad("expected a size such as 256M"))?,
            "deflate_on_oom" => b.deflate_on_oom = on_off(F, &k, &v)?,
            "free_page_reporting" => b.free_page_reporting = on_off(F, &k, &v)?,
            "stats_interval" => {
                b.stats_interval_s = v.parse().map_err(|_| bad("expected seconds (0: off)"))?
            }
            _ => return Err(ConfigError::UnknownKey { flag: F, key: k }),
        }
    }
    Ok(b)
}
