//! The TCP ports receiving VMMs listen on for migrations from peer hosts
//! (`vireod --migration-ports FIRST-LAST`), so that a firewall can admit exactly that
//! range (as Hyper-V's fixed migration port or libvirt's `migration_port_min/max`).
//!
//! An incoming migration leases the first port of the range that no migration of this
//! vireod holds and that can be bound right now (a port another process uses is
//! skipped). The lease keeps the bound socket, which becomes the migration gateway's
//! listener: no other process can take the port between the choice and the listen.
//! The lease ends — the port is free again — when it is dropped, which the
//! incoming migration does when it ends, however it ends. An exhausted range is an
//! error that refuses the migration before anything is started.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use tracing::{debug, info};

/// `FIRST-LAST`, both included, 1 ≤ FIRST ≤ LAST ≤ 65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected FIRST-LAST, two ports 1..=65535, FIRST <= LAST");
        let (first, last) = s.split_once('-').ok_or_else(bad)?;
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|&p| p != 0);
        match (port(first), port(last)) {
            (Some(first), Some(last)) if first <= last => Ok(Self { first, last }),
            _ => Err(bad()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "no free migration port in {range} on {ip}: {leased} held by migrations of this \
     vireod, {busy} in use by other processes (--migration-ports)"
)]
pub struct PortsExhausted {
    pub range: PortRange,
    pub ip: IpAddr,
    pub leased: usize,
    pub busy: usize,
}

/// The range and the ports of it that migrations hold.
#[derive(Clone, Debug)]
pub struct PortPool {
    range: PortRange,
    leased: Arc<Mutex<BTreeSet<u16>>>,
}

/// A port held for one incoming migration; free again when dropped.
#[derive(Debug)]
pub struct PortLease {
    addr: SocketAddr,
    /// The port, bound when it was chosen (until taken for the gateway).
    listener: Option<TcpListener>,
    leased: Arc<Mutex<BTreeSet<u16>>>,
}

impl PortLease {
    /// The address the migration is received on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The socket bound to [`Self::addr`] when the port was chosen (once; None after).
    pub fn take_listener(&mut self) -> Option<TcpListener> {
        self.listener.take()
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        let mut leased = vireo_util::sync::lock(&self.leased);
        leased.remove(&self.addr.port());
        info!(port = self.addr.port(), "migration port freed");
    }
}

impl PortPool {
    pub fn new(range: PortRange) -> Self {
        Self {
            range,
            leased: Arc::new(Mutex::new(BTreeSet::new())),
        }
    }

    pub fn range(&self) -> PortRange {
        self.range
    }

    /// The first port of the range on `ip` that no lease holds and that can be bound
    /// now, bound (see [`PortLease::take_listener`]).
    pub fn lease(&self, ip: IpAddr) -> Result<PortLease, PortsExhausted> {
        let mut leased = vireo_util::sync::lock(&self.leased);
        let mut busy = 0;
        for port in self.range.first..=self.range.last {
            if leased.contains(&port) {
                continue;
            }
            let addr = SocketAddr::new(ip, port);
            match TcpListener::bind(addr) {
                Ok(listener) => {
                    leased.insert(port);
                    info!(port, "migration port leased");
                    return Ok(PortLease {
                        addr,
                        listener: Some(listener),
                        leased: self.leased.clone(),
                    });
                }
                Err(e) => {
                    debug!(port, error = %e, "migration port skipped: cannot bind it");
                    busy += 1;
                }
            }
        }
        Err(PortsExhausted {
            range: self.range,
            ip,
            leased: leased.len(),
            busy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_from_first_dash_last_only() {
        assert_eq!(
            "20000-20010".parse::<PortRange>().unwrap(),
            PortRange {
                first: 20000,
                last: 20010
            }
        );
        assert_eq!(
            "7000-7000".parse::<PortRange>().unwrap().to_string(),
            "7000-7000"
        );
        for bad in ["", "20000", "5-3", "0-10", "1-65536", "a-b", "-5", "10-"] {
            let e = bad.parse::<PortRange>().unwrap_err();
            assert!(e.contains("expected FIRST-LAST"), "{bad}: {e}");
        }
    }

    /// Two consecutive ports that can be bound on 127.0.0.1 now, below the usual
    /// ephemeral range (so that other tests' port-0 binds do not take them).
    fn two_free_ports() -> u16 {
        let base = 21000 + (std::process::id() % 4000) as u16 * 2;
        (0..2000u16)
            .map(|i| base.wrapping_add(i * 2))
            .find(|&p| {
                (1024..32000).contains(&p)
                    && TcpListener::bind(("127.0.0.1", p)).is_ok()
                    && TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
            })
            .expect("two free ports")
    }

    #[test]
    fn a_port_in_use_is_skipped_leases_exhaust_the_range_and_a_dropped_lease_frees_its_port() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let p = two_free_ports();
        let pool = PortPool::new(PortRange {
            first: p,
            last: p + 1,
        });
        let other = TcpListener::bind((ip, p)).unwrap();
        let first = pool.lease(ip).unwrap();
        assert_eq!(first.addr().port(), p + 1, "the port in use is skipped");
        let e = pool.lease(ip).unwrap_err();
        assert_eq!((e.leased, e.busy), (1, 1), "{e}");
        assert!(e.to_string().contains(&format!("{p}-{}", p + 1)), "{e}");
        drop(first);
        assert_eq!(pool.lease(ip).unwrap().addr().port(), p + 1);
        drop(other);
        let a = pool.lease(ip).unwrap();
        let b = pool.lease(ip).unwrap();
        assert_eq!((a.addr().port(), b.addr().port()), (p, p + 1));
    }

    /// Between the choice of a port and the gateway's listen, no other process can
    /// take it: the lease holds it bound, and hands that socket over.
    #[test]
    fn a_leased_port_stays_bound_until_its_listener_is_taken_and_dropped() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let p = two_free_ports();
        let pool = PortPool::new(PortRange { first: p, last: p });
        let mut lease = pool.lease(ip).unwrap();
        assert!(
            TcpListener::bind((ip, p)).is_err(),
            "a leased port is bound"
        );
        let listener = lease.take_listener().expect("the bound socket");
        assert_eq!(listener.local_addr().unwrap().port(), p);
        assert!(lease.take_listener().is_none(), "handed over once");
        // A peer can connect to it at once (the gateway accepts later).
        std::net::TcpStream::connect((ip, p)).unwrap();
        drop(listener);
        drop(lease);
        assert!(TcpListener::bind((ip, p)).is_ok(), "free again");
    }
}
