//! A port's configuration: its VLAN mode (access, trunk, private VLAN), its pinned
//! addresses, which guards watch it, its storm limit and mirror; parsing of the CLI
//! form `name=vm1,iface=tap0,vlan=10,mac=52:54:00:00:00:01,guard=mac+dhcp`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use net::MacAddr;
use serde::{Deserialize, Serialize};

use crate::mirror::{MirrorDirection, MirrorSpec};
use crate::qos::{check_weight, QosError, QosSpec};
use crate::storm::MAX_STORM_PPS;
use crate::team::{TeamError, TeamMode, TeamSpec};

/// A VLAN id a port can carry: 1..=4094 (0 is "priority only", 4095 reserved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct VlanId(u16);

impl VlanId {
    pub const DEFAULT: VlanId = VlanId(1);

    pub fn new(id: u16) -> Result<Self, PortError> {
        if (1..=4094).contains(&id) {
            Ok(Self(id))
        } else {
            Err(PortError::VlanRange(u32::from(id)))
        }
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

impl TryFrom<u16> for VlanId {
    type Error = PortError;
    fn try_from(v: u16) -> Result<Self, PortError> {
        Self::new(v)
    }
}

impl From<VlanId> for u16 {
    fn from(v: VlanId) -> u16 {
        v.0
    }
}

impl fmt::Display for VlanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for VlanId {
    type Err = PortError;
    fn from_str(s: &str) -> Result<Self, PortError> {
        let n: u32 = s
            .trim()
            .parse()
            .map_err(|_| PortError::Value("vlan", s.to_string()))?;
        u16::try_from(n)
            .map_err(|_| PortError::VlanRange(n))
            .and_then(Self::new)
    }
}

/// A port's role in a private VLAN (within its access VLAN, the primary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivateVlan {
    /// Reaches only promiscuous ports.
    Isolated,
    /// Reaches its own community and promiscuous ports.
    Community(u16),
    /// Reaches every port of the VLAN (the router, the uplink).
    Promiscuous,
}

/// How a port maps frames to VLANs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VlanMode {
    /// Untagged frames on one VLAN; tagged frames from the port are dropped.
    Access {
        vlan: VlanId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        private: Option<PrivateVlan>,
    },
    /// Tagged frames of the allowed VLANs; untagged ones belong to `native` if set
    /// (and leave untagged on it), else they are dropped.
    Trunk {
        allowed: BTreeSet<VlanId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        native: Option<VlanId>,
    },
}

impl VlanMode {
    pub fn carries(&self, vlan: VlanId) -> bool {
        match self {
            VlanMode::Access { vlan: v, .. } => *v == vlan,
            VlanMode::Trunk { allowed, native } => allowed.contains(&vlan) || *native == Some(vlan),
        }
    }

    /// The private-VLAN role; trunks act as promiscuous ports.
    pub fn private(&self) -> PrivateVlan {
        match self {
            VlanMode::Access {
                private: Some(p), ..
            } => *p,
            _ => PrivateVlan::Promiscuous,
        }
    }
}

/// The guards a port is under (all off by default, as for an uplink).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Guards {
    /// Frames must carry the port's `mac` as their source.
    pub mac_spoofing: bool,
    /// DHCP server messages (BOOTREPLY from UDP 67, DHCPv6 from 547) are dropped.
    pub dhcp: bool,
    /// Router advertisements and redirects (ICMPv6 134, 137; ICMP 5, 9) are dropped.
    pub router: bool,
    /// ARP must name the port's `mac` (and one of its IPv4 `ips`, if any) as sender.
    pub arp: bool,
    /// Neighbour advertisements must name one of the port's IPv6 `ips` (if any) as
    /// target and carry the port's `mac` as target link-layer address (if any).
    pub nd: bool,
}

