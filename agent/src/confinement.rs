//! What a definition may name on this host: files beneath vireod's storage roots
//! (`--storage-root`, default `<state-dir>/images`) and allow-listed block devices.
//!
//! Each path is checked by opening it beneath its root ([`confine::Roots`]: no
//! symlinks, no `..`, the type checked on the fd). The VMMs vireod starts get the same
//! roots, so what they open at start is checked the same way again: a file swapped
//! for a symlink after the definition was accepted is not followed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::config::{DiskFormat, OutputConfig};
use confine::{ConfineError, Roots};

use crate::model::VmDefinition;
use crate::AgentError;

fn refuse(what: &str, e: ConfineError) -> AgentError {
    AgentError::BadDefinition(format!("{what}: {e}"))
}

/// Refuses an arriving VM's definition (`def`) that names a disk of another VM of this
/// host (`others`: name and definition) as a disk, kernel or initramfs: the source
/// (a peer host, or another vireod) may name files beneath this host's storage roots,
/// but not hand itself another VM's data — a receiving VMM would open that disk for
/// the source's guest, or load it into guest memory as an initramfs. Files are
/// compared by identity (device and inode: another path, a hard link or a bind mount
/// of the same file is the same file), paths that do not exist yet by name.
pub fn refuse_other_vms_disks(
    def: &VmDefinition,
    others: &[(String, VmDefinition)],
) -> Result<(), AgentError> {
    use std::os::unix::fs::MetadataExt;
    let identity = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let mut taken = std::collections::HashMap::new();
    let mut taken_paths = std::collections::HashMap::new();
    for (name, other) in others {
        for d in &other.config.disks {
            if let Some(id) = identity(&d.path) {
                taken.insert(id, name.as_str());
            }
            taken_paths.insert(d.path.clone(), name.as_str());
        }
    }
    let named = crate::peer_scope::named_files(def);
    for (what, path) in named {
        let owner = identity(path)
            .and_then(|id| taken.get(&id))
            .or_else(|| taken_paths.get(path));
        if let Some(owner) = owner {
            return Err(AgentError::BadMigration(format!(
                "{what}: {} is a disk of VM {owner} on this host; an arriving VM may not name it",
                path.display()
            )));
        }
    }
    Ok(())
}

/// The name of the console file in a VM's own directory.
pub const CONSOLE_FILE: &str = "console.log";

/// Checks every path of `def` against `roots` and fills in each disk's format (from
/// `format=`, else the file extension, else refused). `vm_dir` is the VM's own
/// directory: the only place its console file may be.
pub fn confine_definition(
    roots: &Arc<Roots>,
    vm_dir: &Path,
    def: &mut VmDefinition,
) -> Result<(), AgentError> {
    let payload = &def.config.payload;
    roots
        .open_file(&payload.kernel, false)
        .map_err(|e| refuse("payload.kernel", e))?;
    if let Some(i) = &payload.initramfs {
        roots
            .open_file(i, false)
            .map_err(|e| refuse("payload.initramfs", e))?;
    }
    for (i, d) in def.config.disks.iter_mut().enumerate() {
        let what = format!("disk {i}");
        let file = roots
            .open_file(&d.path, false)
            .map_err(|e| refuse(&what, e))?;
        let format = d
            .format
            .or_else(|| DiskFormat::from_extension(&d.path))
            .ok_or_else(|| {
                AgentError::BadDefinition(format!(
                    "{what}: {}: say format=raw or format=vhdx (vireod never guesses a format from the content; .vhdx, .raw and .img name theirs)",
                    d.path.display()
                ))
            })?;
        d.format = Some(format);
        if format == DiskFormat::Vhdx {
            check_vhdx(roots, file, &d.path)
                .map_err(|e| AgentError::BadDefinition(format!("{what}: {e}")))?;
        }
        if let Some(log) = &d.replica_log {
            check_replica_log(roots, log)
                .map_err(|e| refuse(&format!("{what}: replica_log"), e))?;
        }
    }
    if let OutputConfig::File(p) = &def.config.console {
        if p != &vm_dir.join(CONSOLE_FILE) {
            return Err(AgentError::BadDefinition(format!(
                "console file {}: vireod writes a VM's console to {} (name that path, or use off or null)",
                p.display(),
                vm_dir.join(CONSOLE_FILE).display()
            )));
        }
    }
    Ok(())
}

