//! Images as Hyper-V leaves them and qemu never writes: pending logs with data
//! and zero descriptors, twin headers, every BAT state, user metadata.

use crate::common;
use common::*;
use vhdx::{bat_entry as be, CreateOptions, DiskKind, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;

/// A qemu-made 32 MiB image with 1 MiB blocks, blocks 0..8 written with patterns.
fn qemu_image(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("hv.vhdx");
    let ps = p.to_str().unwrap();
    ok(
        "qemu-img",
        &["create", "-f", "vhdx", "-o", "block_size=1M", ps, "32M"],
    );
    for b in 0..8u64 {
        ok(
            "qemu-io",
            &[
                "-f",
                "vhdx",
                "-c",
                &format!("write -P {} {} 1M", 0x10 + b, b * MIB),
                ps,
            ],
        );
    }
    p
}

/// Adds a pending log to `p`: block 20 becomes FULLY_PRESENT at a new 1 MiB at
/// the end of the file (data written there, BAT page through a data
/// descriptor); block 5's data is zeroed through a zero descriptor.
/// Returns the expected disk contents after replay.
fn add_pending_log(p: &std::path::Path) -> Vec<u8> {
    let mut f = std::fs::read(p).unwrap();
    let mut expect = {
        let v = Vhdx::open(p, ro(p)).unwrap();
        read_all(&v)
    };
    let (bat_off, _) = region(&f, &BAT_GUID);
    let (log_off, log_len) = {
        let h = HDR[current_header(&f)];
        (le64(&f, h + 72), le32(&f, h + 68) as u64)
    };
    let old_len = f.len() as u64;
    let new_block = old_len.div_ceil(MIB) * MIB;
    // The new block's data is in place (Hyper-V writes data before logging the BAT).
    f.resize((new_block + MIB) as usize, 0);
    for (i, x) in f[new_block as usize..].iter_mut().enumerate() {
        *x = (i % 253) as u8;
    }
    expect[(20 * MIB) as usize..(21 * MIB) as usize].copy_from_slice(&f[new_block as usize..]);
    // Block 5's file offset, to zero through the log.
    let b5 = le64(&f, bat_off as usize + 5 * 8) & !0xfffff;
    assert_ne!(b5, 0);
    expect[(5 * MIB) as usize..(6 * MIB) as usize].fill(0);
    // New BAT page 0.
    let mut page = f[bat_off as usize..bat_off as usize + 4096].to_vec();
    put64(&mut page, 20 * 8, new_block | 6);
    let guid: [u8; 16] = *b"pending-log-guid";
    let last = new_block + MIB;
    let e1 = log_entry(7, &guid, 0, &[(bat_off, page)], &[], last, last);
    let e2 = log_entry(8, &guid, 0, &[], &[(b5, MIB)], last, last);
    let lo = log_off as usize;
    f[lo..lo + (log_len as usize)].fill(0);
    f[lo..lo + e1.len()].copy_from_slice(&e1);
    f[lo + e1.len()..lo + e1.len() + e2.len()].copy_from_slice(&e2);
    bump_header(&mut f, |h| h[48..64].copy_from_slice(&guid));
    std::fs::write(p, &f).unwrap();
    expect
}

#[test]
fn pending_log_replayed_read_only_in_memory_and_file_untouched() {
    let d = tmp();
    let p = qemu_image(d.path());
    let expect = add_pending_log(&p);
    let before = file_hash(&p);
    {
        let v = Vhdx::open(&p, ro(&p)).unwrap();
        assert_eq!(v.replayed_log_entries(), 2);
        assert_same(&read_all(&v), &expect, "read-only view of the replayed log");
    }
    assert_eq!(file_hash(&p), before, "read-only open wrote to the file");
    // vireo-img check reports the pending log without touching it.
    let out = run(vireo_img(), &["check", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(file_hash(&p), before);
}

#[test]
fn pending_log_replay_matches_qemu_replay() {
    let d = tmp();
    let p = qemu_image(d.path());
    let expect = add_pending_log(&p);
    let q = d.path().join("qemu-copy.vhdx");
    std::fs::copy(&p, &q).unwrap();
    // QEMU replays with check -r all.
    let _ = run(
        "qemu-img",
        &["check", "-r", "all", "-f", "vhdx", q.to_str().unwrap()],
    );
    qemu_check(&q);
    let qemu_view = qemu_to_raw(&q, d.path());
    assert_same(&qemu_view, &expect, "qemu's replay");
    // We replay on a read-write open.
    {
        let v = Vhdx::open(&p, OpenOptions::default()).unwrap();
        assert_eq!(v.replayed_log_entries(), 2);
        v.close().unwrap();
    }
    qemu_check(&p);
    assert_same(
        &qemu_to_raw(&p, d.path()),
        &expect,
        "qemu read of our replay",
    );
    let v = Vhdx::open(&p, ro(&p)).unwrap();
    assert_eq!(
        v.replayed_log_entries(),
        0,
        "log still pending after replay"
    );
    assert_same(&read_all(&v), &expect, "our read after replay");
}

#[test]
fn lying_log_entry_is_refused_and_file_unchanged() {
    let d = tmp();
    let p = qemu_image(d.path());
    let mut f = std::fs::read(&p).unwrap();
    let (bat_off, _) = region(&f, &BAT_GUID);
    let log_off = le64(&f, HDR[current_header(&f)] + 72) as usize;
    let guid: [u8; 16] = *b"lying-log-guid!!";
    let page = f[bat_off as usize..bat_off as usize + 4096].to_vec();
    // Claims the file was flushed at 1 TiB: the file was "truncated".
    let e = log_entry(
        3,
        &guid,
        0,
        &[(bat_off, page.clone())],
        &[],
        1 << 40,
        1 << 40,
    );
    f[log_off..log_off + e.len()].copy_from_slice(&e);
    bump_header(&mut f, |h| h[48..64].copy_from_slice(&guid));
    std::fs::write(&p, &f).unwrap();
    let before = file_hash(&p);
    let err = Vhdx::open(&p, OpenOptions::default())
        .err()
        .expect("must refuse");
    assert!(err.to_string().contains("flushed file offset"), "{err}");
    assert_eq!(file_hash(&p), before);
    // A descriptor aimed at the headers.
    let e = log_entry(
        3,
        &guid,
        0,
        &[(64 << 10, page)],
        &[],
        f.len() as u64,
        f.len() as u64,
    );
    f[log_off..log_off + e.len()].copy_from_slice(&e);
    std::fs::write(&p, &f).unwrap();
    let before = file_hash(&p);
    let err = Vhdx::open(&p, OpenOptions::default())
        .err()
        .expect("must refuse");
    assert!(err.to_string().contains("header area"), "{err}");
    assert_eq!(file_hash(&p), before);
}

#[test]
fn twin_headers_equal_sequence() {
    let d = tmp();
    let p = qemu_image(d.path());
    let mut f = std::fs::read(&p).unwrap();
    let cur = current_header(&f);
    let h = f[HDR[cur]..HDR[cur] + 4096].to_vec();
    f[HDR[1 - cur]..HDR[1 - cur] + 4096].copy_from_slice(&h);
    std::fs::write(&p, &f).unwrap();
    let want = {
        let v = Vhdx::open(&p, ro(&p)).unwrap();
        read_all(&v)
    };
    assert_eq!(want[0], 0x10);
    // Same sequence number, different contents: refused.
    let mut h2 = h.clone();
    h2[20] ^= 0xff;
    fix_crc(&mut h2);
    f[HDR[1 - cur]..HDR[1 - cur] + 4096].copy_from_slice(&h2);
    std::fs::write(&p, &f).unwrap();
    let err = Vhdx::open(&p, ro(&p)).err().expect("must refuse");
    assert!(err.to_string().contains("same sequence number"), "{err}");
    // One corrupt header: the other is used.
    f[HDR[1 - cur] + 100] ^= 1;
    std::fs::write(&p, &f).unwrap();
    let v = Vhdx::open(&p, ro(&p)).unwrap();
    assert_same(&read_all(&v), &want, "with one bad header");
}

#[test]
fn bat_states_zero_unmapped_undefined_in_dynamic() {
    let d = tmp();
    let p = qemu_image(d.path());
    let mut f = std::fs::read(&p).unwrap();
    let (bat_off, _) = region(&f, &BAT_GUID);
    for (block, st) in [(1usize, 2u64), (2, 3), (3, 1)] {
        let o = bat_off as usize + block * 8;
        put64(&mut f, o, st);
    }
    std::fs::write(&p, &f).unwrap();
    let v = Vhdx::open(&p, ro(&p)).unwrap();
    let all = read_all(&v);
    assert!(all[MIB as usize..4 * MIB as usize].iter().all(|&b| b == 0));
    assert!(all[4 * MIB as usize..5 * MIB as usize]
        .iter()
        .all(|&b| b == 0x14));
    drop(v);
    qemu_check(&p);
    assert_same(
        &qemu_to_raw(&p, d.path()),
        &all,
        "qemu agrees on ZERO/UNMAPPED/UNDEFINED",
    );
}

#[test]
fn partially_present_zero_unmapped_in_differencing() {
    let d = tmp();
    let base = d.path().join("base.vhdx");
    let mut model = vec![0u8; 16 * MIB as usize];
    {
        let v = Vhdx::create(
            &base,
            &CreateOptions {
                size: 16 * MIB,
                block_size: Some(MIB as u32),
                ..Default::default()
            },
        )
        .unwrap();
        let mut r = rng(5);
        model = random_bytes(&mut r, model.len());
        v.write_at(&model, 0).unwrap();
        v.close().unwrap();
    }
    let child = d.path().join("child.vhdx");
    let child_block;
    {
        let v = Vhdx::create(
            &child,
            &CreateOptions {
                kind: DiskKind::Differencing {
                    parent: base.clone(),
                },
                block_size: Some(MIB as u32),
                ..Default::default()
            },
        )
        .unwrap();
        v.write_at(&vec![0xcc; MIB as usize], 2 * MIB).unwrap();
        v.close().unwrap();
        let v = Vhdx::open(&child, ro(&child)).unwrap();
        child_block = be::offset(v.payload_entry(2));
        assert_eq!(be::state(v.payload_entry(2)), be::PAYLOAD_FULLY_PRESENT);
    }
    // Hand-edit: block 2 PARTIALLY_PRESENT with a sector bitmap whose bits
    // mark every other 4 KiB of the block; block 3 ZERO; block 4 UNMAPPED.
    let mut f = std::fs::read(&child).unwrap();
    let (bat_off, _) = region(&f, &BAT_GUID);
    let sb_off = (f.len() as u64).div_ceil(MIB) * MIB;
    f.resize((sb_off + MIB) as usize, 0);
    // Chunk ratio for 1 MiB blocks, 512-byte sectors: 4096; block 2 = sectors 4096..6143.
    for s in 4096u64..6144 {
        if (s / 8) % 2 == 0 {
            f[(sb_off + s / 8) as usize] |= 1 << (s % 8);
        }
    }
    let b = bat_off as usize;
    put64(&mut f, b + 2 * 8, child_block | 7);
    put64(&mut f, b + 3 * 8, 2);
    put64(&mut f, b + 4 * 8, 3);
    put64(&mut f, b + 4096 * 8, sb_off | 6);
    std::fs::write(&child, &f).unwrap();
    for (i, x) in model[2 * MIB as usize..3 * MIB as usize]
        .chunks_mut(4096)
        .enumerate()
    {
        if i % 2 == 0 {
            x.fill(0xcc);
        }
    }
    model[3 * MIB as usize..4 * MIB as usize].fill(0);
    let v = Vhdx::open(&child, ro(&child)).unwrap();
    assert_same(
        &read_all(&v),
        &model,
        "PARTIALLY_PRESENT/ZERO/UNMAPPED through the chain",
    );
    drop(v);
    // Writing into the partial block sets more bits; reads stay right.
    let v = Vhdx::open(&child, OpenOptions::default()).unwrap();
    v.write_at(&[0xdd; 1024], 2 * MIB + 4096 + 512).unwrap();
    model[(2 * MIB + 4096 + 512) as usize..(2 * MIB + 4096 + 1536) as usize].fill(0xdd);
    v.close().unwrap();
    let v = Vhdx::open(&child, ro(&child)).unwrap();
    assert_same(
        &read_all(&v),
        &model,
        "after writing into a PARTIALLY_PRESENT block",
    );
}

#[test]
fn user_metadata_items_survive_rewrites() {
    let d = tmp();
    let p = d.path().join("u.vhdx");
    Vhdx::create(
        &p,
        &CreateOptions {
            size: 8 * MIB,
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    // Insert a user item (IsUser) after the existing ones.
    let mut f = std::fs::read(&p).unwrap();
    let (mo, _) = region(&f, &META_GUID);
    let mo = mo as usize;
    let n = u16::from_le_bytes([f[mo + 10], f[mo + 11]]) as usize;
    let payload: Vec<u8> = (0..300u32).map(|i| (i * 13 % 256) as u8).collect();
    let item_off = 200 << 10;
    let e = mo + 32 + n * 32;
    f[e..e + 16].copy_from_slice(b"user-item-guid!!");
    put32(&mut f, e + 16, item_off as u32);
    put32(&mut f, e + 20, payload.len() as u32);
    put32(&mut f, e + 24, 1);
    f[mo + 10..mo + 12].copy_from_slice(&((n + 1) as u16).to_le_bytes());
    f[mo + item_off..mo + item_off + payload.len()].copy_from_slice(&payload);
    std::fs::write(&p, &f).unwrap();
    qemu_check(&p);
    // Resize rewrites the metadata region through the log.
    {
        let mut v = Vhdx::open(&p, OpenOptions::default()).unwrap();
        v.write_at(&[7u8; 4096], 0).unwrap();
        v.resize(24 * MIB).unwrap();
        v.close().unwrap();
    }
    qemu_check(&p);
    let v = Vhdx::open(&p, ro(&p)).unwrap();
    assert_eq!(v.virtual_size(), 24 * MIB);
    let it = v
        .metadata_items()
        .iter()
        .find(|i| i.flags & 1 != 0)
        .expect("user item kept");
    assert_eq!(it.data, payload);
    assert_eq!(it.id.to_bytes_le(), *b"user-item-guid!!");
    let out = ok(
        "qemu-img",
        &["info", "--output", "json", p.to_str().unwrap()],
    );
    assert!(out.contains(&format!("{}", 24 * MIB)), "{out}");
}
