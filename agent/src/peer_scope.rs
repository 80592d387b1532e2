//! What a peer host may name in a VM it migrates here.
//!
//! Every definition is confined to the storage roots ([`crate::confinement`]); a VM
//! that arrives from a peer host is confined further:
//!
//! - **Per-peer storage** (`vireod --peer-storage NAME=DIR`, repeatable): a peer with
//!   a scope may name files (kernel, initramfs, disks, their change logs and VHDX
//!   parents, the `storage_dir` of a shared-nothing migration) only beneath its own
//!   directories, each of which must lie beneath a storage root. No block device. A
//!   peer without a scope may name what any definition may (logged at start).
//! - **Other primaries' replicas**: this host's replica directory (`--replica-dir`,
//!   a storage root so that a failed-over VM runs on its images) holds one part per
//!   primary host (`DIR/<primary>/`). A peer may name files in its own part only: a
//!   peer that could name another primary's replica as its arriving VM's disk would
//!   read and overwrite another host's data. Decided by file identity (device and
//!   inode of each directory on the way), so another spelling of the same directory
//!   (the canonical path, a bind mount) is the same directory.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use confine::Roots;
use tracing::info;

use crate::model::VmDefinition;
use crate::AgentError;

/// `--peer-storage NAME=DIR` as given on the command line.
pub fn parse_flag(s: &str) -> Result<(String, PathBuf), String> {
    let (name, dir) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=DIR (a --peer host and a directory)"))?;
    if name.is_empty() || dir.is_empty() {
        return Err(format!("{s:?}: expected NAME=DIR"));
    }
    Ok((name.to_ascii_lowercase(), PathBuf::from(dir)))
}

/// The storage scopes of the peers that have one, each opened as roots of its own.
#[derive(Debug, Default)]
pub struct PeerScopes {
    scopes: BTreeMap<String, Arc<Roots>>,
}

impl PeerScopes {
    /// Opens each peer's directories; each must be a directory beneath a storage root
    /// (`roots`), reached without a symlink. `flags`: (peer, directory) pairs.
    pub fn open(roots: &Roots, flags: &[(String, PathBuf)]) -> Result<Self, AgentError> {
        let mut dirs: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for (peer, dir) in flags {
            let bad = |m: String| {
                AgentError::BadConfig(format!("--peer-storage {peer}={}: {m}", dir.display()))
            };
            roots.open_dir(dir).map_err(|e| {
                bad(format!(
                    "{e} (a peer's storage lies beneath a --storage-root)"
                ))
            })?;
            dirs.entry(peer.to_ascii_lowercase())
                .or_default()
                .push(dir.clone());
        }
        let mut scopes = BTreeMap::new();
        for (peer, dirs) in dirs {
            let scope = Roots::new(&dirs, &[])
                .map_err(|e| AgentError::BadConfig(format!("--peer-storage {peer}: {e}")))?;
            info!(%peer, dirs = ?scope.paths(), "a peer's arriving VMs may name files beneath these only");
            scopes.insert(peer, Arc::new(scope));
        }
        Ok(Self { scopes })
    }

    /// The scope of `peer` (a host name as its certificate proved it), if it has one.
    pub fn of(&self, peer: &str) -> Option<&Arc<Roots>> {
        self.scopes.get(&peer.to_ascii_lowercase())
    }
}

/// Every file `def` names, with what names it: the kernel, the initramfs, each disk
/// and each disk's change-log directory.
pub fn named_files(def: &VmDefinition) -> Vec<(String, &Path)> {
    let payload = &def.config.payload;
    let mut named = vec![("payload.kernel".to_string(), payload.kernel.as_path())];
    if let Some(i) = &payload.initramfs {
        named.push(("payload.initramfs".into(), i.as_path()));
    }
    for (i, d) in def.config.disks.iter().enumerate() {
        named.push((format!("disk {i}"), d.path.as_path()));
        if let Some(log) = &d.replica_log {
            named.push((format!("disk {i}: replica_log"), log.as_path()));
        }
    }
    named
}

/// This host's replica directory, known by its identity.
#[derive(Debug, Clone)]
pub struct ReplicaArea {
    dir: PathBuf,
    identity: (u64, u64),
}

