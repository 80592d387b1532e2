//! VHDX open on hostile bytes: headers, region tables, log replay (read-only
//! in memory, and read-write onto the in-memory file), metadata, parent
//! locator, BAT; then reads and a write through whatever opened.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::Arc;
use vhdx::{MemStorage, OpenOptions, Vhdx};
use vireo_fuzz::{vhdx_image, MAX_GROWTH};

fn exercise(v: &Vhdx, write: bool) {
    let size = v.virtual_size();
    let mut buf = vec![0u8; 64 * 1024];
    for off in [0, size / 3, size.saturating_sub(buf.len() as u64)] {
        let off = off - off % 512;
        let n = (buf.len() as u64).min(size - off) as usize;
        let _ = v.read_at(&mut buf[..n], off);
    }
    let _ = v.block_status(0, size.min(64 << 20));
    if write {
        let _ = v.write_at(&[0x42; 4096], 0);
        let _ = v.write_at(&[0x43; 512], size.saturating_sub(512));
        let _ = v.flush();
    }
}

fuzz_target!(|data: &[u8]| {
    let image = vhdx_image(data);
    let len = image.len() as u64;
    let path = Path::new("fuzz.vhdx");
    let ro = OpenOptions {
        read_only: true,
        skip_parent: true,
        ..Default::default()
    };
    let mem = Arc::new(MemStorage::new(image.clone(), len + MAX_GROWTH));
    if let Ok(v) = Vhdx::open_storage(mem.clone(), path, ro) {
        exercise(&v, false);
        drop(v);
        // A read-only open never writes.
        assert!(mem.contents() == image, "read-only open changed the file");
    }
    let rw = OpenOptions {
        skip_parent: true,
        ..Default::default()
    };
    let mem = Arc::new(MemStorage::new(image, len + MAX_GROWTH));
    if let Ok(v) = Vhdx::open_storage(mem, path, rw) {
        exercise(&v, true);
        let _ = v.close();
    }
});
