//! systemd's software watchdog (`WatchdogSec=` in `vireo@.service`): while the VM is
//! healthy, the control loop sends `WATCHDOG=1` every half of `$WATCHDOG_USEC`
//! (sd_watchdog_enabled's semantics: only if `$WATCHDOG_PID` is unset or this
//! process). systemd kills a VMM that stays silent for the whole interval.
//!
//! No extra thread: the control loop waits for its events with a timeout and asks
//! [`Watchdog::tick`] when a ping is due, so a wedged control loop is silent by
//! construction. The vCPUs are checked too: a vCPU that should run but has not come
//! out of KVM_RUN for a whole period is kicked (the kick signal every vCPU obeys); if
//! it still shows no exit one period later, it is stuck in the VMM (a device
//! model that hangs, a lock) and the ping is withheld. Parked (paused) vCPUs are
//! healthy.

use std::time::{Duration, Instant};

use crate::notify::Notifier;

/// What the watchdog needs to know of one vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuLiveness {
    /// KVM_RUN returns so far (any exit, including a kick).
    pub exits: u64,
    /// It should be in the guest (not parked, not ended).
    pub running: bool,
}

/// One check's outcome.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub healthy: bool,
    /// vCPUs to kick now (no exit during the last period; the kick makes one).
    pub kick: Vec<usize>,
    /// vCPUs that did not exit even after a kick.
    pub wedged: Vec<usize>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    exits: u64,
    kicked: bool,
}

pub struct Watchdog {
    notifier: Notifier,
    period: Duration,
    next: Instant,
    seen: Vec<Seen>,
    /// The last check withheld the ping (logged once per episode).
    withheld: bool,
    sent: u64,
}

/// The ping period for `$WATCHDOG_USEC` and `$WATCHDOG_PID` (None: no watchdog).
pub fn period_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(p) = pid {
        if p.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// The health check, apart from time and sockets.
fn check(seen: &mut Vec<Seen>, vcpus: &[VcpuLiveness]) -> Verdict {
    if seen.len() != vcpus.len() {
        // A new VM (boot, restore, reboot, arrival): start afresh.
        *seen = vcpus
            .iter()
            .map(|v| Seen {
                exits: v.exits,
                kicked: false,
            })
            .collect();
        return Verdict {
            healthy: true,
            ..Default::default()
        };
    }
    let mut v = Verdict {
        healthy: true,
        ..Default::default()
    };
    for (i, (s, now)) in seen.iter_mut().zip(vcpus).enumerate() {
        if !now.running || now.exits != s.exits {
            *s = Seen {
                exits: now.exits,
                kicked: false,
            };
        } else if s.kicked {
            v.healthy = false;
            v.wedged.push(i);
        } else {
            s.kicked = true;
            v.kick.push(i);
        }
    }
    v
}

impl Watchdog {
    /// From the environment systemd gives a unit with `WatchdogSec=`.
    pub fn from_env() -> Option<Self> {
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        let period = period_from(usec.as_deref(), pid.as_deref(), std::process::id())?;
        let notifier = Notifier::from_env()?;
        tracing::info!(period_ms = period.as_millis() as u64, "systemd watchdog on");
        Some(Self::new(notifier, period))
    }

    pub fn new(notifier: Notifier, period: Duration) -> Self {
        Self {
            notifier,
            period,
            next: Instant::now(),
            seen: Vec::new(),
            withheld: false,
            sent: 0,
        }
    }

    /// How long the control loop may wait before the next ping is due.
    pub fn wait(&self, now: Instant) -> Duration {
        self.next.saturating_duration_since(now)
    }

    /// Checks the vCPUs and pings if all is well; returns the vCPUs to kick.
    pub fn tick(&mut self, now: Instant, vcpus: &[VcpuLiveness]) -> Vec<usize> {
        if now < self.next {
            return Vec::new();
        }
        self.next = now + self.period;
        let v = check(&mut self.seen, vcpus);
        if v.healthy {
            if self.notifier.send("WATCHDOG=1") {
                self.sent += 1;
            }
            if std::mem::take(&mut self.withheld) {
                tracing::info!("vCPUs responsive again; watchdog pings resumed");
            }
        } else if !std::mem::replace(&mut self.withheld, true) {
            tracing::warn!(vcpus = ?v.wedged, "vCPU stuck outside the guest; withholding WATCHDOG=1");
        }
        v.kick
    }

    /// Pings sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(exits: u64) -> VcpuLiveness {
        VcpuLiveness {
            exits,
            running: true,
        }
    }

    #[test]
    fn period_is_half_the_interval_and_only_for_this_pid() {
        assert_eq!(
            period_from(Some("10000000"), None, 7),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            period_from(Some("200000"), Some("7"), 7),
            Some(Duration::from_millis(100))
        );
        assert_eq!(period_from(Some("200000"), Some("8"), 7), None);
        assert_eq!(period_from(Some("0"), None, 7), None);
        assert_eq!(period_from(None, None, 7), None);
        assert_eq!(period_from(Some("soon"), None, 7), None);
    }

    #[test]
    fn a_busy_vcpu_is_kicked_and_a_stuck_one_withholds_the_ping() {
        let mut seen = Vec::new();
        // First sight: healthy.
        assert!(check(&mut seen, &[run(5), run(9)]).healthy);
        // vCPU 0 exits, vCPU 1 spins in the guest without exits: kick it.
        let v = check(&mut seen, &[run(6), run(9)]);
        assert_eq!((v.healthy, v.kick.clone()), (true, vec![1]));
        // The kick made it exit: healthy, nothing to kick.
        let v = check(&mut seen, &[run(6), run(10)]);
        assert!(v.healthy);
        assert_eq!(v.kick, vec![0]);
        // vCPU 0 was kicked and still shows no exit: wedged.
        let v = check(&mut seen, &[run(6), run(11)]);
        assert_eq!((v.healthy, v.wedged), (false, vec![0]));
        // Paused vCPUs (not running) are healthy however long they stay.
        let paused = VcpuLiveness {
            exits: 6,
            running: false,
        };
        for _ in 0..3 {
            assert!(check(&mut seen, &[paused, paused]).healthy);
        }
        // A new VM with another vCPU count starts afresh.
        assert!(check(&mut seen, &[run(0)]).healthy);
        assert!(check(&mut seen, &[]).healthy);
    }
}
