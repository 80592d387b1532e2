//! The host's virtual switches (`vireod --switch NAME[,uplink=IF...]`): vireod runs one
//! `vireo-switch` per switch as its own child, restarts it when it dies, and keeps the
//! ports of its running VMs on it.
//!
//! A definition's network adapter names a switch (`{"switch":"lan","vlan":10}`); the
//! client never names a path. At each start vireod derives the port and its socket:
//!
//! ```text
//! <run-dir>/switches/NAME/ctl.sock             the switch's control socket
//! <run-dir>/switches/NAME/vm/VM/               one directory per VM (its --socket-dir
//!                                              is <run-dir>/switches/NAME)
//! <run-dir>/switches/NAME/vm/VM/N.sock         adapter N's vhost-user port, "VM.N"
//! ```
//!
//! The VM's directory (root:the jail's gid, setgid, 2750; the switch runs with umask
//! 007, so its sockets are 0770 of that group) is bound read-only into the VM's jail:
//! the jailed VMM may connect to what the switch makes there, and a switch restarted
//! makes a new socket inode in the same directory, which the jail sees (binding the
//! socket itself would keep the dead switch's inode). After a restart vireod adds the
//! ports of its running VMs again and their VMMs reconnect by themselves
//! (docs/switch.md, "A switch restarted").
//!
//! [`supervise`] runs and restarts a switch; [`control`] speaks its control socket.

mod control;
mod supervise;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tracing::{info, warn};

use crate::model::VmDefinition;
use crate::supervisor::mkdir;
use crate::AgentError;
use vireo_util::sync::lock;

/// The longest unix socket path (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// `vireod --switch NAME[,uplink=IF][,trunk=V:V..][,native=V]`: a switch vireod runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchSpec {
    pub name: String,
    /// A host interface the switch bridges to (its port `uplink`).
    pub uplink: Option<String>,
    /// The uplink as a trunk of these VLANs (`10:20`), tagged on the wire.
    pub trunk: Option<String>,
    /// The trunk's untagged (native) VLAN.
    pub native: Option<u16>,
}

impl std::str::FromStr for SwitchSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let name = parts.next().unwrap_or_default().to_string();
        let ok_name = !name.is_empty()
            && name.len() <= 32
            && name.as_bytes()[0].is_ascii_alphanumeric()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok_name {
            return Err(format!(
                "switch name {name:?}: 1-32 letters, digits, '-' or '_', starting with a letter or digit"
            ));
        }
        let mut spec = SwitchSpec {
            name,
            uplink: None,
            trunk: None,
            native: None,
        };
        for kv in parts {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("{kv:?}: expected KEY=VALUE"))?;
            match k {
                "uplink" => {
                    net::validate_tap_name(v).map_err(|e| format!("uplink={v}: {e}"))?;
                    spec.uplink = Some(v.to_string());
                }
                "trunk" => {
                    let vlans: Result<Vec<u16>, _> = v.split(':').map(str::parse).collect();
                    match vlans {
                        Ok(l) if !l.is_empty() && l.iter().all(|v| (1..=4094).contains(v)) => {
                            spec.trunk = Some(v.to_string())
                        }
                        _ => return Err(format!("trunk={v}: expected VLANs 1-4094 as V:V...")),
                    }
                }
                "native" => match v.parse::<u16>() {
                    Ok(n) if (1..=4094).contains(&n) => spec.native = Some(n),
                    _ => return Err(format!("native={v}: expected a VLAN 1-4094")),
                },
                _ => {
                    return Err(format!(
                        "unknown switch option {k:?} (known: uplink, trunk, native)"
                    ))
                }
            }
        }
        if (spec.trunk.is_some() || spec.native.is_some()) && spec.uplink.is_none() {
            return Err(format!(
                "switch {}: trunk= and native= need uplink=",
                spec.name
            ));
        }
        Ok(spec)
    }
}

impl SwitchSpec {
    /// The uplink's port spec for `vireo-switch --port`, if the switch has one.
    fn uplink_port(&self) -> Option<String> {
        let iface = self.uplink.as_ref()?;
        let mut p = format!("name=uplink,iface={iface}");
        if let Some(t) = &self.trunk {
            p.push_str(&format!(",trunk={t}"));
        }
        if let Some(n) = self.native {
            p.push_str(&format!(",native={n}"));
        }
        Some(p)
    }
}

