//! What a definition may name on this host: files beneath vireod's storage roots
//! (`--storage-root`, default `<state-dir>/images`) and allow-listed block devices.
//!
//! Each path is checked by opening it beneath its root ([`confine::Roots`]: no
//! symlinks, no `..`, the type checked on the fd). The VMMs vireod starts get the same
//! roots, so what they open at start is checked the same way again: a file swapped
//! for a symlink after the definition was accepted is not followed.

use std::path::Path;
use std::sync::Arc;

use api::config::{DiskFormat, OutputConfig};
use confine::{ConfineError, Roots};

use crate::model::VmDefinition;
use crate::AgentError;

fn refuse(what: &str, e: ConfineError) -> AgentError {
    AgentError::BadDefinition(format!("{what}: {e}"))
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
fn parent_opener(roots: Arc<Roots>) -> vhdx::ParentOpener {
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