/// One port of the switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortConfig {
    /// The port's name in the API and logs.
    pub name: String,
    /// The host interface it sits on (a tap, a veth end); defaults to `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iface: Option<String>,
    /// Instead of an interface: the unix socket where the switch serves a VM's
    /// virtio-net queues as a vhost-user backend (the VMM connects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_user: Option<PathBuf>,
    /// Instead of one interface: a team of member interfaces ([`crate::team`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<TeamSpec>,
    pub vlan: VlanMode,
    /// The address the VM behind the port owns (for the MAC and ARP guards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// The addresses it owns (IPv4 for the ARP guard, IPv6 for the ND guard); none
    /// of a family: any of that family.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub guards: Guards,
    /// Broadcast and multicast frames the port may send per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storm: Option<u32>,
    /// The monitor port its frames are copied to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorSpec>,
    /// Maximum bandwidth, link rate, weight and minimum ([`crate::qos`]).
    #[serde(default, skip_serializing_if = "QosSpec::is_empty")]
    pub qos: QosSpec,
}

/// Checks a storm limit: 1 to [`MAX_STORM_PPS`] packets per second.
pub fn check_storm(pps: u64) -> Result<u32, PortError> {
    u32::try_from(pps)
        .ok()
        .filter(|p| (1..=MAX_STORM_PPS).contains(p))
        .ok_or(PortError::Storm(pps))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
}

impl PortConfig {
    pub fn iface(&self) -> &str {
        self.iface.as_deref().unwrap_or(&self.name)
    }

    /// The host interfaces the port sits on: its interface, a team's members, none
    /// for a vhost-user port.
    pub fn interfaces(&self) -> Vec<&str> {
        match (&self.vhost_user, &self.team) {
            (Some(_), _) => Vec::new(),
            (None, Some(t)) => t.members.iter().map(String::as_str).collect(),
            (None, None) => vec![self.iface()],
        }
    }

    /// Checks what the types cannot: a usable name, a non-empty trunk, guards that
    /// need a MAC have one.
    pub fn validate(&self) -> Result<(), PortError> {
        if !valid_name(&self.name) {
            return Err(PortError::Name(self.name.clone()));
        }
        if let Some(team) = &self.team {
            if self.iface.is_some() || self.vhost_user.is_some() {
                return Err(PortError::TeamAndIface(self.name.clone()));
            }
            team.validate(&self.name)?;
        }
        match &self.vhost_user {
            Some(path) => {
                if self.iface.is_some() {
                    return Err(PortError::IfaceAndSocket(self.name.clone()));
                }
                if !path.is_absolute() {
                    return Err(PortError::Socket(path.display().to_string()));
                }
            }
            None if self.team.is_some() => {}
            None => {
                net::validate_tap_name(self.iface()).map_err(|e| PortError::Iface(e.to_string()))?
            }
        }
        if let VlanMode::Trunk { allowed, native } = &self.vlan {
            if allowed.is_empty() && native.is_none() {
                return Err(PortError::EmptyTrunk(self.name.clone()));
            }
        }
        if (self.guards.mac_spoofing || self.guards.arp || self.guards.nd) && self.mac.is_none() {
            return Err(PortError::GuardNeedsMac(self.name.clone()));
        }
        if let Some(pps) = self.storm {
            check_storm(u64::from(pps))?;
        }
        self.qos.validate(&self.name)?;
        if let Some(m) = &self.mirror {
            if !valid_name(&m.to) {
                return Err(PortError::Name(m.to.clone()));
            }
            if m.to == self.name {
                return Err(PortError::MirrorSelf(self.name.clone()));
            }
        }
        Ok(())
    }
}

