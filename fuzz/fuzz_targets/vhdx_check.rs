//! What `vireo-img check [-r all]` does, on hostile bytes: open, every
//! block's status (sector bitmaps), leaked space, leak repair, close; then
//! the repaired image must open again and check clean of leaks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::Arc;
use vhdx::{MemStorage, OpenOptions, Vhdx};
use vireo_fuzz::{vhdx_image, MAX_GROWTH};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let fix = mode & 1 == 1;
    let image = vhdx_image(rest);
    let path = Path::new("check.vhdx");
    let opts = |read_only| OpenOptions {
        read_only,
        skip_parent: true,
        ..Default::default()
    };
    let mem = Arc::new(MemStorage::new(
        image.clone(),
        image.len() as u64 + MAX_GROWTH,
    ));
    let Ok(v) = Vhdx::open_storage(mem.clone(), path, opts(!fix)) else {
        return;
    };
    let _ = v.block_status(0, v.virtual_size());
    let Ok(leaked) = v.leaked_bytes() else {
        return;
    };
    if fix && leaked > 0 {
        if v.repair_leaks().is_err() {
            return;
        }
        if v.close().is_err() {
            return;
        }
        let again = Arc::new(MemStorage::new(mem.contents(), u64::MAX));
        if let Ok(v) = Vhdx::open_storage(again, path, opts(true)) {
            assert_eq!(v.leaked_bytes().ok(), Some(0), "leaks left after repair");
        }
    }
});
