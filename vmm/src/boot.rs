//! Loading the payload: a PVH ELF (our test guest, Linux vmlinux) or a Linux bzImage.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::GuestAddress;

use devices::virtio::GuestMemoryMmap;

use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an ELF (PVH) image nor a bzImage")]
    UnknownFormat { path: String },
    #[error("kernel {path}: ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); Vireo boots ELF kernels through PVH")]
    NoPvhEntry { path: String },
    #[error("cannot load kernel {path}: {source}")]
    Load {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("bzImage boot is not supported yet for {path}; use a PVH-capable vmlinux")]
    BzImage { path: String },
}

/// Where the boot vCPU starts.
pub struct Entry {
    pub addr: u64,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";

pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<Entry, BootError> {
    let p = || path.display().to_string();
    let read = |source| BootError::Read { path: p(), source };
    let mut f = File::open(path).map_err(read)?;
    let mut magic = [0u8; 4];
    let is_elf = match f.read_exact(&mut magic) {
        Ok(()) => &magic == ELF_MAGIC,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) => return Err(read(e)),
    };
    if !is_elf {
        let mut hdrs = [0u8; 4];
        let is_bz = f.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET)).is_ok()
            && f.read_exact(&mut hdrs).is_ok()
            && &hdrs == BZIMAGE_MAGIC;
        return Err(if is_bz {
            BootError::BzImage { path: p() }
        } else {
            BootError::UnknownFormat { path: p() }
        });
    }
    let result = Elf::load(
        mem,
        None,
        &mut f,
        Some(GuestAddress(layout::HIGH_RAM_START)),
    )
    .map_err(|source| BootError::Load { path: p(), source })?;
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Ok(Entry { addr: addr.0 }),
        _ => Err(BootError::NoPvhEntry { path: p() }),
    }
}
