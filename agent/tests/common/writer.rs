//! Reading back what the test guest's `replica-writer` wrote: iteration n writes 4 KiB
//! block n % BLOCKS with the pattern of seed n.

/// The writer's blocks (`blocks=64` on its command line).
pub const BLOCKS: u64 = 64;

/// The writer guest's disk images' size.
pub const DISK_SIZE: u64 = 4 << 20;

/// Defines VM `vm1` on `daemon`: the writer guest over two raw images in `disks_dir`,
/// each with a change log beside it (`resume`: the guest first reads where the disk's
/// writes end); starts it and waits for its tenth iteration. Returns the images.
pub fn start_writer_vm(
    daemon: &super::Daemon,
    disks_dir: &std::path::Path,
    resume: bool,
) -> Vec<std::path::PathBuf> {
    start_writer_vm_filled(daemon, disks_dir, resume, false)
}

/// Where [`start_writer_vm_filled`]'s filler starts (past the writer's blocks).
pub const FILL_FROM: u64 = 1 << 20;

/// [`start_writer_vm`]; with `fill`, each image holds bytes that do not compress
/// from [`FILL_FROM`] to its end (data the guest never touches).
pub fn start_writer_vm_filled(
    daemon: &super::Daemon,
    disks_dir: &std::path::Path,
    resume: bool,
    fill: bool,
) -> Vec<std::path::PathBuf> {
    start_writer_vm_with(daemon, disks_dir, resume, fill, None)
}

/// [`start_writer_vm_filled`] with the VM's start `priority` (default Off: never
/// started automatically).
pub fn start_writer_vm_with(
    daemon: &super::Daemon,
    disks_dir: &std::path::Path,
    resume: bool,
    fill: bool,
    priority: Option<&str>,
) -> Vec<std::path::PathBuf> {
    start_writer_vm_on(daemon, disks_dir, resume, fill, priority, false)
}

/// Where a VHDX disk of [`start_writer_vm_on`] holds data the guest never touches
/// (VHDX block 2 of 1 MiB blocks; blocks 1 and 3 are never allocated).
pub const VHDX_DATA_AT: u64 = 2 << 20;
/// How much data is there.
pub const VHDX_DATA_LEN: usize = 512 << 10;

/// What VHDX disk `i` holds at [`VHDX_DATA_AT`].
pub fn vhdx_data(i: u64) -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1Du64 + i;
    (0..VHDX_DATA_LEN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The disk as the guest sees it: a VHDX converted by the peer implementation
/// (`qemu-img convert -O raw`), a raw image read as it is.
pub fn virtual_content(image: &std::path::Path) -> Vec<u8> {
    if image.extension().is_none_or(|e| e != "vhdx") {
        return std::fs::read(image).unwrap();
    }
    let out = image.with_extension("qemu.raw");
    let o = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-f", "vhdx", "-O", "raw"])
        .arg(image)
        .arg(&out)
        .output()
        .expect("qemu-img (scripts/setup installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    b
}

/// [`start_writer_vm_with`]; with `vhdx`, the disks are dynamic VHDX images (1 MiB
/// blocks) holding [`vhdx_data`] at [`VHDX_DATA_AT`] (`fill` is for raw disks).
pub fn start_writer_vm_on(
    daemon: &super::Daemon,
    disks_dir: &std::path::Path,
    resume: bool,
    fill: bool,
    priority: Option<&str>,
    vhdx: bool,
) -> Vec<std::path::PathBuf> {
    std::fs::create_dir(disks_dir).unwrap();
    let mut disks = Vec::new();
    let mut images = Vec::new();
    for i in 0..2u64 {
        if vhdx {
            let img = disks_dir.join(format!("d{i}.vhdx"));
            let v = vhdx::Vhdx::create(
                &img,
                &vhdx::CreateOptions {
                    size: DISK_SIZE,
                    kind: vhdx::DiskKind::Dynamic,
                    block_size: Some(1 << 20),
                    ..Default::default()
                },
            )
            .unwrap();
            v.write_at(&vhdx_data(i), VHDX_DATA_AT).unwrap();
            v.close().unwrap();
            disks.push(serde_json::json!({
                "path": img,
                "format": "vhdx",
                "replica_log": disks_dir.join(format!("d{i}.rlog")),
            }));
            images.push(img);
            continue;
        }
        let img = disks_dir.join(format!("d{i}.raw"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(DISK_SIZE)
            .unwrap();
        if fill {
            let mut x = 0x9E37_79B9_7F4A_7C15u64 + i;
            let noise: Vec<u8> = (FILL_FROM..DISK_SIZE)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            std::os::unix::fs::FileExt::write_all_at(
                &std::fs::OpenOptions::new().write(true).open(&img).unwrap(),
                &noise,
                FILL_FROM,
            )
            .unwrap();
        }
        disks.push(serde_json::json!({
            "path": img,
            "format": "raw",
            "replica_log": disks_dir.join(format!("d{i}.rlog")),
        }));
        images.push(img);
    }
    let resume = if resume { " resume" } else { "" };
    let mut def = serde_json::json!({
        "config": {
            "payload": {
                "kernel": vireo_e2e::guest(),
                "cmdline": format!("test=replica-writer disks=2 blocks={BLOCKS}{resume}"),
            },
            "memory": {"size": 32u64 << 20},
            "disks": disks,
        },
        "restart": "never",
    });
    if let Some(p) = priority {
        def["priority"] = p.into();
    }
    daemon.ok("PUT", "/api/v1/vms/vm1", Some(&def.to_string()));
    daemon.ok("PUT", "/api/v1/vms/vm1/start", None);
    daemon.wait_serial("vm1", "rw n=10\n", super::T);
    images
}

/// The seed of the writer guest's iteration whose data block `b` of `image` holds
/// (0: never written), trying every iteration up to `max`.
pub fn seed_of(image: &[u8], b: u64, max: u64) -> u64 {
    let at = (b * 4096) as usize;
    let block = &image[at..at + 4096];
    if block.iter().all(|&x| x == 0) {
        return 0;
    }
    let mut buf = vec![0u8; 4096];
    let mut n = if b == 0 { BLOCKS } else { b };
    while n <= max {
        vireo_e2e::pattern::fill(n, b * 8, &mut buf);
        if buf == block {
            return n;
        }
        n += BLOCKS;
    }
    panic!("block {b} holds no iteration up to {max} of the writer guest");
}

/// Checks that `image` holds exactly the guest's iterations 1..=N for one N (each
/// block the newest of them that wrote it) and returns N.
pub fn prefix_of(image: &[u8], max: u64, what: &str) -> u64 {
    let seeds: Vec<u64> = (0..BLOCKS).map(|b| seed_of(image, b, max)).collect();
    let n = seeds.iter().copied().max().unwrap_or(0);
    for (b, &s) in seeds.iter().enumerate() {
        let b = b as u64;
        // The newest iteration up to n that wrote block b.
        let expected = (1..=n).rev().find(|i| i % BLOCKS == b).unwrap_or(0);
        assert_eq!(s, expected, "{what}: block {b} after iteration {n}: a hole");
    }
    n
}
