//! vireo-switch's teaming: the port spec parser with team options, then a team's
//! failover state machine driven by the input. Records: a port spec (text, parsed as
//! a `--port`/`port-add` spec: any team it accepts has 1-8 distinct valid members and
//! a known mode), then operations on a 3-member team in the mode the input picks:
//! a link change, a frame to send, a frame received on a member, a clock step.
//! Checks what must hold for any input: exactly when every member is down there is
//! no active member and nothing is sent; a frame leaves on an up member only (the
//! active one in active-backup, and for broadcast/multicast in either mode), and the
//! same frame asked twice leaves on the same member; a received frame enters only
//! from an up member (only the active one in active-backup, and only the active one
//! for broadcast/multicast in hash mode); every received frame is counted exactly
//! once (passed, dropped or looped); a takeover names an up member.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use switch::port::PortConfig;
use switch::team::state::Team;
use switch::team::{TeamMode, TeamSpec, MAX_MEMBERS};
use vireo_fuzz::Input;

const MEMBERS: usize = 3;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let n = usize::from(inp.u8() % 96);
    let spec = String::from_utf8_lossy(inp.bytes(n)).into_owned();
    if let Ok(p) = spec.parse::<PortConfig>() {
        if let Some(t) = &p.team {
            assert!((1..=MAX_MEMBERS).contains(&t.members.len()), "{spec}");
            for (i, m) in t.members.iter().enumerate() {
                assert!(!m.is_empty() && m.len() < 16, "{spec}");
                assert!(!t.members[..i].contains(m), "{spec}");
            }
            assert!(p.iface.is_none() && p.vhost_user.is_none(), "{spec}");
            assert_eq!(p.interfaces().len(), t.members.len());
        }
    }

    let mode = if inp.u8() & 1 == 0 {
        TeamMode::ActiveBackup
    } else {
        TeamMode::Hash
    };
    let spec = TeamSpec {
        members: (0..MEMBERS).map(|i| format!("m{i}")).collect(),
        mode,
    };
    let aging = Duration::from_secs(5);
    let mut team = Team::new(&spec, aging);
    let mut up = [false; MEMBERS];
    let mut now = Duration::ZERO;
    let mut received = [0u64; MEMBERS];
    while !inp.is_empty() {
        let op = inp.u8();
        match op % 4 {
            0 => {
                let m = usize::from(inp.u8()) % MEMBERS;
                let state = inp.u8() & 1 == 1;
                let takeover = team.set_link(m, state);
                up[m] = state;
                if let Some(t) = takeover {
                    assert!(up[t.member], "takeover by a member that is down");
                }
            }
            1 => {
                let len = usize::from(inp.u8());
                let frame = inp.bytes(len).to_vec();
                let member = team.tx_member(&frame);
                assert_eq!(member, team.tx_member(&frame), "one frame, two members");
                match member {
                    None => assert!(up.iter().all(|u| !u), "nothing sent with {up:?}"),
                    Some(m) => {
                        assert!(up[m], "sent on a member that is down");
                        let flood = frame.first().is_none_or(|b| b & 1 == 1);
                        if mode == TeamMode::ActiveBackup || flood {
                            assert_eq!(Some(m), team.active());
                        }
                        team.record_tx(m, &frame, op & 0x80 == 0, now);
                    }
                }
            }
            2 => {
                let m = usize::from(inp.u8()) % MEMBERS;
                let len = usize::from(inp.u8());
                let frame = inp.bytes(len).to_vec();
                received[m] += 1;
                if team.accept_rx(m, &frame, now) {
                    assert!(up[m], "a frame entered from a member that is down");
                    let flood = frame.first().is_none_or(|b| b & 1 == 1);
                    if mode == TeamMode::ActiveBackup || flood {
                        assert_eq!(Some(m), team.active());
                    }
                }
            }
            _ => now += Duration::from_millis(u64::from(inp.u16())),
        }
        assert_eq!(team.active().is_none(), up.iter().all(|u| !u), "{up:?}");
        if let Some(a) = team.active() {
            assert!(up[a]);
        }
    }
    for (m, n) in received.iter().enumerate() {
        let c = team.counters(m).expect("member");
        assert_eq!(c.rx_packets + c.rx_dropped + c.rx_looped, *n, "member {m}");
    }
});
