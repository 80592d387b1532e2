//! Port mirroring, an extension: a port's frames copied, untouched, to a monitor port.
//!
//! `out` mirrors what the switch accepts from the port (out of the VM) as it arrived
//! (tag and all), once every ingress drop could have happened: filters, storm limit,
//! a unicast with nowhere to go. `in` mirrors each frame the switch sends to the port
//! (into the VM) as it is sent (tagged or untagged for that port), after the port's
//! egress filters. A dropped frame is not mirrored. The monitor gets the copies
//! whatever VLANs it carries, no filter runs on them, and they are not mirrored
//! again. A port mirrors to one monitor; a monitor may serve many ports; a port may
//! not mirror to itself.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::extension::{Direction, Extension, FrameCtx, Stage};
use crate::PortId;

/// Which of a port's frames are copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MirrorDirection {
    /// Frames sent to the port (into the VM).
    In,
    /// Frames received from the port (out of the VM).
    Out,
    #[default]
    Both,
}

impl MirrorDirection {
    fn covers(self, d: Direction) -> bool {
        matches!(
            (self, d),
            (MirrorDirection::Both, _)
                | (MirrorDirection::In, Direction::Inbound)
                | (MirrorDirection::Out, Direction::Outbound)
        )
    }
}

impl FromStr for MirrorDirection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "in" => Ok(Self::In),
            "out" => Ok(Self::Out),
            "both" => Ok(Self::Both),
            _ => Err(s.to_string()),
        }
    }
}

impl fmt::Display for MirrorDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::In => "in",
            Self::Out => "out",
            Self::Both => "both",
        })
    }
}

/// A port's mirror, by the monitor's name (as configured and shown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorSpec {
    pub to: String,
    #[serde(default)]
    pub direction: MirrorDirection,
}

/// The mirroring extension: source port → (monitor port, direction).
#[derive(Debug, Default)]
pub struct Mirror {
    sessions: HashMap<PortId, (PortId, MirrorDirection)>,
}

impl Mirror {
    /// Mirrors `port` to `monitor` (replacing any mirror it had). The switch checks
    /// that both exist and differ.
    pub fn set(&mut self, port: PortId, monitor: PortId, direction: MirrorDirection) {
        self.sessions.insert(port, (monitor, direction));
    }

    /// Stops mirroring `port`; whether it was mirrored.
    pub fn clear(&mut self, port: PortId) -> bool {
        self.sessions.remove(&port).is_some()
    }

    /// The ports mirrored to `monitor`.
    pub fn sources_of(&self, monitor: PortId) -> Vec<PortId> {
        let mut v: Vec<PortId> = self
            .sessions
            .iter()
            .filter(|(_, (m, _))| *m == monitor)
            .map(|(p, _)| *p)
            .collect();
        v.sort_unstable();
        v
    }
}

impl Extension for Mirror {
    fn name(&self) -> &str {
        "mirror"
    }
    fn stage(&self) -> Stage {
        Stage::Capture
    }
    fn mirror(&mut self, ctx: &FrameCtx<'_>, to: &mut Vec<PortId>) {
        if self.sessions.is_empty() {
            return;
        }
        if let Some((monitor, dir)) = self.sessions.get(&ctx.port) {
            if dir.covers(ctx.direction) {
                to.push(*monitor);
            }
        }
    }
    fn port_removed(&mut self, port: PortId, _name: &str) {
        self.sessions.remove(&port);
        self.sessions.retain(|_, (m, _)| *m != port);
    }
    fn status(&self) -> serde_json::Value {
        serde_json::json!({ "sessions": self.sessions.len() })
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
