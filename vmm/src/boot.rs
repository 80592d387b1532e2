//! Loading the payload: a PVH ELF (our test guest, a Linux vmlinux) or a Linux bzImage
//! (64-bit boot protocol), and the initial ramdisk.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryBackend, ReadVolatile};

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
    #[error("cannot read initramfs {path}: {source}")]
    Initramfs {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel")]
    InitramfsTooBig { path: String, size: u64, limit: u64 },
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug)]
pub enum BootProtocol {
    /// 32-bit protected mode at the PVH entry, EBX = hvm_start_info.
    Pvh { entry: u64 },
    /// 64-bit long mode at the bzImage's 64-bit entry, RSI = boot_params (zero page).
    Linux64 { entry: u64, header: SetupHeader },
}

/// The bzImage setup header, kept for the zero page.
#[derive(Clone, Copy, Debug)]
pub struct SetupHeader(pub setup_header);

/// Where an initramfs was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initramfs {
    pub addr: u64,
    pub size: u64,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
/// The 64-bit entry of a bzImage is 0x200 past where its protected-mode code loads.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<(BootProtocol, u64), BootError> {
    let p = || path.display().to_string();
    let read = |source| BootError::Read { path: p(), source };
    let mut f = crate::confinement::open_read(path)
        .map_err(|e| read(std::io::Error::other(e.to_string())))?;
    let mut magic = [0u8; 4];
    let is_elf = match f.read_exact(&mut magic) {
        Ok(()) => &magic == ELF_MAGIC,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) => return Err(read(e)),
    };
    let load_err = |source| BootError::Load { path: p(), source };
    if is_elf {
        let r = Elf::load(
            mem,
            None,
            &mut f,
            Some(GuestAddress(layout::HIGH_RAM_START)),
        )
        .map_err(load_err)?;
        return match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => {
                Ok((BootProtocol::Pvh { entry: addr.0 }, r.kernel_end))
            }
            _ => Err(BootError::NoPvhEntry { path: p() }),
        };
    }
    let mut hdrs = [0u8; 4];
    let is_bz = f.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET)).is_ok()
        && f.read_exact(&mut hdrs).is_ok()
        && &hdrs == BZIMAGE_MAGIC;
    if !is_bz {
        return Err(BootError::UnknownFormat { path: p() });
    }
    let r = BzImage::load(
        mem,
        None,
        &mut f,
        Some(GuestAddress(layout::HIGH_RAM_START)),
    )
    .map_err(load_err)?;
    let header = r
        .setup_header
        .ok_or(BootError::UnknownFormat { path: p() })?;
    Ok((
        BootProtocol::Linux64 {
            entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
            header: SetupHeader(header),
        },
        r.kernel_end,
    ))
}

/// Loads the initramfs page-aligned at the top of low RAM (below 4 GiB, where both
/// boot protocols can address it), above the kernel.
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel_end: u64,
    path: &Path,
) -> Result<Initramfs, BootError> {
    let p = path.display().to_string();
    let io = |source| BootError::Initramfs {
        path: p.clone(),
        source,
    };
    let mut f = crate::confinement::open_read(path)
        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    let size = f.metadata().map_err(io)?.len();
    let top = mem_size.min(layout::LOW_RAM_END);
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end && size > 0 => a,
        _ => {
            return Err(BootError::InitramfsTooBig {
                path: p,
                size,
                limit: top,
            })
        }
    };
    let mut slice = mem
        .get_slice(GuestAddress(addr), size as usize)
        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    f.read_exact_volatile(&mut slice)
        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    Ok(Initramfs { addr, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::linux;
    use linux_loader::loader::bootparam::boot_params;
    use vm_memory::Bytes;

    const MEM: u64 = 64 << 20;

    /// A minimal bzImage: 4 setup sectors with a 2.15 header, then the payload.
    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512];
        img[0x1f1] = 4; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x01; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn bzimage_loads_at_1mib_with_a_complete_zero_page() {
        let dir = tempfile::tempdir().unwrap();
        let payload: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        let kernel = dir.path().join("bzImage");
        std::fs::write(&kernel, fake_bzimage(&payload)).unwrap();
        let rd_bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let rd_path = dir.path().join("initrd");
        std::fs::write(&rd_path, &rd_bytes).unwrap();

        let mem = crate::memory::create_guest_memory(MEM, None, false, false, None).unwrap();
        let (proto, kernel_end) = load_kernel(&mem, &kernel).unwrap();
        let BootProtocol::Linux64 { entry, header } = proto else {
            panic!("expected the Linux 64-bit protocol, got {proto:?}");
        };
        assert_eq!(entry, layout::HIGH_RAM_START + 0x200);
        let mut loaded = vec![0u8; payload.len()];
        mem.read_slice(&mut loaded, GuestAddress(layout::HIGH_RAM_START))
            .unwrap();
        assert_eq!(loaded, payload);

        let rd = load_initramfs(&mem, MEM, kernel_end, &rd_path).unwrap();
        assert_eq!(rd.addr % 4096, 0);
        assert!(rd.addr >= kernel_end && rd.addr + rd.size <= MEM);
        let mut back = vec![0u8; rd_bytes.len()];
        mem.read_slice(&mut back, GuestAddress(rd.addr)).unwrap();
        assert_eq!(back, rd_bytes);

        linux::write_zero_page(&mem, &header, MEM, 11, Some(rd), 0xe0000).unwrap();
        let bp: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE)).unwrap();
        let hdr = bp.hdr;
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!(hdr.cmd_line_ptr as u64, layout::CMDLINE_START);
        assert_eq!({ hdr.cmdline_size }, 12);
        assert_eq!(
            (hdr.ramdisk_image as u64, hdr.ramdisk_size as u64),
            (rd.addr, rd.size)
        );
        assert_eq!({ bp.acpi_rsdp_addr }, 0xe0000);
        let map = crate::arch::pvh::memory_map(MEM);
        assert_eq!(bp.e820_entries as usize, map.len());
        for (got, want) in bp.e820_table.iter().zip(&map) {
            assert_eq!(
                ({ got.addr }, { got.size }, { got.r#type }),
                (want.addr, want.size, want.type_)
            );
        }

        let cr3 = linux::write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(cr3)).unwrap();
        assert_eq!(pml4 & !0xfff, layout::PDPT_START);
        // The PD entry for 3 GiB + 2 MiB maps exactly that address.
        let pd3: u64 = mem
            .read_obj(GuestAddress(layout::PDPT_START + 3 * 8))
            .unwrap();
        let pde: u64 = mem.read_obj(GuestAddress((pd3 & !0xfff) + 8)).unwrap();
        assert_eq!(pde & !0xfff, (3 << 30) + (2 << 20));
        assert_eq!(pde & 0x83, 0x83);
    }

    #[test]
    fn initramfs_that_does_not_fit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let rd = dir.path().join("big");
        std::fs::File::create(&rd).unwrap().set_len(MEM).unwrap();
        let mem = crate::memory::create_guest_memory(MEM, None, false, false, None).unwrap();
        assert!(matches!(
            load_initramfs(&mem, MEM, 2 << 20, &rd),
            Err(BootError::InitramfsTooBig { .. })
        ));
    }
}
