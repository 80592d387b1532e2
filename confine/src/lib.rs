//! Resolve and open paths beneath allowed roots; create private files safely.
//!
//! Everything is decided on an open fd, never on a path string alone:
//! - [`open_beneath`]: `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//!   RESOLVE_NO_MAGICLINKS)`; where `openat2` is missing (ENOSYS) a component-by-component
//!   walk with `O_NOFOLLOW` whose final fd is checked through `/proc/self/fd` and
//!   `st_dev`/`st_ino` ([`resolver`] says which one runs).
//! - [`Roots`]: the allowed roots; picks the root an absolute path falls under and opens
//!   it relative to that root's directory fd, checking the file type on the fd. A refusal
//!   ([`ConfineError`]) names the path and why.
//! - [`create_private`], [`mkdir_private`], [`write_private_atomic`]: 0600 files and
//!   0700 directories created with `O_EXCL|O_NOFOLLOW` / `mkdirat` relative to a dir fd.

// Product code has no unwrap()/expect(): bad input gets an error, never a panic (test
// code, built with cfg(test), may).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod beneath;
pub mod broker;
mod error;
mod private;
mod roots;

pub use beneath::{fstat, open_beneath, open_beneath_walk, resolver, Resolver};
pub use error::ConfineError;
pub use private::{
    create_private, fd_path, mkdir_private, open_dir, open_dir_at, open_file_at, set_private_umask,
    unlink_at, write_private_atomic, PRIVATE_DIR_MODE, PRIVATE_FILE_MODE,
};
pub use roots::{
    check_lexical, in_socket_dir, open_path_nofollow, open_socket_path_nofollow, Kind, Roots,
};

#[cfg(test)]
mod tests;
