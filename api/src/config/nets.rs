//! Network devices (a tap, or a vhost-user backend's socket) and the `--net` flag.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::options::{number, pairs};
use super::ConfigError;

/// One virtio-net device on a host tap interface, or served by a vhost-user backend
/// (`vireo-switch`) listening on a unix socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a network device: an object with tap (and optionally mac, id, ...)")]
pub struct NetConfig {
    /// The tap interface (created if it does not exist, which needs CAP_NET_ADMIN).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tap: String,
    /// The vhost-user backend's socket (instead of a tap; needs `memory.shared`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_user: Option<PathBuf>,
    /// The guest's MAC address. Without one, the VMM picks a random locally
    /// administered address when it creates the VM and writes it here, so snapshots
    /// and migrations keep it (a new VM from the same flags gets another one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<net::MacAddr>,
    /// Device id for the API (default: net0, net1, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A vireod definition's adapter on one of its host's virtual switches (`vireod
    /// --switch NAME`), instead of a tap or a socket: vireod adds a port for it to the
    /// switch at each start and hands the VMM the port's socket (`vhost_user`). A
    /// `vireo` started by hand refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<String>,
    /// With `switch`: the port's access VLAN (1-4094; default: the switch's untagged
    /// VLAN 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// With `switch`: the port's guards, `mac+dhcp+router+arp+nd` (any of them) or
    /// `all` (docs/switch.md, "Guards"; `mac`, `arp` and `nd` need `mac`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<String>,
    /// With `switch`: the port's QoS cap, `RATE[:in|out|both]` in bits/s with a k/M/G/T
    /// suffix (`100M:out`; docs/switch.md, "QoS").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<String>,
}

impl NetConfig {
    /// The switch options' problems, if any (checked without the switch: what the
    /// switch's port parser would refuse beyond the characters is refused when the
    /// port is added, at start).
    pub fn check_switch_options(&self) -> Result<(), String> {
        let Some(sw) = &self.switch else {
            for (set, what) in [
                (self.vlan.is_some(), "vlan"),
                (self.guard.is_some(), "guard"),
                (self.max.is_some(), "max"),
            ] {
                if set {
                    return Err(format!("{what} is a switch port's option: it needs switch"));
                }
            }
            return Ok(());
        };
        if !self.tap.is_empty() || self.vhost_user.is_some() {
            return Err(format!(
                "a network device on switch {sw} has no tap or vhost_user of its own"
            ));
        }
        if let Some(v) = self.vlan {
            if !(1..=4094).contains(&v) {
                return Err(format!("vlan {v} is outside 1-4094"));
            }
        }
        if let Some(g) = &self.guard {
            const KNOWN: [&str; 6] = ["mac", "dhcp", "router", "arp", "nd", "all"];
            if let Some(bad) = g.split('+').find(|t| !KNOWN.contains(t)) {
                return Err(format!(
                    "guard {g:?}: unknown guard {bad:?} (known: mac, dhcp, router, arp, nd, all)"
                ));
            }
        }
        if let Some(m) = &self.max {
            let (rate, dir) = m.split_once(':').unwrap_or((m.as_str(), "out"));
            let digits = rate.trim_end_matches(['k', 'K', 'M', 'G', 'T']);
            if digits.is_empty()
                || !digits.bytes().all(|b| b.is_ascii_digit())
                || rate.len() > digits.len() + 1
                || !["in", "out", "both"].contains(&dir)
            {
                return Err(format!(
                    "max {m:?}: expected RATE[:in|out|both], RATE bits/s with a k/M/G/T suffix (100M:out)"
                ));
            }
        }
        Ok(())
    }
}

