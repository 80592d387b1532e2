//! Interoperability with the real qemu-img / qemu-io, both directions.

use crate::common;
use common::*;
use rand::Rng;
use vhdx::{CreateOptions, DiskKind, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;

fn create(path: &std::path::Path, size: u64, block: u32, lss: u32, kind: DiskKind) -> Vhdx {
    Vhdx::create(
        path,
        &CreateOptions {
            size,
            kind,
            block_size: Some(block),
            logical_sector_size: lss,
            physical_sector_size: 4096,
            ..Default::default()
        },
    )
    .expect("create")
}

/// Random writes (at block boundaries, straddling them, sparse and full
/// regions) into our image and a raw model; qemu-img must agree byte for byte.
fn ours_to_qemu(lss: u32, kind: DiskKind, seed: u64) {
    let d = tmp();
    let p = d.path().join("a.vhdx");
    let size = 48 * MIB;
    let block = MIB as u32;
    let mut model = vec![0u8; size as usize];
    {
        let v = create(&p, size, block, lss, kind);
        let mut r = rng(seed);
        // Full region: first 3 blocks.
        let full = random_bytes(&mut r, 3 * MIB as usize);
        v.write_at(&full, 0).unwrap();
        model[..full.len()].copy_from_slice(&full);
        // Writes straddling block boundaries.
        for b in [5u64, 9, 17, 31, 47] {
            let len = lss as usize * r.gen_range(1..64);
            let off = b * MIB - lss as u64 * r.gen_range(0..8);
            let off = off.min(size - len as u64);
            let data = random_bytes(&mut r, len);
            v.write_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        // Scattered small writes, flush every 16.
        for i in 0..100 {
            let len = lss as usize * r.gen_range(1..16);
            let off = r.gen_range(0..(size - len as u64) / lss as u64) * lss as u64;
            let data = random_bytes(&mut r, len);
            v.write_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
            if i % 16 == 15 {
                v.flush().unwrap();
            }
        }
        // Our own read-back before close.
        let mut back = vec![0u8; size as usize];
        v.read_at(&mut back, 0).unwrap();
        assert_same(&back, &model, "read back before close");
        v.close().unwrap();
    }
    if lss == 512 {
        qemu_check(&p);
        assert_same(
            &qemu_to_raw(&p, d.path()),
            &model,
            "qemu-img convert of our image",
        );
    } else {
        // QEMU's VHDX driver refuses logical sectors other than 512 bytes
        // ("Operation not supported"), so only our own reader can check these.
        let out = run("qemu-img", &["info", "-f", "vhdx", p.to_str().unwrap()]);
        assert!(
            !out.status.success(),
            "qemu-img learned 4096-byte sectors: extend this test"
        );
    }
    // And reopened by us.
    let v = Vhdx::open(
        &p,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut back = vec![0u8; size as usize];
    v.read_at(&mut back, 0).unwrap();
    assert_same(&back, &model, "reopened read back");
}

#[test]
fn ours_dynamic_512_read_by_qemu() {
    ours_to_qemu(512, DiskKind::Dynamic, 1);
}

#[test]
fn ours_dynamic_4096_read_by_qemu() {
    ours_to_qemu(4096, DiskKind::Dynamic, 2);
}

#[test]
fn ours_fixed_512_read_by_qemu() {
    ours_to_qemu(512, DiskKind::Fixed, 3);
}

#[test]
fn qemu_written_read_by_us() {
    let d = tmp();
    let p = d.path().join("q.vhdx");
    let ps = p.to_str().unwrap();
    ok(
        "qemu-img",
        &["create", "-f", "vhdx", "-o", "block_size=1M", ps, "40M"],
    );
    // Patterned writes with qemu-io, at and across block boundaries.
    let writes: &[(u8, u64, u64)] = &[
        (0x11, 0, 4096),
        (0x22, MIB - 512, 1024),
        (0x33, 5 * MIB, 3 * MIB),
        (0x44, 20 * MIB + 512, 65536),
        (0x55, 40 * MIB - 4096, 4096),
    ];
    let mut model = vec![0u8; 40 * MIB as usize];
    for &(pat, off, len) in writes {
        ok(
            "qemu-io",
            &[
                "-f",
                "vhdx",
                "-c",
                &format!("write -P {pat} {off} {len}"),
                ps,
            ],
        );
        model[off as usize..(off + len) as usize].fill(pat);
    }
    // Random data through qemu-img convert from raw.
    let raw = d.path().join("src.raw");
    let mut r = rng(9);
    let mut rawdata = vec![0u8; 40 * MIB as usize];
    for i in 0..20 {
        let off = i * 2 * MIB as usize;
        let chunk = random_bytes(&mut r, 300_000);
        rawdata[off..off + chunk.len()].copy_from_slice(&chunk);
    }
    std::fs::write(&raw, &rawdata).unwrap();
    let p2 = d.path().join("q2.vhdx");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            raw.to_str().unwrap(),
            p2.to_str().unwrap(),
        ],
    );
    for (img, want) in [(&p, &model), (&p2, &rawdata)] {
        let v = Vhdx::open(
            img,
            OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut back = vec![0u8; want.len()];
        v.read_at(&mut back, 0).unwrap();
        assert_same(&back, want, "our read of a qemu image");
        // Vectored read of an odd split.
        let (mut a, mut b) = (vec![0u8; 777], vec![0u8; 3 * MIB as usize]);
        {
            let mut iov = [
                std::io::IoSliceMut::new(&mut a),
                std::io::IoSliceMut::new(&mut b),
            ];
            v.read_vectored_at(&mut iov, MIB - 100).unwrap();
        }
        let s = (MIB - 100) as usize;
        assert_same(&a, &want[s..s + 777], "vectored a");
        assert_same(&b, &want[s + 777..s + 777 + b.len()], "vectored b");
    }
    // We write into a qemu image; qemu reads it back.
    {
        let v = Vhdx::open(&p, OpenOptions::default()).unwrap();
        let data = random_bytes(&mut r, 2 * MIB as usize + 512);
        v.write_at(&data, 7 * MIB + 512).unwrap();
        model[(7 * MIB + 512) as usize..(7 * MIB + 512) as usize + data.len()]
            .copy_from_slice(&data);
        v.close().unwrap();
    }
    qemu_check(&p);
    assert_same(
        &qemu_to_raw(&p, d.path()),
        &model,
        "qemu read of our write to its image",
    );
    // qemu-io read -P checks a pattern we wrote.
    {
        let v = Vhdx::open(&p, OpenOptions::default()).unwrap();
        v.write_at(&vec![0x5a; 65536], 30 * MIB).unwrap();
        v.close().unwrap();
    }
    let out = ok(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-c",
            &format!("read -P 0x5a {} 65536", 30 * MIB),
            ps,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn concurrent_readers_and_writer() {
    let d = tmp();
    let p = d.path().join("c.vhdx");
    let v = std::sync::Arc::new(create(&p, 64 * MIB, MIB as u32, 512, DiskKind::Dynamic));
    let mut hs = Vec::new();
    for t in 0..4u64 {
        let v = v.clone();
        hs.push(std::thread::spawn(move || {
            let mut r = rng(100 + t);
            for i in 0..64u64 {
                let off = (t * 16 + (i % 16)) * MIB + r.gen_range(0..100) * 512;
                let data = vec![(t * 64 + i) as u8; 8192];
                v.write_at(&data, off).unwrap();
                let mut back = vec![0u8; 8192];
                v.read_at(&mut back, off).unwrap();
                assert_eq!(back, data);
                if i % 8 == 0 {
                    v.flush().unwrap();
                }
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    drop(v);
    qemu_check(&p);
}
