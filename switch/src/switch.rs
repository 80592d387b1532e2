//! The switching core: ports, VLAN classification, the extension chain, the MAC table,
//! private-VLAN rules and egress tagging. No I/O: a frame and the time go in, the
//! frames to send (port and bytes) come out.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;
use tracing::{debug, info};

use crate::acl::{Acl, AclError, AclRule, InstalledRule};
use crate::conntrack::{FlowStats, MAX_FLOWS_PER_PORT};
use crate::extension::{Chain, Direction, DropReason, Extension, FrameCtx, Verdict};
use crate::fdb::{FdbRow, Learned, MacTable};
use crate::frame::{is_multicast, Frame, ETHERTYPE_VLAN, ETH_HLEN, VLAN_HLEN};
use crate::guards::GuardSet;
use crate::mirror::{Mirror, MirrorDirection, MirrorSpec};
use crate::port::{check_storm, PortConfig, PortError, PrivateVlan, VlanId, VlanMode};
use crate::qos::{check_minimums, Policer, QosError, QosSpec, QOS_QUEUE, QOS_SOURCE_REMOVED};
use crate::scheduler::{EgressScheduler, Queued, SourceStats, QUEUE_FRAMES};
use crate::storm::StormControl;
use crate::PortId;

/// Switch-wide settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchConfig {
    /// How long a learned address stays without being seen again.
    pub aging: Duration,
    /// Addresses one port may have in the MAC table.
    pub macs_per_port: usize,
    /// Largest L3 payload (bytes after the Ethernet header and any tag).
    pub mtu: usize,
    /// Flows one port's stateful ACL rules may track.
    pub flows_per_port: usize,
    /// Frames one source port may have queued at a scheduled port (QoS).
    pub qos_queue_frames: usize,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        Self {
            aging: Duration::from_secs(300),
            macs_per_port: 1024,
            mtu: 1500,
            flows_per_port: MAX_FLOWS_PER_PORT,
            qos_queue_frames: QUEUE_FRAMES,
        }
    }
}

/// A port's counters. `tx` counts frames handed to the port; the I/O layer reports
/// the ones the host interface refused ([`Switch::record_tx_failure`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PortCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames from this port dropped, by reason.
    pub rx_dropped: BTreeMap<&'static str, u64>,
    /// Frames to this port dropped, by reason.
    pub tx_dropped: BTreeMap<&'static str, u64>,
    pub macs_refused: u64,
    /// Mirrored copies handed to this port as a monitor (not in `tx_packets`).
    pub mirror_packets: u64,
    pub mirror_bytes: u64,
}

/// A port as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PortStatus<'a> {
    pub id: PortId,
    #[serde(flatten)]
    pub config: &'a PortConfig,
    pub counters: &'a PortCounters,
}

/// A frame to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    pub port: PortId,
    pub frame: Vec<u8>,
}

