//! A disk on a full host file system, seen through vireod: the VM's VMM pauses it
//! (on_error=stop), vireod's event stream says which VM, which disk and which errno
//! (`disk-stopped`) and the VM is `Paused` with the reason; once space is freed a
//! resume through vireod lets the guest finish, and every sector it wrote is on the
//! host.

use crate::common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Daemon, Events, T};
use serde_json::{json, Value};
use vireo_e2e::pattern;

/// An 8 MiB tmpfs (unmounted lazily on drop: the VMM may still hold the disk).
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: &Path) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8M", "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs (the tests run as root)");
        Self(at.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_pauses_the_vm_with_an_event_and_a_resume_through_vireod_loses_nothing() {
    let d = Daemon::start(&["--no-autostart"]);
    let fs = SmallFs::mount(&d.dir.path().join("small"));
    let disk = fs.0.join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let filler = fs.0.join("filler");
    std::fs::write(&filler, vec![0xeeu8; 6 << 20]).unwrap();
    let sectors = 16384u64; // 8 MiB: more than the tmpfs holds with the filler.
    let def = json!({
        "config": {
            "payload": {"kernel": vireo_e2e::guest(), "cmdline": format!("test=blk-write seed=11 sectors={sectors} offset=0")},
            "memory": {"size": 32u64 << 20},
            "disks": [{"path": disk, "on_error": "stop"}],
        },
        "restart": "never",
    });
    d.ok("PUT", "/api/v1/vms/full", Some(&def.to_string()));
    let mut events = Events::subscribe(&d.socket, "");
    d.ok("PUT", "/api/v1/vms/full/start", None);

    let seen = events.until("full", "disk-stopped");
    let e = seen.last().unwrap();
    let detail: Value = serde_json::from_str(e["detail"].as_str().unwrap()).unwrap();
    assert_eq!(detail["disk"], "disk0", "{e}");
    assert_eq!(detail["errno"], libc::ENOSPC, "{e}");
    let vm = d.wait_state("full", "Paused", T);
    assert!(
        !d.serial("full").contains("result"),
        "the guest saw an error: {vm}"
    );

    std::fs::remove_file(&filler).unwrap();
    d.ok("PUT", "/api/v1/vms/full/resume", None);
    d.wait_serial("full", "vireo-guest: result ok", T);
    d.wait_state("full", "Stopped", T);

    let f = std::fs::File::open(&disk).unwrap();
    let mut got = vec![0u8; pattern::SECTOR_SIZE];
    let mut want = vec![0u8; pattern::SECTOR_SIZE];
    for lba in 0..sectors {
        f.read_exact_at(&mut got, lba * pattern::SECTOR_SIZE as u64)
            .unwrap();
        pattern::fill_sector(11, lba, &mut want);
        assert!(got == want, "sector {lba} lost");
    }
    drop(d);
}
