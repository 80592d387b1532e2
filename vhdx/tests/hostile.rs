//! Hostile images that used to cost minutes or gigabytes at open, and locks
//! that must fail closed. Each test asserts on the work the engine counted
//! (bytes checksummed and copied by the log scan) or on the error, never on
//! time: the figures of the crafted images are in docs/vhdx.md.

use crate::common;
use common::*;
use std::io;
use std::path::Path;
use std::sync::Arc;
use vhdx::{CreateOptions, Error, FileStorage, OpenOptions, Storage, Vhdx};

const MIB: u64 = 1 << 20;
const LOG_OFFSET: usize = 1 << 20;
const LOG_GUID: [u8; 16] = *b"hostile-log-guid";

/// A fresh dynamic image with a log of `log_len` bytes, as bytes.
fn image_with_log(dir: &Path, log_len: u32) -> Vec<u8> {
    let p = dir.join("base.vhdx");
    let v = Vhdx::create(
        &p,
        &CreateOptions {
            size: 64 * MIB,
            log_size: log_len,
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap();
    v.close().unwrap();
    std::fs::read(&p).unwrap()
}

/// Makes `LOG_GUID` the active log GUID of the image (so open scans the log).
fn activate_log(f: &mut [u8]) {
    bump_header(f, |h| h[48..64].copy_from_slice(&LOG_GUID));
}

/// A log entry header sector that passes the signature, GUID, sequence and
/// tail checks but claims the whole log: the layout that made open copy and
/// checksum the whole log once per sector.
fn whole_log_claim(log_len: usize) -> Vec<u8> {
    let mut s = vec![0u8; 4096];
    s[0..4].copy_from_slice(b"loge");
    put32(&mut s, 8, log_len as u32);
    put32(&mut s, 12, 0);
    put64(&mut s, 16, 1);
    put32(&mut s, 24, 0);
    s[32..48].copy_from_slice(&LOG_GUID);
    s
}

fn write_image(dir: &Path, name: &str, f: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, f).unwrap();
    p
}

/// Opens read-only and read-write (both scan the log); returns the read-only
/// open's scan figures and prints how long each open took.
fn open_both(p: &Path) -> vhdx::LogScanStats {
    let t = std::time::Instant::now();
    let v = Vhdx::open(p, ro(p)).expect("read-only open");
    eprintln!("read-only open of {}: {:?}", p.display(), t.elapsed());
    let stats = v.log_scan_stats();
    drop(v);
    let t = std::time::Instant::now();
    let w = Vhdx::open(p, OpenOptions::default()).expect("read-write open");
    eprintln!("read-write open of {}: {:?}", p.display(), t.elapsed());
    assert_eq!(w.log_scan_stats(), stats, "both opens scan the same log");
    w.close().unwrap();
    stats
}

#[test]
fn every_sector_claiming_the_whole_log_is_refused_before_any_checksum() {
    let d = tmp();
    let log_len = 64 * MIB as usize;
    let mut f = image_with_log(d.path(), log_len as u32);
    let claim = whole_log_claim(log_len);
    for s in 0..log_len / 4096 {
        let o = LOG_OFFSET + s * 4096;
        f[o..o + 4096].copy_from_slice(&claim);
    }
    activate_log(&mut f);
    let p = write_image(d.path(), "claims.vhdx", &f);
    let stats = open_both(&p);
    // 16384 sectors each claiming 64 MiB used to cost 1 TiB of copying and
    // CRC; the descriptor count (0) cannot account for the claimed length,
    // so nothing is checksummed.
    assert_eq!(stats.bytes_checksummed, 0, "{stats:?}");
    assert_eq!(stats.bytes_copied, 0, "{stats:?}");
}

#[test]
fn a_log_full_of_plausible_entries_with_bad_checksums_is_checksummed_once() {
    let d = tmp();
    let log_len = 64 * MIB as usize;
    let mut f = image_with_log(d.path(), log_len as u32);
    // Every two sectors: a one-page entry whose every cheap field is right
    // and whose CRC is wrong, each claiming a tail at sector 0.
    let page = vec![0x5au8; 4096];
    let mut e = log_entry(
        7,
        &LOG_GUID,
        0,
        &[(4 * MIB, page)],
        &[],
        f.len() as u64,
        f.len() as u64,
    );
    assert_eq!(e.len(), 8192);
    e[4] ^= 0xff;
    for k in 0..log_len / 8192 {
        let o = LOG_OFFSET + k * 8192;
        f[o..o + 8192].copy_from_slice(&e);
    }
    activate_log(&mut f);
    let p = write_image(d.path(), "badcrc.vhdx", &f);
    let stats = open_both(&p);
    assert_eq!(stats.bytes_checksummed, log_len as u64, "{stats:?}");
    assert_eq!(stats.bytes_copied, 0, "{stats:?}");
}

#[test]
fn a_valid_log_costs_one_checksum_and_one_copy_of_what_it_replays() {
    let d = tmp();
    let mut f = image_with_log(d.path(), MIB as u32);
    let page = vec![0x11u8; 4096];
    let len = f.len() as u64;
    // One page just past the end of the file (the entry says the file grows).
    let e = log_entry(3, &LOG_GUID, 0, &[(len, page)], &[], len, len + MIB);
    f[LOG_OFFSET..LOG_OFFSET + e.len()].copy_from_slice(&e);
    activate_log(&mut f);
    let p = write_image(d.path(), "valid.vhdx", &f);
    let v = Vhdx::open(&p, ro(&p)).unwrap();
    assert_eq!(v.replayed_log_entries(), 1);
    let s = v.log_scan_stats();
    assert_eq!(s.bytes_checksummed, 8192, "{s:?}");
    assert_eq!(s.bytes_copied, 4096, "{s:?}");
}

/// A log entry that rewrites region table 1 so that the metadata region lies
/// 1 TiB into a file of a few MiB, the entry claiming a 2 TiB file: open used
/// to allocate (and zero-fill) the whole claimed region before looking at it.
#[test]
fn regions_past_what_the_file_holds_are_refused_before_allocating() {
    let d = tmp();
    let mut f = image_with_log(d.path(), MIB as u32);
    let rt0 = 192 << 10;
    let mut rt = f[rt0..rt0 + (64 << 10)].to_vec();
    let n = le32(&rt, 8) as usize;
    let meta = (0..n)
        .map(|i| 16 + i * 32)
        .find(|&e| rt[e..e + 16] == META_GUID)
        .unwrap();
    put64(&mut rt, meta + 16, 1 << 40);
    put32(&mut rt, meta + 24, 255 * MIB as u32);
    fix_crc(&mut rt);
    let pages: Vec<(u64, Vec<u8>)> = rt
        .chunks(4096)
        .enumerate()
        .map(|(i, c)| ((rt0 + i * 4096) as u64, c.to_vec()))
        .collect();
    let len = f.len() as u64;
    let e = log_entry(1, &LOG_GUID, 0, &pages, &[], len, 2 << 40);
    f[LOG_OFFSET..LOG_OFFSET + e.len()].copy_from_slice(&e);
    activate_log(&mut f);
    let p = write_image(d.path(), "farmeta.vhdx", &f);
    let before = file_hash(&p);
    for opts in [ro(&p), OpenOptions::default()] {
        let e = Vhdx::open(&p, opts).err().expect("hostile image opened");
        assert!(
            e.to_string().contains("lies past the"),
            "unexpected error: {e}"
        );
        assert_eq!(file_hash(&p), before, "refused image was modified");
    }
}

/// A file system without OFD locks, injected: the real file underneath, a
/// lock call that fails the way NFS without lockd or some FUSE file systems do.
struct NoLocks(FileStorage);

impl Storage for NoLocks {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.0.write_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn lock(&self, _exclusive: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOLCK))
    }
}

