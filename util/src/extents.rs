//! The data extents of a sparse file, through `lseek(SEEK_DATA/SEEK_HOLE)`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
    // SAFETY: lseek on a descriptor `file` keeps open; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        // ENXIO: no data (or hole) at or after `offset`, i.e. at or past the end.
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

/// The first byte at or after `offset` that holds data; `None` when only holes follow.
pub fn next_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_DATA)
}

/// The first byte at or after `offset` in a hole (the end of the file counts as one);
/// `None` when `offset` is at or past the end.
pub fn next_hole(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_HOLE)
}

/// The extents of `file` within `start..end` that hold data, as `(offset, length)` in
/// file order. A file system without SEEK_DATA fails with its error (EINVAL,
/// EOPNOTSUPP): the caller decides whether to treat the range as all data.
pub fn data_extents(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let Some(data) = next_data(file, pos)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = next_hole(file, data)?.unwrap_or(end).min(end);
        if hole > data {
            out.push((data, hole - data));
        }
        pos = hole.max(data + 1);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Block-sized extents on a file system that keeps holes (tmpfs and ext4 do; the
    /// test says so if this one does not).
    #[test]
    fn extents_of_a_sparse_file_are_its_written_blocks() {
        const MIB: u64 = 1 << 20;
        let f = tempfile::tempfile().unwrap();
        f.set_len(8 * MIB).unwrap();
        f.write_all_at(&[1u8; 4096], MIB).unwrap();
        f.write_all_at(&[2u8; 8192], 4 * MIB).unwrap();
        let all = data_extents(&f, 0, 8 * MIB).unwrap();
        if all == vec![(0, 8 * MIB)] {
            panic!("the temp directory's file system reports no holes: cannot test extents here");
        }
        assert_eq!(all, vec![(MIB, 4096), (4 * MIB, 8192)]);
        // A window cuts the extents at its edges.
        assert_eq!(
            data_extents(&f, MIB + 1024, 4 * MIB + 4096).unwrap(),
            vec![(MIB + 1024, 3072), (4 * MIB, 4096)]
        );
        // Past the end: nothing.
        assert_eq!(data_extents(&f, 8 * MIB, 9 * MIB).unwrap(), vec![]);
        assert_eq!(next_data(&f, 5 * MIB).unwrap(), None);
        assert_eq!(next_hole(&f, MIB).unwrap(), Some(MIB + 4096));
    }
}
