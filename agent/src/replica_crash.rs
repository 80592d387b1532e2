//! A replicated disk after its host went down while the VM wrote.
//!
//! The change log is synced before the disk at each guest flush, so after a crash of
//! the VMM alone (the host's page cache survives) every write that reached the image
//! is in the log. After a crash of the host (power loss, panic) the writes since the
//! last flush may be on the image and not in the log, or in the log and not on the
//! image: the log no longer tells what the replica lacks. Hyper-V Replica calls this
//! "resynchronization required"; so does vireod:
//!
//! - Before a VMM opens a disk's change log, vireod writes [`WRITER_MARK`] in the log's
//!   directory: this boot's id (`/proc/sys/kernel/random/boot_id`). After the VMM
//!   ended (any way: a kill -9 loses nothing the page cache holds), vireod syncs the
//!   file systems of the image and the log (`syncfs`) and removes the mark.
//! - A mark of another boot found at a start means the host went down while a VMM
//!   wrote: the log's segments are removed (the log starts again, as for a new
//!   replica) and [`RESYNC_MARK`] written. The replication loop then has the replica
//!   reset (`POST /peer/v1/replica/{vm}/resync`: its points dropped, its images kept)
//!   and runs the initial copy again, which sends only the blocks whose hashes differ;
//!   the mark goes once the replica is reset.
//!
//! A VHDX disk is different: its VMM writes a newly allocated block's BAT entry only
//! at a flush, so a VMM killed or crashed (even on this boot) may leave the image
//! without blocks the guest wrote since its last flush, while the log holds those
//! writes. So a VMM with replicated VHDX disks that ended without exit status 0 gets
//! the mark [`UNCLEAN`] (of no boot) instead of none, and a mark of this boot found on
//! a VHDX disk's log at a start (its VMM ended while vireod was down) is taken as
//! unclean too: the next start resyncs.
//!
//! A clean host shutdown (vireod stops its VMs) leaves no mark. With
//! `--keep-vms-on-exit` the marks stay, and a reboot resyncs (safe, not needed).

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use tracing::warn;

/// The boot id of the host a VMM writing this log runs on.
pub const WRITER_MARK: &str = "writer.boot";
/// The log was restarted after a host crash: the replica must be reset and resynced.
pub const RESYNC_MARK: &str = "resync.required";

/// The writer mark of a VHDX disk's log whose VMM ended without closing the image.
pub const UNCLEAN: &str = "vhdx-unclean";

/// This boot's id.
pub fn boot_id() -> io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_string())
}

