//! A team's failover state machine: which members are up, which one is active
//! (active-backup) or primary (hash: it carries broadcast and multicast both ways),
//! which member a frame leaves on, and whether a frame a member received may enter
//! the switch. The I/O layer reports link changes ([`Team::set_link`]) and each frame
//! sent or received; the clock is passed in.
//!
//! What a member may deliver:
//! - active-backup: only the active member (the peer floods to the backups too).
//! - hash: unicast from any up member, but from a member that is not the primary
//!   only to an address the team sent out of *that* member within the aging time
//!   (the peer learnt it there, so it did not flood it); broadcast, multicast and
//!   other unicast only from the primary. A peer that floods delivers each frame to
//!   every member: only one copy enters.
//! - never a frame whose source the team itself sent within [`LOOP_WINDOW`] (out
//!   of any member): a frame of ours the peer flooded back is not switched again.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use super::hash::{flow_hash, pick};
use super::{TeamMode, TeamSpec};
use crate::frame::is_multicast;

/// A frame with a source the team sent within this long is our own, reflected.
pub const LOOP_WINDOW: Duration = Duration::from_secs(2);
/// Source addresses remembered per member (what it sent, for the checks above).
pub const MACS_PER_MEMBER: usize = 4096;

/// One member's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MemberCounters {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Sends the interface refused (down, queue full).
    pub tx_failed: u64,
    /// Frames received and passed to the switch.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Received but not switched: on a backup (active-backup), a flood copy on a
    /// member that is not the primary (hash), or the member is down.
    pub rx_dropped: u64,
    /// Received frames with a source the team had just sent (a reflection).
    pub rx_looped: u64,
    /// Times the link went down.
    pub link_downs: u64,
    /// Times the traffic it carried moved to another member (it failed while active,
    /// or while up in hash mode).
    pub failovers: u64,
    /// Times it became the active (or primary) member after another failed, or
    /// after all were down.
    pub takeovers: u64,
    /// Announces sent out of it.
    pub announces: u64,
    /// Source addresses it sent that could not be remembered (table full).
    pub macs_untracked: u64,
}

/// One member as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus<'a> {
    pub iface: &'a str,
    pub up: bool,
    /// Active (active-backup) or primary (hash).
    pub active: bool,
    pub counters: &'a MemberCounters,
}

/// A team as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TeamStatus<'a> {
    pub mode: TeamMode,
    pub active: Option<&'a str>,
    pub failovers: u64,
    pub members: Vec<MemberStatus<'a>>,
}

#[derive(Debug)]
struct Member {
    iface: String,
    up: bool,
    counters: MemberCounters,
    /// Source address → when the member last sent it.
    sent: HashMap<[u8; 6], Duration>,
}

/// What the switch learnt from a link change: the member the traffic now goes
/// through, out of which the announces go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Takeover {
    pub member: usize,
}

#[derive(Debug)]
pub struct Team {
    mode: TeamMode,
    members: Vec<Member>,
    /// The member carrying traffic (active-backup) or floods (hash); None: all down.
    active: Option<usize>,
    failovers: u64,
    /// How long a sent address counts as known to the peer on its member.
    aging: Duration,
}

impl Team {
    /// A team with every member down: the I/O layer reports each link's state.
    pub fn new(spec: &TeamSpec, aging: Duration) -> Self {
        Self {
            mode: spec.mode,
            members: spec
                .members
                .iter()
                .map(|iface| Member {
                    iface: iface.clone(),
                    up: false,
                    counters: MemberCounters::default(),
                    sent: HashMap::new(),
                })
                .collect(),
            active: None,
            failovers: 0,
            aging,
        }
    }

    pub fn mode(&self) -> TeamMode {
        self.mode
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn active(&self) -> Option<usize> {
        self.active
    }

    pub fn is_up(&self, member: usize) -> bool {
        self.members.get(member).is_some_and(|m| m.up)
    }

    pub fn iface(&self, member: usize) -> Option<&str> {
        self.members.get(member).map(|m| m.iface.as_str())
    }

    pub fn counters(&self, member: usize) -> Option<&MemberCounters> {
        self.members.get(member).map(|m| &m.counters)
    }

    fn up_members(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|i| self.members[*i].up)
            .collect()
    }

