//! The guest-physical address map of an x86_64 Vireo VM.
//!
//! ```text
//! 0x0000_0000 ..0x000a_0000  RAM (low; boot structures live here)
//! 0x000e_0000 ..0x0010_0000  ACPI tables (reserved)
//! 0x0010_0000 ..LOW_RAM_END  RAM (the kernel loads at 1 MiB)
//! 0xc000_0000 ..0xe000_0000  PCI MMIO window for BARs
//! 0xe000_0000 ..0xf000_0000  PCIe ECAM (bus 0 used)
//! 0xfec0_0000                IOAPIC      0xfee0_0000  LAPIC
//! 0x1_0000_0000..            RAM above 4 GiB (the rest of the memory)
//! (next 1 GiB boundary)..     the virtio-mem hotplug region (`--memory hotplug_size=`;
//!                             not RAM in the e820 map: the guest learns it from the device)
//! ```

/// Linux boot protocol: the zero page (boot_params).
pub const ZERO_PAGE: u64 = 0x7000;
/// Linux boot protocol: identity page tables for the 64-bit entry.
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// PVH: start info and memory map (the protocols are exclusive, so 0x7000 is reused).
pub const PVH_START_INFO: u64 = 0x6000;
/// PVH: initramfs module descriptor.
pub const PVH_MODLIST: u64 = 0x6800;
pub const PVH_MEMMAP: u64 = 0x7000;
/// Our GDT for the 32-bit PVH entry.
pub const BOOT_GDT: u64 = 0x500;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 0x10000;
pub const EBDA_START: u64 = 0xa0000;
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
pub const HIGH_RAM_START: u64 = 0x100000;
/// End of RAM below the 32-bit hole.
pub const LOW_RAM_END: u64 = 0xc000_0000;
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_END: u64 = 0xe000_0000;
pub const ECAM_START: u64 = 0xe000_0000;
pub const ECAM_SIZE: u64 = 0x1000_0000;
pub use devices::legacy::IOAPIC_START;
pub const LAPIC_START: u64 = 0xfee0_0000;
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// KVM needs three pages for the TSS just below the BIOS area (Intel only).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// RAM ranges for `size` bytes of memory: below the hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= LOW_RAM_END {
        vec![(0, size)]
    } else {
        vec![(0, LOW_RAM_END), (RAM_64BIT_START, size - LOW_RAM_END)]
    }
}

/// The hotplug region's alignment: a whole number of 1 GiB pages of the guest's identity
/// map, and of any virtio-mem block size.
pub const HOTPLUG_ALIGN: u64 = 1 << 30;

/// Where the virtio-mem hotplug region of `hotplug` bytes lies for `size` bytes of RAM:
/// above 4 GiB (never in the PCI hole or MMIO), after the last RAM, aligned.
pub fn hotplug_region(size: u64, hotplug: Option<u64>) -> Option<(u64, u64)> {
    let len = hotplug.filter(|&h| h > 0)?;
    let ram_end = ram_ranges(size)
        .last()
        .map_or(0, |&(start, len)| start + len)
        .max(RAM_64BIT_START);
    Some((ram_end.next_multiple_of(HOTPLUG_ALIGN), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hotplug_region_follows_ram_above_4_gib() {
        assert_eq!(hotplug_region(512 << 20, None), None);
        assert_eq!(
            hotplug_region(512 << 20, Some(1 << 30)),
            Some((RAM_64BIT_START, 1 << 30))
        );
        // 4 GiB of RAM: 3 GiB low, 1 GiB from 4 GiB; the region starts at 5 GiB.
        assert_eq!(
            hotplug_region(4 << 30, Some(2 << 20)),
            Some((5 << 30, 2 << 20))
        );
        // Not aligned RAM end: rounded up.
        assert_eq!(
            hotplug_region((4 << 30) + (2 << 20), Some(2 << 20)),
            Some((6 << 30, 2 << 20))
        );
    }

    #[test]
    fn memory_splits_around_the_pci_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, LOW_RAM_END), (RAM_64BIT_START, (4 << 30) - LOW_RAM_END)]
        );
        const { assert!(LOW_RAM_END <= PCI_MMIO_START) };
        const { assert!(PCI_MMIO_END <= ECAM_START) };
        const { assert!(ECAM_START + ECAM_SIZE <= IOAPIC_START) };
    }
}