/// A VM's port on a switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub switch: String,
    /// `VM.N` (N: the adapter's index in the definition).
    pub name: String,
    /// The `port-add` spec.
    pub spec: String,
}

/// What a VM's start needs from its switches.
#[derive(Debug, Default)]
pub struct Prepared {
    pub ports: Vec<Port>,
    /// (adapter index, its socket): the runtime config's `vhost_user`.
    pub sockets: Vec<(usize, PathBuf)>,
    /// The VM's socket directories, bound read-only into its jail.
    pub dirs: Vec<PathBuf>,
}

/// One switch: its spec, paths and what vireod knows of its process and ports.
struct Host {
    spec: SwitchSpec,
    dir: PathBuf,
    control: PathBuf,
    state: Mutex<HostState>,
}

#[derive(Default)]
struct HostState {
    /// The switch answers its control socket and has every registered port.
    up: bool,
    pid: Option<u32>,
    /// How many times it was started.
    starts: u32,
    /// Port name → (VM, spec): the ports of the VMs running on it.
    ports: BTreeMap<String, (String, String)>,
}

/// A switch as `GET /api/v1/switches` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SwitchStatus {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// The switch process answers and holds every running VM's port.
    pub running: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Times vireod started it again after it ended.
    pub restarts: u32,
    /// The VMs' ports: `VM.N`.
    pub ports: Vec<SwitchPortStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SwitchPortStatus {
    pub port: String,
    pub vm: String,
}

/// Every switch of this vireod.
pub struct Switches {
    log_dir: PathBuf,
    bin: PathBuf,
    hosts: BTreeMap<String, Arc<Host>>,
}

impl Switches {
    /// The switches of `specs`, their directories under `<run_dir>/switches` (made,
    /// vireod's user only) and logs under `<state_dir>/switches`. Nothing runs until
    /// [`Switches::start`].
    pub fn new(
        specs: &[SwitchSpec],
        run_dir: &Path,
        state_dir: &Path,
        bin: PathBuf,
    ) -> Result<Self, AgentError> {
        let root = run_dir.join("switches");
        let log_dir = state_dir.join("switches");
        // The ports' sockets go into `port-add` specs, which are `key=value,...`.
        if !specs.is_empty() && root.to_string_lossy().contains([',', '=']) {
            return Err(AgentError::BadConfig(format!(
                "--run-dir {}: a run directory with ',' or '=' cannot hold switch ports",
                run_dir.display()
            )));
        }
        let mut hosts = BTreeMap::new();
        for spec in specs {
            if hosts.contains_key(&spec.name) {
                return Err(AgentError::BadConfig(format!(
                    "--switch {}: named twice",
                    spec.name
                )));
            }
            let dir = root.join(&spec.name);
            let host = Host {
                control: dir.join("ctl.sock"),
                dir,
                spec: spec.clone(),
                state: Mutex::default(),
            };
            hosts.insert(spec.name.clone(), Arc::new(host));
        }
        if !hosts.is_empty() {
            mkdir(&root, 0o700)?;
            mkdir(&log_dir, 0o700)?;
            for h in hosts.values() {
                mkdir(&h.dir, 0o700)?;
                mkdir(&h.dir.join("vm"), 0o700)?;
            }
        }
        Ok(Self {
            log_dir,
            bin,
            hosts,
        })
    }

    /// Starts each switch's supervising thread: it runs the switch, adds the
    /// registered ports once it answers, and starts it again whenever it ends.
    pub fn start(&self) {
        for h in self.hosts.values() {
            let (host, bin) = (h.clone(), self.bin.clone());
            let log = self.log_dir.join(format!("{}.log", h.spec.name));
            let name = format!("switch-{}", h.spec.name);
            if let Err(e) = std::thread::Builder::new()
                .name(name)
                .spawn(move || supervise::run(&host, &bin, &log))
            {
                warn!(switch = %h.spec.name, error = %e, "cannot start the switch's supervisor thread");
            }
        }
    }