    /// The first up member after `after` (cyclic, in configuration order).
    fn next_up(&self, after: usize) -> Option<usize> {
        let n = self.members.len();
        (1..=n)
            .map(|k| (after + k) % n)
            .find(|i| self.members[*i].up)
    }

    /// Records member `member`'s link state. Returns the member that took the
    /// traffic over, if the active (or primary) one changed to another up member or
    /// a member came up with all others down: the caller sends the announces out of
    /// it. A member coming back while another is active rejoins as a backup (no
    /// preemption: the traffic does not move twice).
    pub fn set_link(&mut self, member: usize, up: bool) -> Option<Takeover> {
        let m = self.members.get_mut(member)?;
        if m.up == up {
            return None;
        }
        m.up = up;
        if !up {
            m.counters.link_downs += 1;
            if self.active == Some(member) {
                m.counters.failovers += 1;
                self.failovers += 1;
                self.active = self.next_up(member);
                return self.active.map(|next| {
                    self.members[next].counters.takeovers += 1;
                    Takeover { member: next }
                });
            }
            if self.mode == TeamMode::Hash {
                // Its flows move to the others; the primary stays. Announce on it so
                // the peer relearns the addresses that member carried.
                m.counters.failovers += 1;
                self.failovers += 1;
                return self.active.map(|member| Takeover { member });
            }
            return None;
        }
        if self.active.is_none() {
            self.active = Some(member);
            self.members[member].counters.takeovers += 1;
            return Some(Takeover { member });
        }
        None
    }

    /// The member `frame` leaves on: the active one (active-backup); in hash mode
    /// the primary for broadcast and multicast, else the flow's member among the up
    /// ones. None: no member is up.
    pub fn tx_member(&self, frame: &[u8]) -> Option<usize> {
        let dst_multicast = frame.first().is_none_or(|b| b & 1 == 1);
        match self.mode {
            TeamMode::ActiveBackup => self.active,
            TeamMode::Hash if dst_multicast => self.active,
            TeamMode::Hash => pick(flow_hash(frame), &self.up_members()),
        }
    }

    /// Counts a frame sent (or refused) on `member` and remembers its source.
    pub fn record_tx(&mut self, member: usize, frame: &[u8], sent: bool, now: Duration) {
        let aging = self.aging;
        let Some(m) = self.members.get_mut(member) else {
            return;
        };
        if !sent {
            m.counters.tx_failed += 1;
            return;
        }
        m.counters.tx_packets += 1;
        m.counters.tx_bytes += frame.len() as u64;
        let Some(src) = frame.get(6..12).and_then(|s| <[u8; 6]>::try_from(s).ok()) else {
            return;
        };
        if m.sent.len() >= MACS_PER_MEMBER && !m.sent.contains_key(&src) {
            m.sent.retain(|_, t| now.saturating_sub(*t) < aging);
            if m.sent.len() >= MACS_PER_MEMBER {
                m.counters.macs_untracked += 1;
                return;
            }
        }
        m.sent.insert(src, now);
    }

    /// Counts an announce sent out of `member`.
    pub fn record_announce(&mut self, member: usize, frame: &[u8], sent: bool, now: Duration) {
        if sent {
            if let Some(m) = self.members.get_mut(member) {
                m.counters.announces += 1;
            }
        }
        self.record_tx(member, frame, sent, now);
    }