/// Why a port configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("VLAN {0} is out of range (1-4094)")]
    VlanRange(u32),
    #[error("bad {0} value '{1}'")]
    Value(&'static str, String),
    #[error("unknown port option '{0}' (known: name, iface, vhost-user, team, team-mode, vlan, pvlan, trunk, native, mac, ip, guard, storm, mirror, max, rate, weight, min)")]
    Option(String),
    #[error("port name '{0}' is not 1-64 characters of [A-Za-z0-9-_.]")]
    Name(String),
    #[error("{0}")]
    Iface(String),
    #[error("port '{0}': a trunk needs allowed VLANs or a native VLAN")]
    EmptyTrunk(String),
    #[error("port '{0}': the mac, arp and nd guards need mac=")]
    GuardNeedsMac(String),
    #[error("port '{0}': give either iface= or vhost-user=, not both")]
    IfaceAndSocket(String),
    #[error("vhost-user socket '{0}' must be an absolute path")]
    Socket(String),
    #[error("port spec needs name=")]
    NoName,
    #[error("port '{0}': give either vlan= or trunk=, not both")]
    VlanAndTrunk(String),
    #[error("port '{0}': pvlan= needs an access port (vlan=)")]
    PrivateOnTrunk(String),
    #[error("storm limit {0} is out of range (1-{MAX_STORM_PPS} packets/s)")]
    Storm(u64),
    #[error("port '{0}' cannot mirror to itself")]
    MirrorSelf(String),
    #[error("{0}")]
    Qos(#[from] QosError),
    #[error("{0}")]
    Team(#[from] TeamError),
    #[error("port '{0}': a team (team=) has no iface= or vhost-user=")]
    TeamAndIface(String),
    #[error("team-mode= needs team=")]
    ModeWithoutTeam,
}

fn parse_guards(s: &str) -> Result<Guards, PortError> {
    let mut g = Guards::default();
    for word in s.split('+') {
        match word {
            "mac" => g.mac_spoofing = true,
            "dhcp" => g.dhcp = true,
            "router" => g.router = true,
            "arp" => g.arp = true,
            "nd" => g.nd = true,
            "all" => {
                g = Guards {
                    mac_spoofing: true,
                    dhcp: true,
                    router: true,
                    arp: true,
                    nd: true,
                }
            }
            _ => {
                return Err(PortError::Value(
                    "guard (mac, dhcp, router, arp, nd, all)",
                    word.to_string(),
                ))
            }
        }
    }
    Ok(g)
}

/// `MONITOR[:in|out|both]`.
fn parse_mirror(s: &str) -> Result<MirrorSpec, PortError> {
    let (to, dir) = match s.split_once(':') {
        Some((to, d)) => (
            to,
            d.parse()
                .map_err(|d| PortError::Value("mirror direction (in, out, both)", d))?,
        ),
        None => (s, MirrorDirection::Both),
    };
    Ok(MirrorSpec {
        to: to.to_string(),
        direction: dir,
    })
}

fn parse_private(s: &str) -> Result<PrivateVlan, PortError> {
    match s {
        "isolated" => Ok(PrivateVlan::Isolated),
        "promiscuous" => Ok(PrivateVlan::Promiscuous),
        _ => s
            .strip_prefix("community:")
            .and_then(|n| n.parse().ok())
            .map(PrivateVlan::Community)
            .ok_or_else(|| {
                PortError::Value("pvlan (isolated, promiscuous, community:N)", s.to_string())
            }),
    }
}

impl FromStr for PortConfig {
    type Err = PortError;

    /// `name=N[,iface=IF|,vhost-user=SOCKET][,vlan=V[,pvlan=isolated|community:C|promiscuous]]`
    /// `[,trunk=V:V:...[,native=V]][,mac=M][,ip=A]...[,guard=mac+dhcp+router+arp+nd]`
    /// `[,storm=PPS][,mirror=MONITOR[:in|out|both]][,max=RATE[:in|out|both]][,rate=RATE]`
    /// `[,weight=1-100][,min=RATE]` (rates in bits/s with k, M, G, T suffixes).
    /// Trunk VLANs are separated by `:` (a `,` separates options).
    fn from_str(s: &str) -> Result<Self, PortError> {
        let (mut name, mut iface, mut vlan, mut trunk, mut native) = (None, None, None, None, None);
        let (mut vhost_user, mut team_members, mut team_mode) = (None, None, None);
        let (mut private, mut mac, mut ips, mut guards) =
            (None, None, Vec::new(), Guards::default());
        let (mut storm, mut mirror, mut qos) = (None, None, QosSpec::default());
        for kv in s.split(',') {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| PortError::Option(kv.to_string()))?;
            match k {
                "name" => name = Some(v.to_string()),
                "iface" => iface = Some(v.to_string()),
                "vhost-user" => vhost_user = Some(PathBuf::from(v)),
                "team" => team_members = Some(TeamSpec::parse_members(v)),
                "team-mode" => team_mode = Some(v.parse::<TeamMode>()?),
                "vlan" => vlan = Some(v.parse::<VlanId>()?),
                "native" => native = Some(v.parse::<VlanId>()?),
                "trunk" => {
                    trunk = Some(
                        v.split([':', ' '])
                            .filter(|p| !p.is_empty())
                            .map(str::parse)
                            .collect::<Result<BTreeSet<VlanId>, _>>()?,
                    )
                }
                "pvlan" => private = Some(parse_private(v)?),
                "mac" => {
                    mac = Some(
                        v.parse::<MacAddr>()
                            .map_err(|e| PortError::Value("mac", e.to_string()))?,
                    )
                }
                "ip" => ips.push(
                    v.parse()
                        .map_err(|_| PortError::Value("ip", v.to_string()))?,
                ),
                "guard" => guards = parse_guards(v)?,
                "storm" => {
                    let n = v
                        .parse::<u64>()
                        .map_err(|_| PortError::Value("storm", v.to_string()))?;
                    storm = Some(check_storm(n)?);
                }
                "mirror" => mirror = Some(parse_mirror(v)?),
                "max" => qos.max = Some(v.parse()?),
                "rate" => qos.rate = Some(v.parse()?),
                "min" => qos.min = Some(v.parse()?),
                "weight" => {
                    let w = v
                        .trim()
                        .parse::<u64>()
                        .map_err(|_| PortError::Value("weight", v.to_string()))?;
                    qos.weight = Some(check_weight(w)?);
                }
                _ => return Err(PortError::Option(k.to_string())),
            }
        }
        let name = name.ok_or(PortError::NoName)?;
        let team = match (team_members, team_mode) {
            (Some(members), mode) => Some(TeamSpec {
                members,
                mode: mode.unwrap_or_default(),
            }),
            (None, Some(_)) => return Err(PortError::ModeWithoutTeam),
            (None, None) => None,
        };
        let vlan = match (vlan, trunk) {
            (Some(_), Some(_)) => return Err(PortError::VlanAndTrunk(name)),
            (v, None) => {
                if native.is_some() {
                    return Err(PortError::Option("native (only with trunk=)".into()));
                }
                VlanMode::Access {
                    vlan: v.unwrap_or(VlanId::DEFAULT),
                    private,
                }
            }
            (None, Some(allowed)) => {
                if private.is_some() {
                    return Err(PortError::PrivateOnTrunk(name));
                }
                VlanMode::Trunk { allowed, native }
            }
        };
        let cfg = PortConfig {
            name,
            iface,
            vhost_user,
            team,
            vlan,
            mac,
            ips,
            guards,
            storm,
            mirror,
            qos,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_access_trunk_and_private_ports() {
        let p: PortConfig = "name=vm1,iface=tap0,vlan=10,mac=52:54:00:00:00:01,guard=mac+dhcp"
            .parse()
            .unwrap();
        assert_eq!(p.iface(), "tap0");
        assert!(p.vlan.carries(VlanId::new(10).unwrap()));
        assert!(p.guards.mac_spoofing && p.guards.dhcp && !p.guards.router);
        let t: PortConfig = "name=up,trunk=10:20,native=5".parse().unwrap();
        assert!(t.vlan.carries(VlanId::new(20).unwrap()));
        assert!(t.vlan.carries(VlanId::new(5).unwrap()));
        assert!(!t.vlan.carries(VlanId::new(30).unwrap()));
        let i: PortConfig = "name=a,vlan=7,pvlan=community:3".parse().unwrap();
        assert_eq!(i.vlan.private(), PrivateVlan::Community(3));
        let s: PortConfig = "name=a,mac=52:54:00:00:00:01,ip=10.0.0.1,ip=2001:db8::1,guard=nd,storm=500,mirror=mon:in"
            .parse()
            .unwrap();
        assert!(s.guards.nd && !s.guards.arp);
        assert_eq!(s.ips.len(), 2);
        assert_eq!(s.storm, Some(500));
        assert_eq!(
            s.mirror,
            Some(MirrorSpec {
                to: "mon".into(),
                direction: MirrorDirection::In
            })
        );
        let both: PortConfig = "name=a,mirror=mon".parse().unwrap();
        assert_eq!(both.mirror.unwrap().direction, MirrorDirection::Both);
        assert!(
            "name=a,guard=all,mac=52:54:00:00:00:01"
                .parse::<PortConfig>()
                .unwrap()
                .guards
                .nd
        );
    }

    #[test]
    fn parses_teams() {
        let t: PortConfig = "name=up,team=m0+m1,team-mode=hash,trunk=10:20"
            .parse()
            .unwrap();
        let team = t.team.as_ref().unwrap();
        assert_eq!(team.members, ["m0", "m1"]);
        assert_eq!(team.mode, TeamMode::Hash);
        assert_eq!(t.interfaces(), ["m0", "m1"]);
        let ab: PortConfig = "name=up,team=eth1".parse().unwrap();
        assert_eq!(ab.team.unwrap().mode, TeamMode::ActiveBackup);
        let plain: PortConfig = "name=vm1,iface=tap0".parse().unwrap();
        assert_eq!(plain.interfaces(), ["tap0"]);
    }

    #[test]
    fn refuses_bad_ports_with_one_clear_line() {
        let cases = [
            ("name=a,vlan=4095", "VLAN 4095 is out of range"),
            ("name=a,vlan=0", "VLAN 0 is out of range"),
            ("name=a,trunk=10:70000", "VLAN 70000 is out of range"),
            ("name=a,vlan=x", "bad vlan value 'x'"),
            ("name=a,color=red", "unknown port option 'color'"),
            ("vlan=3", "needs name="),
            ("name=a,guard=mac", "need mac="),
            ("name=a,vlan=1,trunk=2", "either vlan= or trunk="),
            ("name=a,trunk=2,pvlan=isolated", "needs an access port"),
            ("name=a/b", "is not 1-64 characters"),
            ("name=a,storm=0", "storm limit 0 is out of range"),
            (
                "name=a,storm=20000000",
                "storm limit 20000000 is out of range",
            ),
            ("name=a,storm=x", "bad storm value 'x'"),
            ("name=a,mirror=a", "port 'a' cannot mirror to itself"),
            (
                "name=a,mirror=m:sideways",
                "bad mirror direction (in, out, both) value 'sideways'",
            ),
            ("name=a,ip=fe80::1,guard=nd", "need mac="),
            ("name=a,max=0", "rate 0 bit/s is out of range"),
            ("name=a,max=8X", "bad rate '8X'"),
            ("name=a,max=8M:up", "bad max direction 'up'"),
            ("name=a,rate=2T", "out of range"),
            ("name=a,weight=0", "weight 0 is out of range (1-100)"),
            ("name=a,weight=101", "weight 101 is out of range"),
            ("name=a,weight=x", "bad weight value 'x'"),
            (
                "name=a,max=1M,min=2M",
                "port 'a': min 2M is above its own max 1M out",
            ),
            ("name=a,ip=10.0.0.300", "bad ip value"),
            (
                "name=a,iface=waytoolonginterfacename",
                "longer than 15 bytes",
            ),
            ("name=up,team=", "team 'up' has no members"),
            ("name=up,team=m0+m0", "team 'up' names member 'm0' twice"),
            (
                "name=up,team=m0+m1,team-mode=lacp",
                "unknown team mode 'lacp' (known: active-backup, hash)",
            ),
            ("name=up,team-mode=hash", "team-mode= needs team="),
            (
                "name=up,iface=m0,team=m0+m1",
                "a team (team=) has no iface= or vhost-user=",
            ),
        ];
        for (spec, want) in cases {
            let e = spec.parse::<PortConfig>().unwrap_err().to_string();
            assert!(e.contains(want), "{spec}: {e}");
            assert!(!e.contains('\n'));
        }
    }
}
