//! Vireo PVH test guest. See README.md for the contract (command line, output, exit codes).
//!
//! The CPL0 part (boot.rs, assembly) builds nothing at run time but the TSS/IDT gates and
//! drops to CPL3 with IOPL=3; everything here runs at CPL3.

#![no_std]
#![no_main]

extern crate alloc;

mod agent;
mod balloon;
mod boot;
mod cpuid;
mod dynmem;
mod hvm;
mod io;
mod paging;
mod pci;
mod rt;
mod smp;
mod tests;
mod timer;
mod vfio_user;
mod virtio_mem;

#[path = "../netframe.rs"]
mod netframe;
#[path = "../pattern.rs"]
mod pattern;

use hvm::CMDLINE;

extern "C" {
    static __image_end: u8;
}

#[no_mangle]
extern "C" fn guest_main(start_info_addr: u64) -> ! {
    io::serial_init();
    // No firmware ran: the 8259 PICs are uninitialised (vector base 0), so a PIT tick
    // through LINT0/ExtINT would arrive as vector 0 once IF is set. Mask both PICs, as
    // firmware and Linux do; interrupts then come only from the LAPIC/IOAPIC/MSI.
    io::outb(0x21, 0xff);
    io::outb(0xa1, 0xff);
    let si = unsafe { hvm::start_info(start_info_addr) };
    let rsdp_hint = si.as_ref().map_or(0, |s| s.rsdp);
    let cpus = hvm::madt_cpus(rsdp_hint).map_or(0, |m| m.cpus);
    let ram = si.as_ref().map_or(0, |s| s.ram_bytes());
    println!(
        "vireo-guest: boot cpus={} mem_mib={}",
        cpus,
        (ram + (1 << 19)) >> 20
    );
    let Some(si) = si else {
        fail!("no hvm_start_info (bad magic at {:#x})", start_info_addr);
    };

    // Heap: the rest of the RAM region that holds the image.
    let image_end = (unsafe { &__image_end } as *const u8 as u64 + 0xfff) & !0xfff;
    let mut heap = None;
    for e in si.memmap() {
        if e.kind == 1 && e.addr <= image_end && image_end < e.addr + e.size {
            heap = Some((image_end, e.addr + e.size));
        }
    }
    let (hs, he) = heap.unwrap_or((image_end, image_end + (64 << 20)));
    unsafe { rt::HEAP.init(hs as usize, he as usize) };

    // Identity map above 4 GiB: RAM now; ECAM and BARs when they are used.
    for e in si.memmap().filter(|e| e.kind == 1) {
        paging::ensure_mapped(e.addr, e.size);
    }

    if CMDLINE.get("verbose").is_some() {
        println!("vireo-guest: cmdline \"{}\"", CMDLINE.as_str());
        println!("vireo-guest: heap {:#x}..{:#x}", hs, he);
        println!(
            "vireo-guest: paging 1g_pages={}",
            paging::has_1g_pages() as u8
        );
        for e in si.memmap() {
            println!(
                "vireo-guest: e820 {:#x}..{:#x} type={}",
                e.addr,
                e.addr + e.size,
                e.kind
            );
        }
    }

    match CMDLINE.get("test").unwrap_or("") {
        "boot" => io::result_ok(),
        "pci" => tests::pci(),
        "blk-write" => tests::blk_write(),
        "blk-read" => tests::blk_read(),
        "blk-ro" => tests::blk_ro(),
        "blk-bench" => tests::blk_bench(),
        "counter" => tests::counter(),
        "cpuid" => tests::cpuid_features(),
        "dirty" => tests::dirty(),
        "fault" => tests::fault(),
        "irq" => tests::irq(),
        "msi" => tests::msi(),
        "mem" => tests::mem(&si),
        "console" => tests::console(),
        "flood-console" => tests::flood_console(),
        "flood-serial" => tests::flood_serial(),
        "net" => tests::net(),
        "net-bench" => tests::net_bench(),
        "echo" => tests::echo(),
        "power-button" => tests::power_button(),
        "workload" => tests::workload(&si),
        "touch" => tests::touch(&si),
        "smp" => tests::smp(&si),
        "numa" => tests::numa(&si),
        "balloon" => balloon::run(&si),
        "virtio-mem" => virtio_mem::run(&si),
        "dynmem" => dynmem::run(&si),
        "replica-writer" => tests::replica_writer(),
        "vfio-user" => vfio_user::run(),
        "vfio-user-dead" => vfio_user::dead(),
        _ => {
            println!("vireo-guest: result fail unknown test");
            io::exit(1)
        }
    }
}