    /// Whether `frame`, received on `member`, enters the switch (counted either way).
    pub fn accept_rx(&mut self, member: usize, frame: &[u8], now: Duration) -> bool {
        let Some(m) = self.members.get(member) else {
            return false;
        };
        let primary = self.active == Some(member);
        let (Some(dst), Some(src)) = (
            frame.get(0..6).and_then(|s| <[u8; 6]>::try_from(s).ok()),
            frame.get(6..12).and_then(|s| <[u8; 6]>::try_from(s).ok()),
        ) else {
            // Too short for the switch anyway: from the active member it enters (and
            // is counted there as malformed).
            let ok = m.up && primary;
            let c = &mut self.members[member].counters;
            if ok {
                c.rx_packets += 1;
                c.rx_bytes += frame.len() as u64;
            } else {
                c.rx_dropped += 1;
            }
            return ok;
        };
        let looped = self.members.iter().any(|o| {
            o.sent
                .get(&src)
                .is_some_and(|t| now.saturating_sub(*t) < LOOP_WINDOW)
        });
        let ok = m.up
            && match self.mode {
                TeamMode::ActiveBackup => primary,
                TeamMode::Hash => {
                    primary
                        || (!is_multicast(&dst)
                            && m.sent
                                .get(&dst)
                                .is_some_and(|t| now.saturating_sub(*t) < self.aging))
                }
            };
        let m = &mut self.members[member].counters;
        if looped {
            m.rx_looped += 1;
            return false;
        }
        if !ok {
            m.rx_dropped += 1;
            return false;
        }
        m.rx_packets += 1;
        m.rx_bytes += frame.len() as u64;
        true
    }