/// A disk's change log directory: beneath a storage root with no symlink on the way
/// (its parent opened beneath the root; the directory itself, if it exists, opened
/// beneath it as a directory). vireod creates it at each start
/// ([`crate::jailing::hand_over_log_dir`]) and a jailed VMM gets it chowned: a path
/// outside the roots would give the VM's uid a directory of the host.
pub fn check_replica_log(roots: &Roots, log: &Path) -> Result<(), ConfineError> {
    roots.open_parent(log)?;
    match roots.open_dir(log) {
        Ok(_) => Ok(()),
        Err(ConfineError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Opens the VHDX (read-only, no lock, the log replayed in memory only) and its whole
/// parent chain: each parent in the child's directory or beneath a root.
fn check_vhdx(roots: &Arc<Roots>, file: std::fs::File, path: &Path) -> Result<(), String> {
    let storage: Arc<dyn vhdx::Storage> = Arc::new(vhdx::FileStorage::new(file));
    let opts = vhdx::OpenOptions {
        read_only: true,
        no_lock: true,
        parent_opener: Some(parent_opener(roots.clone())),
        ..Default::default()
    };
    vhdx::Vhdx::open_storage(storage, path, opts)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A VHDX parent: in the child's directory (opened without following a link) or
/// beneath a storage root.
pub(crate) fn parent_opener(roots: Arc<Roots>) -> vhdx::ParentOpener {
    vhdx::ParentOpener(Arc::new(move |child: &Path, candidate: &Path| {
        let not_found = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        let same_dir = confine::check_lexical(candidate).is_ok()
            && candidate.parent().is_some()
            && candidate.parent() == child.parent();
        if same_dir && !roots.contains(candidate) {
            let (Some(dir), Some(name)) = (candidate.parent(), candidate.file_name()) else {
                return Ok(None);
            };
            let opened = confine::open_dir(dir).and_then(|d| {
                use std::os::fd::AsFd;
                confine::open_file_at(d.as_fd(), name)
            });
            return match opened {
                Ok(f) => Ok(Some(f)),
                Err(e) if not_found(&e) => Ok(None),
                Err(e) => Err(format!("parent {}: {e}", candidate.display())),
            };
        }
        match roots.open_file(candidate, false) {
            Ok(f) => Ok(Some(f)),
            Err(ConfineError::Io { source, .. }) if not_found(&source) => Ok(None),
            Err(e) => Err(format!("parent refused: {e}")),
        }
    }))
}

/// A `unix:` receiver socket must be in the VM's own `<run-dir>/vms/NAME/` (where its
/// jailed VMM can make it; vireod removes a stale one there before the VMM listens).
pub fn check_receiver_url(url: &str, socket_dir: &Path) -> Result<(), AgentError> {
    let Some(p) = url.strip_prefix("unix:") else {
        return Ok(());
    };
    let path = Path::new(p);
    confine::check_lexical(path).map_err(|e| AgentError::BadMigration(e.to_string()))?;
    if path.parent() != Some(socket_dir) || path.file_name().is_none() {
        return Err(AgentError::BadMigration(format!(
            "receiver_url {url:?}: a unix socket must be in {}",
            socket_dir.display()
        )));
    }
    Ok(())
}

/// Where the VMs of another vireod of this host listen: `vms/` beside its API socket
/// (vireod's layout: `<run-dir>/vireod.sock` and `<run-dir>/vms/`).
pub fn peer_socket_dirs(peer_sockets: &[PathBuf]) -> Vec<PathBuf> {
    peer_sockets
        .iter()
        .filter_map(|s| s.parent().map(|d| d.join("vms")))
        .collect()
}

/// A `--peer-socket` must be an absolute path without `..`.
pub fn check_peer_socket_flag(path: &Path) -> Result<(), AgentError> {
    confine::check_lexical(path).map_err(|e| AgentError::BadConfig(format!("--peer-socket: {e}")))
}

/// A `destination_agent` socket path must be one of the configured `--peer-socket`s:
/// vireod (root) connects to it and sends the VM's definition, so an operator may not
/// point it at any other socket of the host.
pub fn check_agent_socket(path: &Path, peer_sockets: &[PathBuf]) -> Result<(), AgentError> {
    confine::check_lexical(path)
        .map_err(|e| AgentError::BadMigration(format!("destination_agent: {e}")))?;
    if peer_sockets.iter().any(|p| p == path) {
        return Ok(());
    }
    Err(AgentError::BadMigration(format!(
        "destination_agent {}: not a peer vireod of this host (allowed: {}; vireod --peer-socket PATH)",
        path.display(),
        list(peer_sockets)
    )))
}

/// A `unix:` migration URL this vireod's VMM may send to: a socket in one of `dirs`
/// (this vireod's `vms/` and its peers') or in a VM's run directory there
/// (`vms/NAME/`); the VMM applies the same rule.
pub fn check_send_url(url: &str, dirs: &[PathBuf]) -> Result<(), AgentError> {
    let Some(p) = url.strip_prefix("unix:") else {
        return Ok(());
    };
    let path = Path::new(p);
    confine::check_lexical(path).map_err(|e| AgentError::BadMigration(format!("{url:?}: {e}")))?;
    if confine::in_socket_dir(path, dirs) {
        return Ok(());
    }
    Err(AgentError::BadMigration(format!(
        "{url:?}: a unix migration socket must be in (a VM's directory in) {}",
        list(dirs)
    )))
}

fn list(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "none".into();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The size the guest sees of `disk`: its declared `size`, else its image's (opened
/// beneath a root; raw: the file's or device's length; VHDX: its virtual size, read
/// without a lock and without its parents).
pub fn disk_size(roots: &Roots, disk: &api::config::DiskConfig) -> Result<u64, String> {
    use std::io::{Seek, SeekFrom};
    if let Some(s) = disk.size {
        return Ok(s);
    }
    let mut file = roots
        .open_file(&disk.path, false)
        .map_err(|e| e.to_string())?;
    match disk.effective_format() {
        DiskFormat::Raw => file
            .seek(SeekFrom::End(0))
            .map_err(|e| format!("{}: {e}", disk.path.display())),
        DiskFormat::Vhdx => {
            let storage: Arc<dyn vhdx::Storage> = Arc::new(vhdx::FileStorage::new(file));
            let opts = vhdx::OpenOptions {
                read_only: true,
                no_lock: true,
                skip_parent: true,
                ..Default::default()
            };
            vhdx::Vhdx::open_storage(storage, &disk.path, opts)
                .map(|v| v.virtual_size())
                .map_err(|e| format!("{}: {e}", disk.path.display()))
        }
    }
}

/// An incoming shared-nothing migration: its disks do not exist here yet; each copy is
/// made in `storage_dir` (under its file name) at the size the definition declares, and
/// the sending VMM may announce and write no more. Every other path is checked as for
/// a definition. The disks' paths become the copies'.
pub fn confine_incoming_copy(
    roots: &Arc<Roots>,
    vm_dir: &Path,
    def: &mut VmDefinition,
    storage_dir: &Path,
) -> Result<(), AgentError> {
    let mut disks = std::mem::take(&mut def.config.disks);
    confine_definition(roots, vm_dir, def)?;
    for (i, d) in disks.iter_mut().enumerate() {
        let bad = |m: String| AgentError::BadMigration(format!("disk {i}: {m}"));
        if d.size.is_none() {
            return Err(bad("a shared-nothing migration needs the disk's size in the definition (the copy is made that size and bounded by it)".into()));
        }
        let name = d
            .path
            .file_name()
            .ok_or_else(|| bad(format!("{} names no file", d.path.display())))?;
        let copy = storage_dir.join(name);
        roots
            .check(&copy)
            .map_err(|e| bad(format!("the copy: {e}")))?;
        d.format = Some(
            d.format
                .or_else(|| DiskFormat::from_extension(&d.path))
                .ok_or_else(|| {
                    bad(format!(
                        "{}: say format=raw or format=vhdx",
                        d.path.display()
                    ))
                })?,
        );
        d.path = copy;
    }
    def.config.disks = disks;
    Ok(())
}
