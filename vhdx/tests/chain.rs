//! Differencing chains against a raw model, and the whole-image operations:
//! commit, resize, compact, convert (library and vireo-img).

use crate::common;
use common::*;
use rand::Rng;
use std::process::Command;
use vhdx::{CreateOptions, DiskKind, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 24 * MIB;

fn random_writes(v: &Vhdx, model: &mut [u8], r: &mut impl Rng, n: usize, unaligned: bool) {
    for i in 0..n {
        let len = if r.gen_bool(0.1) {
            r.gen_range(1..3 * MIB as usize)
        } else {
            512 * r.gen_range(1..24)
        };
        let mut off = r.gen_range(0..SIZE - len as u64);
        if !unaligned || r.gen_bool(0.7) {
            off = off / 512 * 512;
        }
        let len = if unaligned && r.gen_bool(0.3) {
            len + r.gen_range(1..511)
        } else {
            len
        };
        let len = len.min((SIZE - off) as usize);
        let data = random_bytes(r, len);
        v.write_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
        if i % 10 == 9 {
            v.flush().unwrap();
        }
    }
}

fn diff(parent: &std::path::Path, child: &std::path::Path) -> Vhdx {
    Vhdx::create(
        child,
        &CreateOptions {
            kind: DiskKind::Differencing {
                parent: parent.to_path_buf(),
            },
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap()
}

fn check_all(p: &std::path::Path, model: &[u8], what: &str) {
    let v = Vhdx::open(p, ro(p)).unwrap();
    assert_same(&read_all(&v), model, what);
}

#[test]
fn three_level_chain_matches_model_then_commit() {
    let d = tmp();
    let base = d.path().join("base.vhdx");
    let mid = d.path().join("mid.vhdx");
    let top = d.path().join("top.vhdx");
    let mut r = rng(42);
    let mut model = vec![0u8; SIZE as usize];
    {
        let v = Vhdx::create(
            &base,
            &CreateOptions {
                size: SIZE,
                block_size: Some(MIB as u32),
                ..Default::default()
            },
        )
        .unwrap();
        random_writes(&v, &mut model, &mut r, 40, false);
        v.close().unwrap();
    }
    qemu_check(&base);
    let base_model = model.clone();
    {
        let v = diff(&base, &mid);
        assert_same(&read_all(&v), &model, "fresh child reads the parent");
        random_writes(&v, &mut model, &mut r, 60, true);
        assert_same(&read_all(&v), &model, "mid before close");
        v.close().unwrap();
    }
    let mid_model = model.clone();
    check_all(&mid, &model, "mid reopened");
    {
        let v = diff(&mid, &top);
        random_writes(&v, &mut model, &mut r, 60, true);
        // Zeroing and discarding whole blocks in a child must hide the parent.
        v.write_zeroes(4 * MIB, 2 * MIB).unwrap();
        model[(4 * MIB) as usize..(6 * MIB) as usize].fill(0);
        v.write_zeroes(9 * MIB + 512, 4096).unwrap();
        model[(9 * MIB + 512) as usize..(9 * MIB + 4608) as usize].fill(0);
        v.close().unwrap();
    }
    check_all(&top, &model, "top reopened");
    check_all(&base, &base_model, "base untouched");
    check_all(&mid, &mid_model, "mid untouched");
    // qemu-img cannot read differencing VHDX; vireo-img convert flattens the chain.
    let flat = d.path().join("flat.raw");
    ok(
        vireo_img(),
        &[
            "convert",
            "-O",
            "raw",
            top.to_str().unwrap(),
            flat.to_str().unwrap(),
        ],
    );
    assert_same(&std::fs::read(&flat).unwrap(), &model, "flattened chain");
    let info = ok(
        vireo_img(),
        &["info", "--output", "json", top.to_str().unwrap()],
    );
    assert!(info.contains("backing-filename"), "{info}");
    assert_eq!(
        run(vireo_img(), &["check", top.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    // Commit top into mid: mid now holds the model, top still reads it (emptied and re-linked).
    let out = ok(vireo_img(), &["commit", top.to_str().unwrap()]);
    assert!(out.contains("committed"), "{out}");
    check_all(&mid, &model, "mid after commit");
    check_all(&top, &model, "top after commit");
    {
        let v = Vhdx::open(&top, ro(&top)).unwrap();
        for b in 0..v.geometry().data_blocks {
            assert_eq!(vhdx::bat_entry::state(v.payload_entry(b)), 0, "top emptied");
        }
    }
    check_all(&base, &base_model, "base untouched by commit");
    // And once more down to the base.
    vhdx::commit(&mid).unwrap();
    check_all(&base, &model, "base after second commit");
    qemu_check(&base);
    assert_same(
        &qemu_to_raw(&base, d.path()),
        &model,
        "qemu reads the committed base",
    );
}

#[test]
fn parent_linkage_and_loops_are_checked() {
    let d = tmp();
    let base = d.path().join("base.vhdx");
    let child = d.path().join("child.vhdx");
    Vhdx::create(
        &base,
        &CreateOptions {
            size: 8 * MIB,
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    diff(&base, &child).close().unwrap();
    Vhdx::open(&child, ro(&child)).unwrap();
    // Writing the parent changes its data write GUID: the child must refuse it.
    {
        let v = Vhdx::open(&base, OpenOptions::default()).unwrap();
        v.write_at(&[1u8; 512], 0).unwrap();
        v.close().unwrap();
    }
    let err = Vhdx::open(&child, ro(&child))
        .err()
        .expect("stale linkage accepted");
    assert!(err.to_string().contains("data write GUID"), "{err}");
    // Missing parent.
    let child2 = d.path().join("child2.vhdx");
    diff(&base, &child2).close().unwrap();
    std::fs::rename(&base, d.path().join("moved.vhdx")).unwrap();
    let err = Vhdx::open(&child2, ro(&child2))
        .err()
        .expect("missing parent accepted");
    assert!(err.to_string().contains("parent"), "{err}");
    std::fs::rename(d.path().join("moved.vhdx"), &base).unwrap();
    // A loop: a child whose locator points at itself (same bytes, linked to its own GUID).
    let lp = d.path().join("loop.vhdx");
    std::fs::copy(&child2, &lp).unwrap();
    let mut f = std::fs::read(&lp).unwrap();
    let (mo, ml) = region(&f, &META_GUID);
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let name16: Vec<u8> = "base.vhdx"
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    let loop16: Vec<u8> = "loop.vhdx"
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    let region_bytes = &mut f[mo as usize..(mo + ml) as usize];
    while let Some(i) = find(region_bytes, &name16) {
        region_bytes[i..i + loop16.len()].copy_from_slice(&loop16);
    }
    std::fs::write(&lp, &f).unwrap();
    let before = file_hash(&lp);
    let err = Vhdx::open(&lp, OpenOptions::default())
        .err()
        .expect("loop accepted");
    assert!(
        err.to_string().contains("loop")
            || err.to_string().contains("lock")
            || err.to_string().contains("GUID"),
        "{err}"
    );
    assert_eq!(file_hash(&lp), before);
}

#[test]
fn resize_grow_shrink_and_refusal() {
    let d = tmp();
    let p = d.path().join("r.vhdx");
    let ps = p.to_str().unwrap();
    ok(
        vireo_img(),
        &["create", "-f", "vhdx", "-o", "block_size=1M", ps, "16M"],
    );
    let mut model = vec![0u8; 16 * MIB as usize];
    {
        let v = Vhdx::open(&p, OpenOptions::default()).unwrap();
        let mut r = rng(3);
        let data = random_bytes(&mut r, 3 * MIB as usize);
        v.write_at(&data, 5 * MIB).unwrap();
        model[5 * MIB as usize..8 * MIB as usize].copy_from_slice(&data);
        v.close().unwrap();
    }
    // Grow far enough that the BAT must move (1 MiB of BAT holds 128Ki entries = 128 GiB at 1 MiB blocks).
    ok(vireo_img(), &["resize", ps, "+200G"]);
    qemu_check(&p);
    let info = ok("qemu-img", &["info", "--output", "json", ps]);
    assert!(
        info.contains(&format!("{}", 16 * MIB + (200u64 << 30))),
        "{info}"
    );
    {
        let v = Vhdx::open(&p, OpenOptions::default()).unwrap();
        let mut b = vec![0u8; 16 * MIB as usize];
        v.read_at(&mut b, 0).unwrap();
        assert_same(&b, &model, "data after growing");
        v.write_at(&[9u8; 4096], 150 << 30).unwrap();
        v.close().unwrap();
    }
    qemu_check(&p);
    // A smaller size needs --shrink (as with qemu-img)...
    let out = run(vireo_img(), &["resize", ps, "16M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--shrink"),
        "{out:?}"
    );
    // ... and, with it, is refused while data would be lost.
    let out = run(vireo_img(), &["resize", "--shrink", ps, "16M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("discard data"),
        "{:?}",
        out
    );
    {
        let v = Vhdx::open(&p, OpenOptions::default()).unwrap();
        v.write_zeroes(150 << 30, 4096).unwrap();
        v.close().unwrap();
    }
    ok(vireo_img(), &["resize", "--shrink", ps, "16M"]);
    assert_eq!(
        run(vireo_img(), &["resize", "--shrink", ps, "6M"])
            .status
            .code(),
        Some(1)
    );
    qemu_check(&p);
    assert_same(&qemu_to_raw(&p, d.path()), &model, "after shrink");
    // Fixed disks grow with allocated blocks.
    let f = d.path().join("f.vhdx");
    ok(
        vireo_img(),
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "subformat=fixed,block_size=1M",
            f.to_str().unwrap(),
            "4M",
        ],
    );
    ok(vireo_img(), &["resize", f.to_str().unwrap(), "+4M"]);
    qemu_check(&f);
    let v = Vhdx::open(&f, ro(&f)).unwrap();
    assert_eq!(
        vhdx::bat_entry::state(v.payload_entry(7)),
        vhdx::bat_entry::PAYLOAD_FULLY_PRESENT
    );
}

#[test]
fn compact_releases_zero_blocks_and_shrinks_file() {
    let d = tmp();
    let p = d.path().join("c.vhdx");
    let mut model = vec![0u8; 32 * MIB as usize];
    {
        let v = Vhdx::create(
            &p,
            &CreateOptions {
                size: 32 * MIB,
                block_size: Some(MIB as u32),
                ..Default::default()
            },
        )
        .unwrap();
        let mut r = rng(8);
        for b in 0..32u64 {
            if b % 3 == 0 {
                let data = random_bytes(&mut r, 4096);
                v.write_at(&data, b * MIB + 8192).unwrap();
                model[(b * MIB + 8192) as usize..(b * MIB + 8192 + 4096) as usize]
                    .copy_from_slice(&data);
            } else {
                // Allocated but all zero.
                v.write_at(&[0u8; 4096], b * MIB).unwrap();
            }
        }
        v.close().unwrap();
    }
    let before = std::fs::metadata(&p).unwrap().len();
    let out = ok(vireo_img(), &["compact", p.to_str().unwrap()]);
    assert!(out.contains("compacted"), "{out}");
    let after = std::fs::metadata(&p).unwrap().len();
    assert!(after + 20 * MIB <= before, "file {before} -> {after}");
    qemu_check(&p);
    assert_same(&qemu_to_raw(&p, d.path()), &model, "after compact");
    check_all(&p, &model, "ours after compact");
}

#[test]
fn convert_both_ways_keeps_bytes_and_sparseness() {
    let d = tmp();
    let raw = d.path().join("in.raw");
    let mut data = vec![0u8; 40 * MIB as usize];
    let mut r = rng(77);
    for i in 0..10 {
        let off = (i * 4 * MIB + 123 * 512) as usize;
        let chunk = random_bytes(&mut r, 700_000);
        data[off..off + chunk.len()].copy_from_slice(&chunk);
    }
    std::fs::write(&raw, &data).unwrap();
    let v = d.path().join("out.vhdx");
    ok(
        vireo_img(),
        &[
            "convert",
            "-p",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            "block_size=1M",
            raw.to_str().unwrap(),
            v.to_str().unwrap(),
        ],
    );
    qemu_check(&v);
    assert_same(&qemu_to_raw(&v, d.path()), &data, "raw -> vhdx");
    // Sparse: about 10 * 1-2 blocks allocated, not 40.
    let vs = std::fs::metadata(&v).unwrap().len();
    assert!(vs < 30 * MIB, "destination not sparse: {vs}");
    let back = d.path().join("back.raw");
    ok(
        vireo_img(),
        &[
            "convert",
            "-f",
            "vhdx",
            "-O",
            "raw",
            v.to_str().unwrap(),
            back.to_str().unwrap(),
        ],
    );
    assert_same(&std::fs::read(&back).unwrap(), &data, "vhdx -> raw");
    // From a qemu-made VHDX too.
    let q = d.path().join("q.vhdx");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            raw.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
    );
    let back2 = d.path().join("back2.raw");
    ok(
        vireo_img(),
        &[
            "convert",
            "-O",
            "raw",
            q.to_str().unwrap(),
            back2.to_str().unwrap(),
        ],
    );
    assert_same(&std::fs::read(&back2).unwrap(), &data, "qemu vhdx -> raw");
    // map agrees with qemu-img map on where data is.
    let ours = ok(
        vireo_img(),
        &["map", "--output", "json", v.to_str().unwrap()],
    );
    let j: serde_json::Value = serde_json::from_str(&ours).unwrap();
    let data_bytes: u64 = j
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        (10 * 700_000..=30 * MIB).contains(&data_bytes),
        "{data_bytes}"
    );
}

#[test]
fn locks_keep_qemu_and_us_apart() {
    let d = tmp();
    let p = d.path().join("l.vhdx");
    let ps = p.to_str().unwrap();
    let w = Vhdx::create(
        &p,
        &CreateOptions {
            size: 8 * MIB,
            ..Default::default()
        },
    )
    .unwrap();
    let out = run("qemu-io", &["-f", "vhdx", "-c", "write 0 512", ps]);
    assert!(
        !out.status.success(),
        "qemu wrote while we had it open for writing"
    );
    assert!(
        Vhdx::open(&p, ro(&p)).is_err(),
        "reader opened alongside our writer"
    );
    drop(w);
    let r1 = Vhdx::open(&p, ro(&p)).unwrap();
    let _r2 = Vhdx::open(&p, ro(&p)).unwrap();
    ok("qemu-img", &["info", ps]);
    let out = run("qemu-io", &["-f", "vhdx", "-c", "write 0 512", ps]);
    assert!(!out.status.success(), "qemu wrote while we were reading");
    assert!(Vhdx::open(&p, OpenOptions::default()).is_err());
    drop(r1);
}

/// `create -b base.vhdx sub/child.vhdx` run from elsewhere: the relative backing path names
/// `sub/base.vhdx` (the child's directory), as qemu-img and Hyper-V read it; a base.vhdx in
/// the current directory is not used. qemu-img 7.2 cannot open differencing VHDX, so its
/// reading of a relative `-b` is checked with qcow2 under the same layout.
#[test]
fn a_relative_backing_path_is_read_against_the_childs_directory() {
    let d = tempfile::tempdir().unwrap();
    let sub = d.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let base = sub.join("base.vhdx");
    ok(
        vireo_img(),
        &["create", "-f", "vhdx", base.to_str().unwrap(), "8M"],
    );
    // A decoy of another size in the current directory: the old reading picked it.
    ok(
        vireo_img(),
        &[
            "create",
            "-f",
            "vhdx",
            d.path().join("base.vhdx").to_str().unwrap(),
            "4M",
        ],
    );
    let create_child = |name: &str| {
        Command::new(vireo_img())
            .current_dir(d.path())
            .args(["create", "-f", "vhdx", "-b", "base.vhdx", "-F", "vhdx"])
            .arg(format!("sub/{name}"))
            .output()
            .unwrap()
    };
    let out = create_child("child.vhdx");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = ok(
        vireo_img(),
        &[
            "info",
            "--output",
            "json",
            sub.join("child.vhdx").to_str().unwrap(),
        ],
    );
    let j: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(j["virtual-size"], 8 << 20, "{info}");
    let backing = j["backing-filename"].as_str().unwrap();
    assert_eq!(
        std::fs::canonicalize(backing).unwrap(),
        std::fs::canonicalize(&base).unwrap(),
        "{info}"
    );
    // Reopened from yet another directory, the child still finds sub/base.vhdx.
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(vireo_img())
        .current_dir(other.path())
        .args(["check", sub.join("child.vhdx").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // No base next to the child: one clear error naming the path looked for, no child made.
    std::fs::remove_file(&base).unwrap();
    let out = create_child("orphan.vhdx");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("sub/base.vhdx"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!sub.join("orphan.vhdx").exists());
    // qemu-img's reading of a relative -b, same layout in qcow2: against the child's
    // directory (the 4M decoy in the current directory is not what it finds).
    let q = |args: &[&str]| {
        Command::new("qemu-img")
            .current_dir(d.path())
            .args(args)
            .output()
            .unwrap()
    };
    let out = q(&["create", "-f", "qcow2", "sub/qbase.qcow2", "8M"]);
    assert!(out.status.success(), "{out:?}");
    let out = q(&["create", "-f", "qcow2", "qbase.qcow2", "4M"]);
    assert!(out.status.success(), "{out:?}");
    let out = q(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "qbase.qcow2",
        "-F",
        "qcow2",
        "sub/qchild.qcow2",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = q(&["info", "--output", "json", "sub/qchild.qcow2"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["virtual-size"], 8 << 20, "qemu-img: {j}");
}
