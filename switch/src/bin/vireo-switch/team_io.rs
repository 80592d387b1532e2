//! A team port's I/O: one [`PacketPort`] per member interface, the members' link
//! state read with `SIOCGIFFLAGS` and `SIOCETHTOOL`/`ETHTOOL_GLINK` (administratively
//! up with carrier; read-only ioctls the switch thread's filter allows), and the frames and
//! announces sent through the member [`Team`] picks. The decisions are the library's
//! ([`switch::team`]); this module only does what they say.

use std::collections::HashMap;
use std::io;
use std::mem::zeroed;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use switch::port::{VlanId, VlanMode};
use switch::team::hash::announces;
use switch::team::state::{Takeover, Team, TeamStatus};
use switch::team::TeamSpec;
use switch::PortId;
use tracing::{info, warn};

use crate::afpacket::{PacketPort, PortIoError};

/// How often the members' links are read.
pub const LINK_POLL: Duration = Duration::from_millis(50);

/// `SIOCETHTOOL`'s `ETHTOOL_GLINK`: the driver's carrier, as it is now.
const ETHTOOL_GLINK: u32 = 0x0000_000a;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

fn ifreq(iface: &str) -> libc::ifreq {
    // SAFETY: a zeroed plain-data ifreq; its name is filled below within
    // IFNAMSIZ - 1 bytes, so it stays NUL-terminated.
    let mut ifr: libc::ifreq = unsafe { zeroed() };
    for (d, s) in ifr
        .ifr_name
        .iter_mut()
        .zip(iface.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    ifr
}

/// Whether `iface` is up with carrier, asked through any socket `fd`: administratively
/// up (`SIOCGIFFLAGS`) and the driver's carrier (`ETHTOOL_GLINK`, current at once; the
/// flags' `IFF_RUNNING` follows the carrier only when the kernel's link watch has run,
/// up to a second later), or `IFF_RUNNING` for a driver without `get_link`.
fn link_up(fd: RawFd, iface: &str) -> io::Result<bool> {
    let mut ifr = ifreq(iface);
    // SAFETY: SIOCGIFFLAGS reads the flags into the live ifreq passed.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
    if flags & libc::IFF_UP == 0 {
        return Ok(false);
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_GLINK,
        data: 0,
    };
    let mut ifr = ifreq(iface);
    ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: SIOCETHTOOL with ETHTOOL_GLINK writes one ethtool_value into `value`,
    // which the ifreq points to and which outlives the call.
    if unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut ifr) } == 0 {
        return Ok(value.data != 0);
    }
    Ok(flags & libc::IFF_RUNNING != 0)
}

pub struct TeamPort {
    members: Vec<PacketPort>,
    team: Team,
}

impl TeamPort {
    /// Opens every member (on the opener thread once there is one); all start down
    /// until [`TeamPort::poll_links`] reads them.
    pub fn open(spec: &TeamSpec, aging: Duration) -> Result<Self, PortIoError> {
        let members = spec
            .members
            .iter()
            .map(|m| PacketPort::open(m))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            members,
            team: Team::new(spec, aging),
        })
    }

    pub fn status(&self) -> TeamStatus<'_> {
        self.team.status()
    }

    pub fn fds(&self) -> impl Iterator<Item = (usize, RawFd)> + '_ {
        self.members
            .iter()
            .enumerate()
            .map(|(i, p)| (i, p.as_raw_fd()))
    }

    pub fn member(&self, i: usize) -> Option<&PacketPort> {
        self.members.get(i)
    }

    /// Reads member `i`'s link and tells the team; a takeover if the traffic moved.
    fn check_link(&mut self, port: &str, i: usize) -> Option<Takeover> {
        let p = self.members.get(i)?;
        let up = match link_up(p.as_raw_fd(), p.iface()) {
            Ok(up) => up,
            Err(e) => {
                // The interface is gone (deleted): down.
                warn!(port, iface = p.iface(), error = %e, "member link state unreadable");
                false
            }
        };
        self.set_link(port, i, up)
    }

    /// Records member `i`'s link state (also from a receive error: ENETDOWN).
    pub fn set_link(&mut self, port: &str, i: usize, up: bool) -> Option<Takeover> {
        let was = self.team.is_up(i);
        let takeover = self.team.set_link(i, up);
        if was != up {
            let iface = self.team.iface(i).unwrap_or("?");
            if up {
                info!(port, iface, "team member up");
            } else {
                warn!(port, iface, "team member down");
            }
        }
        if let Some(t) = takeover {
            info!(
                port,
                iface = self.team.iface(t.member).unwrap_or("?"),
                "team member takes the traffic over"
            );
        }
        takeover
    }

    /// Reads every member's link; the last takeover, if the traffic moved.
    pub fn poll_links(&mut self, port: &str) -> Option<Takeover> {
        (0..self.members.len()).fold(None, |t, i| self.check_link(port, i).or(t))
    }

    /// Sends `frame` out of the member the team picks. A refused send has that
    /// member's link read at once: if it is down the team fails over and the frame
    /// goes once more, out of the new member. Returns whether it left, and the
    /// takeover if there was one.
    pub fn send(&mut self, port: &str, frame: &[u8], now: Duration) -> (bool, Option<Takeover>) {
        let mut takeover = None;
        for _ in 0..2 {
            let Some(m) = self.team.tx_member(frame) else {
                return (false, takeover);
            };
            let Some(p) = self.members.get(m) else {
                return (false, takeover);
            };
            let sent = match p.send(frame) {
                Ok(sent) => sent,
                Err(e) => {
                    warn!(port, iface = p.iface(), error = %e, "team member send failed");
                    false
                }
            };
            self.team.record_tx(m, frame, sent, now);
            if sent {
                return (true, takeover);
            }
            match self.check_link(port, m) {
                Some(t) => takeover = Some(t),
                None => return (false, takeover),
            }
        }
        (false, takeover)
    }

    /// Whether a frame received on member `i` enters the switch.
    pub fn accept_rx(&mut self, i: usize, frame: &[u8], now: Duration) -> bool {
        self.team.accept_rx(i, frame, now)
    }

    /// Sends a RARP announce out of `t.member` for every address learnt behind
    /// another port (`learnt`: port, VLAN, address) on a VLAN the team carries.
    pub fn announce(
        &mut self,
        port: &str,
        id: PortId,
        vlan: &VlanMode,
        learnt: &[(PortId, VlanId, [u8; 6])],
        t: Takeover,
        now: Duration,
    ) {
        let behind_others: Vec<(VlanId, [u8; 6])> = learnt
            .iter()
            .filter(|(p, _, _)| *p != id)
            .map(|(_, v, m)| (*v, *m))
            .collect();
        let frames = announces(vlan, &behind_others);
        let Some(p) = self.members.get(t.member) else {
            return;
        };
        let mut sent_count = 0usize;
        for f in &frames {
            let sent = p.send(f).unwrap_or(false);
            sent_count += usize::from(sent);
            self.team.record_announce(t.member, f, sent, now);
        }
        info!(
            port,
            iface = p.iface(),
            announces = sent_count,
            of = frames.len(),
            "announces sent"
        );
    }
}

/// The team ports of the switch.
#[derive(Default)]
pub struct Teams {
    pub ports: HashMap<PortId, TeamPort>,
}

impl Teams {
    /// (port, member, fd) of every member socket, for poll.
    pub fn fds(&self) -> Vec<(PortId, usize, RawFd)> {
        self.ports
            .iter()
            .flat_map(|(id, t)| t.fds().map(move |(m, fd)| (*id, m, fd)))
            .collect()
    }
}
