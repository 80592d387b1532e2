//! Where each VM's files live (state and run directories, sockets, runtime config,
//! pid file, jail), the launch specs of its VMM, and removing or giving back its files.

use std::path::PathBuf;

use super::{lock, vmm_fence_record, Supervisor};
use crate::launcher::{self, LaunchSpec, VmmArgs};
use crate::model::VmDefinition;
use crate::AgentError;

impl Supervisor {
    pub(super) fn vm_dir(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join("vms").join(name)
    }

    /// The VM's own run directory: its VMM's API and migration sockets, and what
    /// vireod hands a jailed VMM at run time (the jail binds it; nothing else of the
    /// run directory is visible there).
    pub fn vm_run_dir(&self, name: &str) -> PathBuf {
        self.cfg.run_dir.join("vms").join(name)
    }

    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.vm_run_dir(name).join("api.sock")
    }

    /// Where vireod relays a jailed VMM's outgoing migration to a unix receiver.
    pub(super) fn relay_socket_path(&self, name: &str) -> PathBuf {
        self.vm_run_dir(name).join("send.sock")
    }

    /// The jail of `name`'s next VMM (None with jailing off): its uid (given now if it
    /// has none yet), its root, its run directory and `binds`/`read_only` extras.
    pub(super) fn jail_spec(
        &self,
        name: &str,
        binds: Vec<PathBuf>,
        read_only: Vec<PathBuf>,
    ) -> Result<Option<launcher::JailSpec>, AgentError> {
        let Some(ids) = self.cfg.jail_uids else {
            return Ok(None);
        };
        let uid = lock(&self.inv).jail_uid(name, ids.range())?;
        let mut all = vec![self.vm_run_dir(name), self.saved_dir(name)];
        all.extend(binds);
        Ok(Some(launcher::JailSpec {
            uid,
            root: self.cfg.run_dir.join("jail").join(name),
            netns: None,
            binds: all,
            read_only,
            new_pid_namespace: false,
        }))
    }

    /// The uid of `name`'s jail, when jailing is on and it has one.
    pub(super) fn jail_uid(&self, name: &str) -> Option<u32> {
        self.cfg.jail_uids?;
        lock(&self.inv).jail_uid_of(name).ok().flatten()
    }

    pub fn serial_path(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("serial.log")
    }

    pub(super) fn config_path(&self, name: &str) -> PathBuf {
        self.cfg.run_dir.join("vms").join(format!("{name}.json"))
    }

    /// Where this vireod's VMMs may have unix migration sockets: its own `vms/` and
    /// its same-host peers' (`--peer-socket`).
    pub(super) fn send_socket_dirs(&self) -> Vec<PathBuf> {
        std::iter::once(self.cfg.run_dir.join("vms"))
            .chain(crate::confinement::peer_socket_dirs(&self.cfg.peer_sockets))
            .collect()
    }

    pub(super) fn migrate_socket_path(&self, name: &str) -> PathBuf {
        self.vm_run_dir(name).join("migrate.sock")
    }

    /// The launch of a VMM that boots the VM's runtime configuration.
    pub(super) fn spec(&self, name: &str) -> LaunchSpec {
        let run = self.cfg.run_dir.join("vms");
        LaunchSpec {
            name: name.to_string(),
            vireo_bin: self.cfg.vireo_bin.clone(),
            args: VmmArgs::Boot {
                config: self.config_path(name),
            },
            socket: self.socket_path(name),
            log: self.vm_dir(name).join("vireo.log"),
            pid_file: run.join(format!("{name}.pid")),
            env_file: run.join(format!("{name}.env")),
            // The VM's saved-state area is one more root of its own (see `save`).
            storage_roots: self
                .cfg
                .storage_roots
                .iter()
                .cloned()
                .chain([self.saved_dir(name)])
                .collect(),
            block_devices: self.cfg.block_devices.clone(),
            socket_dirs: self.send_socket_dirs(),
            memory: None,
            jail: None,
        }
    }

    /// The launch of a VMM that resumes the VM from its saved state.
    pub(super) fn restore_spec(&self, name: &str) -> LaunchSpec {
        LaunchSpec {
            args: VmmArgs::Restore {
                dir: self.saved_state(name),
                serial: self.serial_path(name),
            },
            ..self.spec(name)
        }
    }

    /// The launch of a VMM that waits for the VM to arrive by live migration.
    pub(super) fn receive_spec(&self, name: &str) -> LaunchSpec {
        LaunchSpec {
            args: VmmArgs::Receive {
                serial: self.serial_path(name),
            },
            ..self.spec(name)
        }
    }

    pub(super) fn remove_run_files(&self, name: &str) {
        // Its switch ports go with its VMM.
        self.switches.detach(name);
        let s = self.spec(name);
        for p in [
            &s.socket,
            &s.pid_file,
            &self.config_path(name),
            &s.env_file,
            &self.migrate_socket_path(name),
            &self.relay_socket_path(name),
            // A VMM of the old layout's socket (see `legacy_spec`).
            &self.cfg.run_dir.join("vms").join(format!("{name}.sock")),
        ] {
            let _ = std::fs::remove_file(p);
        }
        // An older vireod copied the host identity here for a TLS migration.
        let _ = std::fs::remove_dir_all(self.vm_run_dir(name).join("tls"));
        let _ = std::fs::remove_dir(self.vm_run_dir(name));
    }

    /// A deleted VM's writable disks (and fencing records, and change-log directories
    /// with their files) go back to root (files 0600): its jail uid is free for the
    /// next VM. Call before the definition is removed from the inventory.
    pub(super) fn give_back_files(&self, name: &str, def: &VmDefinition) {
        if self.jail_uid(name).is_none() {
            return;
        }
        for d in &def.config.disks {
            if !d.readonly {
                crate::jailing::give_back(&self.roots, &d.path);
            }
            if d.fencing_token.is_some() {
                crate::jailing::give_back(&self.roots, &vmm_fence_record(&d.path));
            }
            if let Some(log) = &d.replica_log {
                crate::jailing::give_back_log_dir(&self.roots, log);
            }
        }
    }
}