fn read_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<Option<String>> {
    match confine::open_file_at(dir, OsStr::new(name)) {
        Ok(mut f) => {
            let mut s = String::new();
            io::Read::read_to_string(&mut io::Read::take(&mut f, 256), &mut s)?;
            Ok(Some(s.trim().to_string()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_segment(name: &OsStr) -> bool {
    name.to_str()
        .is_some_and(|n| n.ends_with(replica::SEGMENT_SUFFIX))
}

/// Whether the change log in `dir` was being written when the host went down: a
/// writer mark of another boot than `boot`.
pub fn written_across_a_crash(dir: BorrowedFd<'_>, boot: &str) -> io::Result<bool> {
    Ok(read_at(dir, WRITER_MARK)?.is_some_and(|previous| previous != boot))
}

/// Starts the change log in `dir` again for a resync: its segments removed, the
/// resync mark written.
pub fn restart_for_resync(dir: BorrowedFd<'_>, boot: &str) -> io::Result<()> {
    let listing = format!("/proc/self/fd/{}", dir.as_raw_fd());
    for entry in std::fs::read_dir(&listing)? {
        let name = entry?.file_name();
        // The region maps of a log over its budget and a catch-up's marker go too:
        // after a host crash the resync by block hashes tells what differs.
        let catch_up = name
            .to_str()
            .is_some_and(|n| crate::replica_catch_up::CATCH_UP_FILES.contains(&n));
        if is_segment(&name) || catch_up {
            confine::unlink_at(dir, &name)?;
        }
    }
    confine::write_private_atomic(dir, OsStr::new(RESYNC_MARK), boot.as_bytes())
}

/// Marks the change log in `dir` as written on boot `boot` (before a VMM opens it).
pub fn mark_writer(dir: BorrowedFd<'_>, boot: &str) -> io::Result<()> {
    confine::write_private_atomic(dir, OsStr::new(WRITER_MARK), boot.as_bytes())
}

/// Before a VM's VMM opens its change logs (`dirs`, each opened beneath its storage
/// root): if any was written across a host crash, every one of them starts again for
/// a resync (the replica is reset as a whole: a disk whose log went on would miss
/// segments the reset dropped). Then each gets this boot's writer mark. Returns
/// whether the logs were restarted.
pub fn before_writer(dirs: &[BorrowedFd<'_>], boot: &str) -> io::Result<bool> {
    let mut crashed = false;
    for dir in dirs {
        crashed |= written_across_a_crash(*dir, boot)?;
    }
    for dir in dirs {
        if crashed {
            restart_for_resync(*dir, boot)?;
        }
        mark_writer(*dir, boot)?;
    }
    Ok(crashed)
}

/// After the VMM that wrote the change log in `dir` ended: what it wrote to the log and
/// to the image (`image`, on another file system perhaps) is made durable.
pub fn sync_writes(dir: BorrowedFd<'_>, image: Option<BorrowedFd<'_>>) -> io::Result<()> {
    for fd in std::iter::once(dir).chain(image) {
        // SAFETY: syncfs on a descriptor we hold open; no memory is passed.
        if unsafe { libc::syncfs(fd.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Marks the change log in `dir` as one whose VMM left its VHDX disk unclosed: the
/// next start resyncs the replica.
pub fn mark_unclean(dir: BorrowedFd<'_>) -> io::Result<()> {
    confine::write_private_atomic(dir, OsStr::new(WRITER_MARK), UNCLEAN.as_bytes())
}

/// Removes the writer mark of the change log in `dir` (its writes are durable).
pub fn unmark_writer(dir: BorrowedFd<'_>) -> io::Result<()> {
    match confine::unlink_at(dir, OsStr::new(WRITER_MARK)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether the log in `dir` (a path beneath a storage root, as the replication loop
/// knows it) waits for its replica to be reset.
pub fn resync_required(dir: &Path) -> bool {
    dir.join(RESYNC_MARK).exists()
}

/// The replica was reset: the log's resync mark goes.
pub fn resync_requested(dir: &Path) {
    if let Err(e) = std::fs::remove_file(dir.join(RESYNC_MARK)) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!(log = %dir.display(), error = %e, "cannot remove the resync mark");
        }
    }
}

/// Before a VMM opens the change log in `dir` of a VHDX disk: a writer mark of this
/// boot means its last VMM ended while vireod was down (nothing settled it), perhaps
/// without closing the image: it becomes [`UNCLEAN`]. Returns whether it did.
pub fn unsettled_vhdx(dir: BorrowedFd<'_>, boot: &str) -> io::Result<bool> {
    if read_at(dir, WRITER_MARK)?.is_some_and(|m| m == boot) {
        mark_unclean(dir)?;
        return Ok(true);
    }
    Ok(false)
}

/// [`before_writer`] for a VM's change logs at `logs` (each with whether its disk is a
/// VHDX: [`unsettled_vhdx`] first) beneath `roots`, logged.
pub fn prepare_logs(roots: &confine::Roots, vm: &str, logs: &[(&Path, bool)]) -> io::Result<bool> {
    let dirs: Vec<OwnedFd> = logs
        .iter()
        .map(|(log, _)| {
            roots
                .open_dir(log)
                .map_err(|e| io::Error::other(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let fds: Vec<BorrowedFd<'_>> = dirs.iter().map(|d| d.as_fd()).collect();
    let boot = boot_id()?;
    for (fd, (_, vhdx)) in fds.iter().zip(logs) {
        if *vhdx {
            unsettled_vhdx(*fd, &boot)?;
        }
    }
    let crashed = before_writer(&fds, &boot)?;
    if crashed {
        warn!(
            vm,
            logs = ?logs,
            "the host went down while this VM wrote its replicated disks: their change logs start again and the replica will be resynchronised"
        );
    }
    Ok(crashed)
}

/// After a VM's VMM ended: the writes to its change logs and images (`logs`: log
/// directory and image, beneath `roots`) made durable. Returns the log directories,
/// whose writer marks the caller removes ([`unmark_writer`]) if no new VMM of the VM
/// began meanwhile.
pub fn sync_logs(
    roots: &confine::Roots,
    logs: &[(std::path::PathBuf, std::path::PathBuf)],
) -> io::Result<Vec<OwnedFd>> {
    logs.iter()
        .map(|(log, image)| {
            let dir = roots
                .open_dir(log)
                .map_err(|e| io::Error::other(e.to_string()))?;
            let image = roots.open_file(image, false).ok();
            sync_writes(dir.as_fd(), image.as_ref().map(|f| f.as_fd()))?;
            Ok(dir)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_fd(p: &Path) -> OwnedFd {
        confine::open_dir(p).unwrap()
    }

    #[test]
    fn a_mark_of_another_boot_restarts_the_log_for_a_resync() {
        let d = tempfile::tempdir().unwrap();
        let dir = dir_fd(d.path());
        for seq in 1..=3 {
            std::fs::write(d.path().join(replica::segment_file_name(seq)), b"x").unwrap();
        }
        std::fs::write(d.path().join("keep.txt"), b"y").unwrap();
        // A first start: no mark, nothing removed.
        assert!(!before_writer(&[dir.as_fd()], "boot-1").unwrap());
        assert_eq!(
            std::fs::read_to_string(d.path().join(WRITER_MARK)).unwrap(),
            "boot-1"
        );
        // The VMM was killed on the same boot: no resync.
        assert!(!before_writer(&[dir.as_fd()], "boot-1").unwrap());
        assert!(d.path().join(replica::segment_file_name(2)).exists());
        assert!(!resync_required(d.path()));
        // The host went down while it wrote: the next boot restarts the log.
        assert!(before_writer(&[dir.as_fd()], "boot-2").unwrap());
        for seq in 1..=3 {
            assert!(!d.path().join(replica::segment_file_name(seq)).exists());
        }
        assert!(d.path().join("keep.txt").exists());
        assert!(resync_required(d.path()));
        assert_eq!(
            std::fs::read_to_string(d.path().join(WRITER_MARK)).unwrap(),
            "boot-2"
        );
        resync_requested(d.path());
        assert!(!resync_required(d.path()));
        // A VMM that ended is settled: no mark, and no resync on another boot.
        sync_writes(dir.as_fd(), None).unwrap();
        unmark_writer(dir.as_fd()).unwrap();
        assert!(!d.path().join(WRITER_MARK).exists());
        assert!(!before_writer(&[dir.as_fd()], "boot-3").unwrap());
    }

    #[test]
    fn one_disk_written_across_a_crash_restarts_every_log_of_the_vm() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (da, db) = (dir_fd(a.path()), dir_fd(b.path()));
        for d in [&a, &b] {
            std::fs::write(d.path().join(replica::segment_file_name(5)), b"x").unwrap();
        }
        // Only disk a's log has a mark of the boot that went down.
        std::fs::write(a.path().join(WRITER_MARK), "boot-1").unwrap();
        assert!(before_writer(&[da.as_fd(), db.as_fd()], "boot-2").unwrap());
        for d in [&a, &b] {
            assert!(!d.path().join(replica::segment_file_name(5)).exists());
            assert!(resync_required(d.path()));
            assert_eq!(
                std::fs::read_to_string(d.path().join(WRITER_MARK)).unwrap(),
                "boot-2"
            );
        }
    }

    #[test]
    fn a_vhdx_log_whose_vmm_ended_unclosed_or_unsettled_restarts_for_a_resync() {
        let d = tempfile::tempdir().unwrap();
        let dir = dir_fd(d.path());
        std::fs::write(d.path().join(replica::segment_file_name(5)), b"x").unwrap();
        // Settled after an unclean end: the next start resyncs.
        mark_unclean(dir.as_fd()).unwrap();
        assert!(before_writer(&[dir.as_fd()], "boot-1").unwrap());
        assert!(resync_required(d.path()));
        resync_requested(d.path());
        // Not settled (vireod was down when the VMM ended): a mark of this boot on a
        // VHDX disk's log is taken as unclean; on a raw disk's it is not.
        std::fs::write(d.path().join(replica::segment_file_name(6)), b"x").unwrap();
        assert!(!unsettled_vhdx(dir.as_fd(), "boot-2").unwrap());
        assert!(unsettled_vhdx(dir.as_fd(), "boot-1").unwrap());
        assert!(before_writer(&[dir.as_fd()], "boot-1").unwrap());
        assert!(!d.path().join(replica::segment_file_name(6)).exists());
        // A settled clean end leaves no mark: no resync.
        unmark_writer(dir.as_fd()).unwrap();
        assert!(!unsettled_vhdx(dir.as_fd(), "boot-1").unwrap());
        assert!(!before_writer(&[dir.as_fd()], "boot-1").unwrap());
    }

    #[test]
    fn this_boot_has_an_id() {
        let id = boot_id().unwrap();
        assert_eq!(id.len(), 36, "{id}");
    }
}