    pub fn status(&self) -> TeamStatus<'_> {
        TeamStatus {
            mode: self.mode,
            active: self.active.map(|i| self.members[i].iface.as_str()),
            failovers: self.failovers,
            members: self
                .members
                .iter()
                .enumerate()
                .map(|(i, m)| MemberStatus {
                    iface: &m.iface,
                    up: m.up,
                    active: self.active == Some(i),
                    counters: &m.counters,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::build;

    const VM: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const PEER: [u8; 6] = [0x52, 0x54, 0, 0, 0, 9];
    const T: Duration = Duration::from_secs(300);

    fn team(mode: TeamMode, n: usize) -> Team {
        let spec = TeamSpec {
            members: (0..n).map(|i| format!("m{i}")).collect(),
            mode,
        };
        Team::new(&spec, T)
    }

    fn unicast(dst: [u8; 6], src: [u8; 6], sport: u16) -> Vec<u8> {
        build::udp4_frame(
            dst,
            src,
            None,
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            sport,
            9,
            b"x",
        )
    }

    #[test]
    fn active_backup_fails_over_in_order_announces_and_a_returning_member_rejoins_as_backup() {
        let mut t = team(TeamMode::ActiveBackup, 3);
        let now = Duration::ZERO;
        assert_eq!(t.tx_member(&unicast(PEER, VM, 1)), None);
        // The first link seen up becomes active (announce there).
        assert_eq!(t.set_link(1, true), Some(Takeover { member: 1 }));
        assert_eq!(t.set_link(0, true), None);
        assert_eq!(t.set_link(2, true), None);
        assert_eq!(t.set_link(2, true), None, "no change, nothing to do");
        assert_eq!(t.active(), Some(1));
        for sport in 0..20 {
            assert_eq!(t.tx_member(&unicast(PEER, VM, sport)), Some(1));
        }
        assert_eq!(t.tx_member(&[0xff; 60]), Some(1));
        // Only the active member delivers; a backup's copy is dropped and counted.
        let from_peer = unicast(VM, PEER, 7);
        assert!(t.accept_rx(1, &from_peer, now));
        assert!(!t.accept_rx(0, &from_peer, now));
        assert!(!t.accept_rx(2, &from_peer, now));
        // The active fails: the next up member after it takes over.
        assert_eq!(t.set_link(1, false), Some(Takeover { member: 2 }));
        assert_eq!(t.tx_member(&unicast(PEER, VM, 1)), Some(2));
        assert!(t.accept_rx(2, &from_peer, now));
        assert!(!t.accept_rx(1, &from_peer, now));
        // A backup failing moves nothing.
        assert_eq!(t.set_link(0, false), None);
        // Member 1 returns: a backup; no preemption.
        assert_eq!(t.set_link(1, true), None);
        assert_eq!(t.active(), Some(2));
        // All down, then one back: it takes over.
        assert_eq!(t.set_link(2, false), Some(Takeover { member: 1 }));
        assert_eq!(t.set_link(1, false), None);
        assert_eq!(t.active(), None);
        assert_eq!(t.tx_member(&unicast(PEER, VM, 1)), None);
        assert!(!t.accept_rx(1, &from_peer, now));
        assert_eq!(t.set_link(0, true), Some(Takeover { member: 0 }));
        let s = t.status();
        assert_eq!(s.failovers, 3);
        assert_eq!(s.active, Some("m0"));
        let c = |i| t.counters(i).unwrap().clone();
        assert_eq!((c(1).failovers, c(1).link_downs, c(1).takeovers), (2, 2, 2));
        assert_eq!((c(2).failovers, c(2).takeovers), (1, 1));
        assert_eq!((c(0).failovers, c(0).link_downs, c(0).takeovers), (0, 1, 1));
        assert_eq!((c(1).rx_packets, c(1).rx_dropped), (1, 2));
        assert_eq!((c(0).rx_dropped, c(2).rx_packets), (1, 1));
    }

    #[test]
    fn hash_mode_keeps_each_flow_on_one_member_and_moves_only_a_failed_members_flows() {
        let mut t = team(TeamMode::Hash, 2);
        t.set_link(0, true);
        t.set_link(1, true);
        let flows: Vec<Vec<u8>> = (0..32).map(|p| unicast(PEER, VM, 2000 + p)).collect();
        let before: Vec<usize> = flows.iter().map(|f| t.tx_member(f).unwrap()).collect();
        assert!(before.contains(&0) && before.contains(&1), "{before:?}");
        // Stable: asked again, the same answer.
        for (f, m) in flows.iter().zip(&before) {
            assert_eq!(t.tx_member(f), Some(*m));
        }
        // Broadcast and multicast leave on the primary only.
        assert_eq!(t.tx_member(&[0xff; 60]), Some(0));
        let mut mc = [0u8; 60];
        mc[0] = 0x01;
        assert_eq!(t.tx_member(&mc), Some(0));
        // Member 1 fails: its flows move to 0, the primary stays (announce on it).
        assert_eq!(t.set_link(1, false), Some(Takeover { member: 0 }));
        assert!(flows.iter().all(|f| t.tx_member(f) == Some(0)));
        // It comes back: the flows hash as before.
        assert_eq!(t.set_link(1, true), None);
        let after: Vec<usize> = flows.iter().map(|f| t.tx_member(f).unwrap()).collect();
        assert_eq!(before, after);
        // The primary fails: member 1 becomes primary for floods.
        assert_eq!(t.set_link(0, false), Some(Takeover { member: 1 }));
        assert_eq!(t.tx_member(&[0xff; 60]), Some(1));
        assert_eq!(t.counters(0).unwrap().failovers, 1);
        assert_eq!(t.counters(1).unwrap().failovers, 1);
    }

    #[test]
    fn hash_mode_takes_one_copy_of_a_flood_and_never_its_own_frames_back() {
        let mut t = team(TeamMode::Hash, 2);
        t.set_link(0, true);
        t.set_link(1, true);
        let mut now = Duration::from_secs(10);
        // A broadcast from the peer arrives on both members: one copy enters.
        let bcast = build::ethernet([0xff; 6], PEER, None, 0x88b5, b"flood");
        assert!(t.accept_rx(0, &bcast, now));
        assert!(!t.accept_rx(1, &bcast, now));
        // Unicast to an address the team never sent: from the primary only (a flood
        // of the peer's arrives on both).
        let to_vm = unicast(VM, PEER, 5);
        assert!(t.accept_rx(0, &to_vm, now));
        assert!(!t.accept_rx(1, &to_vm, now));
        // Once the VM sent out of member 1, the peer sends to it there: accepted.
        let from_vm = unicast(PEER, VM, 5);
        t.record_tx(1, &from_vm, true, now);
        now += LOOP_WINDOW;
        assert!(t.accept_rx(1, &to_vm, now));
        // Our own frame reflected back by the peer (its source is ours, just sent):
        // never switched again, on any member.
        t.record_tx(0, &bcast_from(VM), true, now);
        assert!(!t.accept_rx(1, &bcast_from(VM), now));
        assert!(!t.accept_rx(0, &bcast_from(VM), now));
        assert_eq!(t.counters(1).unwrap().rx_looped, 1);
        assert_eq!(t.counters(0).unwrap().rx_looped, 1);
        // After the loop window the address may come from outside (a moved VM).
        now += LOOP_WINDOW;
        assert!(t.accept_rx(0, &bcast_from(VM), now));
        // After the aging time, member 1 no longer counts as known to the peer.
        now += T;
        assert!(!t.accept_rx(1, &to_vm, now));
        let c1 = t.counters(1).unwrap();
        assert_eq!((c1.rx_packets, c1.rx_dropped, c1.tx_packets), (1, 3, 1));
    }

    /// The fuzz target's invariants (fuzz/fuzz_targets/switch_team.rs) over
    /// pseudo-random operations (a fixed LCG: the same sequences every run).
    #[test]
    fn random_link_changes_and_frames_keep_the_invariants() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let macs = [
            VM,
            PEER,
            [0xff; 6],
            [0x01, 0, 0x5e, 0, 0, 1],
            [0x52, 0x54, 0, 0, 0, 3],
        ];
        for run in 0..400 {
            let mode = if run % 2 == 0 {
                TeamMode::ActiveBackup
            } else {
                TeamMode::Hash
            };
            let n = 1 + next(4) as usize;
            let mut t = team(mode, n);
            let mut up = vec![false; n];
            let mut received = vec![0u64; n];
            let mut now = Duration::ZERO;
            for _ in 0..200 {
                match next(4) {
                    0 => {
                        let m = next(n as u64) as usize;
                        let state = next(2) == 1;
                        let takeover = t.set_link(m, state);
                        up[m] = state;
                        if let Some(tk) = takeover {
                            assert!(up[tk.member]);
                        }
                    }
                    1 => {
                        let dst = macs[next(5) as usize];
                        let src = macs[next(2) as usize * 4];
                        let f = unicast(dst, src, next(64) as u16);
                        match t.tx_member(&f) {
                            None => assert!(up.iter().all(|u| !u)),
                            Some(m) => {
                                assert!(up[m]);
                                assert_eq!(t.tx_member(&f), Some(m));
                                if mode == TeamMode::ActiveBackup || dst[0] & 1 == 1 {
                                    assert_eq!(Some(m), t.active());
                                }
                                t.record_tx(m, &f, next(8) != 0, now);
                            }
                        }
                    }
                    2 => {
                        let m = next(n as u64) as usize;
                        let f = unicast(macs[next(5) as usize], macs[next(2) as usize], 1);
                        let f = &f[..next(f.len() as u64 + 1) as usize];
                        received[m] += 1;
                        if t.accept_rx(m, f, now) {
                            assert!(up[m]);
                            if mode == TeamMode::ActiveBackup
                                || f.first().is_none_or(|b| b & 1 == 1)
                            {
                                assert_eq!(Some(m), t.active());
                            }
                        }
                    }
                    _ => now += Duration::from_millis(next(3000)),
                }
                assert_eq!(t.active().is_none(), up.iter().all(|u| !u));
                if let Some(a) = t.active() {
                    assert!(up[a]);
                }
            }
            for (m, r) in received.iter().enumerate() {
                let c = t.counters(m).unwrap();
                assert_eq!(c.rx_packets + c.rx_dropped + c.rx_looped, *r);
            }
        }
    }

    fn bcast_from(src: [u8; 6]) -> Vec<u8> {
        build::ethernet([0xff; 6], src, None, 0x88b5, b"ours")
    }

    #[test]
    fn the_remembered_sources_are_bounded() {
        let mut t = team(TeamMode::Hash, 1);
        t.set_link(0, true);
        let now = Duration::from_secs(1);
        for i in 0..(MACS_PER_MEMBER as u32 + 10) {
            let b = i.to_be_bytes();
            let src = [0x52, 0x54, b[0], b[1], b[2], b[3]];
            t.record_tx(0, &unicast(PEER, src, 1), true, now);
        }
        assert_eq!(t.counters(0).unwrap().macs_untracked, 10);
        // Once they aged, new ones fit again.
        t.record_tx(0, &unicast(PEER, [2; 6], 1), true, now + T);
        assert_eq!(t.counters(0).unwrap().macs_untracked, 10);
        assert_eq!(
            t.counters(0).unwrap().tx_packets,
            MACS_PER_MEMBER as u64 + 11
        );
    }
}
