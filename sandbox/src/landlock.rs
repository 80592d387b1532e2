//! File-system domains (Landlock): a thread, and the threads it starts later, may only
//! reach the paths it was given, each for one [`Use`]. Seccomp decides which system
//! calls a thread makes; a domain decides which files those calls reach, so a thread
//! that must keep `openat`, `bind` or `unlink` for what it is asked to do after start
//! still reaches nothing else. On a kernel without Landlock nothing is restricted, and
//! [`Domain::enter`] says so ([`Enforcement`]).

use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, ABI,
};

/// The newest file-system rights this code knows (Linux 6.10: `ioctl` on devices).
/// An older kernel enforces what it has (Landlock's best effort).
const ABI_USED: ABI = ABI::V5;

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("cannot build the Landlock ruleset: {0}")]
    Ruleset(#[from] landlock::RulesetError),
}

/// What a path given to [`Domain::allow`] may be used for.
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

/// The paths a domain allows, each for its use.
#[derive(Clone, Debug, Default)]
pub struct Domain {
    paths: Vec<(PathBuf, Use)>,
}

impl Domain {
    pub fn allow(&mut self, path: impl Into<PathBuf>, what: Use) {
        self.paths.push((path.into(), what));
    }

    /// Enters the domain on the calling thread (the threads it starts later inherit
    /// it): the paths allowed, and the directories `anchored` (descriptors opened
    /// earlier, so a directory renamed or replaced since is not followed). Paths that
    /// do not exist are left out: nothing can be opened there anyway except by
    /// creating them, which the domain then refuses.
    pub fn enter<'a>(
        self,
        anchored: impl IntoIterator<Item = (BorrowedFd<'a>, Use)>,
    ) -> Result<Enforcement, LandlockError> {
        let mut ruleset = Ruleset::default()
            .handle_access(AccessFs::from_all(ABI_USED))?
            .create()?;
        for (dir, what) in anchored {
            ruleset = ruleset.add_rule(PathBeneath::new(dir, what.rights()))?;
        }
        for (path, what) in &self.paths {
            if let Some(rule) = rule(path, *what) {
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
            tracing::debug!(path = %path.display(), error = %e, "left out of the Landlock domain");
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