fn no_locks(p: &Path) -> Arc<dyn Storage> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    Arc::new(NoLocks(FileStorage::new(f)))
}

#[test]
fn without_ofd_locks_open_fails_closed_unless_locking_is_off() {
    let d = tmp();
    let f = image_with_log(d.path(), MIB as u32);
    let p = write_image(d.path(), "nolocks.vhdx", &f);
    let before = file_hash(&p);
    for read_only in [false, true] {
        let opts = OpenOptions {
            read_only,
            ..Default::default()
        };
        match Vhdx::open_storage(no_locks(&p), &p, opts) {
            Err(e @ Error::LockUnsupported { .. }) => {
                assert!(e.to_string().contains("locking=off"), "{e}")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened without a lock (read_only {read_only})"),
        }
        assert_eq!(file_hash(&p), before, "refused open wrote the file");
    }
    // Locking off, said explicitly: opens, writes, reads back.
    let v = Vhdx::open_storage(
        no_locks(&p),
        &p,
        OpenOptions {
            no_lock: true,
            ..Default::default()
        },
    )
    .unwrap();
    v.write_at(&[7u8; 4096], 8192).unwrap();
    v.close().unwrap();
    let v = Vhdx::open(&p, ro(&p)).unwrap();
    let mut b = vec![0u8; 4096];
    v.read_at(&mut b, 8192).unwrap();
    assert_eq!(b, vec![7u8; 4096]);
}

#[test]
fn vireo_img_force_share_reads_an_image_another_process_writes() {
    let d = tmp();
    let f = image_with_log(d.path(), MIB as u32);
    let p = write_image(d.path(), "held.vhdx", &f);
    let ps = p.to_str().unwrap();
    let writer = Vhdx::open(&p, OpenOptions::default()).unwrap();
    let out = run(vireo_img(), &["info", ps]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lock"),
        "{out:?}"
    );
    for args in [
        vec!["info", "-U", ps],
        vec!["info", "--force-share", ps],
        vec!["check", "-U", ps],
        vec!["map", "-U", ps],
    ] {
        let out = run(vireo_img(), &args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
    }
    // A repair writes: -U is refused, like qemu-img.
    let out = run(vireo_img(), &["check", "-r", "all", "-U", ps]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("force-share"),
        "{out:?}"
    );
    writer.close().unwrap();
}
