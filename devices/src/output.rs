//! Guest output to a file that cannot grow without bound.
//!
//! Serial and console output is written by the guest at will; a guest printing in a
//! loop must not fill the host disk. A [`RotatingFile`] holds at most `max_size` bytes:
//! when a write would take it past that, its content moves to `PATH.1` (replacing what
//! was there) and `PATH` starts empty again. At most `2 * max_size` bytes of guest
//! output exist on disk, the newest always in `PATH`.
//!
//! Both files are opened when the device is made; rotating only reads, writes and
//! truncates them (pread64, pwrite64, ftruncate), so the threads that write guest
//! output need no right to open or rename files.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The cap when none is configured.
pub const DEFAULT_MAX_SIZE: u64 = 16 << 20;

pub struct RotatingFile {
    file: File,
    old: File,
    /// Bytes in the current file.
    size: u64,
    max_size: u64,
    /// Times the file was rotated.
    rotations: u64,
}

/// `PATH.1`: where the previous output goes.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// Private (0600), and never written through a symlink planted at its name.
fn open_rw(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

impl RotatingFile {
    /// Creates (truncates) `path` and `path.1`; `max_size` is at least 1.
    pub fn create(path: &Path, max_size: u64) -> io::Result<Self> {
        Ok(Self {
            file: open_rw(path)?,
            old: open_rw(&rotated_path(path))?,
            size: 0,
            max_size: max_size.max(1),
            rotations: 0,
        })
    }

    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    /// Copies the current file over the old one and empties the current one.
    fn rotate(&mut self) -> io::Result<()> {
        self.old.set_len(0)?;
        let mut buf = vec![0u8; 64 << 10];
        let mut at = 0u64;
        while at < self.size {
            let n = self.file.read_at(&mut buf, at)?;
            if n == 0 {
                break;
            }
            self.old.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        self.file.set_len(0)?;
        self.size = 0;
        self.rotations += 1;
        Ok(())
    }
}

impl Write for RotatingFile {
    /// Writes what fits in the current file; rotates first when it is full.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.size >= self.max_size {
            self.rotate()?;
        }
        let room = usize::try_from(self.max_size - self.size).unwrap_or(usize::MAX);
        let n = self.file.write_at(&buf[..buf.len().min(room)], self.size)?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_cap_rotates_to_one_old_file_and_never_exceeds_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("serial.log");
        let mut f = RotatingFile::create(&p, 1000).unwrap();
        let mut all = Vec::new();
        for i in 0..100u32 {
            let line = format!("line {i:05} {}\n", "x".repeat((i % 37) as usize));
            f.write_all(line.as_bytes()).unwrap();
            all.extend_from_slice(line.as_bytes());
            let cur = std::fs::metadata(&p).unwrap().len();
            assert!(cur <= 1000, "{cur} bytes in the current file");
        }
        f.flush().unwrap();
        let cur = std::fs::read(&p).unwrap();
        let old = std::fs::read(rotated_path(&p)).unwrap();
        assert_eq!(old.len(), 1000, "a rotated file is full");
        assert!(f.rotations() >= 2);
        // The two files hold the newest output, in order, without a gap.
        let mut tail = old.clone();
        tail.extend_from_slice(&cur);
        assert!(all.ends_with(&tail));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "only PATH and PATH.1"
        );
    }
}
