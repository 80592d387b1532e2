//! vireod's side of jailing its VMMs (`vmm/src/jail.rs` is the VMM's side).
//!
//! When vireod runs as root it starts every `vireo` with `--jail`: the VM's own uid and
//! gid from `--jail-uids FIRST-LAST` (stored in the inventory, the same for the VM's
//! whole life, never shared), a root under `<run-dir>/jail/NAME`, and binds of what it
//! needs at run time beyond what its configuration names (its own run directory
//! `<run-dir>/vms/NAME/`). What vireod gives a VMM later goes through that directory,
//! which the jail shows at the same path: a migration to a unix socket the jail cannot
//! see, or over TCP, goes through vireod's gateway socket there (`crate::tls_gateway`;
//! the host's identity stays in vireod).

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::AgentError;

/// The default of `vireod --jail-uids`.
pub const DEFAULT_JAIL_UIDS: &str = "980000-980999";

/// `--jail-uids FIRST-LAST`: the uids (and gids) vireod gives its VMs, one each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JailIds {
    pub first: u32,
    pub last: u32,
}

impl JailIds {
    pub fn range(&self) -> std::ops::RangeInclusive<u32> {
        self.first..=self.last
    }
}

impl std::str::FromStr for JailIds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?}: expected FIRST-LAST"))?;
        let num = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| format!("{v:?}: expected a uid"))
        };
        let (first, last) = (num(a)?, num(b)?);
        if first == 0 || first > last {
            return Err(format!(
                "{s:?}: expected 0 < FIRST <= LAST (the VMMs never run as root)"
            ));
        }
        // 65534 (nobody) and the unmapped -1 are no VM's.
        if (first..=last).contains(&65534) || last == u32::MAX {
            return Err(format!("{s:?}: must not include 65534 or 4294967295"));
        }
        Ok(Self { first, last })
    }
}

/// Whether this process runs as root (jailing needs it).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Creates a disk's change log directory (`replica_log`) beneath its storage root (no
/// symlink on the way, 0700) if it is missing and, for a jailed VMM (`uid`), gives it
/// and every entry in it to that uid through the directory's descriptor (no link is
/// followed: a symlink planted there changes owner itself, not its target).
/// The jail then binds it at the same path.
pub fn hand_over_log_dir(
    roots: &confine::Roots,
    log: &Path,
    uid: Option<u32>,
) -> Result<(), AgentError> {
    let refuse = |e: confine::ConfineError| {
        AgentError::BadDefinition(format!("replica_log {}: {e}", log.display()))
    };
    let dir = roots.create_dir_private(log).map_err(refuse)?;
    let Some(uid) = uid else { return Ok(()) };
    chown_dir_and_entries(dir, uid)
        .map_err(|e| AgentError::io("cannot hand over the change log", log, e))?;
    debug!(log = %log.display(), uid, "change log handed over to the jail");
    Ok(())
}

/// Gives a deleted jailed VM's change log directory and its entries back to root
/// (opened beneath its storage root, changed through that descriptor, no link
/// followed). A directory that is gone is no error.
pub fn give_back_log_dir(roots: &confine::Roots, log: &Path) {
    let dir = match roots.open_dir(log) {
        Ok(d) => d,
        Err(confine::ConfineError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return
        }
        Err(e) => {
            warn!(error = %e, "a deleted VM's change log is not given back to root");
            return;
        }
    };
    if let Err(e) = chown_dir_and_entries(dir, 0) {
        warn!(log = %log.display(), error = %e, "cannot give a deleted VM's change log back to root");
    }
}

/// Changes the owner (uid = gid) of the open directory `dir` and of every entry in it,
/// through its descriptor: `fchownat(AT_SYMLINK_NOFOLLOW)` per name, so a planted link
/// changes owner itself, never its target, and a FIFO is not opened.
fn chown_dir_and_entries(dir: std::os::fd::OwnedFd, uid: u32) -> std::io::Result<()> {
    let file = std::fs::File::from(dir);
    std::os::unix::fs::fchown(&file, Some(uid), Some(uid))?;
    let listing = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    for entry in std::fs::read_dir(&listing)? {
        let name = entry?.file_name();
        let c = std::ffi::CString::new(name.as_encoded_bytes()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a file name with a NUL byte",
            )
        })?;
        // SAFETY: fchownat on the directory's open descriptor and a NUL-terminated
        // single name; AT_SYMLINK_NOFOLLOW changes that entry itself. The result is
        // checked.
        let r = unsafe {
            libc::fchownat(
                file.as_raw_fd(),
                c.as_ptr(),
                uid,
                uid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Gives a file a deleted jailed VM had owned back to root, 0600 (its uid goes to the
/// next VM): opened beneath its storage root (no symlink on the way), then changed
/// through that descriptor. A file that is gone is no error.
pub fn give_back(roots: &confine::Roots, path: &Path) {
    let file = match roots.open_file(path, false) {
        Ok(f) => f,
        Err(confine::ConfineError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return
        }
        Err(e) => {
            warn!(error = %e, "a deleted VM's file is not given back to root");
            return;
        }
    };
    if let Err(e) = std::os::unix::fs::fchown(&file, Some(0), Some(0))
        .and_then(|_| file.set_permissions(std::fs::Permissions::from_mode(0o600)))
    {
        warn!(path = %path.display(), error = %e, "cannot give a deleted VM's file back to root");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_ranges_parse_and_refuse_root_nobody_and_reversed() {
        assert_eq!(
            "980000-980999".parse::<JailIds>().unwrap(),
            JailIds {
                first: 980000,
                last: 980999
            }
        );
        for bad in ["0-10", "10-5", "x-5", "100", "65000-66000", "5-4294967295"] {
            assert!(bad.parse::<JailIds>().is_err(), "{bad}");
        }
    }
}
