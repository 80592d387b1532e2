//! PVH boot information: `hvm_start_info`, the E820-style memory map and the command
//! line, written into guest memory with linux-loader's PVH configurator.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use devices::virtio::GuestMemoryMmap;

use crate::boot::Initramfs;
use crate::layout;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    #[error("kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("cannot write the command line into guest memory: {0}")]
    Cmdline(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write the PVH boot information: {0}")]
    Configure(#[source] linux_loader::configurator::Error),
}

/// The memory map the guest sees.
pub fn memory_map(mem_size: u64) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr, size, type_| hvm_memmap_table_entry {
        addr,
        size,
        type_,
        reserved: 0,
    };
    let mut map = vec![entry(0, layout::EBDA_START, E820_RAM)];
    map.push(entry(
        layout::ACPI_START,
        layout::ACPI_END - layout::ACPI_START,
        E820_RESERVED,
    ));
    for (start, len) in layout::ram_ranges(mem_size) {
        let start = start.max(layout::HIGH_RAM_START);
        let end = if start >= layout::RAM_64BIT_START {
            start + len
        } else {
            len.min(layout::LOW_RAM_END)
        };
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map.push(entry(layout::ECAM_START, layout::ECAM_SIZE, E820_RESERVED));
    map
}

/// Writes the NUL-terminated kernel command line (both boot protocols use it).
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), PvhError> {
    let bytes = cmdline.as_bytes();
    if bytes.len() + 1 > layout::CMDLINE_MAX {
        return Err(PvhError::CmdlineTooLong {
            len: bytes.len(),
            max: layout::CMDLINE_MAX - 1,
        });
    }
    mem.write_slice(bytes, GuestAddress(layout::CMDLINE_START))
        .and_then(|_| {
            mem.write_obj(
                0u8,
                GuestAddress(layout::CMDLINE_START + bytes.len() as u64),
            )
        })
        .map_err(PvhError::Cmdline)
}

/// Writes the command line, memory map, initramfs module and start info; `rsdp` is
/// the ACPI root.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline: &str,
    rsdp: u64,
    initramfs: Option<Initramfs>,
) -> Result<(), PvhError> {
    write_cmdline(mem, cmdline)?;

    let map = memory_map(mem_size);
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: layout::PVH_MEMMAP,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if initramfs.is_some() {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = layout::PVH_MODLIST;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_START_INFO));
    params.set_sections(&map, GuestAddress(layout::PVH_MEMMAP));
    if let Some(rd) = initramfs {
        let module = hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(layout::PVH_MODLIST));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(PvhError::Configure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_covers_ram_and_reserves_ecam() {
        let map = memory_map(512 << 20);
        let ram: u64 = map
            .iter()
            .filter(|e| e.type_ == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(
            ram,
            layout::EBDA_START + (512 << 20) - layout::HIGH_RAM_START
        );
        assert!(map
            .iter()
            .any(|e| e.type_ == E820_RESERVED && e.addr == layout::ECAM_START));
        let big = memory_map(6 << 30);
        assert!(big.iter().any(
            |e| e.addr == layout::RAM_64BIT_START && e.size == (6 << 30) - layout::LOW_RAM_END
        ));
    }
}