/// `--net tap=NAME[,mac=52:54:00:12:34:56][,id=ID]` or
/// `--net vhost-user=SOCKET[,mac=..][,queues=N][,id=ID]`.
pub fn parse_net(s: &str) -> Result<NetConfig, ConfigError> {
    const F: &str = "--net";
    let mut tap = None;
    let mut n = NetConfig {
        tap: String::new(),
        vhost_user: None,
        mac: None,
        id: None,
        switch: None,
        vlan: None,
        guard: None,
        max: None,
    };
    for (k, v) in pairs(F, s)? {
        match k.as_str() {
            "vhost-user" | "vhost_user" => {
                if v.is_empty() {
                    return Err(ConfigError::BadValue {
                        flag: F,
                        key: k.clone(),
                        value: v.clone(),
                        reason: "expected the backend's unix socket path".into(),
                    });
                }
                n.vhost_user = Some(PathBuf::from(v))
            }
            "queues" => {
                let q: u32 = number(F, &k, &v)?;
                if q != 1 {
                    return Err(ConfigError::BadValue {
                        flag: F,
                        key: k.clone(),
                        value: v.clone(),
                        reason: "only one queue pair is supported (multiqueue is not done)".into(),
                    });
                }
            }
            "tap" => {
                net::validate_tap_name(&v).map_err(|e| ConfigError::BadValue {
                    flag: F,
                    key: k.clone(),
                    value: v.clone(),
                    reason: match e {
                        net::TapError::BadName { reason, .. } => reason.to_string(),
                        other => other.to_string(),
                    },
                })?;
                tap = Some(v)
            }
            "mac" => {
                n.mac = Some(
                    v.parse()
                        .map_err(|e: net::MacParseError| ConfigError::BadValue {
                            flag: F,
                            key: k.clone(),
                            value: v.clone(),
                            reason: match e {
                                net::MacParseError::Syntax(_) => {
                                    "expected six hex bytes such as 52:54:00:12:34:56".into()
                                }
                                net::MacParseError::Multicast(_) => {
                                    "a multicast address; a NIC needs a unicast one".into()
                                }
                            },
                        })?,
                )
            }
            "id" => n.id = Some(v),
            _ => return Err(ConfigError::UnknownKey { flag: F, key: k }),
        }
    }
    match (tap, &n.vhost_user) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::BadValue {
                flag: F,
                key: "vhost-user".into(),
                value: s.into(),
                reason: "give either tap= or vhost-user=, not both".into(),
            })
        }
        (Some(t), None) => n.tap = t,
        (None, Some(_)) => {}
        (None, None) => {
            return Err(ConfigError::Missing {
                flag: F,
                key: "tap (or vhost-user)",
            })
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmConfig;

    #[test]
    fn nets_parse_validate_and_keep_a_stable_mac() {
        let n = parse_net("tap=vtap0,mac=52:54:00:aa:bb:cc,id=lan").unwrap();
        assert_eq!(n.tap, "vtap0");
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:aa:bb:cc");
        assert_eq!(n.id.as_deref(), Some("lan"));
        for (bad, needle) in [
            (
                "mac=52:54:00:aa:bb:cc",
                "missing required option 'tap (or vhost-user)'",
            ),
            ("tap=", "tap=: empty"),
            ("tap=a234567890123456", "longer than 15 bytes"),
            ("tap=t0,mac=52:54:00:aa:bb", "six hex bytes"),
            ("tap=t0,mac=01:00:5e:00:00:01", "multicast"),
            ("tap=t0,queues=4", "only one queue pair"),
        ] {
            let e = parse_net(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
            assert!(!e.contains('\n'));
        }
        let mut c: VmConfig = serde_json::from_str(
            r#"{"payload":{"kernel":"/k"},"nets":[{"tap":"a"},{"tap":"b","mac":"52:54:00:00:00:09"}]}"#,
        )
        .unwrap();
        let mut n = 0u8;
        c.assign_missing_macs(|| {
            n += 1;
            net::MacAddr::new([2, 0, 0, 0, 0, n])
        });
        assert_eq!(c.nets[0].mac.unwrap().to_string(), "02:00:00:00:00:01");
        assert_eq!(
            c.nets[1].mac.unwrap().to_string(),
            "52:54:00:00:00:09",
            "kept"
        );
        let two = r#"{"payload":{"kernel":"/k"},"nets":[{"tap":"t"},{"tap":"t"}]}"#;
        let c: VmConfig = serde_json::from_str(two).unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(m)) if m.contains("tap t")));

        let json =
            r#"{"payload":{"kernel":"/k"},"nets":[{"tap":"vtap0","mac":"52:54:00:01:02:03"}]}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        c.validate().unwrap();
        assert_eq!(c.device_ids(), ["net0"]);
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let bad_mac = r#"{"payload":{"kernel":"/k"},"nets":[{"tap":"t","mac":"zz"}]}"#;
        let e = serde_json::from_str::<VmConfig>(bad_mac)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a MAC address"), "{e}");
        let unknown = r#"{"payload":{"kernel":"/k"},"nets":[{"tap":"t","vhost":true}]}"#;
        assert!(serde_json::from_str::<VmConfig>(unknown).is_err());
        let long = r#"{"payload":{"kernel":"/k"},"nets":[{"tap":"a234567890123456"}]}"#;
        let c: VmConfig = serde_json::from_str(long).unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(m)) if m.contains("IFNAMSIZ")));
        let clash = r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/d","id":"x"}],
                        "nets":[{"tap":"t","id":"x"}]}"#;
        let c: VmConfig = serde_json::from_str(clash).unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(m)) if m.contains("'x'")));
        // A configuration without networking serializes without the field.
        let plain: VmConfig = serde_json::from_str(r#"{"payload":{"kernel":"/k"}}"#).unwrap();
        assert!(serde_json::to_value(&plain).unwrap().get("nets").is_none());
    }

    #[test]
    fn switch_adapters_are_checked_without_a_tap_and_their_options_need_a_switch() {
        let def = |nets: &str| -> Result<(), String> {
            let c: VmConfig = serde_json::from_str(&format!(
                r#"{{"payload":{{"kernel":"/k"}},"nets":[{nets}]}}"#
            ))
            .map_err(|e| e.to_string())?;
            c.validate().map_err(|e| e.to_string())
        };
        // No tap, no socket, no shared memory: vireod gives those.
        def(r#"{"switch":"lan","vlan":10,"guard":"mac+arp","max":"100M:out"}"#).unwrap();
        def(r#"{"switch":"lan","guard":"all","max":"1G"}"#).unwrap();
        for (bad, needle) in [
            (r#"{"tap":"t","vlan":10}"#, "vlan is a switch port's option"),
            (
                r#"{"tap":"t","guard":"all"}"#,
                "guard is a switch port's option",
            ),
            (r#"{"switch":"lan","tap":"t"}"#, "no tap or vhost_user"),
            (r#"{"switch":"lan","vlan":4095}"#, "outside 1-4094"),
            (r#"{"switch":"lan","vlan":0}"#, "outside 1-4094"),
            (
                r#"{"switch":"lan","guard":"mac,vhost-user=/x"}"#,
                "unknown guard",
            ),
            (r#"{"switch":"lan","max":"1G,vlan=20"}"#, "expected RATE"),
            (r#"{"switch":"lan","max":"fast"}"#, "expected RATE"),
            (r#"{"switch":"lan","max":"1G:sideways"}"#, "expected RATE"),
        ] {
            let e = def(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
            assert!(!e.contains('\n'));
        }
    }
}