/// One frame seen at a traced port: entering it (`Outbound`, out of the VM) with
/// the ingress verdict, or leaving by it (`Inbound`) as sent or with the egress
/// verdict. `dropped: None` means it went on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRecord {
    pub port: PortId,
    pub direction: Direction,
    pub dropped: Option<DropReason>,
    pub frame: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwitchError {
    #[error("no port '{0}'")]
    UnknownPort(String),
    #[error("a port named '{0}' exists already")]
    DuplicateName(String),
    #[error("interface '{iface}' is port '{port}' already")]
    DuplicateIface { iface: String, port: String },
    #[error("vhost-user socket {path} is port '{port}' already")]
    DuplicateSocket { path: String, port: String },
    #[error("port: {0}")]
    Port(#[from] PortError),
    #[error("ACL: {0}")]
    Acl(#[from] AclError),
    #[error("port '{port}': mirror target '{to}' is no port")]
    MirrorTarget { port: String, to: String },
    #[error("QoS: {0}")]
    Qos(#[from] QosError),
}

/// A port's QoS as the API shows it: its settings, and as a scheduled port its rate
/// and what each source queued, sent and lost there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QosStatus {
    #[serde(flatten)]
    pub spec: QosSpec,
    /// The rate frames to the port are scheduled at, bits/s (absent: not scheduled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_rate: Option<u64>,
    /// Bytes left in the policer's bucket (absent: no cap out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policer_credit: Option<u64>,
    pub queued_packets: u64,
    /// Per source port (by name) at this port's scheduler.
    pub sources: BTreeMap<String, SourceStats>,
}

struct Port {
    config: PortConfig,
    counters: PortCounters,
}

pub struct Switch {
    cfg: SwitchConfig,
    ports: BTreeMap<PortId, Port>,
    next_port: PortId,
    fdb: MacTable,
    chain: Chain,
    traced: BTreeSet<PortId>,
    trace: Vec<TraceRecord>,
    /// The egress schedulers of ports with a known rate.
    schedulers: BTreeMap<PortId, EgressScheduler>,
}

/// Whether private-VLAN roles `a` and `b` may exchange frames.
fn private_vlan_allows(a: PrivateVlan, b: PrivateVlan) -> bool {
    match (a, b) {
        (PrivateVlan::Promiscuous, _) | (_, PrivateVlan::Promiscuous) => true,
        (PrivateVlan::Community(x), PrivateVlan::Community(y)) => x == y,
        _ => false,
    }
}

/// The shortest Ethernet frame without its FCS.
const ETH_ZLEN: usize = 60;

/// The frame without its tag (if it had one), with `tci` inserted (if any).
fn retag(bytes: &[u8], tagged: bool, tci: Option<u16>) -> Vec<u8> {
    let body = if tagged {
        &bytes[ETH_HLEN - 2 + VLAN_HLEN..]
    } else {
        &bytes[ETH_HLEN - 2..]
    };
    let mut out = Vec::with_capacity(bytes.len() + VLAN_HLEN);
    out.extend_from_slice(&bytes[..ETH_HLEN - 2]);
    if let Some(tci) = tci {
        out.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        out.extend_from_slice(&tci.to_be_bytes());
    }
    out.extend_from_slice(body);
    // A frame that lost its tag may fall below the Ethernet minimum: pad it, as a
    // hardware switch does.
    if tagged && out.len() < ETH_ZLEN {
        out.resize(ETH_ZLEN, 0);
    }
    out
}

impl Switch {
    /// A switch whose chain holds mirroring (capture stage), then the guards, the
    /// ACLs, the storm limits and the QoS policer (filter stage, in that order).
    pub fn new(cfg: SwitchConfig) -> Self {
        let mut chain = Chain::default();
        chain.push(Box::new(Mirror::default()));
        chain.push(Box::new(GuardSet));
        chain.push(Box::new(Acl::new(cfg.flows_per_port)));
        chain.push(Box::new(StormControl::default()));
        chain.push(Box::new(Policer::new(Self::max_frame_of(&cfg))));
        Self {
            cfg,
            ports: BTreeMap::new(),
            next_port: 1,
            fdb: MacTable::new(cfg.aging, cfg.macs_per_port),
            chain,
            traced: BTreeSet::new(),
            trace: Vec::new(),
            schedulers: BTreeMap::new(),
        }
    }

    /// The largest frame the switch passes: the MTU, the Ethernet header and a tag.
    fn max_frame_of(cfg: &SwitchConfig) -> usize {
        cfg.mtu + ETH_HLEN + VLAN_HLEN
    }

    /// How long a learned address lives unseen.
    pub fn aging(&self) -> Duration {
        self.cfg.aging
    }

    /// Adds an extension after the others of its stage.
    pub fn add_extension(&mut self, ext: Box<dyn Extension>) {
        self.chain.push(ext);
    }

    pub fn extensions(&self) -> impl Iterator<Item = &dyn Extension> {
        self.chain.iter()
    }

    /// Whether `config` could be added: valid, a new name, interface and socket, a
    /// mirror to a port that exists. Returns the mirror's monitor, if any.
    pub fn check_port(
        &self,
        config: &PortConfig,
    ) -> Result<Option<(PortId, MirrorDirection)>, SwitchError> {
        config.validate()?;
        for p in self.ports.values() {
            if p.config.name == config.name {
                return Err(SwitchError::DuplicateName(config.name.clone()));
            }
            if let (Some(a), Some(b)) = (&p.config.vhost_user, &config.vhost_user) {
                if a == b {
                    return Err(SwitchError::DuplicateSocket {
                        path: b.display().to_string(),
                        port: p.config.name.clone(),
                    });
                }
            }
            let theirs = p.config.interfaces();
            if let Some(iface) = config.interfaces().into_iter().find(|i| theirs.contains(i)) {
                return Err(SwitchError::DuplicateIface {
                    iface: iface.to_string(),
                    port: p.config.name.clone(),
                });
            }
        }
        self.check_qos(&config.name, &config.qos)?;
        match &config.mirror {
            Some(m) => Ok(Some((
                self.port_id(&m.to).map_err(|_| SwitchError::MirrorTarget {
                    port: config.name.clone(),
                    to: m.to.clone(),
                })?,
                m.direction,
            ))),
            None => Ok(None),
        }
    }

    /// Adds a port ([`Switch::check_port`] first).
    pub fn add_port(&mut self, config: PortConfig) -> Result<PortId, SwitchError> {
        let monitor = self.check_port(&config)?;
        let id = self.next_port;
        self.next_port += 1;
        self.ports.insert(
            id,
            Port {
                config,
                counters: PortCounters::default(),
            },
        );
        if let Some((monitor, direction)) = monitor {
            self.mirror_ext().set(id, monitor, direction);
        }
        Ok(id)
    }

    /// Removes a port; mirrors to it end.
    pub fn remove_port(&mut self, name: &str) -> Result<PortId, SwitchError> {
        let id = self.port_id(name)?;
        self.ports.remove(&id);
        for p in self.ports.values_mut() {
            if p.config.mirror.as_ref().is_some_and(|m| m.to == name) {
                info!(port = %p.config.name, monitor = name, "monitor port removed: mirror cleared");
                p.config.mirror = None;
            }
        }
        self.fdb.flush_port(id);
        self.traced.remove(&id);
        self.chain.port_removed(id, name);
        self.schedulers.remove(&id);
        let mut lost = Vec::new();
        for (egress, s) in &mut self.schedulers {
            let n = s.remove_source(id);
            if n > 0 {
                lost.push((*egress, n));
            }
        }
        for (egress, n) in lost {
            if let Some(p) = self.ports.get_mut(&egress) {
                *p.counters
                    .tx_dropped
                    .entry(QOS_SOURCE_REMOVED.0)
                    .or_default() += n as u64;
            }
        }
        Ok(id)
    }

    /// Whether port `name` may have QoS `qos`, the other ports keeping theirs: the
    /// minimums of the other ports must fit the rate of every port with `rate=`.
    fn check_qos(&self, name: &str, qos: &QosSpec) -> Result<(), QosError> {
        qos.validate(name)?;
        let mut all: Vec<(&str, &QosSpec)> = self
            .ports
            .values()
            .map(|p| {
                let n = p.config.name.as_str();
                (n, if n == name { qos } else { &p.config.qos })
            })
            .collect();
        if !all.iter().any(|(n, _)| *n == name) {
            all.push((name, qos));
        }
        for (port, spec) in &all {
            if let (Some(_), Some(rate)) = (spec.rate, spec.egress_rate()) {
                check_minimums(port, rate, all.iter().map(|(n, s)| (*n, s.min)))?;
            }
        }
        Ok(())
    }

    /// Changes `port`'s QoS: the fields `update` gives replace the port's (the others
    /// stay). Refused as a whole if the result is invalid or the minimums would no
    /// longer fit a rate. Returns the port's QoS now.
    pub fn qos_set(
        &mut self,
        port: &str,
        update: &QosSpec,
        now: Duration,
    ) -> Result<QosSpec, SwitchError> {
        let id = self.port_id(port)?;
        let mut spec = self.ports[&id].config.qos;
        spec.merge(update);
        self.check_qos(port, &spec)?;
        self.apply_qos(id, spec, now);
        Ok(spec)
    }

    /// Removes `port`'s QoS: no cap, no rate (frames queued for it leave at the next
    /// [`Switch::poll_egress`]), weight 1, no minimum.
    pub fn qos_clear(&mut self, port: &str, now: Duration) -> Result<(), SwitchError> {
        let id = self.port_id(port)?;
        self.apply_qos(id, QosSpec::default(), now);
        Ok(())
    }

    fn apply_qos(&mut self, id: PortId, spec: QosSpec, now: Duration) {
        if let Some(p) = self.ports.get_mut(&id) {
            p.config.qos = spec;
            info!(port = %p.config.name, qos = %spec.spec_options(), "QoS set");
        }
        if let Some(s) = self.schedulers.get_mut(&id) {
            s.set_rate(spec.egress_rate().map(|r| r.bits_per_s()), now);
        }
    }

    /// `port`'s QoS settings and state.
    pub fn qos_status(&mut self, port: &str) -> Result<QosStatus, SwitchError> {
        let id = self.port_id(port)?;
        let spec = self.ports[&id].config.qos;
        let policer_credit = self.chain.find_mut::<Policer>().and_then(|p| p.credit(id));
        let mut status = QosStatus {
            spec,
            scheduled_rate: None,
            policer_credit: policer_credit.filter(|_| spec.out_cap().is_some()),
            queued_packets: 0,
            sources: BTreeMap::new(),
        };
        if let Some(s) = self.schedulers.get(&id) {
            status.scheduled_rate = s.rate();
            status.queued_packets = s.queued() as u64;
            for (src, st) in s.stats() {
                let name = self
                    .ports
                    .get(&src)
                    .map_or_else(|| format!("#{src}"), |p| p.config.name.clone());
                status.sources.insert(name, st);
            }
        }
        Ok(status)
    }

    /// Appends the queued frames that may leave at `now` (ports with a known rate) to
    /// `out`. Call it when [`Switch::next_deadline`] comes (and whenever convenient:
    /// it is cheap with nothing queued).
    pub fn poll_egress(&mut self, now: Duration, out: &mut Vec<Egress>) {
        if self.schedulers.is_empty() {
            return;
        }
        let ids: Vec<PortId> = self.schedulers.keys().copied().collect();
        for id in ids {
            self.drain(id, now, out);
        }
        // A port that lost its rate keeps no scheduler once its queues are empty.
        self.schedulers
            .retain(|_, s| s.rate().is_some() || s.queued() > 0);
    }

    /// The earliest time a queued frame may leave (`None`: nothing queued): when to
    /// call [`Switch::poll_egress`] next.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.schedulers.values().filter_map(|s| s.deadline()).min()
    }

    /// Frames queued for `port`'s scheduler, all sources.
    pub fn queued(&self, port: PortId) -> usize {
        self.schedulers.get(&port).map_or(0, |s| s.queued())
    }

    /// Queues a frame for the scheduled port `id` and sends what may leave now.
    #[allow(clippy::too_many_arguments)]
    fn schedule(
        &mut self,
        id: PortId,
        src: PortId,
        weight: u8,
        min: Option<u64>,
        rate: u64,
        item: Queued,
        now: Duration,
        out: &mut Vec<Egress>,
    ) {
        let (max_frame, bound) = (Self::max_frame_of(&self.cfg), self.cfg.qos_queue_frames);
        let s = self
            .schedulers
            .entry(id)
            .or_insert_with(|| EgressScheduler::new(rate, max_frame, bound, now));
        if s.rate() != Some(rate) {
            s.set_rate(Some(rate), now);
        }
        if let Err(item) = s.enqueue(src, weight, min, item, now) {
            if let Some(p) = self.ports.get_mut(&id) {
                *p.counters.tx_dropped.entry(QOS_QUEUE.0).or_default() += 1;
            }
            if self.traced.contains(&id) {
                self.trace.push(TraceRecord {
                    port: id,
                    direction: Direction::Inbound,
                    dropped: Some(QOS_QUEUE),
                    frame: item.frame,
                });
            }
        }
        self.drain(id, now, out);
    }

    /// Sends what `id`'s scheduler lets leave at `now`.
    fn drain(&mut self, id: PortId, now: Duration, out: &mut Vec<Egress>) {
        while let Some((_, item)) = self.schedulers.get_mut(&id).and_then(|s| s.dequeue(now)) {
            self.emit(id, item.frame, &item.monitors, out);
        }
    }

    /// Hands `bytes` to port `id` (counted, traced) and its copies to `monitors`.
    fn emit(&mut self, id: PortId, bytes: Vec<u8>, monitors: &[PortId], out: &mut Vec<Egress>) {
        let Some(port) = self.ports.get_mut(&id) else {
            return;
        };
        port.counters.tx_packets += 1;
        port.counters.tx_bytes += bytes.len() as u64;
        if self.traced.contains(&id) {
            self.trace.push(TraceRecord {
                port: id,
                direction: Direction::Inbound,
                dropped: None,
                frame: bytes.clone(),
            });
        }
        if monitors.is_empty() {
            out.push(Egress {
                port: id,
                frame: bytes,
            });
        } else {
            out.push(Egress {
                port: id,
                frame: bytes.clone(),
            });
            self.send_copies(id, monitors, &bytes, out);
        }
    }

    pub fn port_id(&self, name: &str) -> Result<PortId, SwitchError> {
        self.ports
            .iter()
            .find(|(_, p)| p.config.name == name)
            .map(|(id, _)| *id)
            .ok_or_else(|| SwitchError::UnknownPort(name.to_string()))
    }

    pub fn port_config(&self, id: PortId) -> Option<&PortConfig> {
        self.ports.get(&id).map(|p| &p.config)
    }

    pub fn ports(&self) -> Vec<PortStatus<'_>> {
        self.ports
            .iter()
            .map(|(id, p)| PortStatus {
                id: *id,
                config: &p.config,
                counters: &p.counters,
            })
            .collect()
    }

    pub fn counters(&self, name: &str) -> Result<&PortCounters, SwitchError> {
        let id = self.port_id(name)?;
        Ok(&self.ports[&id].counters)
    }

    pub fn mac_table(&self, now: Duration) -> Vec<FdbRow> {
        self.fdb.rows(now)
    }

    /// Drops aged MAC entries and extension state (flows): call now and then
    /// (lookups ignore aged entries anyway). Returns the MAC entries dropped.
    pub fn expire(&mut self, now: Duration) -> usize {
        self.chain.expire(now);
        self.fdb.expire(now)
    }

    fn acl(&mut self) -> &mut Acl {
        // The constructor put it there and nothing removes it.
        match self.chain.find_mut::<Acl>() {
            Some(acl) => acl,
            None => unreachable!("Switch::new installs the ACL extension"),
        }
    }

    fn mirror_ext(&mut self) -> &mut Mirror {
        match self.chain.find_mut::<Mirror>() {
            Some(m) => m,
            None => unreachable!("Switch::new installs the mirror extension"),
        }
    }

    fn port_mut(&mut self, name: &str) -> Result<(PortId, &mut Port), SwitchError> {
        let id = self.port_id(name)?;
        match self.ports.get_mut(&id) {
            Some(p) => Ok((id, p)),
            None => Err(SwitchError::UnknownPort(name.to_string())),
        }
    }

    /// The connection-table counters of `port` (`None`: no stateful rule on it).
    pub fn acl_flows(&mut self, port: &str) -> Result<Option<FlowStats>, SwitchError> {
        let id = self.port_id(port)?;
        Ok(self.acl().flow_stats(id))
    }

    /// Copies `port`'s frames (`direction`) to the port `to`, replacing any mirror
    /// `port` had.
    pub fn mirror_set(
        &mut self,
        port: &str,
        to: &str,
        direction: MirrorDirection,
    ) -> Result<(), SwitchError> {
        if port == to {
            return Err(PortError::MirrorSelf(port.to_string()).into());
        }
        let monitor = self.port_id(to).map_err(|_| SwitchError::MirrorTarget {
            port: port.to_string(),
            to: to.to_string(),
        })?;
        let (id, p) = self.port_mut(port)?;
        p.config.mirror = Some(MirrorSpec {
            to: to.to_string(),
            direction,
        });
        self.mirror_ext().set(id, monitor, direction);
        Ok(())
    }

    /// Stops mirroring `port`; whether it was mirrored.
    pub fn mirror_clear(&mut self, port: &str) -> Result<bool, SwitchError> {
        let (id, p) = self.port_mut(port)?;
        p.config.mirror = None;
        Ok(self.mirror_ext().clear(id))
    }

    /// Sets (`Some`) or lifts (`None`) `port`'s broadcast/multicast limit, in
    /// packets per second; a new limit starts with a full bucket.
    pub fn storm_set(&mut self, port: &str, pps: Option<u64>) -> Result<(), SwitchError> {
        let pps = pps.map(check_storm).transpose()?;
        let (_, p) = self.port_mut(port)?;
        p.config.storm = pps;
        Ok(())
    }

    pub fn acl_add(&mut self, port: &str, rule: AclRule) -> Result<u64, SwitchError> {
        let id = self.port_id(port)?;
        Ok(self.acl().add(id, port, rule)?)
    }

    pub fn acl_remove(&mut self, port: &str, rule: u64) -> Result<(), SwitchError> {
        let id = self.port_id(port)?;
        Ok(self.acl().remove(id, port, rule)?)
    }

    pub fn acl_list(&mut self, port: &str) -> Result<Vec<InstalledRule>, SwitchError> {
        let id = self.port_id(port)?;
        Ok(self.acl().list(id).to_vec())
    }

    /// Starts or stops recording the frames that enter and leave `port`
    /// (collected with [`Switch::drain_trace`]).
    pub fn set_trace(&mut self, port: &str, on: bool) -> Result<PortId, SwitchError> {
        let id = self.port_id(port)?;
        if on {
            self.traced.insert(id);
        } else {
            self.traced.remove(&id);
        }
        Ok(id)
    }

    /// The trace records since the last call, in the order the switch saw them.
    pub fn drain_trace(&mut self) -> Vec<TraceRecord> {
        std::mem::take(&mut self.trace)
    }

    /// The host interface refused a frame this switch handed to `port`.
    pub fn record_tx_failure(&mut self, port: PortId) {
        self.record_tx_drop(port, DropReason::TX_FAILED);
    }

    /// The I/O layer dropped a frame this switch handed to `port`, for `why`.
    pub fn record_tx_drop(&mut self, port: PortId, why: DropReason) {
        if let Some(p) = self.ports.get_mut(&port) {
            *p.counters.tx_dropped.entry(why.0).or_default() += 1;
        }
    }

    /// Counts a frame from `port` dropped before it reached the switch (e.g. one
    /// longer than the I/O layer's buffer).
    pub fn record_rx_drop(&mut self, port: PortId, why: DropReason) {
        if let Some(p) = self.ports.get_mut(&port) {
            p.counters.rx_packets += 1;
        }
        self.drop_rx(port, why);
    }

    fn drop_rx(&mut self, port: PortId, why: DropReason) -> DropReason {
        if let Some(p) = self.ports.get_mut(&port) {
            *p.counters.rx_dropped.entry(why.0).or_default() += 1;
            debug!(port = %p.config.name, reason = why.0, "frame dropped");
        }
        why
    }

    /// The VLAN a frame from `mode` belongs to, or why it is dropped.
    fn classify(mode: &VlanMode, frame: &Frame<'_>) -> Result<VlanId, DropReason> {
        let vid = frame.tag.map(|t| t.vid).filter(|v| *v != 0);
        match (mode, vid) {
            (VlanMode::Access { vlan, .. }, None) => Ok(*vlan),
            (VlanMode::Access { .. }, Some(_)) => Err(DropReason::TAGGED_ON_ACCESS),
            (VlanMode::Trunk { native, .. }, None) => native.ok_or(DropReason::UNTAGGED_ON_TRUNK),
            (mode, Some(v)) => VlanId::new(v)
                .ok()
                .filter(|v| mode.carries(*v))
                .ok_or(DropReason::VLAN_NOT_ALLOWED),
        }
    }

    /// Switches one frame that arrived on `ingress` at time `now`; appends what to
    /// send to `out`.
    pub fn process(&mut self, ingress: PortId, bytes: &[u8], now: Duration, out: &mut Vec<Egress>) {
        let mark = self.trace.len();
        let verdict = self.switch_frame(ingress, bytes, now, out);
        if self.traced.contains(&ingress) {
            let record = TraceRecord {
                port: ingress,
                direction: Direction::Outbound,
                dropped: verdict.err(),
                frame: bytes.to_vec(),
            };
            self.trace.insert(mark, record);
        }
    }

    /// `process` without the ingress trace record; `Err` when the frame was dropped on
    /// its way in.
    fn switch_frame(
        &mut self,
        ingress: PortId,
        bytes: &[u8],
        now: Duration,
        out: &mut Vec<Egress>,
    ) -> Result<(), DropReason> {
        let Some(port) = self.ports.get_mut(&ingress) else {
            return Ok(());
        };
        port.counters.rx_packets += 1;
        port.counters.rx_bytes += bytes.len() as u64;
        let frame = match Frame::parse(bytes) {
            Ok(f) => f,
            Err(e) => {
                debug!(port = %port.config.name, error = %e, "malformed frame");
                return Err(self.drop_rx(ingress, DropReason::MALFORMED));
            }
        };
        let tag_len = if frame.tag.is_some() { VLAN_HLEN } else { 0 };
        if bytes.len() - tag_len > self.cfg.mtu + ETH_HLEN {
            return Err(self.drop_rx(ingress, DropReason::OVERSIZE));
        }
        let vlan = match Self::classify(&port.config.vlan, &frame) {
            Ok(v) => v,
            Err(why) => return Err(self.drop_rx(ingress, why)),
        };
        let in_role = port.config.vlan.private();
        let verdict = {
            let ctx = FrameCtx {
                frame: &frame,
                vlan,
                port: ingress,
                port_config: &port.config,
                direction: Direction::Outbound,
                ingress,
                now,
            };
            self.chain.ingress(&ctx)
        };
        if let Verdict::Drop(why) = verdict {
            return Err(self.drop_rx(ingress, why));
        }
        if self.fdb.learn(vlan, frame.src, ingress, now) == Learned::Refused {
            port.counters.macs_refused += 1;
        }

        let known = if is_multicast(&frame.dst) {
            None
        } else {
            self.fdb.lookup(vlan, &frame.dst, now)
        };
        let mut egress: Vec<PortId> = match known {
            Some(p) => vec![p],
            None => self.ports.keys().copied().collect(),
        };
        let reachable = |ports: &BTreeMap<PortId, Port>, id: &PortId| {
            *id != ingress
                && ports.get(id).is_some_and(|p| {
                    p.config.vlan.carries(vlan)
                        && private_vlan_allows(in_role, p.config.vlan.private())
                })
        };
        egress.retain(|id| reachable(&self.ports, id));
        {
            let Some(port) = self.ports.get(&ingress) else {
                return Ok(());
            };
            let ctx = FrameCtx {
                frame: &frame,
                vlan,
                port: ingress,
                port_config: &port.config,
                direction: Direction::Outbound,
                ingress,
                now,
            };
            self.chain.forward(&ctx, &mut egress);
        }
        egress.sort_unstable();
        egress.dedup();
        egress.retain(|id| reachable(&self.ports, id));
        if egress.is_empty() && known.is_some() {
            return Err(self.drop_rx(ingress, DropReason::NO_EGRESS));
        }
        // Accepted: a copy as received for the ingress port's monitor, if any.
        let mut monitors = Vec::new();
        if let Some(port) = self.ports.get(&ingress) {
            let ctx = FrameCtx {
                frame: &frame,
                vlan,
                port: ingress,
                port_config: &port.config,
                direction: Direction::Outbound,
                ingress,
                now,
            };
            self.chain.mirror(&ctx, &mut monitors);
        }
        self.send_copies(ingress, &monitors, bytes, out);

        let pcp = frame.tag.map(|t| u16::from(t.pcp) << 13).unwrap_or(0);
        let src_qos = self
            .ports
            .get(&ingress)
            .map(|p| p.config.qos)
            .unwrap_or_default();
        for id in egress {
            let Some(port) = self.ports.get_mut(&id) else {
                continue;
            };
            let ctx = FrameCtx {
                frame: &frame,
                vlan,
                port: id,
                port_config: &port.config,
                direction: Direction::Inbound,
                ingress,
                now,
            };
            let traced = self.traced.contains(&id);
            let verdict = self.chain.egress(&ctx);
            monitors.clear();
            if verdict == Verdict::Pass {
                self.chain.mirror(&ctx, &mut monitors);
            }
            if let Verdict::Drop(why) = verdict {
                *port.counters.tx_dropped.entry(why.0).or_default() += 1;
                if traced {
                    self.trace.push(TraceRecord {
                        port: id,
                        direction: Direction::Inbound,
                        dropped: Some(why),
                        frame: bytes.to_vec(),
                    });
                }
                continue;
            }
            let tci = match &port.config.vlan {
                VlanMode::Trunk { native, .. } if *native != Some(vlan) => Some(pcp | vlan.get()),
                _ => None,
            };
            let bytes = retag(bytes, frame.tag.is_some(), tci);
            let qos = port.config.qos;
            match qos.egress_rate() {
                Some(rate) => {
                    // Minimums are reserved where the link rate is known.
                    let min = src_qos
                        .min
                        .filter(|_| qos.rate.is_some())
                        .map(|m| m.bits_per_s());
                    let item = Queued {
                        frame: bytes,
                        monitors: monitors.clone(),
                    };
                    let weight = src_qos.weight();
                    self.schedule(id, ingress, weight, min, rate.bits_per_s(), item, now, out);
                }
                None => self.emit(id, bytes, &monitors, out),
            }
        }
        Ok(())
    }

    /// Hands `monitors` an untouched copy of `bytes`, a frame of port `of`.
    fn send_copies(
        &mut self,
        of: PortId,
        monitors: &[PortId],
        bytes: &[u8],
        out: &mut Vec<Egress>,
    ) {
        for &m in monitors {
            let Some(port) = self.ports.get_mut(&m) else {
                continue;
            };
            if m == of {
                continue;
            }
            port.counters.mirror_packets += 1;
            port.counters.mirror_bytes += bytes.len() as u64;
            if self.traced.contains(&m) {
                self.trace.push(TraceRecord {
                    port: m,
                    direction: Direction::Inbound,
                    dropped: None,
                    frame: bytes.to_vec(),
                });
            }
            out.push(Egress {
                port: m,
                frame: bytes.to_vec(),
            });
        }
    }
}
