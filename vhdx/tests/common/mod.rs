#![allow(dead_code)]
//! Helpers shared by the integration tests: temp dirs, running the real
//! qemu-img/qemu-io, deterministic random data.

use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("vhdx-test").tempdir_in(std::env::temp_dir()).expect("tempdir")
}

pub fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    out
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
    ok("qemu-img", &["convert", "-f", "vhdx", "-O", "raw", path.to_str().unwrap(), out.to_str().unwrap()]);
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
        panic!("{what}: first difference at byte {i} ({} vs {})", a[i], b[i]);
    }
}

pub fn vireo_img() -> &'static str {
    env!("CARGO_BIN_EXE_vireo-img")
}
