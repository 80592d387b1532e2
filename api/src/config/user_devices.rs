//! vfio-user devices (a PCI function emulated by another process) and the
//! `--user-device` flag.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::options::pairs;
use super::ConfigError;

/// One PCI function served by a vfio-user server listening on a unix socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a vfio-user device: an object with socket (and optionally id)")]
pub struct UserDeviceConfig {
    /// The server's unix socket (an absolute path; needs `memory.shared`).
    pub socket: PathBuf,
    /// Device id for the API (default: user0, user1, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// `--user-device socket=PATH[,id=ID]`.
pub fn parse_user_device(s: &str) -> Result<UserDeviceConfig, ConfigError> {
    const F: &str = "--user-device";
    let mut socket = None;
    let mut id = None;
    for (k, v) in pairs(F, s)? {
        match k.as_str() {
            "socket" => {
                if v.is_empty() {
                    return Err(ConfigError::BadValue {
                        flag: F,
                        key: k.clone(),
                        value: v.clone(),
                        reason: "expected the server's unix socket path".into(),
                    });
                }
                socket = Some(PathBuf::from(v));
            }
            "id" => id = Some(v),
            _ => return Err(ConfigError::UnknownKey { flag: F, key: k }),
        }
    }
    let socket = socket.ok_or(ConfigError::Missing {
        flag: F,
        key: "socket",
    })?;
    Ok(UserDeviceConfig { socket, id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_devices_parse() {
        let d = parse_user_device("socket=/run/d.sock,id=gpu").unwrap();
        assert_eq!(d.socket, PathBuf::from("/run/d.sock"));
        assert_eq!(d.id.as_deref(), Some("gpu"));
        for (bad, needle) in [
            ("id=x", "missing required option 'socket'"),
            ("socket=", "expected the server's unix socket path"),
            ("socket=/s,mmap=on", "unknown option 'mmap'"),
        ] {
            let e = parse_user_device(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
