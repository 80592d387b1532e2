//! The one place that decides VM lifecycle transitions.
//!
//! ```text
//! Created --boot--> Running --pause--> Paused --resume--> Running
//! Running|Paused --shutdown--> Shutdown        Running|Paused --reboot--> Running
//! Running --power-button--> Running (the guest decides; paused guests cannot see it)
//! ```

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Paused,
    Shutdown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Boot,
    Pause,
    Resume,
    Shutdown,
    Reboot,
    PowerButton,
    /// Not a transition: allowed only while Paused (checked by the VMM).
    Snapshot,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot {action:?} a VM that is {from:?}")]
pub struct InvalidTransition {
    pub from: VmState,
    pub action: Action,
}

impl VmState {
    /// The state after `action`, or why it is not allowed now.
    pub fn next(self, action: Action) -> Result<VmState, InvalidTransition> {
        use VmState::{Created, Paused, Running};
        let to = match (self, action) {
            (Created, Action::Boot) => Running,
            (Running, Action::Pause) => Paused,
            (Paused, Action::Resume) => Running,
            (Running | Paused, Action::Shutdown) => VmState::Shutdown,
            (Running | Paused, Action::Reboot) => Running,
            (Running, Action::PowerButton) => Running,
            (from, action) => return Err(InvalidTransition { from, action }),
        };
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::Action::{Boot, Pause, PowerButton, Reboot, Resume};
    use super::VmState::{Created, Paused, Running};
    use super::*;

    #[test]
    fn every_transition_is_explicit() {
        let all_states = [Created, Running, Paused, VmState::Shutdown];
        let all_actions = [Boot, Pause, Resume, Action::Shutdown, Reboot, PowerButton];
        let allowed = [
            (Created, Boot, Running),
            (Running, Pause, Paused),
            (Paused, Resume, Running),
            (Running, Action::Shutdown, VmState::Shutdown),
            (Paused, Action::Shutdown, VmState::Shutdown),
            (Running, Reboot, Running),
            (Paused, Reboot, Running),
            (Running, PowerButton, Running),
        ];
        for s in all_states {
            for a in all_actions {
                let expected = allowed
                    .iter()
                    .find(|(f, x, _)| *f == s && *x == a)
                    .map(|(_, _, t)| *t);
                match expected {
                    Some(t) => assert_eq!(s.next(a), Ok(t), "{s:?} {a:?}"),
                    None => assert_eq!(s.next(a), Err(InvalidTransition { from: s, action: a })),
                }
            }
        }
    }
}
