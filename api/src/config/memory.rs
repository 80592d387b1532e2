//! Guest RAM: its size, huge pages, overcommit and shared backing, and the
//! `--memory` flag.

use serde::{Deserialize, Serialize};

use super::options::{on_off, pairs, parse_size};
use super::ConfigError;

pub const MIN_MEMORY: u64 = 16 << 20;
/// The largest guest: 4 TiB (RAM above 4 GiB is one KVM memory slot, at most 8 TiB;
/// half of that keeps the guest's physical addresses well inside 40 bits).
pub const MAX_MEMORY: u64 = 4 << 40;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "memory: an object such as {\"size\": \"512M\"}")]
pub struct MemoryConfig {
    /// Bytes (JSON may say `"512M"`).
    #[serde(deserialize_with = "crate::json::size::de")]
    pub size: u64,
    #[serde(default)]
    pub hugepages: bool,
    /// The huge page size in bytes (2 MiB or 1 GiB) when `hugepages`; none: 2 MiB.
    #[serde(
        default,
        deserialize_with = "crate::json::size::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub hugepage_size: Option<u64>,
    /// May `size` exceed the host's RAM? Guest memory is only backed where the guest
    /// touches it, so a large guest that touches little fits on a small host; without
    /// this a VM larger than the host is refused at start (as Hyper-V refuses a VM whose
    /// memory the host cannot give).
    #[serde(default, skip_serializing_if = "is_off")]
    pub overcommit: bool,
    /// Back RAM by memfds mapped shared, so a vhost-user backend (`vireo-switch`) can
    /// map the guest's memory (Cloud Hypervisor's `shared=on`). Not with hugepages.
    #[serde(default, skip_serializing_if = "is_off")]
    pub shared: bool,
    /// Bytes of hotplug region after guest RAM, plugged and unplugged by the guest
    /// through a virtio-mem device in blocks of [`HOTPLUG_BLOCK_SIZE`] (Cloud
    /// Hypervisor's `hotplug_size`); `vm.resize`'s `desired_ram` asks for some of it.
    #[serde(
        default,
        deserialize_with = "crate::json::size::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub hotplug_size: Option<u64>,
}

/// virtio-mem's block: the unit the guest plugs and unplugs.
pub const HOTPLUG_BLOCK_SIZE: u64 = 2 << 20;

impl MemoryConfig {
    /// The huge page size in bytes when huge pages are on.
    pub fn huge_page(&self) -> Option<u64> {
        self.hugepages
            .then(|| self.hugepage_size.unwrap_or(2 << 20))
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: 512 << 20,
            hugepages: false,
            hugepage_size: None,
            overcommit: false,
            shared: false,
            hotplug_size: None,
        }
    }
}

fn is_off(b: &bool) -> bool {
    !*b
}

/// `--memory`: `size=SIZE[,hugepages=on,...]`, or just `SIZE` (= `size=SIZE`).
pub fn parse_memory(s: &str) -> Result<MemoryConfig, ConfigError> {
    const F: &str = "--memory";
    let mut m = MemoryConfig::default();
    let long;
    let s = if !s.contains('=') && parse_size(s).is_some() {
        long = format!("size={s}");
        long.as_str()
    } else {
        s
    };
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
            "hugepage_size" => {
                m.hugepage_size = Some(parse_size(&v).ok_or_else(|| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason: "expected 2M or 1G".into(),
                })?)
            }
            "overcommit" => m.overcommit = on_off(F, &k, &v)?,
            "shared" => m.shared = on_off(F, &k, &v)?,
            "hotplug_size" => {
                m.hotplug_size = Some(parse_size(&v).ok_or_else(|| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason: "expected a size such as 1G".into(),
                })?)
            }
            _ => return Err(ConfigError::UnknownKey { flag: F, key: k }),
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_size_is_the_size() {
        assert_eq!(parse_memory("2G").unwrap().size, 2 << 30);
        assert_eq!(
            parse_memory("2G").unwrap(),
            parse_memory("size=2G").unwrap()
        );
        assert!(parse_memory("lots").is_err());
    }

    #[test]
    fn hotplug_size_is_a_size() {
        assert_eq!(
            parse_memory("size=1G,hotplug_size=2G")
                .unwrap()
                .hotplug_size,
            Some(2 << 30)
        );
        assert_eq!(parse_memory("1G").unwrap().hotplug_size, None);
        assert!(parse_memory("size=1G,hotplug_size=x").is_err());
    }
}
