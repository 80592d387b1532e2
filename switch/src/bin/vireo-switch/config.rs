//! The switch's configuration: command-line options and, optionally, a TOML or JSON
//! file (`.json` by extension) with the same content:
//!
//! ```toml
//! control = "/run/vireo-switch.sock"
//! aging_secs = 300
//! mtu = 1500
//! ports = ["name=vm1,iface=tap0,vlan=10,mac=52:54:00:00:00:01,guard=all,storm=1000,mirror=mon,max=100M,weight=3",
//!          "name=uplink,iface=eth1,trunk=10:20,rate=1G",
//!          "name=mon,iface=tap9,vlan=99"]
//! [[acls]]
//! port = "vm1"
//! rule = { action = "deny", direction = "outbound", protocol = "tcp", dst_port = 25 }
//! [[acls]]
//! port = "vm1"
//! rule = { action = "allow", direction = "outbound", protocol = "tcp", dst_port = 80, stateful = true, priority = 10 }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use switch::acl::AclRule;
use switch::port::{PortConfig, PortError};
use switch::SwitchConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("port '{spec}': {source}")]
    Port { spec: String, source: PortError },
    #[error("no control socket: give --control or control= in the file")]
    NoControl,
    #[error("mtu {0} is out of range (68-65000)")]
    Mtu(usize),
    #[error("aging of {0} s is out of range (1-86400)")]
    Aging(u64),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub control: Option<PathBuf>,
    pub aging_secs: Option<u64>,
    pub mtu: Option<usize>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub acls: Vec<FileAcl>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAcl {
    pub port: String,
    pub rule: AclRule,
}

/// Everything `run` needs, checked.
#[derive(Debug)]
pub struct Config {
    pub control: PathBuf,
    pub switch: SwitchConfig,
    pub ports: Vec<PortConfig>,
    pub acls: Vec<FileAcl>,
}

pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parsed = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        toml::from_str(&text).map_err(|e| e.to_string())
    };
    parsed.map_err(|msg| ConfigError::Parse {
        path: path.to_path_buf(),
        msg: msg.lines().collect::<Vec<_>>().join(" "),
    })
}

pub fn parse_port(spec: &str) -> Result<PortConfig, ConfigError> {
    spec.parse().map_err(|source| ConfigError::Port {
        spec: spec.to_string(),
        source,
    })
}

/// Merges the file (if any) and the command line (which adds ports and overrides
/// the scalars).
pub fn build(
    file: Option<FileConfig>,
    control: Option<PathBuf>,
    ports: &[String],
    aging_secs: Option<u64>,
    mtu: Option<usize>,
) -> Result<Config, ConfigError> {
    let file = file.unwrap_or_default();
    let control = control.or(file.control).ok_or(ConfigError::NoControl)?;
    let aging = aging_secs.or(file.aging_secs).unwrap_or(300);
    if !(1..=86_400).contains(&aging) {
        return Err(ConfigError::Aging(aging));
    }
    let mtu = mtu.or(file.mtu).unwrap_or(1500);
    if !(68..=65_000).contains(&mtu) {
        return Err(ConfigError::Mtu(mtu));
    }
    let ports = file
        .ports
        .iter()
        .chain(ports)
        .map(|s| parse_port(s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Config {
        control,
        switch: SwitchConfig {
            aging: Duration::from_secs(aging),
            mtu,
            ..SwitchConfig::default()
        },
        ports,
        acls: file.acls,
    })
}
