//! Fencing tokens on disks: a cluster's ownership revision, recorded beside each disk.
//!
//! A clustered VM's disks carry `fencing_token=N` (the revision of the VM's ownership
//! key in etcd, which grows with every change of owner). Before the VM runs, the VMM
//! compares `N` with the token recorded in `DISK.fence` beside the image: a newer
//! recorded token means another node has taken the VM over since this VMM's owner got
//! it, and the disk is refused; otherwise `N` is recorded. The check runs while the
//! image's OFD lock is held, so two VMMs on one file cannot interleave it.
//!
//! The record is one fixed-width line, `token=` and 20 digits, rewritten in place (no
//! rename: the VMM's seccomp filter has no use for one). Anything else in the file is
//! refused, not repaired: a record the VMM cannot read proves nothing.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const PREFIX: &[u8] = b"token=";
const RECORD_LEN: usize = PREFIX.len() + 20 + 1;

/// Why a disk's fencing record refused the VMM.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("disk {disk}: fencing token {ours} is older than the {recorded} recorded in {record} (another node owns this VM now); refusing the disk")]
    Stale {
        disk: PathBuf,
        record: PathBuf,
        ours: u64,
        recorded: u64,
    },
    #[error("disk {disk}: fencing record {record} is not a fencing record; refusing the disk")]
    Malformed { disk: PathBuf, record: PathBuf },
    #[error("disk {disk}: fencing record {record}: {what}: {source}")]
    Io {
        disk: PathBuf,
        record: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// `DISK.fence`, beside the image.
pub fn record_path(disk: &Path) -> PathBuf {
    let mut name = disk.file_name().unwrap_or_default().to_os_string();
    name.push(".fence");
    disk.with_file_name(name)
}

fn encode(token: u64) -> [u8; RECORD_LEN] {
    let mut out = [0u8; RECORD_LEN];
    let text = format!("token={token:020}\n");
    out.copy_from_slice(text.as_bytes());
    out
}

/// The token a record holds; `Ok(None)` for an empty (new) record.
fn decode(bytes: &[u8]) -> Result<Option<u64>, ()> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let digits = bytes
        .strip_prefix(PREFIX)
        .and_then(|r| r.strip_suffix(b"\n"))
        .filter(|d| d.len() == 20 && d.iter().all(u8::is_ascii_digit))
        .ok_or(())?;
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or(())
}

/// Opens (creating, 0600) `name` in `dir` for reading and writing, never through a
/// symlink.
fn open_record(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<File> {
    let c =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid directory fd and a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Admits `disk` for a VMM holding `token`, or refuses it (see the module comment).
/// Call it with the image's lock held. Returns the token that was recorded before.
pub fn admit(disk: &Path, token: u64) -> Result<Option<u64>, FenceError> {
    let record = record_path(disk);
    let io_err = |what: &'static str| {
        let (disk, record) = (disk.to_path_buf(), record.clone());
        move |source| FenceError::Io {
            disk,
            record,
            what,
            source,
        }
    };
    let (dir, name) = crate::confinement::open_parent(&record).map_err(|e| FenceError::Io {
        disk: disk.to_path_buf(),
        record: record.clone(),
        what: "cannot open its directory",
        source: io::Error::other(e.to_string()),
    })?;
    let file = open_record(dir.as_fd(), &name).map_err(io_err("cannot open"))?;
    let meta = file.metadata().map_err(io_err("cannot stat"))?;
    if !meta.is_file() || meta.len() > RECORD_LEN as u64 {
        return Err(FenceError::Malformed {
            disk: disk.to_path_buf(),
            record,
        });
    }
    let mut buf = vec![0u8; meta.len() as usize];
    file.read_exact_at(&mut buf, 0)
        .map_err(io_err("cannot read"))?;
    let recorded = decode(&buf).map_err(|()| FenceError::Malformed {
        disk: disk.to_path_buf(),
        record: record.clone(),
    })?;
    match recorded {
        Some(r) if r > token => Err(FenceError::Stale {
            disk: disk.to_path_buf(),
            record,
            ours: token,
            recorded: r,
        }),
        Some(r) if r == token => Ok(recorded),
        _ => {
            file.write_all_at(&encode(token), 0)
                .and_then(|_| file.sync_data())
                .map_err(io_err("cannot write"))?;
            tracing::info!(disk = %disk.display(), token, previous = ?recorded, "fencing token recorded");
            Ok(recorded)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_anything_else_is_malformed() {
        assert_eq!(decode(&encode(42)), Ok(Some(42)));
        assert_eq!(decode(&encode(u64::MAX)), Ok(Some(u64::MAX)));
        assert_eq!(decode(b""), Ok(None));
        for bad in [
            &b"token=42\n"[..],
            b"token=0000000000000000004x\n",
            b"token=00000000000000000042",
            b"TOKEN=00000000000000000042\n",
            b"token=99999999999999999999\n", // beyond u64
        ] {
            assert_eq!(decode(bad), Err(()), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn newer_tokens_are_recorded_older_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.raw");
        std::fs::write(&disk, b"").unwrap();
        assert_eq!(admit(&disk, 5).unwrap(), None);
        assert_eq!(admit(&disk, 5).unwrap(), Some(5));
        let err = admit(&disk, 4).unwrap_err().to_string();
        assert!(
            err.contains("fencing token 4 is older than the 5 recorded"),
            "{err}"
        );
        assert_eq!(admit(&disk, 9).unwrap(), Some(5));
        assert_eq!(std::fs::read(record_path(&disk)).unwrap(), encode(9));
    }

    #[test]
    fn a_symlinked_record_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.raw");
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, record_path(&disk)).unwrap();
        assert!(matches!(admit(&disk, 1), Err(FenceError::Io { .. })));
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }
}
