//! `--socket-dir DIR` (repeatable): the switch's file-system domain (Landlock, through
//! the `sandbox` crate). Its threads open no file (no seccomp filter has `openat`),
//! but the switch thread keeps `bind` and `unlink` for vhost-user ports added through
//! the control socket; with socket directories the kernel holds those to them: the
//! switch may only make and remove sockets beneath a socket directory and the control
//! socket's directory, nothing else anywhere. Without `--socket-dir` no domain is
//! entered (a port may then name any path the switch's user can write).

use std::path::{Component, Path, PathBuf};

use sandbox::landlock::{Domain, Enforcement, LandlockError, Use};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("--socket-dir {0}: must be an absolute path without '..'")]
    BadDir(PathBuf),
    #[error("vhost-user socket {0} is outside every --socket-dir")]
    Outside(PathBuf),
    #[error("{0}")]
    Landlock(#[from] LandlockError),
}

fn plain_absolute(p: &Path) -> bool {
    p.is_absolute() && !p.components().any(|c| c == Component::ParentDir)
}

/// Checks the directories, and that every socket in `sockets` is beneath one.
pub fn check(dirs: &[PathBuf], sockets: &[&Path]) -> Result<(), DomainError> {
    if let Some(bad) = dirs.iter().find(|d| !plain_absolute(d)) {
        return Err(DomainError::BadDir(bad.clone()));
    }
    if dirs.is_empty() {
        return Ok(());
    }
    for s in sockets {
        if !plain_absolute(s) || !dirs.iter().any(|d| s.starts_with(d)) {
            return Err(DomainError::Outside(s.to_path_buf()));
        }
    }
    Ok(())
}

/// Enters the domain on the calling thread (before it starts any other), if there
/// are socket directories.
pub fn enter(dirs: &[PathBuf], control: &Path) -> Result<(), DomainError> {
    if dirs.is_empty() {
        info!("no --socket-dir: the switch's sockets are not held to directories");
        return Ok(());
    }
    let mut domain = Domain::default();
    for d in dirs {
        domain.allow(d.clone(), Use::Sockets);
    }
    if let Some(parent) = control.parent().filter(|p| !p.as_os_str().is_empty()) {
        domain.allow(parent, Use::Sockets);
    }
    match domain.enter([])? {
        Enforcement::Full => {
            info!(dirs = ?dirs, "sockets held to the socket directories (Landlock)")
        }
        Enforcement::Partial => warn!(
            "sockets held to the socket directories, but this kernel's Landlock restricts \
             only some file-system rights"
        ),
        Enforcement::None => warn!(
            "this kernel has no Landlock: --socket-dir is checked for the configured ports only"
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_must_be_beneath_a_socket_dir() {
        let dirs = [PathBuf::from("/run/vireo-switch")];
        let inside = Path::new("/run/vireo-switch/vm1.sock");
        assert!(check(&dirs, &[inside]).is_ok());
        let outside = Path::new("/tmp/vm1.sock");
        assert!(matches!(
            check(&dirs, &[inside, outside]),
            Err(DomainError::Outside(_))
        ));
        let climbing = Path::new("/run/vireo-switch/../../etc/x.sock");
        assert!(check(&dirs, &[climbing]).is_err());
        assert!(check(&[PathBuf::from("run")], &[]).is_err());
        assert!(check(&[], &[outside]).is_ok(), "no dirs: no restriction");
    }
}
