//! The Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst): the zero page
//! (`boot_params`) with the setup header, command line, initramfs and E820 map, and
//! the identity-mapped page tables the kernel's 64-bit entry expects.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Bytes, GuestAddress};

use devices::virtio::GuestMemoryMmap;

use crate::arch::pvh;
use crate::boot::{Initramfs, SetupHeader};
use crate::layout;

const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KEEP_SEGMENTS: u8 = 0x40;
const CAN_USE_HEAP: u8 = 0x80;

#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    #[error("cannot write the Linux zero page: {0}")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    #[error("too many memory map entries for the zero page ({0})")]
    E820Full(usize),
    #[error("cannot write the boot page tables: {0}")]
    PageTables(#[source] vm_memory::GuestMemoryError),
}

/// Builds and writes the zero page at [`layout::ZERO_PAGE`].
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: &SetupHeader,
    mem_size: u64,
    cmdline_len: usize,
    initramfs: Option<Initramfs>,
    rsdp: u64,
) -> Result<(), LinuxBootError> {
    let mut params = boot_params {
        hdr: header.0,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.loadflags |= KEEP_SEGMENTS | CAN_USE_HEAP;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some(rd) = initramfs {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.hdr.ramdisk_size = rd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    let map = pvh::memory_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(LinuxBootError::E820Full(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.type_,
        };
    }
    params.e820_entries = map.len() as u8;
    let bp = BootParams::new(&params, GuestAddress(layout::ZERO_PAGE));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(LinuxBootError::ZeroPage)
}

/// Identity-maps the first 4 GiB with 2 MiB pages (PML4 → PDPT → 4 PDs); returns CR3.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<u64, LinuxBootError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(LinuxBootError::PageTables)
    };
    w(layout::PDPT_START | PRESENT_RW, layout::PML4_START)?;
    for gib in 0..4u64 {
        let pd = layout::PD_START + gib * 0x1000;
        w(pd | PRESENT_RW, layout::PDPT_START + gib * 8)?;
        for i in 0..512u64 {
            w(((gib << 30) + (i << 21)) | PRESENT_RW | HUGE, pd + i * 8)?;
        }
    }
    Ok(layout::PML4_START)
}
