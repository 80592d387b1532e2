//! Creating fixed, dynamic and differencing images.

use crate::bat::{self, Geometry};
use crate::bytes::*;
use crate::error::{Error, Result};
use crate::header::{self, Header, HEADER_OFFSETS};
use crate::image::{OpenOptions, Vhdx};
use crate::metadata::{DiskParams, Metadata, ParentLocator, MAX_VIRTUAL_SIZE};
use crate::region::{RegionEntry, RegionTable, BAT_GUID, METADATA_GUID, REGION_TABLE_OFFSETS};
use crate::storage::{self, FileStorage, Storage};
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// What kind of image to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskKind {
    /// All blocks allocated up front.
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
    /// Holds only what differs from `parent` (a VHDX file).
    Differencing { parent: PathBuf },
}

/// Parameters of a new image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (ignored for differencing disks: the parent's size is used).
    pub size: u64,
    pub kind: DiskKind,
    /// Block size; `None` picks Hyper-V's default (32 MiB, or 2 MiB for differencing).
    pub block_size: Option<u32>,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// Log size (default 1 MiB).
    pub log_size: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            kind: DiskKind::Dynamic,
            block_size: None,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            log_size: MIB as u32,
        }
    }
}

pub(crate) const LOG_OFFSET: u64 = MIB;

