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
use landlock::{
    Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, ABI,
};

/// The newest file-system rights this code knows (Linux 6.10: `ioctl` on devices).
/// An older kernel enforces what it has (Landlock's best effort).
const ABI_USED: ABI = ABI::V5;

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("cannot build the control thread's Landlock ruleset: {0}")]
    Ruleset(#[from] landlock::RulesetError),
}

/// What a path given to [`ControlDomain::allow`] may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Files and directories beneath it: everything but executing.
    Storage,
    /// A directory where output files are made and written.
    Outputs,
    /// A directory where unix sockets are bound and removed.
    Sockets,
    /// A device node opened, written and `ioctl`ed.
    Device,
    /// Read only (files and listings beneath it).
    Read,
}

impl Use {
    fn rights(self) -> BitFlags<AccessFs> {
        let all = AccessFs::from_all(ABI_USED);
        match self {
            Use::Storage => all & !AccessFs::Execute,
            Use::Outputs => {
                AccessFs::MakeReg | AccessFs::WriteFile | AccessFs::ReadFile | AccessFs::Truncate
            }
            Use::Sockets => AccessFs::MakeSock | AccessFs::RemoveFile,
            Use::Device => AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev,
            Use::Read => AccessFs::from_read(ABI_USED),
        }
    }
}

/// How much of the domain the kernel enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Every right this code asks to restrict.
    Full,
    /// The kernel knows an older Landlock: some rights are not restricted.
    Partial,
    /// The kernel has no Landlock (or it is disabled): nothing is restricted.
    None,
}

/// The paths the control thread may reach besides its storage roots.
#[derive(Debug, Default)]
pub struct ControlDomain {
    paths: Vec<(PathBuf, Use)>,
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
        self.paths.push((path.into(), what));
    }

    /// The directory an output file is in (its rotated copy is beside it).
    pub fn allow_output_file(&mut self, file: &Path) {
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            self.allow(dir, Use::Outputs);
        }
    }

    /// Enters the domain on the calling thread (the threads it starts later inherit
    /// it). Paths that do not exist are left out: nothing can be opened there anyway
    /// except by creating them, which the domain then refuses.
    pub fn enter(self, roots: &Roots) -> Result<Enforcement, LandlockError> {
        let mut ruleset = Ruleset::default()
            .handle_access(AccessFs::from_all(ABI_USED))?
            .create()?;
        for dir in roots.dirs() {
            ruleset = ruleset.add_rule(PathBeneath::new(dir, Use::Storage.rights()))?;
        }
        let devices = roots
            .block_devices()
            .iter()
            .map(|d| (d.as_path(), Use::Device));
        let paths = self.paths.iter().map(|(p, what)| (p.as_path(), *what));
        for (path, what) in devices.chain(paths) {
            if let Some(rule) = rule(path, what) {
                ruleset = ruleset.add_rule(rule)?;
            }
        }
        let status = ruleset.restrict_self()?;
        Ok(match status.ruleset {
            RulesetStatus::FullyEnforced => Enforcement::Full,
            RulesetStatus::PartiallyEnforced => Enforcement::Partial,
            RulesetStatus::NotEnforced => Enforcement::None,
        })
    }
}

/// The rule for `path`, or None when it cannot be opened (it does not exist).
fn rule(path: &Path, what: Use) -> Option<PathBeneath<PathFd>> {
    let fd = match PathFd::new(path) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "left out of the control thread's domain");
            return None;
        }
    };
    // A rule on a file (not a directory) may only hold rights that apply to files.
    let rights = if path.is_dir() {
        what.rights()
    } else {
        what.rights() & AccessFs::from_file(ABI_USED)
    };
    Some(PathBeneath::new(fd, rights))
}

/// Enters the control thread's domain when there are storage roots, logging how much
/// of it the kernel enforces.
pub fn confine_control_thread(domain: ControlDomain) -> Result<Enforcement, LandlockError> {
    let Some(roots) = crate::confinement::roots() else {
        tracing::info!("no storage roots: the control thread's file access is not narrowed");
        return Ok(Enforcement::None);
    };
    let enforced = domain.enter(roots)?;
    match enforced {
        Enforcement::Full => {
            tracing::info!("control thread confined to its storage roots (Landlock)")
        }
        Enforcement::Partial => tracing::warn!(
            "control thread confined to its storage roots, but this kernel's Landlock \
             restricts only some file-system rights"
        ),
        Enforcement::None => tracing::warn!(
            "this kernel has no Landlock: the control thread's file access is held by \
             the VMM's own checks and the jail only"
        ),
    }
    Ok(enforced)
}