impl ReplicaArea {
    /// The replica directory `dir` (it exists: the replica server made it).
    pub fn new(dir: &Path) -> Result<Self, AgentError> {
        let m = std::fs::metadata(dir)
            .map_err(|e| AgentError::BadConfig(format!("--replica-dir {}: {e}", dir.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            identity: (m.dev(), m.ino()),
        })
    }

    /// The primary whose part of the replica directory `path` lies in (the name of
    /// the path's component right beneath the directory), or None when `path` is not
    /// beneath it. `path` was confined (absolute, no `..`, no symlink beneath its root).
    fn primary_of<'p>(&self, path: &'p Path) -> Option<Option<&'p std::ffi::OsStr>> {
        let mut below = None;
        for ancestor in path.ancestors() {
            if let Ok(m) = std::fs::metadata(ancestor) {
                if (m.dev(), m.ino()) == self.identity {
                    return Some(below);
                }
            }
            below = ancestor.file_name();
        }
        None
    }

    /// Refuses a definition arriving from `peer` that names a file (or, for a
    /// shared-nothing migration, a `storage_dir`) in another primary's part of the
    /// replica directory, or the directory itself.
    pub fn refuse_others(
        &self,
        def: &VmDefinition,
        storage_dir: Option<&Path>,
        peer: &str,
    ) -> Result<(), AgentError> {
        let named = storage_dir
            .map(|d| ("storage_dir".to_string(), d))
            .into_iter()
            .chain(named_files(def));
        for (what, path) in named {
            let Some(primary) = self.primary_of(path) else {
                continue;
            };
            let own = primary.is_some_and(|p| p.eq_ignore_ascii_case(peer));
            if !own {
                return Err(AgentError::BadMigration(format!(
                    "{what}: {} is in the replica directory {} outside {peer}'s own part ({}/{peer}/): an arriving VM may not name another primary's replica",
                    path.display(),
                    self.dir.display(),
                    self.dir.display(),
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(disk: &Path) -> VmDefinition {
        serde_json::from_value(serde_json::json!({
            "config": {
                "payload": {"kernel": "/nonexistent/kernel"},
                "disks": [{"path": disk, "format": "raw"}],
            }
        }))
        .unwrap()
    }

    #[test]
    fn the_flag_is_a_peer_and_a_directory() {
        assert_eq!(
            parse_flag("Host-A=/srv/a").unwrap(),
            ("host-a".to_string(), PathBuf::from("/srv/a"))
        );
        for bad in ["host-a", "=/srv/a", "host-a=", ""] {
            assert!(parse_flag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_scope_must_lie_beneath_a_storage_root() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("a")).unwrap();
        let roots = Roots::new(&[root.path().to_path_buf()], &[]).unwrap();
        let flags = vec![("Host-A".to_string(), root.path().join("a"))];
        let scopes = PeerScopes::open(&roots, &flags).unwrap();
        assert!(scopes
            .of("host-a")
            .unwrap()
            .contains(&root.path().join("a/d.raw")));
        assert!(!scopes
            .of("HOST-A")
            .unwrap()
            .contains(&root.path().join("d.raw")));
        assert!(scopes.of("host-b").is_none());
        let outside = vec![("host-a".to_string(), elsewhere.path().to_path_buf())];
        let e = PeerScopes::open(&roots, &outside).unwrap_err().to_string();
        assert!(e.contains("--peer-storage host-a="), "{e}");
        assert!(e.contains("outside every storage root"), "{e}");
        let missing = vec![("host-a".to_string(), root.path().join("nope"))];
        assert!(PeerScopes::open(&roots, &missing).is_err());
    }

    #[test]
    fn a_peer_names_only_its_own_part_of_the_replica_directory() {
        let dir = tempfile::tempdir().unwrap();
        let replicas = dir.path().join("replicas");
        for p in ["host-a/vm", "host-c/vm"] {
            std::fs::create_dir_all(replicas.join(p)).unwrap();
        }
        let area = ReplicaArea::new(&replicas).unwrap();
        let own = replicas.join("host-a/vm/disk.raw");
        assert!(area.refuse_others(&def(&own), None, "host-a").is_ok());
        assert!(area.refuse_others(&def(&own), None, "HOST-A").is_ok());
        let other = replicas.join("host-c/vm/disk.raw");
        let e = area
            .refuse_others(&def(&other), None, "host-a")
            .unwrap_err()
            .to_string();
        assert!(e.contains("disk 0"), "{e}");
        assert!(e.contains("another primary's replica"), "{e}");
        // The directory itself, and the same directory by another spelling (a link).
        let top = replicas.join("disk.raw");
        assert!(area.refuse_others(&def(&top), None, "host-a").is_err());
        let alias = dir.path().join("alias");
        std::os::unix::fs::symlink(&replicas, &alias).unwrap();
        let aliased = alias.join("host-c/vm/disk.raw");
        assert!(area.refuse_others(&def(&aliased), None, "host-a").is_err());
        // A storage_dir in another primary's part; a file elsewhere is not this rule's.
        let elsewhere = dir.path().join("disk.raw");
        let e = area
            .refuse_others(&def(&elsewhere), Some(&replicas.join("host-c")), "host-a")
            .unwrap_err()
            .to_string();
        assert!(e.contains("storage_dir"), "{e}");
        assert!(area.refuse_others(&def(&elsewhere), None, "host-a").is_ok());
    }
}