    fn known(&self) -> String {
        if self.hosts.is_empty() {
            return "none".into();
        }
        self.hosts.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// Checks a definition's network adapters for this host: a switch it names must
    /// be one of this vireod's, and no adapter names a host path (`vhost_user`: the
    /// sockets are vireod's to derive). A switch adapter without a MAC gets one now,
    /// so that it is the same at every start (the port's guards need it).
    pub fn check_definition(&self, vm: &str, def: &mut VmDefinition) -> Result<(), AgentError> {
        for (i, n) in def.config.nets.iter_mut().enumerate() {
            if let Some(p) = &n.vhost_user {
                return Err(AgentError::BadDefinition(format!(
                    "nets[{i}].vhost_user {} names a host socket: under vireod an adapter names a switch (\"switch\": NAME)",
                    p.display()
                )));
            }
            let Some(sw) = &n.switch else { continue };
            let Some(host) = self.hosts.get(sw) else {
                return Err(AgentError::UnknownSwitch {
                    index: i,
                    switch: sw.clone(),
                    known: self.known(),
                });
            };
            let port = port_name(vm, i);
            if port.len() > 64 {
                return Err(AgentError::BadDefinition(format!(
                    "nets[{i}]: a VM on a switch has a name of at most {} characters (its port is VM.N)",
                    64 - (port.len() - vm.len())
                )));
            }
            let sock = host.dir.join("vm").join(vm).join(format!("{i}.sock"));
            if sock.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(AgentError::BadDefinition(format!(
                    "nets[{i}]: the port's socket {} would be longer than {MAX_SOCKET_PATH} bytes (a shorter VM name, or a shorter --run-dir)",
                    sock.display()
                )));
            }
            n.mac.get_or_insert_with(net::MacAddr::random_local);
        }
        Ok(())
    }

    /// Makes the VM's socket directory on each switch its adapters name (owned by
    /// vireod's user and the jail's gid `jail_gid`, setgid, 2750: the switch's sockets
    /// there are the jail's group's) and derives its ports.
    pub fn prepare(
        &self,
        vm: &str,
        def: &VmDefinition,
        jail_gid: Option<u32>,
    ) -> Result<Prepared, AgentError> {
        let mut out = Prepared::default();
        for (i, n) in def.config.nets.iter().enumerate() {
            let Some(sw) = &n.switch else { continue };
            let host = self
                .hosts
                .get(sw)
                .ok_or_else(|| AgentError::UnknownSwitch {
                    index: i,
                    switch: sw.clone(),
                    known: self.known(),
                })?;
            let dir = host.dir.join("vm").join(vm);
            if !out.dirs.contains(&dir) {
                vm_dir(&dir, jail_gid)?;
                out.dirs.push(dir.clone());
            }
            let sock = dir.join(format!("{i}.sock"));
            let name = port_name(vm, i);
            let mut spec = format!("name={name},vhost-user={}", sock.display());
            if let Some(m) = n.mac {
                spec.push_str(&format!(",mac={m}"));
            }
            if let Some(v) = n.vlan {
                spec.push_str(&format!(",vlan={v}"));
            }
            if let Some(g) = &n.guard {
                spec.push_str(&format!(",guard={g}"));
            }
            if let Some(m) = &n.max {
                spec.push_str(&format!(",max={m}"));
            }
            out.ports.push(Port {
                switch: sw.clone(),
                name,
                spec,
            });
            out.sockets.push((i, sock));
        }
        Ok(out)
    }

    /// Puts `vm`'s ports on their switches (blocking: a request each on the control
    /// socket). A port the switch refuses is an error (and no port of the VM stays);
    /// a switch that is not up now gets them when it is (its supervisor adds every
    /// registered port).
    pub fn attach(&self, vm: &str, ports: &[Port]) -> Result<(), AgentError> {
        for p in ports {
            let Some(host) = self.hosts.get(&p.switch) else {
                continue;
            };
            let mut st = lock(&host.state);
            st.ports
                .insert(p.name.clone(), (vm.to_string(), p.spec.clone()));
            if !st.up {
                info!(switch = %p.switch, port = %p.name, "switch not up: the port is added when it is");
                continue;
            }
            match host.add_port(&p.name, &p.spec) {
                Ok(()) => info!(switch = %p.switch, port = %p.name, "port added"),
                Err(control::ControlError::Refused(reason)) => {
                    st.ports.remove(&p.name);
                    drop(st);
                    self.detach(vm);
                    return Err(AgentError::SwitchPort {
                        switch: p.switch.clone(),
                        port: p.name.clone(),
                        reason,
                    });
                }
                Err(e) => {
                    // The switch went away meanwhile: its supervisor adds the port
                    // once it runs again.
                    warn!(switch = %p.switch, port = %p.name, error = %e, "cannot reach the switch: the port is added when it runs again");
                }
            }
        }
        Ok(())
    }

