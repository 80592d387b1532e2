//! Giving up what a process does not need, while it is still single-threaded: resource
//! limits, the uid and gid (with supplementary groups), every capability but the ones
//! named (bounding, ambient, inheritable, permitted and effective sets), and the right
//! to gain privileges again (`no_new_privs`).
//!
//! Capabilities are per thread and `capset` changes the caller's only, so
//! [`drop_privileges`] must run before the process starts any thread: threads started
//! afterwards inherit the reduced sets.

use std::io;

/// `CAP_NET_ADMIN` (interface configuration).
pub const CAP_NET_ADMIN: u32 = 12;
/// `CAP_NET_RAW` (AF_PACKET and raw sockets).
pub const CAP_NET_RAW: u32 = 13;
/// `CAP_SETPCAP` (needed to shrink the bounding set).
const CAP_SETPCAP: u32 = 8;

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("{what}: {source}")]
    Sys { what: String, source: io::Error },
}

fn check(r: libc::c_int, what: impl Into<String>) -> Result<(), PrivilegeError> {
    if r == 0 {
        Ok(())
    } else {
        Err(PrivilegeError::Sys {
            what: what.into(),
            source: io::Error::last_os_error(),
        })
    }
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct` (two of them for the 64 capabilities of version 3).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's (effective, permitted) sets as bit masks.
fn capget() -> Result<(u64, u64), PrivilegeError> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a valid header and room for the two data structs of version 3.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    check(r as libc::c_int, "capget")?;
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
    ))
}

/// Sets the calling thread's effective and permitted sets to `mask`, inheritable empty.
fn capset(mask: u64) -> Result<(), PrivilegeError> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let half = |shift: u32| {
        let bits = (mask >> shift) as u32;
        CapData {
            effective: bits,
            permitted: bits,
            inheritable: 0,
        }
    };
    let data = [half(0), half(32)];
    // SAFETY: capset with a valid header and the two data structs of version 3.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    check(r as libc::c_int, "capset")
}

fn mask_of(caps: &[u32]) -> u64 {
    caps.iter()
        .filter(|&&c| c < 64)
        .fold(0, |m, &c| m | (1u64 << c))
}

fn set_limit(
    resource: libc::__rlimit_resource_t,
    value: u64,
    name: &str,
) -> Result<(), PrivilegeError> {
    let r = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    check(
        // SAFETY: setrlimit with a valid struct.
        unsafe { libc::setrlimit(resource, &r) },
        format!("setrlimit {name}"),
    )
}

/// Sets the open-file and process (thread) limits, soft and hard.
pub fn set_limits(nofile: u64, nproc: u64) -> Result<(), PrivilegeError> {
    set_limit(libc::RLIMIT_NOFILE, nofile, "RLIMIT_NOFILE")?;
    set_limit(libc::RLIMIT_NPROC, nproc, "RLIMIT_NPROC")
}

/// Sets each limit, soft and hard, to the value asked or the current hard limit if
/// that is lower (a process without CAP_SYS_RESOURCE cannot raise it): "at most".
/// Returns the (open files, processes) limits set.
pub fn lower_limits(nofile: u64, nproc: u64) -> Result<(u64, u64), PrivilegeError> {
    let hard = |resource, name: &str| {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit into a local struct.
        check(
            unsafe { libc::getrlimit(resource, &mut r) },
            format!("getrlimit {name}"),
        )
        .map(|()| r.rlim_max)
    };
    let nofile = nofile.min(hard(libc::RLIMIT_NOFILE, "RLIMIT_NOFILE")?);
    let nproc = nproc.min(hard(libc::RLIMIT_NPROC, "RLIMIT_NPROC")?);
    set_limits(nofile, nproc)?;
    Ok((nofile, nproc))
}

/// Drops to `user` (uid, gid; no supplementary groups) if given, keeps only the
/// capabilities in `keep` (effective and permitted; every other one also leaves the
/// bounding set, when the process may shrink it), clears the ambient and inheritable
/// sets and sets `no_new_privs`. Call while single-threaded.
pub fn drop_privileges(user: Option<(u32, u32)>, keep: &[u32]) -> Result<(), PrivilegeError> {
    let keep_mask = mask_of(keep);
    let (effective, _) = capget()?;
    // SAFETY: plain prctl/credential calls with constant or checked arguments.
    unsafe {
        // The bounding set, while CAP_SETPCAP is still held (a process started without
        // it, by a user with file capabilities, keeps its bounding set: no_new_privs
        // and the seccomp filters' ban on execve leave it nothing to bound).
        if effective & (1 << CAP_SETPCAP) != 0 {
            let mut cap: u32 = 0;
            while libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong) >= 0 {
                if keep_mask & (1u64 << cap) == 0 {
                    check(
                        libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong),
                        format!("drop capability {cap}"),
                    )?;
                }
                cap += 1;
            }
        }
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ),
            "clear ambient capabilities",
        )?;
        if let Some((uid, gid)) = user {
            // Without SECBIT_KEEP_CAPS the kernel clears the permitted set when the
            // last uid 0 goes; with it, the kept capabilities survive (effective is
            // cleared, and raised again by capset below).
            if keep_mask != 0 {
                check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0), "keepcaps")?;
            }
            check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
            check(libc::setresgid(gid, gid, gid), "setresgid")?;
            check(libc::setresuid(uid, uid, uid), "setresuid")?;
            if keep_mask != 0 {
                check(libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0), "keepcaps")?;
            }
        }
    }
    capset(keep_mask)?;
    // SAFETY: prctl with constant arguments.
    check(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        "no_new_privs",
    )
}

/// The calling thread's (effective, permitted) capabilities, as bit masks (bit N:
/// capability N).
pub fn held() -> Result<(u64, u64), PrivilegeError> {
    capget()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_name_the_kept_capabilities() {
        assert_eq!(mask_of(&[CAP_NET_RAW]), 1 << 13);
        assert_eq!(mask_of(&[CAP_NET_RAW, CAP_NET_ADMIN]), 0x3000);
        assert_eq!(mask_of(&[]), 0);
        assert_eq!(mask_of(&[99]), 0);
    }

    #[test]
    fn limits_are_only_ever_lowered() {
        // In a child process: the limits are the process's own.
        // SAFETY: the child only makes plain system calls and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let ok = lower_limits(u64::MAX, u64::MAX)
                .is_ok_and(|(f, p)| f < u64::MAX || p < u64::MAX)
                && lower_limits(64, 1 << 20).is_ok_and(|(f, _)| f == 64)
                && lower_limits(128, 1 << 20).is_ok_and(|(f, _)| f == 64);
            // SAFETY: async-signal-safe exit of the forked child.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    #[test]
    fn the_current_sets_can_be_read() {
        let (effective, permitted) = capget().unwrap();
        assert_eq!(effective & !permitted, 0, "effective within permitted");
    }
}
