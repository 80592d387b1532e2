//! `O_DIRECT` payload I/O (`OpenOptions::direct`, `vireo-img convert -t none`):
//! aligned I/O bypasses the page cache, everything else stays buffered, and
//! the bytes are the same either way.

use crate::common;
use common::*;
use rand::Rng;
use std::os::fd::AsRawFd;
use std::path::Path;
use vhdx::{CreateOptions, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 48 * MIB;
const ALIGN: usize = 4096;

fn direct() -> OpenOptions {
    OpenOptions {
        direct: true,
        ..Default::default()
    }
}

fn create(p: &Path, open: OpenOptions) -> Vhdx {
    let o = CreateOptions {
        size: SIZE,
        block_size: Some(MIB as u32),
        ..Default::default()
    };
    Vhdx::create_with(p, &o, open).expect("create")
}

/// A buffer of `len` bytes starting at an address `skew` bytes past a 4 KiB boundary.
struct Buf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize, skew: usize) -> Buf {
        let mem = vec![0u8; len + 2 * ALIGN];
        let start = mem.as_ptr().align_offset(ALIGN) + skew;
        Buf { mem, start, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

/// Pages of `path` in `[start, end)` that are in the page cache (mincore).
fn resident_pages(path: &Path, start: u64, end: u64) -> usize {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len().min(end) as usize;
    let page = 4096;
    // SAFETY: a read-only shared mapping of a file we hold open; it is only
    // passed to mincore and unmapped before returning.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap");
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `vec` has one byte per page of the mapping.
    let r = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore");
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(addr, len) };
    vec[(start as usize / page).min(vec.len())..]
        .iter()
        .filter(|&&b| b & 1 == 1)
        .count()
}

fn drop_file_cache(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: advisory call on an open descriptor with plain integer arguments.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

#[test]
fn direct_image_reads_back_aligned_and_unaligned_io() {
    let d = tmp();
    let p = d.path().join("d.vhdx");
    let v = create(&p, direct());
    assert!(v.direct_io(), "O_DIRECT expected on this file system");
    let mut model = vec![0u8; SIZE as usize];
    let mut r = rng(4242);
    for i in 0..300 {
        // Half aligned (4 KiB offset, length and buffer), half not (512-byte
        // offsets, odd buffer addresses) and some spanning blocks.
        let aligned = i % 2 == 0;
        let len = if aligned {
            ALIGN * r.gen_range(1..64)
        } else {
            512 * r.gen_range(1..600)
        };
        let mut off = r.gen_range(0..SIZE - len as u64);
        off = if aligned {
            off / 4096 * 4096
        } else {
            off / 512 * 512
        };
        let mut b = Buf::new(len, if aligned { 0 } else { 8 * r.gen_range(1..512) });
        r.fill(b.get());
        v.write_at(b.get(), off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(b.get());
        if i % 50 == 0 {
            v.flush().unwrap();
        }
        // Read back a region around it, aligned or not.
        let rs = off.saturating_sub(8192) / 512 * 512;
        let rl = ((len + 16384) / 512 * 512).min((SIZE - rs) as usize);
        let mut rb = Buf::new(rl, if i % 3 == 0 { 0 } else { 24 });
        v.read_at(rb.get(), rs).unwrap();
        assert_same(rb.get(), &model[rs as usize..rs as usize + rl], "read back");
    }
    v.close().unwrap();
    qemu_check(&p);
    assert_same(
        &qemu_to_raw(&p, d.path()),
        &model,
        "qemu reads the direct-written image",
    );
    let v = Vhdx::open(
        &p,
        OpenOptions {
            read_only: true,
            direct: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut all = Buf::new(SIZE as usize, 0);
    v.read_at(all.get(), 0).unwrap();
    assert_same(all.get(), &model, "direct reopen");
}

#[test]
fn aligned_payload_writes_leave_the_page_cache_alone() {
    let d = tmp();
    // Where the payload starts: past the log, metadata and BAT regions.
    let payload_from = 8 * MIB;
    let mut resident = Vec::new();
    for (name, open) in [
        ("buffered.vhdx", OpenOptions::default()),
        ("direct.vhdx", direct()),
    ] {
        let p = d.path().join(name);
        let v = create(&p, open);
        drop_file_cache(&p);
        let mut b = Buf::new(16 * MIB as usize, 0);
        rng(9).fill(b.get());
        v.write_at(b.get(), 0).unwrap();
        v.flush().unwrap();
        resident.push(resident_pages(&p, payload_from, u64::MAX));
        v.close().unwrap();
        qemu_check(&p);
    }
    // The buffered image has its 16 MiB of payload in the cache (the control
    // that shows the measurement works), the direct one next to none.
    assert!(
        resident[0] >= 2048,
        "buffered: {} pages resident",
        resident[0]
    );
    assert!(resident[1] < 64, "direct: {} pages resident", resident[1]);
}

#[test]
fn convert_cache_modes_and_unaligned_tail_keep_bytes() {
    let d = tmp();
    let raw = d.path().join("in.raw");
    // An odd length: the last piece cannot go through O_DIRECT.
    let mut data = vec![0u8; (20 * MIB + 1234) as usize];
    let mut r = rng(5);
    for i in 0..6 {
        let off = (i * 3 * MIB + 4096 * i) as usize;
        r.fill(&mut data[off..off + 900_000]);
    }
    let tail = data.len() - 3000;
    r.fill(&mut data[tail..]);
    std::fs::write(&raw, &data).unwrap();
    for cache in ["none", "writeback", "unsafe"] {
        let v = d.path().join(format!("{cache}.vhdx"));
        let s = |p: &Path| p.to_str().unwrap().to_string();
        ok(
            vireo_img(),
            &[
                "convert",
                "-t",
                cache,
                "-T",
                cache_src(cache),
                "-O",
                "vhdx",
                &s(&raw),
                &s(&v),
            ],
        );
        qemu_check(&v);
        let mut expect = data.clone();
        expect.resize(expect.len().div_ceil(512) * 512, 0);
        assert_same(&qemu_to_raw(&v, d.path()), &expect, cache);
        let back = d.path().join(format!("{cache}.raw"));
        ok(
            vireo_img(),
            &[
                "convert",
                "-t",
                cache,
                "-T",
                cache_src(cache),
                "-O",
                "raw",
                &s(&v),
                &s(&back),
            ],
        );
        assert_same(&std::fs::read(&back).unwrap(), &expect, "back to raw");
        let back2 = d.path().join(format!("{cache}.2.raw"));
        ok(
            vireo_img(),
            &[
                "convert",
                "-t",
                cache,
                "-f",
                "raw",
                "-O",
                "raw",
                &s(&raw),
                &s(&back2),
            ],
        );
        assert_same(&std::fs::read(&back2).unwrap(), &data, "raw to raw");
    }
    let out = run(
        vireo_img(),
        &[
            "convert",
            "-t",
            "sometimes",
            "-O",
            "raw",
            raw.to_str().unwrap(),
            "/nonexistent",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Invalid cache option"),
        "{out:?}"
    );
}

fn cache_src(dst: &str) -> &'static str {
    if dst == "none" {
        "none"
    } else {
        "writeback"
    }
}
