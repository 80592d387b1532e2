//! The MAC table: (VLAN, address) → port, learned from source addresses, aged out.
//!
//! Time is passed in (`now`, a monotonic [`Duration`] from any epoch the caller keeps),
//! so aging is tested without sleeping. A port may hold at most `per_port_limit`
//! addresses: a VM that sends from a million random sources fills its own share, not
//! the table (frames from addresses past the limit are still switched, by flooding
//! their replies).

use std::collections::HashMap;
use std::time::Duration;

use crate::port::VlanId;
use crate::PortId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    port: PortId,
    seen: Duration,
}

/// What learning a source did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    New,
    Refreshed,
    /// The address moved here from another port.
    Moved {
        from: PortId,
    },
    /// The port is at its limit: not learned.
    Refused,
}

/// One row of the table, for the API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FdbRow {
    pub vlan: u16,
    pub mac: String,
    pub port: PortId,
    pub age_ms: u64,
}

#[derive(Debug)]
pub struct MacTable {
    entries: HashMap<(VlanId, [u8; 6]), Entry>,
    per_port: HashMap<PortId, usize>,
    aging: Duration,
    per_port_limit: usize,
}

pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

impl MacTable {
    pub fn new(aging: Duration, per_port_limit: usize) -> Self {
        Self {
            entries: HashMap::new(),
            per_port: HashMap::new(),
            aging,
            per_port_limit,
        }
    }

    fn expired(&self, e: &Entry, now: Duration) -> bool {
        now.saturating_sub(e.seen) >= self.aging
    }

    /// Records that `mac` was seen on `port` in `vlan`.
    pub fn learn(&mut self, vlan: VlanId, mac: [u8; 6], port: PortId, now: Duration) -> Learned {
        let key = (vlan, mac);
        if let Some(e) = self.entries.get(&key).copied() {
            if e.port == port {
                self.entries.insert(key, Entry { port, seen: now });
                return Learned::Refreshed;
            }
            if self.count(port) >= self.per_port_limit {
                return Learned::Refused;
            }
            self.entries.insert(key, Entry { port, seen: now });
            self.dec(e.port);
            *self.per_port.entry(port).or_default() += 1;
            return Learned::Moved { from: e.port };
        }
        if self.count(port) >= self.per_port_limit {
            // Make room from this port's own stale entries before refusing.
            self.expire(now);
            if self.count(port) >= self.per_port_limit {
                return Learned::Refused;
            }
        }
        self.entries.insert(key, Entry { port, seen: now });
        *self.per_port.entry(port).or_default() += 1;
        Learned::New
    }

    /// The port `mac` lives on in `vlan`, unless unknown or aged out.
    pub fn lookup(&self, vlan: VlanId, mac: &[u8; 6], now: Duration) -> Option<PortId> {
        self.entries
            .get(&(vlan, *mac))
            .filter(|e| !self.expired(e, now))
            .map(|e| e.port)
    }

    /// Drops aged entries; returns how many.
    pub fn expire(&mut self, now: Duration) -> usize {
        let aging = self.aging;
        let before = self.entries.len();
        let mut gone = Vec::new();
        self.entries.retain(|_, e| {
            let keep = now.saturating_sub(e.seen) < aging;
            if !keep {
                gone.push(e.port);
            }
            keep
        });
        for p in gone {
            self.dec(p);
        }
        before - self.entries.len()
    }

    /// Forgets every address of `port` (it was removed).
    pub fn flush_port(&mut self, port: PortId) {
        self.entries.retain(|_, e| e.port != port);
        self.per_port.remove(&port);
    }

    fn count(&self, port: PortId) -> usize {
        self.per_port.get(&port).copied().unwrap_or(0)
    }

    fn dec(&mut self, port: PortId) {
        if let Some(n) = self.per_port.get_mut(&port) {
            *n = n.saturating_sub(1);
        }
    }

    pub fn rows(&self, now: Duration) -> Vec<FdbRow> {
        let mut rows: Vec<FdbRow> = self
            .entries
            .iter()
            .filter(|(_, e)| !self.expired(e, now))
            .map(|((vlan, mac), e)| FdbRow {
                vlan: vlan.get(),
                mac: format_mac(mac),
                port: e.port,
                age_ms: now.saturating_sub(e.seen).as_millis() as u64,
            })
            .collect();
        rows.sort_by(|a, b| (a.vlan, &a.mac).cmp(&(b.vlan, &b.mac)));
        rows
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    fn v(n: u16) -> VlanId {
        VlanId::new(n).unwrap()
    }

    #[test]
    fn learns_moves_and_ages_per_vlan() {
        let mut t = MacTable::new(300 * S, 16);
        let m = [2, 0, 0, 0, 0, 1];
        assert_eq!(t.learn(v(10), m, 1, S), Learned::New);
        assert_eq!(t.lookup(v(10), &m, 2 * S), Some(1));
        assert_eq!(
            t.lookup(v(20), &m, 2 * S),
            None,
            "VLANs are separate tables"
        );
        assert_eq!(t.learn(v(10), m, 1, 100 * S), Learned::Refreshed);
        assert_eq!(t.learn(v(10), m, 2, 101 * S), Learned::Moved { from: 1 });
        assert_eq!(t.lookup(v(10), &m, 101 * S), Some(2));
        assert_eq!(t.lookup(v(10), &m, 400 * S), Some(2));
        assert_eq!(t.lookup(v(10), &m, 401 * S), None, "aged out");
        assert_eq!(t.expire(401 * S), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn a_port_cannot_fill_the_table_beyond_its_limit() {
        let mut t = MacTable::new(300 * S, 4);
        for i in 0..100u8 {
            let r = t.learn(v(1), [2, 0, 0, 0, 0, i], 7, S);
            assert_eq!(r == Learned::Refused, i >= 4, "{i}");
        }
        assert_eq!(t.len(), 4);
        assert_eq!(
            t.learn(v(1), [2, 0, 0, 0, 1, 0], 8, S),
            Learned::New,
            "other ports still learn"
        );
        // Once its entries age out the port learns again.
        assert_eq!(t.learn(v(1), [2, 0, 0, 0, 2, 0], 7, 400 * S), Learned::New);
        t.flush_port(7);
        assert_eq!(t.rows(400 * S).len(), 0);
    }
}
