//! Why a path was refused: one line that names the path and the reason.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("{path}: the path must be absolute")]
    NotAbsolute { path: PathBuf },
    #[error("{path}: '..' is not allowed in a path")]
    DotDot { path: PathBuf },
    #[error("{path}: outside every storage root ({roots})")]
    Outside { path: PathBuf, roots: String },
    #[error("{path}: a symlink is on the way (symlinks are not followed)")]
    Symlink { path: PathBuf },
    #[error("{path}: resolves outside its storage root")]
    Escapes { path: PathBuf },
    #[error("{path}: a block device that is not allow-listed (--allow-block-device)")]
    BlockDevice { path: PathBuf },
    #[error("{path}: not a {expected} (it is a {found})")]
    WrongType {
        path: PathBuf,
        expected: &'static str,
        found: &'static str,
    },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl ConfineError {
    /// Maps an error of a beneath-open to the refusal it stands for.
    pub(crate) fn from_open(path: PathBuf, what: &'static str, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ELOOP) => ConfineError::Symlink { path },
            Some(libc::EXDEV) => ConfineError::Escapes { path },
            _ => ConfineError::Io { path, what, source },
        }
    }
}
