//! The switch thread's side of team ports: serving the members' sockets, reading
//! their links, sending the announces of a takeover (docs/switch.md, "Teaming").

use switch::extension::DropReason;
use switch::team::state::Takeover;
use switch::PortId;
use tracing::warn;

use super::{Daemon, BURST};
use crate::afpacket::Rx;

impl Daemon {
    /// Switches what member `m` of team port `id` received and the team lets in;
    /// a receive error saying the interface went down fails the member over.
    pub(super) fn serve_team(&mut self, id: PortId, m: usize) {
        for _ in 0..BURST {
            let Some(team) = self.teams.ports.get_mut(&id) else {
                return;
            };
            let Some(port) = team.member(m) else { return };
            let len = match port.recv(&mut self.rx) {
                Ok(Rx::Frame(n)) => n,
                Ok(Rx::Truncated) => {
                    self.sw.record_rx_drop(id, DropReason::OVERSIZE);
                    continue;
                }
                Ok(Rx::WouldBlock) => return,
                Err(e) => {
                    warn!(iface = port.iface(), error = %e, "team member receive failed");
                    if e.raw_os_error() == Some(libc::ENETDOWN) {
                        let name = self.sw.port_config(id).map_or("?", |c| c.name.as_str());
                        if let Some(tk) = team.set_link(name, m, false) {
                            self.announce(id, tk);
                        }
                    }
                    return;
                }
            };
            let now = self.epoch.elapsed();
            if !team.accept_rx(m, &self.rx[..len], now) {
                continue;
            }
            self.out.clear();
            self.sw.process(id, &self.rx[..len], now, &mut self.out);
            self.dispatch_trace();
            self.send_out();
        }
    }

    /// Reads the team members' links; a failover sends its announces.
    pub(super) fn poll_team_links(&mut self) {
        let ids: Vec<PortId> = self.teams.ports.keys().copied().collect();
        for id in ids {
            let name = self
                .sw
                .port_config(id)
                .map_or_else(String::new, |c| c.name.clone());
            let takeover = self
                .teams
                .ports
                .get_mut(&id)
                .and_then(|t| t.poll_links(&name));
            if let Some(tk) = takeover {
                self.announce(id, tk);
            }
        }
    }

    /// Announces every address learnt behind the other ports out of the member of
    /// team port `id` that took the traffic over.
    pub(super) fn announce(&mut self, id: PortId, tk: Takeover) {
        let now = self.epoch.elapsed();
        let learnt: Vec<_> = self
            .sw
            .mac_table(now)
            .into_iter()
            .filter_map(|r| {
                let vlan = switch::port::VlanId::new(r.vlan).ok()?;
                let mac = r.mac.parse::<net::MacAddr>().ok()?;
                Some((r.port, vlan, mac.bytes()))
            })
            .collect();
        let Some(cfg) = self.sw.port_config(id) else {
            return;
        };
        if let Some(t) = self.teams.ports.get_mut(&id) {
            t.announce(&cfg.name, id, &cfg.vlan, &learnt, tk, now);
        }
    }
}
