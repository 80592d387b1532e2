//! The control thread's file-system domain (Landlock).
//!
//! Seccomp decides which system calls a thread makes, not which files it reaches: the
//! control thread must keep `openat` for what the API names after start (hot-added
//! disks, snapshots, restores, storage migration, a VM that arrives). With storage
//! roots, our own code already opens those beneath a root without following links
//! ([`crate::confinement`]); this module makes the kernel hold the same line, so a bug
//! in that code, or code run by an attacker on this thread, still reaches nothing else.
//!
//! Once the VM is running, the control thread (and every thread it starts later)
//! enters a Landlock domain in which it may only:
//! - do anything but execute beneath each storage root (anchored on the root's
//!   descriptor, opened at start) and in each replica change-log directory;
//! - make and remove sockets in the socket directories (`--socket-dir`), where unix
//!   migration sockets are bound;
//! - make, read, write and truncate files in the directories of its serial and
//!   console files (a VM that arrives later opens them then);
//! - read, write and `ioctl` `/dev/kvm`, `/dev/net/tun` and the allow-listed block
//!   devices (a VM created through the API opens them after start);
//! - read `/proc` (its own pagemap, `meminfo`, descriptors reopened by path) and
//!   `/dev/urandom`.
//!
//! Landlock restricts the calling thread only: the vCPU, API and device threads are
//! already unable to open anything (their seccomp filters have no `openat`). Without
//! storage roots (a user running `vireo` by hand) the API may name any path the user
//! could open anyway, so no domain is entered. On a kernel without Landlock the VMM
//! runs as before and says so in its log.

use std::path::{Path, PathBuf};

use confine::Roots;
pub use sandbox::landlock::{Enforcement, LandlockError, Use};

/// The paths the control thread may reach besides its storage roots.
#[derive(Clone, Debug, Default)]
pub struct ControlDomain {
    domain: sandbox::landlock::Domain,
}

impl ControlDomain {
    /// The devices and system files every VMM needs after start.
    pub fn new() -> Self {
        let mut d = Self::default();
        d.allow("/dev/kvm", Use::Device);
        d.allow("/dev/net/tun", Use::Device);
        d.allow("/dev/urandom", Use::Read);
        d.allow("/proc", Use::Read);
        d
    }

    pub fn allow(&mut self, path: impl Into<PathBuf>, what: Use) {
        self.domain.allow(path, what);
    }

    /// The directory an output file is in (its rotated copy is beside it).
    pub fn allow_output_file(&mut self, file: &Path) {
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            self.allow(dir, Use::Outputs);
        }
    }

    /// Enters the domain on the calling thread (the threads it starts later inherit
    /// it): the storage roots (by their descriptors), their block devices and the
    /// paths allowed.
    pub fn enter(mut self, roots: &Roots) -> Result<Enforcement, LandlockError> {
        for d in roots.block_devices() {
            self.allow(d.clone(), Use::Device);
        }
        self.domain
            .enter(roots.dirs().map(|dir| (dir, Use::Storage)))
    }
}

/// Enters the control thread's domain when there are storage roots, logging how much
/// of it the kernel enforces.
pub fn confine_control_thread(domain: ControlDomain) -> Result<Enforcement, LandlockError> {
    confine_thread(domain, "control")
}

/// Enters `domain` on the calling thread (`thread` names it in the log): the control
/// thread (which binds unix sockets) and the file thread (`vireo-files`, which opens,
/// creates and removes files for it) enter the same one.
pub fn confine_thread(domain: ControlDomain, thread: &str) -> Result<Enforcement, LandlockError> {
    let Some(roots) = crate::confinement::roots() else {
        tracing::info!(
            thread,
            "no storage roots: the thread's file access is not narrowed"
        );
        return Ok(Enforcement::None);
    };
    let enforced = domain.enter(roots)?;
    match enforced {
        Enforcement::Full => {
            tracing::info!(thread, "thread confined to its storage roots (Landlock)")
        }
        Enforcement::Partial => tracing::warn!(
            thread,
            "thread confined to its storage roots, but this kernel's Landlock \
             restricts only some file-system rights"
        ),
        Enforcement::None => tracing::warn!(
            thread,
            "this kernel has no Landlock: the thread's file access is held by \
             the VMM's own checks and the jail only"
        ),
    }
    Ok(enforced)
}
