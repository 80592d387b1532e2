//! The extension chain, after Hyper-V's extensible switch: every frame passes the
//! extensions in stage order — **capture** (observe only), **filter** (pass or drop),
//! **forward** (change the set of ports a frame goes to) — and, within a stage, in the
//! order they were added. ACLs and guards are extensions themselves.
//!
//! The switch calls, for each frame:
//! 1. [`Extension::ingress`] once, after VLAN classification, with `ctx.port` the port
//!    it came in on (direction [`Direction::Outbound`]: out of the VM). A filter's
//!    `Drop` ends the frame there; a capture's verdict is ignored.
//! 2. [`Extension::forward`] with the ports the L2 table chose (already cut down by
//!    VLAN and private-VLAN rules); an extension may remove ports or add ports that
//!    carry the frame's VLAN (others are removed again by the switch).
//! 3. [`Extension::egress`] per remaining port, `ctx.port` now the port it leaves by
//!    (direction [`Direction::Inbound`]: into the VM); `Drop` removes that port only.
//! 4. [`Extension::mirror`] for a frame the switch accepted from a port (after every
//!    ingress drop could happen; direction outbound) and for each copy it sends to a
//!    port (direction inbound): the ports named get the bytes untouched (as received,
//!    or as sent), whatever their VLAN ([`crate::mirror`]).
//!
//! [`Extension::expire`] is called now and then with the switch's clock, for state
//! that ages (connection tracking).
//!
//! Extensions get the parsed frame, never a way to write it: frames are not rewritten
//! in the chain (the switch itself adds or strips 802.1Q tags at egress).

use std::any::Any;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::frame::Frame;
use crate::port::{PortConfig, VlanId};
use crate::PortId;

/// The stages, in the order the chain runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Capture,
    Filter,
    Forward,
}

/// A frame's direction relative to a port (Hyper-V's terms): **outbound** leaves the
/// VM (enters the switch through the port), **inbound** goes to the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

/// Why a frame was dropped: a short stable name, the key of the drop counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DropReason(pub &'static str);

impl DropReason {
    pub const MALFORMED: DropReason = DropReason("malformed");
    pub const OVERSIZE: DropReason = DropReason("oversize");
    pub const TAGGED_ON_ACCESS: DropReason = DropReason("tagged-on-access");
    pub const VLAN_NOT_ALLOWED: DropReason = DropReason("vlan-not-allowed");
    pub const UNTAGGED_ON_TRUNK: DropReason = DropReason("untagged-on-trunk");
    pub const NO_EGRESS: DropReason = DropReason("no-egress");
    pub const TX_FAILED: DropReason = DropReason("tx-failed");
    /// A vhost-user port's guest posted a transmit chain that is not a frame
    /// (device-writable, out of guest memory, a loop, too short or too long).
    pub const BAD_DESCRIPTOR: DropReason = DropReason("bad-descriptor");
    /// A vhost-user port's guest had no receive buffer (or none big enough).
    pub const NO_RX_BUFFER: DropReason = DropReason("no-rx-buffer");
    /// A vhost-user port with no VM connected, or with its receive backlog full.
    pub const PORT_DOWN: DropReason = DropReason("port-down");
}

/// A filter's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop(DropReason),
}

/// What an extension sees of one frame.
#[derive(Debug, Clone, Copy)]
pub struct FrameCtx<'a> {
    pub frame: &'a Frame<'a>,
    /// The VLAN the frame was classified into.
    pub vlan: VlanId,
    /// The port this call is about (ingress port, or the egress port in `egress`).
    pub port: PortId,
    pub port_config: &'a PortConfig,
    pub direction: Direction,
    /// The port the frame came in on.
    pub ingress: PortId,
    /// The switch's clock, as passed to [`crate::Switch::process`].
    pub now: Duration,
}

/// A stage of the switch's pipeline. Implementations must not panic on any frame.
pub trait Extension: Send {
    /// Shown in the API and logs.
    fn name(&self) -> &str;
    fn stage(&self) -> Stage;
    /// A frame entering the switch from `ctx.port`.
    fn ingress(&mut self, _ctx: &FrameCtx<'_>) -> Verdict {
        Verdict::Pass
    }
    /// The ports a frame is about to go to (forward-stage extensions).
    fn forward(&mut self, _ctx: &FrameCtx<'_>, _egress: &mut Vec<PortId>) {}
    /// A frame leaving the switch by `ctx.port`.
    fn egress(&mut self, _ctx: &FrameCtx<'_>) -> Verdict {
        Verdict::Pass
    }
    /// A frame accepted from `ctx.port` (outbound) or sent to it (inbound): the ports
    /// to add to `to` get an untouched copy of it.
    fn mirror(&mut self, _ctx: &FrameCtx<'_>, _to: &mut Vec<PortId>) {}
    /// Drops state older than the extension keeps it, at `now`.
    fn expire(&mut self, _now: Duration) {}
    /// A port was removed: forget its state.
    fn port_removed(&mut self, _port: PortId, _name: &str) {}
    /// Its state for the API (`extensions` request).
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// For typed access through [`crate::Switch::extension_mut`].
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// The ordered chain.
#[derive(Default)]
pub struct Chain {
    exts: Vec<Box<dyn Extension>>,
}

impl Chain {
    /// Adds `ext` after the others of its stage.
    pub fn push(&mut self, ext: Box<dyn Extension>) {
        let at = self
            .exts
            .iter()
            .position(|e| e.stage() > ext.stage())
            .unwrap_or(self.exts.len());
        self.exts.insert(at, ext);
    }

    pub fn ingress(&mut self, ctx: &FrameCtx<'_>) -> Verdict {
        self.run(ctx, |e, c| e.ingress(c))
    }

    pub fn egress(&mut self, ctx: &FrameCtx<'_>) -> Verdict {
        self.run(ctx, |e, c| e.egress(c))
    }

    fn run(
        &mut self,
        ctx: &FrameCtx<'_>,
        mut call: impl FnMut(&mut dyn Extension, &FrameCtx<'_>) -> Verdict,
    ) -> Verdict {
        for e in &mut self.exts {
            let v = call(e.as_mut(), ctx);
            if e.stage() != Stage::Capture && v != Verdict::Pass {
                return v;
            }
        }
        Verdict::Pass
    }

    pub fn forward(&mut self, ctx: &FrameCtx<'_>, egress: &mut Vec<PortId>) {
        for e in self.exts.iter_mut().filter(|e| e.stage() == Stage::Forward) {
            e.forward(ctx, egress);
        }
    }

    /// The ports that get a copy of this frame (see [`Extension::mirror`]).
    pub fn mirror(&mut self, ctx: &FrameCtx<'_>, to: &mut Vec<PortId>) {
        for e in &mut self.exts {
            e.mirror(ctx, to);
        }
    }

    pub fn expire(&mut self, now: Duration) {
        for e in &mut self.exts {
            e.expire(now);
        }
    }

    pub fn port_removed(&mut self, port: PortId, name: &str) {
        for e in &mut self.exts {
            e.port_removed(port, name);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &dyn Extension> {
        self.exts.iter().map(|e| e.as_ref())
    }

    pub fn find_mut<T: 'static>(&mut self) -> Option<&mut T> {
        self.exts
            .iter_mut()
            .find_map(|e| e.as_any_mut().downcast_mut::<T>())
    }
}
