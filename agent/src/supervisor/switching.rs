//! A VM's adapters on the host's switches ([`crate::switches`]): at start, the ports
//! are derived and added and the VMM gets their sockets (shared memory implied, the
//! socket directories bound read-only into its jail); a re-adopted VMM's ports are
//! registered again; when the VMM is gone they are removed (`remove_run_files`).

use std::sync::Arc;

use api::config::VmConfig;

use super::Supervisor;
use crate::launcher::LaunchSpec;
use crate::model::VmDefinition;
use crate::switches::Port;
use crate::AgentError;

impl Supervisor {
    /// Derives `name`'s switch ports and rewrites its VMM's launch and runtime config
    /// for them: each switch adapter becomes `vhost_user` on its port's socket,
    /// guest memory is shared, the jail binds the VM's socket directories read-only
    /// and the VMM may connect to sockets there (`--socket-dir`). Returns the ports to
    /// add.
    pub(super) fn switch_ports(
        &self,
        name: &str,
        def: &VmDefinition,
        spec: &mut LaunchSpec,
        cfg: &mut VmConfig,
    ) -> Result<Vec<Port>, AgentError> {
        if !cfg.nets.iter().any(|n| n.switch.is_some()) {
            return Ok(Vec::new());
        }
        let gid = spec.jail.as_ref().map(|j| j.uid);
        let prepared = self.switches.prepare(name, def, gid)?;
        for (i, sock) in prepared.sockets {
            if let Some(n) = cfg.nets.get_mut(i) {
                n.vhost_user = Some(sock);
                n.switch = None;
                n.vlan = None;
                n.guard = None;
                n.max = None;
            }
        }
        cfg.memory.shared = true;
        // The VMM connects only to sockets in a --socket-dir (with storage roots).
        spec.socket_dirs.extend(prepared.dirs.iter().cloned());
        if let Some(jail) = spec.jail.as_mut() {
            jail.read_only.extend(prepared.dirs);
        }
        Ok(prepared.ports)
    }

    /// Adds `ports` of VM `name` to their switches (off the async runtime: a control
    /// request each).
    pub(super) async fn attach_ports(
        self: &Arc<Self>,
        name: &str,
        ports: Vec<Port>,
    ) -> Result<(), AgentError> {
        if ports.is_empty() {
            return Ok(());
        }
        let (sup, vm) = (self.clone(), name.to_string());
        tokio::task::spawn_blocking(move || sup.switches.attach(&vm, &ports))
            .await
            .map_err(|e| AgentError::BadConfig(format!("switch ports of {name}: {e}")))?
    }

    /// A re-adopted VMM's ports: added again (the switch vireod runs now is new).
    pub(super) async fn reattach_ports(self: &Arc<Self>, name: &str) {
        let Some(def) = super::lock(&self.vms).get(name).map(|vm| vm.def.clone()) else {
            return;
        };
        if !def.config.nets.iter().any(|n| n.switch.is_some()) {
            return;
        }
        let added = match self.switches.prepare(name, &def, self.jail_uid(name)) {
            Ok(p) => self.attach_ports(name, p.ports).await,
            Err(e) => Err(e),
        };
        if let Err(e) = added {
            tracing::warn!(vm = %name, error = %e, "the re-adopted VM's switch ports are not added");
        }
    }
}
