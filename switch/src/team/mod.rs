//! NIC teaming of uplinks: one switch port made of several member interfaces.
//!
//! - this module: the team's configuration (`team=eth0+eth1,team-mode=...` in a port
//!   spec) and its checks;
//! - [`hash`]: the flow hash that spreads transmit over the members (address hash
//!   mode) and the RARP announces sent after a failover;
//! - [`state`]: the failover state machine (which member carries what, what a member
//!   may deliver to the switch), with the members' counters.
//!
//! No I/O here: the binary polls the members' links and feeds [`state::Team`] with
//! what it saw, on a clock passed in (docs/switch.md, "Teaming").

pub mod hash;
pub mod state;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Members one team may have.
pub const MAX_MEMBERS: usize = 8;

/// How a team uses its members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TeamMode {
    /// One member carries everything (both ways); the next up member takes over when
    /// it fails. Switch-independent: the peer needs no configuration.
    #[default]
    ActiveBackup,
    /// Transmit spread per flow by a hash of L2/L3/L4 addresses over the up members;
    /// unicast received on any member, broadcast and multicast on the primary only.
    Hash,
}

impl fmt::Display for TeamMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TeamMode::ActiveBackup => "active-backup",
            TeamMode::Hash => "hash",
        })
    }
}

impl FromStr for TeamMode {
    type Err = TeamError;
    fn from_str(s: &str) -> Result<Self, TeamError> {
        match s {
            "active-backup" => Ok(TeamMode::ActiveBackup),
            "hash" => Ok(TeamMode::Hash),
            _ => Err(TeamError::Mode(s.to_string())),
        }
    }
}

/// A team port's members and mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamSpec {
    /// The member interfaces, in order of preference (the first up one is active,
    /// or the primary in hash mode).
    pub members: Vec<String>,
    #[serde(default)]
    pub mode: TeamMode,
}

/// Why a team configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TeamError {
    #[error("unknown team mode '{0}' (known: active-backup, hash)")]
    Mode(String),
    #[error("team '{0}' has no members (team=IF+IF...)")]
    NoMembers(String),
    #[error("team '{port}' has {count} members; at most {MAX_MEMBERS}")]
    TooMany { port: String, count: usize },
    #[error("team '{port}' names member '{iface}' twice")]
    Duplicate { port: String, iface: String },
    #[error("team '{port}' member '{iface}': {msg}")]
    Member {
        port: String,
        iface: String,
        msg: String,
    },
}

impl TeamSpec {
    /// `IF+IF+...` (the value of `team=`); empty members are kept so that
    /// [`TeamSpec::validate`] refuses them by name.
    pub fn parse_members(s: &str) -> Vec<String> {
        if s.is_empty() {
            return Vec::new();
        }
        s.split('+').map(str::to_string).collect()
    }

    /// 1 to [`MAX_MEMBERS`] distinct, valid interface names.
    pub fn validate(&self, port: &str) -> Result<(), TeamError> {
        if self.members.is_empty() {
            return Err(TeamError::NoMembers(port.to_string()));
        }
        if self.members.len() > MAX_MEMBERS {
            return Err(TeamError::TooMany {
                port: port.to_string(),
                count: self.members.len(),
            });
        }
        for (i, m) in self.members.iter().enumerate() {
            net::validate_tap_name(m).map_err(|e| TeamError::Member {
                port: port.to_string(),
                iface: m.clone(),
                msg: e.to_string(),
            })?;
            if self.members[..i].contains(m) {
                return Err(TeamError::Duplicate {
                    port: port.to_string(),
                    iface: m.clone(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_members_parse_and_bad_ones_are_refused_by_name() {
        assert_eq!("hash".parse::<TeamMode>(), Ok(TeamMode::Hash));
        assert_eq!(
            "active-backup".parse::<TeamMode>(),
            Ok(TeamMode::ActiveBackup)
        );
        assert_eq!(
            "lacp".parse::<TeamMode>().unwrap_err().to_string(),
            "unknown team mode 'lacp' (known: active-backup, hash)"
        );
        let ok = TeamSpec {
            members: TeamSpec::parse_members("eth0+eth1"),
            mode: TeamMode::Hash,
        };
        assert_eq!(ok.members, ["eth0", "eth1"]);
        ok.validate("up").unwrap();
        let bad = |m: &str| {
            TeamSpec {
                members: TeamSpec::parse_members(m),
                mode: TeamMode::ActiveBackup,
            }
            .validate("up")
            .unwrap_err()
            .to_string()
        };
        assert_eq!(bad(""), "team 'up' has no members (team=IF+IF...)");
        assert_eq!(bad("a+b+a"), "team 'up' names member 'a' twice");
        assert!(
            bad("a++b").starts_with("team 'up' member '':"),
            "{}",
            bad("a++b")
        );
        assert!(bad("a+b+c+d+e+f+g+h+i").contains("9 members; at most 8"));
        assert!(bad("a+waytoolonginterfacename").contains("longer than 15 bytes"));
    }
}
