//! What the switch gives up once its sockets are open, before it starts any thread:
//! every capability but `CAP_NET_RAW` (which a port added later through the control
//! socket needs for its AF_PACKET socket; binding it to an interface and making it
//! promiscuous need nothing more), optionally its uid and gid (`--user UID:GID`), the
//! right to regain privileges (`no_new_privs`), and open files and threads beyond
//! `--nofile` and `--nproc` (or the hard limits it was started with, if lower).
//! `--confine false` keeps everything (logged).

use sandbox::privileges::{self, PrivilegeError, CAP_NET_RAW};
use tracing::{info, warn};

/// The switch's privilege options.
#[derive(Clone, Copy, Debug)]
pub struct PrivilegeOptions {
    /// Whether to drop anything at all.
    pub confine: bool,
    /// Run as this uid and gid.
    pub user: Option<(u32, u32)>,
    pub nofile: u64,
    pub nproc: u64,
}

/// Parses `UID:GID`.
pub fn parse_user(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s
        .split_once(':')
        .ok_or_else(|| format!("--user: expected UID:GID, got '{s}'"))?;
    let num = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("--user: '{v}' is not a numeric id"))
    };
    Ok((num(u)?, num(g)?))
}

/// Drops what `opts` says. Call while the process is single-threaded.
pub fn drop_privileges(opts: &PrivilegeOptions) -> Result<(), PrivilegeError> {
    if !opts.confine {
        warn!("--confine false: the switch keeps its uid and every capability");
        return Ok(());
    }
    let (nofile, nproc) = privileges::lower_limits(opts.nofile, opts.nproc)?;
    let (_, permitted) = privileges::held()?;
    let keep: &[u32] = if permitted & (1 << CAP_NET_RAW) != 0 {
        &[CAP_NET_RAW]
    } else {
        warn!("CAP_NET_RAW is not held: ports on host interfaces cannot be added");
        &[]
    };
    privileges::drop_privileges(opts.user, keep)?;
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    info!(
        uid,
        gid,
        capabilities = if keep.is_empty() {
            "none"
        } else {
            "CAP_NET_RAW"
        },
        nofile,
        nproc,
        "privileges dropped (no_new_privs)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_is_uid_colon_gid() {
        assert_eq!(parse_user("65534:65534"), Ok((65534, 65534)));
        assert!(parse_user("nobody").unwrap_err().contains("UID:GID"));
        assert!(parse_user("1:x").unwrap_err().contains("'x'"));
    }
}
