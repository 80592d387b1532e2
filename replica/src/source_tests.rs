//! The initial copy's reader of VHDX disks: the virtual content (as `qemu-img convert
//! -O raw` gives it) is what a new replica ends with, the blocks the VHDX has not
//! allocated are neither read nor sent and stay holes in the replica's image, a
//! differencing disk is read through its parent, and a damaged or unopenable VHDX is
//! refused with an error naming it.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::store_tests::dir_fd;
use crate::*;

const MIB: u64 = 1 << 20;
/// Eight VHDX blocks of 1 MiB.
const SIZE: u64 = 8 * MIB;

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn create(path: &Path, kind: vhdx::DiskKind) -> vhdx::Vhdx {
    vhdx::Vhdx::create(
        path,
        &vhdx::CreateOptions {
            size: SIZE,
            kind,
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap()
}

/// The peer's reading of `image`: `qemu-img convert -O raw`.
fn qemu_raw(image: &Path) -> Vec<u8> {
    let out = image.with_extension("qemu.raw");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(image)
        .arg(&out)
        .output()
        .expect("qemu-img (scripts/setup installs it)");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    std::fs::read(&out).unwrap()
}

/// Resyncs `image` into `vm`'s disk 0 as the primary does; returns the bytes sent.
fn resync<'a>(image: &'a dyn DiskImage, vm: &mut ReplicaVm) -> (u64, Resync<'a>) {
    let mut pass = Resync::new(image, 4 * MIB as usize);
    let mut sent = 0;
    while !pass.done() {
        let start = pass.next_block();
        let theirs = vm.block_hashes(0, start, 16).unwrap();
        while let Some(run) = pass.next_run(&theirs, start).unwrap() {
            sent += run.data.len() as u64;
            vm.write_base(0, run.offset, &run.data).unwrap();
        }
    }
    (sent, pass)
}

fn replica_image(vm: &ReplicaVm) -> Vec<u8> {
    let mut got = vec![0u8; SIZE as usize];
    vm.image(0).unwrap().read_exact_at(&mut got, 0).unwrap();
    got
}

/// Where the next data of `f` at or after `from` is (SEEK_DATA), `None` past the last.
fn next_data(f: &std::fs::File, from: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    (r >= 0).then_some(r as u64)
}

#[test]
fn a_dynamic_vhdx_is_copied_as_its_virtual_content_and_its_unallocated_blocks_stay_holes() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("os.vhdx");
    let v = create(&path, vhdx::DiskKind::Dynamic);
    // Block 1: 200 KiB of data 4 KiB in; block 5: 64 KiB at its second 64 KiB; block
    // 6: written with zeros (allocated, reads zero). Blocks 0, 2, 3, 4, 7: never
    // written.
    v.write_at(&noise(1, 200 << 10), MIB + 4096).unwrap();
    v.write_at(&noise(2, 64 << 10), 5 * MIB + (64 << 10))
        .unwrap();
    v.write_at(&vec![0u8; 128 << 10], 6 * MIB).unwrap();
    v.close().unwrap();
    let peer = qemu_raw(&path);
    assert_eq!(peer.len() as u64, SIZE);

    let image = VhdxImage::open_path(&path).unwrap();
    assert_eq!(image.size(), SIZE, "the virtual size, not the file's");
    let r = tempfile::tempdir().unwrap();
    let mut vm = ReplicaVm::create_or_open(dir_fd(r.path()).as_fd(), "vm1", &[SIZE]).unwrap();
    let (sent, pass) = resync(&image, &mut vm);
    // The 64 KiB blocks holding non-zero bytes: 4 KiB + 200 KiB span blocks 16..19 of
    // the disk's 64 KiB blocks (4 blocks), block 5's one.
    assert_eq!(sent, 5 * (64 << 10), "only the non-zero blocks are sent");
    // Blocks 1 and 5 are read (and 6, unless the zero write left it unallocated);
    // the never-written ones are not.
    assert_eq!(pass.read_bytes + pass.unallocated_bytes, SIZE);
    assert!(
        pass.unallocated_bytes >= 5 * MIB && pass.read_bytes >= 2 * MIB,
        "read {} bytes, {} taken as unallocated",
        pass.read_bytes,
        pass.unallocated_bytes
    );
    let whole = pass.finish();
    vm.complete_base_checked(&[whole]).unwrap();
    assert!(replica_image(&vm) == peer, "the replica is qemu-img's raw");
    // The replica's image has data only where the VHDX had non-zero bytes.
    let img = vm.image(0).unwrap();
    assert_eq!(next_data(img, 0), Some(MIB), "block 0 is a hole");
    let after = next_data(img, 2 * MIB).unwrap();
    assert!(after >= 5 * MIB, "blocks 2..5 are holes: data at {after}");
    if let Some(at) = next_data(img, 6 * MIB) {
        panic!("blocks 6 and 7 (zeros, unallocated) hold data at {at}");
    }
    assert!(
        img.metadata().unwrap().len() == SIZE,
        "the image keeps the disk's size"
    );
}

