//! The switch thread: a poll(2) loop over the ports' packet sockets, the control
//! socket and its clients, the vhost-user workers' channel, and a signalfd for
//! SIGTERM/SIGINT. Every socket of the configuration is opened by [`Daemon::new`];
//! the caller then drops privileges, [`Daemon::start_threads`] starts the vhost-user
//! listener threads and the opener thread ([`crate::opener`]), which makes every
//! socket from then on, and the caller confines this thread before [`Daemon::run`].

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use serde_json::{json, Value};
use switch::extension::DropReason;
use switch::port::PortConfig;
use switch::{pcap, Egress, PortId, Switch, SwitchError};
use tracing::{debug, info, warn};

use crate::afpacket::{PacketPort, PortIoError, Rx, RX_BUF};
use crate::config::{parse_port, Config};
use crate::control::{self, Request, MAX_REQUEST};
use crate::opener::{privileged, Opener};
use crate::seccomp::{Filters, Role};
use crate::team_io::{TeamPort, Teams, LINK_POLL};
use crate::vhost_user::{Inbound, ToSwitch, VhostPortError, VhostUserPort};

mod team;

/// The signalfd, the control socket and the vhost-user wake eventfd come first.
const FIXED_FDS: usize = 3;
/// Frames read from one port before the loop turns to the next (fairness).
const BURST: usize = 64;
/// Control clients served at once.
const MAX_CLIENTS: usize = 16;
/// The poll's timeout with no queued frame to send.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// Trace bytes held for a slow trace client before frames are left out.
const TRACE_BACKLOG: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("control socket {path}: {source}")]
    Control { path: PathBuf, source: io::Error },
    #[error("control socket {0} is in use by a running switch")]
    ControlInUse(PathBuf),
    #[error("{0}")]
    PortIo(#[from] PortIoError),
    #[error("{0}")]
    VhostPort(#[from] VhostPortError),
    #[error("eventfd: {0}")]
    EventFd(io::Error),
    #[error("{0}")]
    Switch(#[from] SwitchError),
    #[error("signals: {0}")]
    Signals(io::Error),
    #[error("poll: {0}")]
    Poll(io::Error),
    #[error("the opener thread: {0}")]
    OpenerStart(io::Error),
    #[error("the opener thread is gone")]
    OpenerGone,
}

struct Client {
    stream: UnixStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    closing: bool,
    /// The port (id, name) this connection streams a trace of.
    trace: Option<(PortId, String)>,
    trace_lost: u64,
}

/// The vhost-user ports and the channel their workers hand frames over.
struct VhostPorts {
    ports: HashMap<PortId, VhostUserPort>,
    inbound: Receiver<Inbound>,
    to_switch: ToSwitch,
    /// Readable when `inbound` has messages.
    wake: Arc<EventFd>,
    /// The filters the ports' threads install.
    filters: Filters<Role>,
}

/// Messages taken from the vhost-user workers before the loop turns to the others.
const INBOUND_BURST: usize = 256;

pub struct Daemon {
    sw: Switch,
    /// Makes and removes sockets once the switch is confined.
    opener: Option<Opener>,
    ports: HashMap<PortId, PacketPort>,
    /// Team ports (several member interfaces each).
    teams: Teams,
    vhost: VhostPorts,
    listener: UnixListener,
    control_path: PathBuf,
    clients: Vec<Client>,
    signals: OwnedFd,
    epoch: Instant,
    rx: Vec<u8>,
    out: Vec<Egress>,
}

/// Blocks SIGTERM and SIGINT and returns a signalfd that reports them.
fn signal_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset manipulation on a local set; sigprocmask on this (the only)
    // thread; signalfd creates a new fd that is owned at once.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Binds the control socket, owner-only; a stale file (nobody listening) is replaced.
fn bind_control(path: &Path) -> Result<UnixListener, DaemonError> {
    let ctl = |source| DaemonError::Control {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(DaemonError::ControlInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(ctl)?;
    }
    let listener = UnixListener::bind(path).map_err(ctl)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(ctl)?;
    listener.set_nonblocking(true).map_err(ctl)?;
    Ok(listener)
}

/// Opens `cfg`'s interface (or vhost-user socket), on the opener thread once there is
/// one (a vhost-user port's listener then starts at once), and adds the port to the
/// switch.
fn open_port(
    sw: &mut Switch,
    ports: &mut HashMap<PortId, PacketPort>,
    teams: &mut Teams,
    vhost: &mut VhostPorts,
    opener: Option<&Opener>,
    cfg: PortConfig,
) -> Result<PortId, DaemonError> {
    // Checked before the socket opens, so a duplicate (or a mirror to nowhere) never
    // touches the interface.
    sw.check_port(&cfg)?;
    if let Some(spec) = cfg.team.clone() {
        let aging = sw.aging();
        let mut team = privileged(opener, move || TeamPort::open(&spec, aging))
            .ok_or(DaemonError::OpenerGone)??;
        let (name, mode) = (cfg.name.clone(), cfg.vlan.clone());
        let members = cfg.interfaces().join("+");
        let id = sw.add_port(cfg)?;
        // Read on this thread: the opener's filter has no SIOCGIFFLAGS. Nothing is
        // learnt yet, so there is nothing to announce.
        let _ = team.poll_links(&name);
        teams.ports.insert(id, team);
        info!(port = %name, %members, id, vlan = ?mode, "team port up");
        return Ok(id);
    }
    if let Some(path) = cfg.vhost_user.clone() {
        let (name, mode) = (cfg.name.clone(), cfg.vlan.clone());
        let id = sw.add_port(cfg)?;
        let (port_name, to_switch) = (name.clone(), vhost.to_switch.clone());
        let (filters, socket, start) = (vhost.filters.clone(), path.clone(), opener.is_some());
        let opened = privileged(opener, move || {
            let mut p = VhostUserPort::open(id, &port_name, &socket, to_switch, filters)?;
            if start {
                p.start()?;
            }
            Ok::<_, VhostPortError>(p)
        });
        match opened {
            Some(Ok(p)) => {
                vhost.ports.insert(id, p);
                info!(port = %name, socket = %path.display(), id, vlan = ?mode, "vhost-user port up");
                return Ok(id);
            }
            Some(Err(e)) => {
                let _ = sw.remove_port(&name);
                return Err(e.into());
            }
            None => {
                let _ = sw.remove_port(&name);
                return Err(DaemonError::OpenerGone);
            }
        }
    }
    let iface = cfg.iface().to_string();
    let io =
        privileged(opener, move || PacketPort::open(&iface)).ok_or(DaemonError::OpenerGone)??;
    let (name, iface, mode) = (cfg.name.clone(), io.iface().to_string(), cfg.vlan.clone());
    let id = sw.add_port(cfg)?;
    ports.insert(id, io);
    info!(port = %name, %iface, id, vlan = ?mode, "port up");
    Ok(id)
}

/// Removes a socket file (on the opener thread once there is one).
fn remove_socket(opener: Option<&Opener>, path: &Path) {
    let path = path.to_path_buf();
    let _ = privileged(opener, move || std::fs::remove_file(path));
}

fn pollfd(fd: RawFd, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

impl Daemon {
    /// Opens every port, then the control socket: once the socket exists the
    /// ports are open, so a client that sees it can send frames.
    pub fn new(cfg: Config, filters: Filters<Role>) -> Result<Self, DaemonError> {
        let signals = signal_fd().map_err(DaemonError::Signals)?;
        let mut sw = Switch::new(cfg.switch);
        let mut ports = HashMap::new();
        let mut teams = Teams::default();
        let (tx, inbound) = std::sync::mpsc::channel();
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(DaemonError::EventFd)?);
        let mut vhost = VhostPorts {
            ports: HashMap::new(),
            inbound,
            to_switch: ToSwitch::new(tx, wake.clone()),
            wake,
            filters,
        };
        // Mirrors are set once every port exists: a monitor may come later in the list.
        let mut mirrors = Vec::new();
        for mut p in cfg.ports {
            if let Some(m) = p.mirror.take() {
                mirrors.push((p.name.clone(), m));
            }
            open_port(&mut sw, &mut ports, &mut teams, &mut vhost, None, p)?;
        }
        for (port, m) in mirrors {
            sw.mirror_set(&port, &m.to, m.direction)?;
        }
        for acl in cfg.acls {
            sw.acl_add(&acl.port, acl.rule)?;
        }
        Ok(Self {
            sw,
            opener: None,
            ports,
            teams,
            vhost,
            listener: bind_control(&cfg.control)?,
            control_path: cfg.control,
            clients: Vec::new(),
            signals,
            epoch: Instant::now(),
            rx: vec![0u8; RX_BUF + 64],
            out: Vec::new(),
        })
    }

    /// Starts the listener threads of the vhost-user ports and the opener thread: the
    /// switch's first threads, after the privilege drop and before this thread's filter
    /// (each installs its own).
    pub fn start_threads(&mut self) -> Result<(), DaemonError> {
        for p in self.vhost.ports.values_mut() {
            p.start()?;
        }
        let opener = Opener::spawn(self.vhost.filters.clone()).map_err(DaemonError::OpenerStart)?;
        self.opener = Some(opener);
        Ok(())
    }

    /// Runs until SIGTERM/SIGINT; removes the control socket on the way out.
    pub fn run(mut self) -> Result<(), DaemonError> {
        #[cfg(feature = "test-hooks")]
        crate::test_hooks::probe_syscall("switch");
        info!(
            ports = self.ports.len() + self.teams.ports.len() + self.vhost.ports.len(),
            control = %self.control_path.display(),
            "vireo-switch ready"
        );
        let result = self.poll_loop();
        remove_socket(self.opener.as_ref(), &self.control_path);
        for p in self.vhost.ports.values() {
            remove_socket(self.opener.as_ref(), p.path());
        }
        info!("vireo-switch stopped");
        result
    }

    fn poll_loop(&mut self) -> Result<(), DaemonError> {
        let mut last_expiry = Instant::now();
        let mut last_links = Instant::now();
        loop {
            let port_ids: Vec<PortId> = self.ports.keys().copied().collect();
            let mut fds = vec![
                pollfd(self.signals.as_raw_fd(), libc::POLLIN),
                pollfd(self.listener.as_raw_fd(), libc::POLLIN),
                pollfd(self.vhost.wake.as_raw_fd(), libc::POLLIN),
            ];
            fds.extend(
                port_ids
                    .iter()
                    .map(|id| pollfd(self.ports[id].as_raw_fd(), libc::POLLIN)),
            );
            let team_fds = self.teams.fds();
            fds.extend(team_fds.iter().map(|t| pollfd(t.2, libc::POLLIN)));
            fds.extend(self.clients.iter().map(|c| {
                let ev = if c.outbuf.is_empty() {
                    libc::POLLIN
                } else {
                    libc::POLLIN | libc::POLLOUT
                };
                pollfd(c.stream.as_raw_fd(), ev)
            }));
            // Queued frames (QoS) leave on time: the poll ends at the next deadline.
            let mut wait = match self.sw.next_deadline() {
                Some(d) => d.saturating_sub(self.epoch.elapsed()).min(IDLE_WAIT),
                None => IDLE_WAIT,
            };
            // Team members' links are read every LINK_POLL.
            if !team_fds.is_empty() {
                wait = wait.min(LINK_POLL.saturating_sub(last_links.elapsed()));
            }
            let timeout = libc::timespec {
                tv_sec: wait.as_secs() as libc::time_t,
                tv_nsec: wait.subsec_nanos() as libc::c_long,
            };
            // SAFETY: `fds` is a live array of `fds.len()` pollfds; `timeout` is a
            // live timespec; no signal mask (null) is passed.
            let n = unsafe {
                libc::ppoll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    &timeout,
                    std::ptr::null(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DaemonError::Poll(e));
            }
            if fds[0].revents != 0 {
                info!("signal received, shutting down");
                return Ok(());
            }
            if fds[2].revents != 0 {
                self.serve_inbound();
            }
            for (i, id) in port_ids.iter().enumerate() {
                if fds[FIXED_FDS + i].revents != 0 {
                    self.serve_port(*id);
                }
            }
            let teams_at = FIXED_FDS + port_ids.len();
            for (i, (id, m, _)) in team_fds.iter().enumerate() {
                if fds[teams_at + i].revents != 0 {
                    self.serve_team(*id, *m);
                }
            }
            let client_events: Vec<i16> = fds[teams_at + team_fds.len()..]
                .iter()
                .map(|f| f.revents)
                .collect();
            for (i, ev) in client_events.iter().enumerate() {
                if *ev != 0 {
                    self.serve_client(i);
                }
            }
            self.drop_closed_clients();
            if fds[1].revents != 0 {
                self.accept();
            }
            self.serve_egress();
            if !team_fds.is_empty() && last_links.elapsed() >= LINK_POLL {
                self.poll_team_links();
                last_links = Instant::now();
            }
            if last_expiry.elapsed().as_secs() >= 1 {
                self.sw.expire(self.epoch.elapsed());
                last_expiry = Instant::now();
            }
        }
    }

    fn serve_port(&mut self, id: PortId) {
        for _ in 0..BURST {
            let Some(port) = self.ports.get(&id) else {
                return;
            };
            let len = match port.recv(&mut self.rx) {
                Ok(Rx::Frame(n)) => n,
                Ok(Rx::Truncated) => {
                    debug!(
                        iface = port.iface(),
                        "frame longer than the receive buffer dropped"
                    );
                    self.sw.record_rx_drop(id, DropReason::OVERSIZE);
                    continue;
                }
                Ok(Rx::WouldBlock) => return,
                Err(e) => {
                    warn!(iface = port.iface(), error = %e, "receive failed");
                    return;
                }
            };
            let now = self.epoch.elapsed();
            self.out.clear();
            self.sw.process(id, &self.rx[..len], now, &mut self.out);
            self.dispatch_trace();
            self.send_out();
        }
    }

    /// Sends the queued frames (QoS) whose time has come.
    fn serve_egress(&mut self) {
        if self.sw.next_deadline().is_none() {
            return;
        }
        self.out.clear();
        self.sw.poll_egress(self.epoch.elapsed(), &mut self.out);
        self.dispatch_trace();
        self.send_out();
    }

    /// Switches what the vhost-user ports' workers handed over, and counts their drops.
    fn serve_inbound(&mut self) {
        let _ = self.vhost.wake.read();
        for _ in 0..INBOUND_BURST {
            let msg = match self.vhost.inbound.try_recv() {
                Ok(m) => m,
                Err(_) => return,
            };
            match msg {
                Inbound::Frame(id, frame) => {
                    let now = self.epoch.elapsed();
                    self.out.clear();
                    self.sw.process(id, &frame, now, &mut self.out);
                    self.dispatch_trace();
                    self.send_out();
                }
                Inbound::RxDrop(id, why) => self.sw.record_rx_drop(id, why),
                Inbound::TxDrop(id, why) => self.sw.record_tx_drop(id, why),
            }
        }
        // More wait: come back after the other fds had their turn.
        let _ = self.vhost.wake.write(1);
    }

    /// Sends the frames the switch produced to their ports.
    fn send_out(&mut self) {
        let mut takeovers = Vec::new();
        for e in self.out.drain(..) {
            if let Some(t) = self.teams.ports.get_mut(&e.port) {
                let name = self.sw.port_config(e.port).map_or("?", |c| c.name.as_str());
                let (sent, takeover) = t.send(name, &e.frame, self.epoch.elapsed());
                if !sent {
                    self.sw.record_tx_failure(e.port);
                }
                if let Some(tk) = takeover {
                    takeovers.push((e.port, tk));
                }
                continue;
            }
            if let Some(v) = self.vhost.ports.get(&e.port) {
                if let Err(why) = v.shared.deliver(e.frame) {
                    self.sw.record_tx_drop(e.port, why);
                }
                continue;
            }
            let sent = self.ports.get(&e.port).map(|p| p.send(&e.frame));
            match sent {
                Some(Ok(true)) => {}
                Some(Ok(false)) => self.sw.record_tx_failure(e.port),
                Some(Err(err)) => {
                    warn!(port = e.port, error = %err, "send failed");
                    self.sw.record_tx_failure(e.port);
                }
                None => {}
            }
        }
        for (id, tk) in takeovers {
            self.announce(id, tk);
        }
    }

    fn drop_closed_clients(&mut self) {
        let before = self.clients.len();
        self.clients.retain(|c| {
            let done = c.closing && (c.outbuf.is_empty() || c.trace.is_some());
            if done {
                if let Some((_, port)) = &c.trace {
                    info!(%port, lost = c.trace_lost, "trace ended");
                }
            }
            !done
        });
        if self.clients.len() == before {
            return;
        }
        // Ports nobody traces any more stop recording.
        let names: Vec<String> = self
            .sw
            .ports()
            .iter()
            .map(|p| p.config.name.clone())
            .collect();
        for name in names {
            let traced = self
                .clients
                .iter()
                .any(|c| c.trace.as_ref().is_some_and(|t| t.1 == name));
            if !traced {
                let _ = self.sw.set_trace(&name, false);
            }
        }
    }

    /// Hands the switch's trace records to the clients tracing their ports.
    fn dispatch_trace(&mut self) {
        let records = self.sw.drain_trace();
        if records.is_empty() {
            return;
        }
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        for r in &records {
            for c in &mut self.clients {
                let Some((id, name)) = &c.trace else { continue };
                if *id != r.port {
                    continue;
                }
                if c.outbuf.len() > TRACE_BACKLOG {
                    c.trace_lost += 1;
                    continue;
                }
                c.outbuf.extend_from_slice(&pcap::packet(r, name, micros));
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.clients.len() >= MAX_CLIENTS || stream.set_nonblocking(true).is_err() {
                        warn!("control client refused: too many clients");
                        continue;
                    }
                    self.clients.push(Client {
                        stream,
                        inbuf: Vec::new(),
                        outbuf: Vec::new(),
                        closing: false,
                        trace: None,
                        trace_lost: 0,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!(error = %e, "control accept failed");
                    return;
                }
            }
        }
    }

    fn serve_client(&mut self, i: usize) {
        let mut buf = [0u8; 4096];
        loop {
            let c = &mut self.clients[i];
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    c.closing = true;
                    break;
                }
                Ok(n) => c.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    c.closing = true;
                    c.outbuf.clear();
                    return;
                }
            }
        }
        while let Some(pos) = self.clients[i].inbuf.iter().position(|b| *b == b'\n') {
            if self.clients[i].trace.is_some() {
                // A trace stream takes no more requests.
                self.clients[i].inbuf.clear();
                break;
            }
            let line: Vec<u8> = self.clients[i].inbuf.drain(..=pos).collect();
            let reply = self.handle(i, &line[..pos]);
            let c = &mut self.clients[i];
            c.outbuf.extend_from_slice(reply.to_string().as_bytes());
            c.outbuf.push(b'\n');
            if let Some((_, port)) = &c.trace {
                c.outbuf.extend_from_slice(&pcap::header(port));
            }
        }
        let c = &mut self.clients[i];
        if c.inbuf.len() > MAX_REQUEST {
            let reply = control::err(format!("request longer than {MAX_REQUEST} bytes"));
            c.outbuf.extend_from_slice(reply.to_string().as_bytes());
            c.outbuf.push(b'\n');
            c.inbuf.clear();
            c.closing = true;
        }
        while !c.outbuf.is_empty() {
            match c.stream.write(&c.outbuf) {
                Ok(n) => {
                    c.outbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    c.outbuf.clear();
                    c.closing = true;
                }
            }
        }
    }

    fn handle(&mut self, client: usize, line: &[u8]) -> Value {
        let req = match control::parse(line) {
            Ok(r) => r,
            Err(e) => return control::err(e),
        };
        debug!(?req, "control request");
        let now = self.epoch.elapsed();
        let result: Result<Value, String> = match req {
            Request::Ports => {
                let mut ports = json!(self.sw.ports());
                // vhost-user ports also say whether a VMM is connected.
                if let Some(list) = ports.as_array_mut() {
                    for p in list {
                        let id = p["id"].as_u64().unwrap_or(0);
                        if let Some(v) = self.vhost.ports.get(&(id as PortId)) {
                            p["connected"] = json!(v.shared.is_connected());
                        }
                        if let Some(t) = self.teams.ports.get(&(id as PortId)) {
                            p["team"] = json!(t.status());
                        }
                        let queued = self.sw.queued(id as PortId);
                        if queued > 0 {
                            p["qos_queued"] = json!(queued);
                        }
                    }
                }
                Ok(json!({ "ports": ports }))
            }
            Request::Counters { port } => self
                .sw
                .counters(&port)
                .map(|c| json!({ "port": port, "counters": c }))
                .and_then(|mut v| {
                    v["qos"] = json!(self.sw.qos_status(&port)?);
                    let id = self.sw.port_id(&port)?;
                    if let Some(t) = self.teams.ports.get(&id) {
                        v["team"] = json!(t.status());
                    }
                    Ok(v)
                })
                .map_err(|e| e.to_string()),
            Request::Macs => Ok(json!({ "macs": self.sw.mac_table(now) })),
            Request::Extensions => Ok(json!({
                "extensions": self.sw.extensions()
                    .map(|e| json!({"name": e.name(), "stage": e.stage()}))
                    .collect::<Vec<_>>()
            })),
            Request::AclList { port } => self
                .sw
                .acl_list(&port)
                .and_then(|r| Ok(json!({ "rules": r, "flows": self.sw.acl_flows(&port)? })))
                .map_err(|e| e.to_string()),
            Request::AclAdd { port, rule } => {
                let r = self.sw.acl_add(&port, rule);
                if let Ok(id) = &r {
                    info!(%port, id, "ACL rule added");
                }
                r.map(|id| json!({ "id": id })).map_err(|e| e.to_string())
            }
            Request::AclRemove { port, id } => {
                let r = self.sw.acl_remove(&port, id);
                if r.is_ok() {
                    info!(%port, id, "ACL rule removed");
                }
                r.map(|()| json!({})).map_err(|e| e.to_string())
            }
            Request::PortAdd { spec } => parse_port(&spec)
                .map_err(|e| e.to_string())
                .and_then(|cfg| {
                    open_port(
                        &mut self.sw,
                        &mut self.ports,
                        &mut self.teams,
                        &mut self.vhost,
                        self.opener.as_ref(),
                        cfg,
                    )
                    .map_err(|e| e.to_string())
                })
                .map(|id| json!({ "id": id })),
            Request::MirrorSet {
                port,
                to,
                direction,
            } => {
                let r = self.sw.mirror_set(&port, &to, direction);
                if r.is_ok() {
                    info!(%port, monitor = %to, %direction, "mirror set");
                }
                r.map(|()| json!({})).map_err(|e| e.to_string())
            }
            Request::MirrorClear { port } => {
                let r = self.sw.mirror_clear(&port);
                if r.is_ok() {
                    info!(%port, "mirror cleared");
                }
                r.map(|was| json!({ "was_mirrored": was }))
                    .map_err(|e| e.to_string())
            }
            Request::StormSet { port, pps } => {
                let r = self.sw.storm_set(&port, Some(pps));
                if r.is_ok() {
                    info!(%port, pps, "storm limit set");
                }
                r.map(|()| json!({})).map_err(|e| e.to_string())
            }
            Request::StormClear { port } => {
                let r = self.sw.storm_set(&port, None);
                if r.is_ok() {
                    info!(%port, "storm limit lifted");
                }
                r.map(|()| json!({})).map_err(|e| e.to_string())
            }
            Request::QosSet {
                port,
                max,
                rate,
                weight,
                min,
            } => control::qos_update(max, rate, weight, min)
                .map_err(|e| format!("QoS: {e}"))
                .and_then(|u| {
                    self.sw
                        .qos_set(&port, &u, now)
                        .map(|q| json!({ "qos": q }))
                        .map_err(|e| e.to_string())
                }),
            Request::QosClear { port } => self
                .sw
                .qos_clear(&port, now)
                .map(|()| json!({}))
                .map_err(|e| e.to_string()),
            Request::Trace { port } => match self.sw.set_trace(&port, true) {
                Ok(id) => {
                    info!(%port, "trace started");
                    self.clients[client].trace = Some((id, port.clone()));
                    Ok(json!({ "trace": port, "format": "pcapng" }))
                }
                Err(e) => Err(e.to_string()),
            },
            Request::PortRemove { port } => match self.sw.remove_port(&port) {
                Ok(id) => {
                    self.ports.remove(&id);
                    self.teams.ports.remove(&id);
                    if let Some(v) = self.vhost.ports.remove(&id) {
                        // No new VMM can connect; a connected one's frames are ignored
                        // (the switch no longer knows the port).
                        remove_socket(self.opener.as_ref(), v.path());
                    }
                    info!(%port, "port removed");
                    Ok(json!({}))
                }
                Err(e) => Err(e.to_string()),
            },
        };
        match result {
            Ok(v) => control::ok(v),
            Err(e) => control::err(e),
        }
    }
}
