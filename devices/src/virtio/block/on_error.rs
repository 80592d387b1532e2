//! What a disk does when the host fails a guest's I/O (QEMU's `werror`/`rerror`).
//!
//! `report` completes the request with VIRTIO_BLK_S_IOERR: the guest sees the error.
//! `stop` keeps the request (it is not completed and stays first in its queue) and
//! asks the VMM to pause the VM; once the cause is fixed (space freed), resuming runs
//! the request again, so nothing the guest was told is written is lost and nothing it
//! was not told about is half-reported. Without a policy, `stop` applies to running out
//! of space (ENOSPC, EDQUOT), which the host can fix, and `report` to the rest.

use std::sync::Arc;

/// The configured policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ErrorPolicy {
    /// `stop` for ENOSPC and EDQUOT, `report` for the rest.
    #[default]
    Auto,
    /// Every error reaches the guest.
    Report,
    /// ENOSPC, EDQUOT and EIO pause the VM; other errors reach the guest.
    Stop,
}

impl ErrorPolicy {
    /// Whether a request that failed with `errno` pauses the VM.
    pub fn stops_on(self, errno: i32) -> bool {
        match self {
            ErrorPolicy::Report => false,
            ErrorPolicy::Auto => matches!(errno, libc::ENOSPC | libc::EDQUOT),
            ErrorPolicy::Stop => matches!(errno, libc::ENOSPC | libc::EDQUOT | libc::EIO),
        }
    }
}

/// A host I/O error that stopped a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskStopped {
    /// The failed operation ("read", "write", "flush", ...).
    pub op: &'static str,
    pub errno: i32,
}

/// Where a disk reports that it stopped (the VMM pauses the VM). Without one, every
/// error is reported to the guest whatever the policy.
#[derive(Clone)]
pub struct StopSink(pub Arc<dyn Fn(DiskStopped) + Send + Sync>);

impl std::fmt::Debug for StopSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StopSink")
    }
}

/// The OS error number behind a backend error, looking through wrapped errors (a VHDX
/// error wraps the file's).
pub fn errno_of(e: &std::io::Error) -> Option<i32> {
    if let Some(n) = e.raw_os_error() {
        return Some(n);
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|r| r as _);
    while let Some(s) = source {
        if let Some(n) = s
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return Some(n);
        }
        source = s.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_decide_by_errno() {
        for e in [libc::ENOSPC, libc::EDQUOT] {
            assert!(ErrorPolicy::Auto.stops_on(e));
            assert!(ErrorPolicy::Stop.stops_on(e));
            assert!(!ErrorPolicy::Report.stops_on(e));
        }
        assert!(!ErrorPolicy::Auto.stops_on(libc::EIO));
        assert!(ErrorPolicy::Stop.stops_on(libc::EIO));
        assert!(!ErrorPolicy::Stop.stops_on(libc::EINVAL));
    }

    #[test]
    fn the_errno_is_found_inside_wrapped_errors() {
        let inner = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let vhdx = vhdx::Error::Io {
            path: "/d.vhdx".into(),
            op: "writing data",
            offset: 0,
            source: inner,
        };
        let wrapped = std::io::Error::other(vhdx);
        assert_eq!(errno_of(&wrapped), Some(libc::ENOSPC));
        assert_eq!(errno_of(&std::io::Error::other("no errno")), None);
    }
}