#[test]
fn a_resync_from_a_vhdx_zeroes_what_it_released_and_sends_only_changes() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("os.vhdx");
    let v = create(&path, vhdx::DiskKind::Dynamic);
    v.write_at(&noise(3, 2 * MIB as usize), MIB).unwrap();
    v.flush().unwrap();
    let r = tempfile::tempdir().unwrap();
    let mut vm = ReplicaVm::create_or_open(dir_fd(r.path()).as_fd(), "vm1", &[SIZE]).unwrap();
    {
        let image = VhdxImage::open_path(&path).unwrap();
        let (sent, _) = resync(&image, &mut vm);
        assert_eq!(sent, 2 * MIB);
    }
    // The primary releases block 1 and writes 64 KiB into block 2 (a crash needed a
    // resync): the replica still holds the old bytes.
    v.discard(MIB, MIB).unwrap();
    v.write_at(&noise(4, 64 << 10), 2 * MIB + (128 << 10))
        .unwrap();
    v.close().unwrap();
    let peer = qemu_raw(&path);
    assert!(peer[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0));
    let image = VhdxImage::open_path(&path).unwrap();
    let (sent, pass) = resync(&image, &mut vm);
    assert_eq!(sent, MIB + (64 << 10), "the released block and the change");
    vm.complete_base_checked(&[pass.finish()]).unwrap();
    assert!(replica_image(&vm) == peer);
    // The released block is a hole again in the replica's image.
    let after = next_data(vm.image(0).unwrap(), MIB).unwrap();
    assert_eq!(after, 2 * MIB, "block 1 is a hole again");
}

#[test]
fn a_differencing_vhdx_is_read_through_its_parent_and_a_seed_from_it_is_sparse() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.vhdx");
    let p = create(&base, vhdx::DiskKind::Dynamic);
    p.write_at(&noise(5, 2 * MIB as usize), 0).unwrap();
    p.close().unwrap();
    let child = d.path().join("child.vhdx");
    let c = create(
        &child,
        vhdx::DiskKind::Differencing {
            parent: base.clone(),
        },
    );
    c.write_at(&noise(6, 4096), MIB + 8192).unwrap();
    c.write_at(&noise(7, 4096), 4 * MIB).unwrap();
    c.close().unwrap();
    // qemu-img does not read differencing VHDX: the model is the parent's bytes with
    // the child's writes over them.
    let mut peer = vec![0u8; SIZE as usize];
    peer[..2 * MIB as usize].copy_from_slice(&noise(5, 2 * MIB as usize));
    let at = (MIB + 8192) as usize;
    peer[at..at + 4096].copy_from_slice(&noise(6, 4096));
    let at = (4 * MIB) as usize;
    peer[at..at + 4096].copy_from_slice(&noise(7, 4096));
    assert!(
        qemu_raw(&base)[..2 * MIB as usize] == noise(5, 2 * MIB as usize)[..],
        "the parent as qemu-img reads it"
    );

    let image = VhdxImage::open_path(&child).unwrap();
    let r = tempfile::tempdir().unwrap();
    let mut vm = ReplicaVm::create_or_open(dir_fd(r.path()).as_fd(), "vm1", &[SIZE]).unwrap();
    let (_, pass) = resync(&image, &mut vm);
    vm.complete_base_checked(&[pass.finish()]).unwrap();
    assert!(replica_image(&vm) == peer, "the chain's content");

    // A reverse replica seeded from the same disk: the same bytes, holes where
    // nothing of the chain holds data.
    let seed: Vec<Box<dyn DiskImage>> = vec![Box::new(VhdxImage::open_path(&child).unwrap())];
    let seeded =
        ReplicaVm::create_or_open_seeded(dir_fd(r.path()).as_fd(), "vm2", &[SIZE], Some(&seed))
            .unwrap();
    assert!(replica_image(&seeded) == peer);
    let img = seeded.image(0).unwrap();
    let after = next_data(img, 2 * MIB).unwrap();
    assert!(after >= 4 * MIB, "blocks 2, 3 are holes: data at {after}");
    assert_eq!(next_data(img, 5 * MIB), None, "blocks 5..8 are holes");
}

#[test]
fn a_damaged_or_unopenable_vhdx_is_refused_with_its_name() {
    let d = tempfile::tempdir().unwrap();
    let good = d.path().join("good.vhdx");
    let v = create(&good, vhdx::DiskKind::Dynamic);
    v.write_at(&noise(8, 4096), 0).unwrap();
    v.close().unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage.vhdx", noise(9, 4 * MIB as usize)),
        ("truncated.vhdx", bytes[..MIB as usize].to_vec()),
        ("headers.vhdx", {
            // Both headers (64 KiB and 128 KiB in) damaged.
            let mut b = bytes.clone();
            for at in [64usize << 10, 128 << 10] {
                b[at + 100] ^= 0xff;
            }
            b
        }),
    ];
    for (name, content) in cases {
        let path = d.path().join(name);
        std::fs::write(&path, content).unwrap();
        let e = match VhdxImage::open_path(&path) {
            Ok(_) => panic!("{name} opened"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(name), "{name}: {e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
    // A differencing disk whose parent is gone.
    let base = d.path().join("parent.vhdx");
    create(&base, vhdx::DiskKind::Dynamic).close().unwrap();
    let child = d.path().join("orphan.vhdx");
    create(
        &child,
        vhdx::DiskKind::Differencing {
            parent: base.clone(),
        },
    )
    .close()
    .unwrap();
    std::fs::remove_file(&base).unwrap();
    let e = VhdxImage::open_path(&child)
        .err()
        .expect("an orphan opened");
    assert!(e.to_string().contains("orphan.vhdx"), "{e}");
    // A missing file.
    let e = VhdxImage::open_path(&d.path().join("none.vhdx"))
        .err()
        .expect("a missing file opened");
    assert!(e.to_string().contains("none.vhdx"), "{e}");
}