    /// Takes `vm`'s ports off every switch (its VMM is gone, or never started) and
    /// removes its socket directories.
    pub fn detach(&self, vm: &str) {
        for host in self.hosts.values() {
            let mut st = lock(&host.state);
            let mine: Vec<String> = st
                .ports
                .iter()
                .filter(|(_, (v, _))| v == vm)
                .map(|(p, _)| p.clone())
                .collect();
            for p in &mine {
                st.ports.remove(p);
                if !st.up {
                    continue;
                }
                match control::request(&host.control, &control::port_remove(p)) {
                    Ok(()) => info!(switch = %host.spec.name, port = %p, "port removed"),
                    Err(e) => {
                        warn!(switch = %host.spec.name, port = %p, error = %e, "cannot remove the port")
                    }
                }
            }
            drop(st);
            let dir = host.dir.join("vm").join(vm);
            if dir.exists() {
                // The switch removed its sockets with the ports; a dead switch's stay.
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }

    /// Every switch, as the API shows it.
    pub fn status(&self) -> Vec<SwitchStatus> {
        self.hosts
            .values()
            .map(|h| {
                let st = lock(&h.state);
                SwitchStatus {
                    name: h.spec.name.clone(),
                    uplink: h.spec.uplink.clone(),
                    running: st.up,
                    pid: st.pid,
                    restarts: st.starts.saturating_sub(1),
                    ports: st
                        .ports
                        .iter()
                        .map(|(p, (vm, _))| SwitchPortStatus {
                            port: p.clone(),
                            vm: vm.clone(),
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

impl Host {
    /// `port-add`, after a `port-remove` of the same name (a port left by a VMM that
    /// ended while its switch was down, or added by the supervisor meanwhile).
    fn add_port(&self, name: &str, spec: &str) -> Result<(), control::ControlError> {
        let _ = control::request(&self.control, &control::port_remove(name));
        control::request(&self.control, &control::port_add(spec))
    }
}

/// A VM's adapter `i`'s port name.
fn port_name(vm: &str, i: usize) -> String {
    format!("{vm}.{i}")
}

/// Makes (or fixes) a VM's socket directory on a switch: vireod's user, the jail's
/// gid, setgid and 2750 (0700 without a jail).
fn vm_dir(dir: &Path, jail_gid: Option<u32>) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match jail_gid {
        Some(_) => 0o2750,
        None => 0o700,
    };
    mkdir(dir, 0o700)?;
    if let Some(gid) = jail_gid {
        std::os::unix::fs::lchown(dir, None, Some(gid))
            .map_err(|e| AgentError::io("cannot give the jail's group", dir, e))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| AgentError::io("cannot set permissions of", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_flags_parse_and_bad_ones_are_refused_with_one_line() {
        let s: SwitchSpec = "lan".parse().unwrap();
        assert_eq!(s.uplink_port(), None);
        let s: SwitchSpec = "ext,uplink=eth1,trunk=10:20,native=1".parse().unwrap();
        assert_eq!(
            s.uplink_port().unwrap(),
            "name=uplink,iface=eth1,trunk=10:20,native=1"
        );
        for (bad, needle) in [
            ("", "switch name"),
            ("a/b", "switch name"),
            ("-x", "switch name"),
            ("lan,uplink=a234567890123456", "uplink="),
            ("lan,uplink=e,trunk=0", "trunk="),
            (
                "lan,uplink=e,trunk=10,vhost-user=/x",
                "unknown switch option",
            ),
            ("lan,trunk=10", "need uplink="),
            ("lan,native=5000", "native="),
            ("lan,uplink", "KEY=VALUE"),
        ] {
            let e = bad.parse::<SwitchSpec>().unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
            assert!(!e.contains('\n'));
        }
    }
}
