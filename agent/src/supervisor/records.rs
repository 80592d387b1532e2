//! The migration records (both directions, as this host and as a peer host sees them)
//! and forgetting a VM that is no longer this host's.

use tracing::warn;

use super::{lock, Supervisor};
use crate::model::MigrationRecord;
use crate::{error_chain, AgentError};

impl Supervisor {
    pub fn migrations(&self) -> Vec<MigrationRecord> {
        self.migrations.list()
    }

    pub fn migration(&self, id: &str) -> Result<MigrationRecord, AgentError> {
        self.migrations.get(id)
    }

    /// Asks migration `id` to stop (a queued one, or an incoming one).
    pub fn cancel_migration(&self, id: &str) -> Result<MigrationRecord, AgentError> {
        self.migrations.cancel(id)?;
        self.migrations.get(id)
    }

    /// Migration `id` as peer host `peer` may see it: only an incoming one it sent
    /// (any other is unknown to it).
    pub fn peer_migration(&self, id: &str, peer: &str) -> Result<MigrationRecord, AgentError> {
        match self.migrations.get(id) {
            Ok(r)
                if r.direction == crate::model::MigrationDirection::Incoming
                    && r.peer_host.as_deref() == Some(peer) =>
            {
                Ok(r)
            }
            _ => Err(AgentError::UnknownMigration(id.to_string())),
        }
    }

    /// Cancels the incoming migration `id` that peer host `peer` sent.
    pub fn peer_cancel_migration(
        &self,
        id: &str,
        peer: &str,
    ) -> Result<MigrationRecord, AgentError> {
        self.peer_migration(id, peer)?;
        self.cancel_migration(id)
    }

    pub(super) fn save_record(&self, rec: &MigrationRecord) {
        if let Err(e) = lock(&self.inv).save_migration(rec) {
            warn!(id = %rec.id, error = %error_chain(&e), "cannot store migration record");
        }
    }

    /// Changes a record and stores it (state changes; progress is only kept in memory).
    pub(super) fn record(
        &self,
        id: &str,
        f: impl FnOnce(&mut MigrationRecord),
    ) -> Option<MigrationRecord> {
        let rec = self.migrations.update(id, f)?;
        self.save_record(&rec);
        Some(rec)
    }

    /// Removes a VM that is no longer this host's (migrated away, or an incoming one
    /// that never arrived): definition, history, files. Its VMM must be gone.
    pub(super) fn forget(&self, name: &str) {
        let mut vms = lock(&self.vms);
        // Its disks stay as they are: after a migration they are the destination's.
        if vms.remove(name).is_none() {
            return;
        }
        if let Err(e) = lock(&self.inv).delete(name) {
            warn!(vm = name, error = %error_chain(&e), "cannot remove the VM from the inventory");
        }
        drop(vms);
        self.remove_run_files(name);
        self.cfg.launcher.ended(&self.spec(name));
        let dir = self.vm_dir(name);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(vm = name, dir = %dir.display(), error = %e, "cannot remove VM directory");
            }
        }
        self.emit(name, "deleted", None);
    }
}
