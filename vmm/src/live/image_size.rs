//! A disk's size as the guest sees it, read from its image without opening it for the
//! VM (no lock taken: the image may be in use by the VM, or by a migration's source).

use std::path::Path;

use api::config::{DiskConfig, DiskFormat};

/// The size `disk` has: the configuration's `size` if it declares one, else its image's.
pub fn of(disk: &DiskConfig) -> Result<u64, String> {
    match disk.size {
        Some(s) => Ok(s),
        None => image(&disk.path, disk.effective_format()),
    }
}

/// The virtual size of the image at `path` in its declared `format` (raw: the file's
/// length); never guessed from the content.
pub fn image(path: &Path, format: DiskFormat) -> Result<u64, String> {
    let path = path.to_path_buf();
    crate::file_broker::run(crate::file_broker::FileOp::OpenDisk, move || {
        image_here(&path, format)
    })
}

fn image_here(path: &Path, format: DiskFormat) -> Result<u64, String> {
    match format {
        DiskFormat::Raw => std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|e| format!("{}: {e}", path.display())),
        DiskFormat::Vhdx => vhdx::Vhdx::open(
            path,
            vhdx::OpenOptions {
                read_only: true,
                no_lock: true,
                skip_parent: true,
                direct: false,
                parent_opener: None,
            },
        )
        .map(|v| v.virtual_size())
        .map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_come_from_the_configuration_or_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a.raw");
        std::fs::File::create(&raw)
            .unwrap()
            .set_len(3 << 20)
            .unwrap();
        let vhdx = dir.path().join("b.vhdx");
        vhdx::Vhdx::create(
            &vhdx,
            &vhdx::CreateOptions {
                size: 64 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        let disk = |p: &Path, size| -> DiskConfig {
            let mut d = api::config::parse_disk(&format!("path={}", p.display())).unwrap();
            d.size = size;
            d
        };
        assert_eq!(of(&disk(&raw, None)).unwrap(), 3 << 20);
        assert_eq!(of(&disk(&vhdx, None)).unwrap(), 64 << 20);
        assert_eq!(of(&disk(&raw, Some(7 << 20))).unwrap(), 7 << 20);
        let e = of(&disk(&dir.path().join("none.raw"), None)).unwrap_err();
        assert!(e.contains("none.raw"), "{e}");
    }
}
