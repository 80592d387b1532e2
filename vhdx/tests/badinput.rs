//! Malformed, truncated and hostile images: a clear error naming what is
//! wrong, never a panic, and a file that failed to parse is never written.

use crate::common;
use common::*;
use rand::Rng;
use std::path::Path;
use vhdx::{CreateOptions, DiskKind, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;

fn sample(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("good.vhdx");
    let ps = p.to_str().unwrap();
    ok(
        "qemu-img",
        &["create", "-f", "vhdx", "-o", "block_size=1M", ps, "16M"],
    );
    ok("qemu-io", &["-f", "vhdx", "-c", "write -P 0xab 0 3M", ps]);
    p
}

/// Applies `edit` to a copy of the sample; opening it (read-write and
/// read-only) must fail with a message containing `expect`, leaving the file unchanged.
fn refuse(edit: impl FnOnce(&mut Vec<u8>), expect: &str) {
    let d = tmp();
    let good = sample(d.path());
    let mut f = std::fs::read(&good).unwrap();
    edit(&mut f);
    let p = d.path().join("bad.vhdx");
    std::fs::write(&p, &f).unwrap();
    let before = file_hash(&p);
    for opts in [OpenOptions::default(), ro(&p)] {
        match Vhdx::open(&p, opts) {
            Ok(_) => panic!("hostile image accepted (expected '{expect}')"),
            Err(e) => assert!(
                e.to_string().contains(expect),
                "error '{e}' does not mention '{expect}'"
            ),
        }
        assert_eq!(file_hash(&p), before, "refused image was modified");
    }
    // The tool says so too, with qemu-img's exit codes.
    let out = run(vireo_img(), &["check", p.to_str().unwrap()]);
    assert!(matches!(out.status.code(), Some(1) | Some(2)), "{out:?}");
    assert_eq!(file_hash(&p), before);
}

fn bat_off(f: &[u8]) -> usize {
    region(f, &BAT_GUID).0 as usize
}
fn meta_off(f: &[u8]) -> usize {
    region(f, &META_GUID).0 as usize
}

/// Finds a metadata item's data offset by its GUID bytes.
fn item(f: &[u8], guid: &[u8; 16]) -> usize {
    let mo = meta_off(f);
    let n = u16::from_le_bytes([f[mo + 10], f[mo + 11]]) as usize;
    for i in 0..n {
        let e = mo + 32 + i * 32;
        if &f[e..e + 16] == guid {
            return mo + le32(f, e + 16) as usize;
        }
    }
    panic!("item missing")
}
const FILE_PARAMS: [u8; 16] = [
    0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b,
];
const VDISK_SIZE: [u8; 16] = [
    0x24, 0x42, 0xa5, 0x2f, 0x1b, 0xcd, 0x76, 0x48, 0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8,
];
const LOGICAL: [u8; 16] = [
    0x1d, 0xbf, 0x41, 0x81, 0x6f, 0xa9, 0x09, 0x47, 0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f,
];

#[test]
fn not_vhdx() {
    refuse(|f| f[0] = b'X', "not a VHDX");
}

#[test]
fn both_header_crcs_wrong() {
    refuse(
        |f| {
            f[HDR[0] + 200] ^= 1;
            f[HDR[1] + 200] ^= 1;
        },
        "checksum",
    );
}

#[test]
fn both_region_tables_wrong() {
    refuse(
        |f| {
            f[(192 << 10) + 40] ^= 1;
            f[(256 << 10) + 40] ^= 1;
        },
        "region table",
    );
}

#[test]
fn one_bad_region_table_uses_the_other() {
    let d = tmp();
    let good = sample(d.path());
    let mut f = std::fs::read(&good).unwrap();
    f[(192 << 10) + 40] ^= 1;
    std::fs::write(&good, &f).unwrap();
    let v = Vhdx::open(&good, ro(&good)).unwrap();
    assert!(read_all(&v)[..3 * MIB as usize].iter().all(|&b| b == 0xab));
}

#[test]
fn bat_entry_beyond_end_of_file() {
    refuse(
        |f| {
            let b = bat_off(f);
            put64(f, b + 8 * 5, (1u64 << 40) | 6)
        },
        "beyond the end of the file",
    );
}

#[test]
fn bat_entry_overlapping_metadata() {
    refuse(
        |f| {
            let (b, m) = (bat_off(f), meta_off(f) as u64);
            put64(f, b + 8 * 5, m | 6)
        },
        "overlaps",
    );
}

#[test]
fn bat_entries_overlapping_each_other() {
    refuse(
        |f| {
            let b = bat_off(f);
            let e = le64(f, b);
            put64(f, b + 8 * 7, e)
        },
        "overlaps",
    );
}

#[test]
fn bat_entry_in_header_area_or_bad_state() {
    refuse(
        |f| {
            let b = bat_off(f);
            put64(f, b + 8 * 5, 6)
        },
        "header area",
    );
    refuse(
        |f| {
            let b = bat_off(f);
            put64(f, b + 8 * 5, 5)
        },
        "invalid state",
    );
    refuse(
        |f| {
            let b = bat_off(f);
            put64(f, b + 8 * 5, (8 << 20) | 7)
        },
        "PARTIALLY_PRESENT",
    );
}

#[test]
fn absurd_sizes() {
    refuse(
        |f| {
            let o = item(f, &VDISK_SIZE);
            put64(f, o, 1 << 62)
        },
        "virtual disk size",
    );
    refuse(
        |f| {
            let o = item(f, &VDISK_SIZE);
            put64(f, o, 0)
        },
        "virtual disk size",
    );
    refuse(
        |f| {
            let o = item(f, &FILE_PARAMS);
            put32(f, o, 3 << 20)
        },
        "block size",
    );
    refuse(
        |f| {
            let o = item(f, &FILE_PARAMS);
            put32(f, o, 1 << 30)
        },
        "block size",
    );
    refuse(
        |f| {
            let o = item(f, &LOGICAL);
            put32(f, o, 1000)
        },
        "logical sector size",
    );
    // A size whose BAT does not fit in the BAT region.
    refuse(
        |f| {
            let o = item(f, &VDISK_SIZE);
            put64(f, o, 60 << 40)
        },
        "do not fit",
    );
    refuse(
        |f| {
            let m = meta_off(f);
            f[m + 10] = 0xff;
            f[m + 11] = 0xff
        },
        "entry count",
    );
    refuse(
        |f| {
            let m = meta_off(f);
            put32(f, m + 32 + 16, 0xffff_0000)
        },
        "outside the metadata region",
    );
    refuse(
        |f| {
            let rt = 192 << 10;
            put32(f, rt + 8, 100_000);
            let mut t = f[rt..rt + (64 << 10)].to_vec();
            fix_crc(&mut t);
            f[rt..rt + (64 << 10)].copy_from_slice(&t);
            f[(256 << 10) + 40] ^= 1;
        },
        "entry count",
    );
    // Region past the end of the file (checksum fixed so the table itself is valid).
    refuse(
        |f| {
            let rt = 192 << 10;
            put64(f, rt + 16 + 16, 1 << 40);
            let mut t = f[rt..rt + (64 << 10)].to_vec();
            fix_crc(&mut t);
            f[rt..rt + (64 << 10)].copy_from_slice(&t);
            f[(256 << 10) + 40] ^= 1;
        },
        "past the end of the file",
    );
}

#[test]
fn truncated_files() {
    let d = tmp();
    let good = sample(d.path());
    let full = std::fs::read(&good).unwrap();
    let p = d.path().join("t.vhdx");
    let bo = bat_off(&full);
    for len in [
        0usize,
        7,
        100,
        64 << 10,
        (64 << 10) + 100,
        200 << 10,
        1 << 20,
        bo,
        bo + 8,
        full.len() - (1 << 20),
        full.len() - 1,
    ] {
        std::fs::write(&p, &full[..len.min(full.len())]).unwrap();
        let before = file_hash(&p);
        let r = Vhdx::open(&p, OpenOptions::default());
        assert!(r.is_err(), "truncated to {len} accepted");
        assert_eq!(file_hash(&p), before, "truncated file modified ({len})");
        let _ = run(vireo_img(), &["info", p.to_str().unwrap()]);
    }
}

#[test]
fn bad_arguments_are_errors() {
    let d = tmp();
    let p = d.path().join("a.vhdx");
    for o in [
        CreateOptions {
            size: 0,
            ..Default::default()
        },
        CreateOptions {
            size: 1 << 50,
            ..Default::default()
        },
        CreateOptions {
            size: 1000,
            ..Default::default()
        },
        CreateOptions {
            size: MIB,
            block_size: Some(3 << 20),
            ..Default::default()
        },
        CreateOptions {
            size: MIB,
            logical_sector_size: 1024,
            ..Default::default()
        },
    ] {
        assert!(
            matches!(Vhdx::create(&p, &o), Err(vhdx::Error::InvalidArgument(_))),
            "{o:?}"
        );
    }
    let v = Vhdx::create(
        &p,
        &CreateOptions {
            size: 4 * MIB,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(
        v.write_at(&[0; 512], 4 * MIB),
        Err(vhdx::Error::OutOfRange { .. })
    ));
    assert!(matches!(
        v.read_at(&mut [0; 512], u64::MAX - 10),
        Err(vhdx::Error::OutOfRange { .. })
    ));
    drop(v);
    let r = Vhdx::open(&p, ro(&p)).unwrap();
    assert!(matches!(
        r.write_at(&[0; 512], 0),
        Err(vhdx::Error::ReadOnly { .. })
    ));
    let out = run(
        vireo_img(),
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "block_size=3M",
            p.with_file_name("new.vhdx").to_str().unwrap(),
            "1G",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("vireo-img: ") && err.contains("power of two"),
        "{out:?}"
    );
}

/// What `vireo-img` would once have ignored or silently done is refused with one line
/// and changes nothing: create over an existing file (unless `--force`), a smaller
/// size without `--shrink`, `-f` naming another format than the file's, an unknown
/// `--output`; `-o help` lists the VHDX options; every option of every verb has help.
#[test]
fn vireo_img_refuses_what_it_would_have_ignored_and_documents_every_option() {
    let d = tmp();
    let p = d.path().join("a.vhdx");
    let ps = p.to_str().unwrap();
    ok(vireo_img(), &["create", "-f", "vhdx", ps, "16M"]);
    ok("qemu-io", &["-f", "vhdx", "-c", "write -P 0x5a 0 1M", ps]);
    let before = file_hash(&p);
    let refused = |args: &[&str], expect: &str| {
        let out = run(vireo_img(), args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_ne!(out.status.code(), Some(0), "{args:?} succeeded");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert_eq!(file_hash(&p), before, "{args:?} changed the image");
    };
    refused(
        &["create", "-f", "vhdx", ps, "8M"],
        "exists: refusing to overwrite",
    );
    refused(
        &["create", "-f", "raw", ps, "8M"],
        "exists: refusing to overwrite",
    );
    refused(&["resize", ps, "8M"], "--shrink");
    refused(&["resize", ps, "-1M"], "--shrink");
    refused(&["info", "-f", "raw", ps], "is a vhdx image, not raw");
    refused(&["map", "-f", "raw", ps], "is a vhdx image, not raw");
    refused(&["check", "-f", "raw", ps], "is a vhdx image, not raw");
    refused(&["info", "--output", "jsn", ps], "invalid value 'jsn'");
    refused(&["info", "-f", "qcow2", ps], "invalid value 'qcow2'");

    // A raw file shrinks only when asked to.
    let r = d.path().join("r.raw");
    let rs = r.to_str().unwrap();
    ok(vireo_img(), &["create", "-f", "raw", rs, "8M"]);
    let out = run(vireo_img(), &["resize", rs, "4M"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(std::fs::metadata(&r).unwrap().len(), 8 * MIB);
    ok(vireo_img(), &["resize", "--shrink", rs, "4M"]);
    assert_eq!(std::fs::metadata(&r).unwrap().len(), 4 * MIB);
    ok(vireo_img(), &["resize", "-f", "raw", rs, "+4M"]);
    assert_eq!(std::fs::metadata(&r).unwrap().len(), 8 * MIB);

    // --force replaces; the new image is empty and qemu-img agrees.
    ok(vireo_img(), &["create", "--force", "-f", "vhdx", ps, "8M"]);
    let info = ok("qemu-img", &["info", "--output", "json", ps]);
    assert!(info.contains("\"virtual-size\": 8388608"), "{info}");
    assert_eq!(qemu_to_raw(&p, d.path()), vec![0u8; 8 * MIB as usize]);

    let help = ok(vireo_img(), &["create", "-o", "help", "x.vhdx"]);
    for key in [
        "size=",
        "subformat=",
        "block_size=",
        "log_size=",
        "logical_sector_size=",
        "physical_sector_size=",
    ] {
        assert!(help.contains(key), "{help}");
    }
    assert!(!d.path().join("x.vhdx").exists() && !Path::new("x.vhdx").exists());

    // Every option line of every verb's help has a description after the flag.
    for verb in [
        "create", "info", "check", "convert", "resize", "commit", "compact", "map",
    ] {
        let help = ok(vireo_img(), &[verb, "--help"]);
        let mut section = "";
        for line in help.lines() {
            if line.ends_with(':') && !line.starts_with(' ') {
                section = line;
                continue;
            }
            if (section == "Options:" || section == "Arguments:") && line.starts_with("  ") {
                let l = line.trim_start();
                // "-f <FORMAT>  The image's format..." : text after two spaces past the flag.
                let described = l
                    .split_once("  ")
                    .is_some_and(|(_, rest)| !rest.trim().is_empty());
                let continuation = line.starts_with("          ");
                assert!(
                    described || continuation,
                    "`vireo-img {verb} --help`: no help for `{l}`:\n{help}"
                );
            }
        }
    }
}

/// Random mutations of real images (ours, qemu's, a differencing child, one
/// with a pending log): opening and reading must never panic or hang.
#[test]
fn mutated_images_never_panic() {
    let d = tmp();
    let qemu = sample(d.path());
    let ours = d.path().join("ours.vhdx");
    {
        let v = Vhdx::create(
            &ours,
            &CreateOptions {
                size: 16 * MIB,
                block_size: Some(MIB as u32),
                ..Default::default()
            },
        )
        .unwrap();
        v.write_at(&vec![0x5c; 2 * MIB as usize], MIB).unwrap();
        v.close().unwrap();
    }
    let child = d.path().join("child.vhdx");
    {
        let v = Vhdx::create(
            &child,
            &CreateOptions {
                kind: DiskKind::Differencing {
                    parent: ours.clone(),
                },
                block_size: Some(MIB as u32),
                ..Default::default()
            },
        )
        .unwrap();
        v.write_at(&[0x77; 4096], 3 * MIB + 512).unwrap();
        v.close().unwrap();
    }
    // A copy of ours with an unflushed log (written by a crashing writer).
    let logged = d.path().join("logged.vhdx");
    std::fs::copy(&ours, &logged).unwrap();
    {
        let v = Vhdx::open(&logged, OpenOptions::default()).unwrap();
        v.write_at(&[1u8; 4096], 9 * MIB).unwrap();
        v.flush().unwrap();
        std::mem::forget(v); // no clean close: log GUID stays set
    }
    let images: Vec<Vec<u8>> = [&qemu, &ours, &child, &logged]
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let mut r = rng(2024);
    let target = d.path().join("m.vhdx");
    let start = std::time::Instant::now();
    for it in 0..300 {
        let mut f = images[it % images.len()].clone();
        let n = r.gen_range(1..8);
        for _ in 0..n {
            // Structures live in the first few MiB; bias there.
            let hi = if r.gen_bool(0.8) {
                (6 << 20).min(f.len())
            } else {
                f.len()
            };
            let at = r.gen_range(0..hi);
            match r.gen_range(0..4) {
                0 => f[at] ^= 1 << r.gen_range(0..8),
                1 => f[at] = r.gen(),
                2 => {
                    let k = r.gen_range(0..8).min(f.len() - at);
                    for x in &mut f[at..at + k] {
                        *x = 0xff;
                    }
                }
                _ => {
                    if r.gen_bool(0.1) {
                        let cut = r.gen_range(0..f.len());
                        f.truncate(cut);
                    }
                }
            }
        }
        // Half the time, make checksummed structures valid again to reach deeper code.
        if r.gen_bool(0.5) && f.len() >= (320 << 10) {
            for o in [HDR[0], HDR[1]] {
                let mut h = f[o..o + 4096].to_vec();
                fix_crc(&mut h);
                f[o..o + 4096].copy_from_slice(&h);
            }
            for o in [192usize << 10, 256 << 10] {
                let mut t = f[o..o + (64 << 10)].to_vec();
                fix_crc(&mut t);
                f[o..o + (64 << 10)].copy_from_slice(&t);
            }
        }
        std::fs::write(&target, &f).unwrap();
        let before = file_hash(&target);
        let rw = it % 2 == 0;
        match Vhdx::open(
            &target,
            if rw {
                OpenOptions::default()
            } else {
                ro(&target)
            },
        ) {
            Ok(v) => {
                let size = v.virtual_size().min(64 * MIB);
                let mut buf = vec![0u8; MIB as usize];
                let mut at = 0;
                while at < size {
                    let n = (size - at).min(MIB);
                    let _ = v.read_at(&mut buf[..n as usize], at);
                    at += n;
                }
                if rw {
                    let _ = v.write_at(&[3u8; 4096], 0);
                    let _ = v.flush();
                }
            }
            Err(_) => assert_eq!(
                file_hash(&target),
                before,
                "iteration {it}: failed open wrote the file"
            ),
        }
        assert!(
            start.elapsed().as_secs() < 60,
            "mutation test too slow (iteration {it})"
        );
    }
}