impl Vhdx {
    /// Creates (truncating any existing file) and opens an image for writing.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Vhdx> {
        Self::create_with(path, opts, OpenOptions::default())
    }

    /// [`Vhdx::create`], then opens the new image with `open` (say, `direct`).
    pub fn create_with(path: &Path, opts: &CreateOptions, open: OpenOptions) -> Result<Vhdx> {
        let pstr = path.display().to_string();
        let mut o = opts.clone();
        let mut locator = None;
        if let DiskKind::Differencing { parent } = &opts.kind {
            let par = Vhdx::open(
                parent,
                OpenOptions {
                    read_only: true,
                    ..Default::default()
                },
            )?;
            o.size = par.virtual_size();
            o.logical_sector_size = par.logical_sector_size();
            o.physical_sector_size = par.physical_sector_size();
            let abs = std::fs::canonicalize(parent)
                .map_err(|e| Error::io(&parent.display().to_string(), "resolving", 0, e))?;
            let child_dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf()))
                .unwrap_or_else(|| std::env::current_dir().unwrap_or_default());
            let rel = crate::diff::relative_path(&child_dir, &abs);
            let rel_win = format!(".\\{}", rel.display().to_string().replace('/', "\\"));
            locator = Some(ParentLocator {
                entries: vec![
                    (
                        "parent_linkage".into(),
                        format!("{{{}}}", par.data_write_guid()),
                    ),
                    ("relative_path".into(), rel_win),
                    ("absolute_win32_path".into(), abs.display().to_string()),
                ],
            });
        }
        let has_parent = locator.is_some();
        let block_size = o.block_size.unwrap_or(if has_parent {
            2 * MIB as u32
        } else {
            32 * MIB as u32
        });
        if !block_size.is_power_of_two() || !(MIB as u32..=256 * MIB as u32).contains(&block_size) {
            return Err(Error::InvalidArgument(format!(
                "block size {block_size} must be a power of two from 1 MiB to 256 MiB"
            )));
        }
        for (n, v) in [
            ("logical", o.logical_sector_size),
            ("physical", o.physical_sector_size),
        ] {
            if v != 512 && v != 4096 {
                return Err(Error::InvalidArgument(format!(
                    "{n} sector size {v} must be 512 or 4096"
                )));
            }
        }
        if o.size == 0
            || o.size > MAX_VIRTUAL_SIZE
            || !o.size.is_multiple_of(u64::from(o.logical_sector_size))
        {
            return Err(Error::InvalidArgument(format!(
                "size {} must be non-zero, at most 64 TiB and a multiple of the logical sector size {}",
                o.size, o.logical_sector_size
            )));
        }
        if o.log_size == 0 || u64::from(o.log_size) % MIB != 0 {
            return Err(Error::InvalidArgument(format!(
                "log size {} must be a multiple of 1 MiB",
                o.log_size
            )));
        }
        let params = DiskParams {
            block_size,
            leave_blocks_allocated: o.kind == DiskKind::Fixed,
            has_parent,
            virtual_size: o.size,
            logical_sector_size: o.logical_sector_size,
            physical_sector_size: o.physical_sector_size,
            page83: Uuid::new_v4(),
        };
        let geo = Geometry::new(o.size, block_size, o.logical_sector_size, has_parent);
        let log_len = u64::from(o.log_size);
        let meta_off = LOG_OFFSET + log_len;
        let meta_len = MIB;
        let bat_off = meta_off + meta_len;
        let bat_len = geo.bat_region_len();
        let data_start = bat_off + bat_len;

        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(&pstr, "creating", 0, e))?;
        let s = FileStorage::new(file);
        let ps = pstr.as_str();
        let werr = |off: u64| move |e| Error::io(ps, "writing", off, e);
        let mut bat_bytes = vec![0u8; bat_len as usize];
        let mut file_len = data_start;
        if o.kind == DiskKind::Fixed {
            for b in 0..geo.data_blocks {
                let off = data_start + b * u64::from(block_size);
                let i = geo.payload_index(b);
                put64(
                    &mut bat_bytes,
                    i * 8,
                    bat::entry(bat::PAYLOAD_FULLY_PRESENT, off),
                );
            }
            file_len = data_start + geo.data_blocks * u64::from(block_size);
        }
        s.set_len(file_len).map_err(werr(0))?;
        if o.kind == DiskKind::Fixed {
            if let Some(fd) = s.raw_fd() {
                // SAFETY: plain fallocate on our open descriptor; failure is harmless (space stays sparse).
                unsafe {
                    libc::fallocate(
                        fd,
                        0,
                        data_start as libc::off_t,
                        (file_len - data_start) as libc::off_t,
                    );
                }
            }
        }
        storage::write_all_at(&s, &header::file_identifier("vireo-img"), 0).map_err(werr(0))?;
        let rt = RegionTable {
            entries: vec![
                RegionEntry {
                    guid: BAT_GUID,
                    file_offset: bat_off,
                    length: bat_len as u32,
                    required: true,
                },
                RegionEntry {
                    guid: METADATA_GUID,
                    file_offset: meta_off,
                    length: meta_len as u32,
                    required: true,
                },
            ],
        };
        let rtb = rt.to_bytes();
        for off in REGION_TABLE_OFFSETS {
            storage::write_all_at(&s, &rtb, off).map_err(werr(off))?;
        }
        let md = Metadata::new_image(&params, locator.as_ref());
        let mdb = md.to_bytes(&pstr, meta_len as usize)?;
        storage::write_all_at(&s, &mdb, meta_off).map_err(werr(meta_off))?;
        // The log is written with zeros rather than left sparse: log entries are
        // appended through it, and a write into a hole costs a block allocation
        // (a metadata change the next fdatasync has to commit).
        storage::write_all_at(&s, &vec![0u8; log_len as usize], LOG_OFFSET)
            .map_err(werr(LOG_OFFSET))?;
        storage::write_all_at(&s, &bat_bytes, bat_off).map_err(werr(bat_off))?;
        s.sync_data().map_err(werr(0))?;
        // Headers last: until they exist the file is not a VHDX image.
        let mut h = Header {
            sequence_number: 0,
            file_write_guid: Uuid::new_v4(),
            data_write_guid: Uuid::new_v4(),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: o.log_size,
            log_offset: LOG_OFFSET,
        };
        for (i, off) in HEADER_OFFSETS.iter().enumerate() {
            h.sequence_number = i as u64;
            storage::write_all_at(&s, &h.to_bytes(), *off).map_err(werr(*off))?;
        }
        s.sync_data().map_err(werr(0))?;
        drop(s);
        tracing::debug!(path = pstr.as_str(), size = o.size, block_size, "created");
        Vhdx::open(path, open)
    }
}

/// Creates a raw image file of `size` bytes (sparse).
pub fn create_raw(path: &Path, size: u64) -> Result<()> {
    let pstr = path.display().to_string();
    let f = std::fs::File::create(path).map_err(|e| Error::io(&pstr, "creating", 0, e))?;
    f.set_len(size)
        .map_err(|e| Error::io(&pstr, "setting the length", 0, e))
}
