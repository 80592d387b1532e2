#![allow(dead_code)]
//! Helpers shared by the integration tests: temp dirs, running the real
//! qemu-img/qemu-io, deterministic random data.

use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vhdx-test")
        .tempdir_in(std::env::temp_dir())
        .expect("tempdir")
}

/// Longest a tool may run: a hang (qemu-img once looped forever on a log
/// filled to its last sector) fails the test instead of stalling the suite.
const TOOL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

pub fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(cmd)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    // Drain the pipes on threads so a chatty tool cannot block on a full pipe.
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let to = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let te = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if t0.elapsed() > TOOL_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd} {args:?} did not finish in {TOOL_TIMEOUT:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    std::process::Output {
        status,
        stdout: to.join().expect("stdout reader"),
        stderr: te.join().expect("stderr reader"),
    }
}

/// Runs a command that must succeed; returns stdout.
pub fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_check(path: &Path) {
    ok("qemu-img", &["check", "-f", "vhdx", path.to_str().unwrap()]);
}

/// Converts a VHDX to raw with qemu-img and returns the bytes.
pub fn qemu_to_raw(path: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("qemu-out-{}.raw", rand::random::<u32>()));
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vhdx",
            "-O",
            "raw",
            path.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let b = std::fs::read(&out).expect("read raw");
    let _ = std::fs::remove_file(&out);
    b
}

pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

pub fn random_bytes(r: &mut impl Rng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    r.fill(&mut v[..]);
    v
}

pub fn path_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

pub fn sha(b: &[u8]) -> u32 {
    crc32c::crc32c(b)
}

pub fn file_hash(p: &Path) -> u32 {
    crc32c::crc32c(&std::fs::read(p).expect("read"))
}

/// Index of the first differing byte, for readable failures.
pub fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!(
            "{what}: first difference at byte {i} ({} vs {})",
            a[i], b[i]
        );
    }
}

pub fn vireo_img() -> &'static str {
    env!("CARGO_BIN_EXE_vireo-img")
}

// ---- Independent, test-side knowledge of the on-disk format (MS-VHDX) ----

pub const HDR: [usize; 2] = [64 << 10, 128 << 10];

pub fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
pub fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
pub fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes the CRC-32C of a structure whose checksum sits at byte 4.
pub fn fix_crc(b: &mut [u8]) {
    put32(b, 4, 0);
    let c = crc32c::crc32c(b);
    put32(b, 4, c);
}

/// Index (0/1) of the current header, by sequence number.
pub fn current_header(f: &[u8]) -> usize {
    if le64(f, HDR[1] + 8) > le64(f, HDR[0] + 8) {
        1
    } else {
        0
    }
}

/// (file offset, length) of a region by its GUID bytes (as stored).
pub fn region(f: &[u8], guid_le: &[u8; 16]) -> (u64, u64) {
    let rt = 192 << 10;
    let n = le32(f, rt + 8) as usize;
    for i in 0..n {
        let e = rt + 16 + i * 32;
        if &f[e..e + 16] == guid_le {
            return (le64(f, e + 16), le32(f, e + 24) as u64);
        }
    }
    panic!("region not found");
}

pub const BAT_GUID: [u8; 16] = [
    0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08,
];
pub const META_GUID: [u8; 16] = [
    0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e,
];

/// Writes a new current header: copy of the current one with `f` applied,
/// sequence number + 1, in the other slot, CRC fixed.
pub fn bump_header(file: &mut [u8], f: impl FnOnce(&mut [u8])) {
    let cur = current_header(file);
    let mut h = file[HDR[cur]..HDR[cur] + 4096].to_vec();
    f(&mut h);
    let seq = le64(&h, 8);
    put64(&mut h, 8, seq + 1);
    fix_crc(&mut h);
    let other = HDR[1 - cur];
    file[other..other + 4096].copy_from_slice(&h);
}

/// Builds a log entry (MS-VHDX 2.3.1) the way Hyper-V does: data descriptors
/// with their data sectors, and zero descriptors.
pub fn log_entry(
    seq: u64,
    log_guid: &[u8; 16],
    tail: u32,
    pages: &[(u64, Vec<u8>)],
    zeros: &[(u64, u64)],
    flushed: u64,
    last: u64,
) -> Vec<u8> {
    let dc = pages.len() + zeros.len();
    let hs = (64 + 32 * dc).div_ceil(4096);
    let len = (hs + pages.len()) * 4096;
    let mut b = vec![0u8; len];
    b[0..4].copy_from_slice(b"loge");
    put32(&mut b, 8, len as u32);
    put32(&mut b, 12, tail);
    put64(&mut b, 16, seq);
    put32(&mut b, 24, dc as u32);
    b[32..48].copy_from_slice(log_guid);
    put64(&mut b, 48, flushed);
    put64(&mut b, 56, last);
    let mut d = 64;
    for (off, len) in zeros {
        b[d..d + 4].copy_from_slice(b"zero");
        put64(&mut b, d + 8, *len);
        put64(&mut b, d + 16, *off);
        put64(&mut b, d + 24, seq);
        d += 32;
    }
    for (i, (off, data)) in pages.iter().enumerate() {
        b[d..d + 4].copy_from_slice(b"desc");
        b[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
        b[d + 8..d + 16].copy_from_slice(&data[0..8]);
        put64(&mut b, d + 16, *off);
        put64(&mut b, d + 24, seq);
        d += 32;
        let s = (hs + i) * 4096;
        b[s..s + 4].copy_from_slice(b"data");
        put32(&mut b, s + 4, (seq >> 32) as u32);
        b[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        put32(&mut b, s + 4092, seq as u32);
    }
    fix_crc(&mut b);
    b
}

pub fn read_all(v: &vhdx::Vhdx) -> Vec<u8> {
    let mut b = vec![0u8; v.virtual_size() as usize];
    v.read_at(&mut b, 0).expect("read_at");
    b
}

pub fn ro(p: &Path) -> vhdx::OpenOptions {
    let _ = p;
    vhdx::OpenOptions {
        read_only: true,
        ..Default::default()
    }
}
