//! PCI over ECAM (bus 0), BAR assignment, virtio-drivers HAL (identity-mapped DMA).

use crate::hvm::CMDLINE;
use crate::println;
use core::ptr::NonNull;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Cam, Command, DeviceFunction, DeviceFunctionInfo, HeaderType, MemoryBarType, MmioCam,
    PciRoot,
};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// QEMU microvm (pcie=on) defaults: PCIE_ECAM_BASE, PCIE_MMIO_BASE/SIZE.
pub const DEFAULT_ECAM: u64 = 0xe000_0000;
pub const DEFAULT_MMIO_BASE: u64 = 0xc000_0000;
pub const DEFAULT_MMIO_SIZE: u64 = 0x2000_0000;

pub struct GuestHal;

unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let p = crate::rt::HEAP.alloc_raw(pages * PAGE_SIZE, PAGE_SIZE);
        match NonNull::new(p) {
            Some(nn) => {
                unsafe { core::ptr::write_bytes(p, 0, pages * PAGE_SIZE) };
                (p as PhysAddr, nn)
            }
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        crate::paging::ensure_mapped(paddr, size as u64);
        NonNull::new(crate::paging::virt(paddr) as *mut u8)
            .unwrap_or_else(|| crate::fail!("device MMIO at physical address 0"))
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

pub type Root = PciRoot<MmioCam<'static>>;

pub fn ecam_base() -> u64 {
    match CMDLINE.hex("ecam") {
        Some(Ok(v)) => v,
        Some(Err(())) => crate::fail!("bad ecam= value"),
        None => DEFAULT_ECAM,
    }
}

fn window(key: &str) -> Option<(u64, u64)> {
    let v = CMDLINE.get(key)?;
    let parsed = v.split_once(':').and_then(|(b, s)| {
        Some((
            crate::hvm::parse_hex(b).ok()?,
            crate::hvm::parse_hex(s).ok()?,
        ))
    });
    match parsed {
        Some(w) => Some(w),
        None => crate::fail!("bad {}= value (want <hex base>:<hex size>)", key),
    }
}

/// BAR window from `mmio=<hex base>:<hex size>`, default QEMU microvm's.
pub fn mmio_window() -> (u64, u64) {
    window("mmio").unwrap_or((DEFAULT_MMIO_BASE, DEFAULT_MMIO_SIZE))
}

/// Optional separate window for 64-bit BARs: `mmio64=<hex base>:<hex size>`.
pub fn mmio64_window() -> Option<(u64, u64)> {
    window("mmio64")
}

/// Bump allocator over one BAR window.
struct Window {
    base: u64,
    end: u64,
    next: u64,
}

impl Window {
    fn new((base, size): (u64, u64)) -> Self {
        Window {
            base,
            end: base + size,
            next: base,
        }
    }

    fn alloc(&mut self, size: u64) -> Option<u64> {
        let a = self.next.checked_add(size - 1)? & !(size - 1);
        if a.checked_add(size)? > self.end {
            return None;
        }
        self.next = a + size;
        Some(a)
    }
}

pub fn root() -> Root {
    let base = ecam_base();
    crate::paging::ensure_mapped(base, Cam::Ecam.size() as u64);
    // SAFETY: ECAM is identity-mapped (just above) and nothing else accesses it.
    PciRoot::new(unsafe { MmioCam::new(crate::paging::virt(base) as *mut u8, Cam::Ecam) })
}

pub fn functions(root: &Root) -> impl Iterator<Item = (DeviceFunction, DeviceFunctionInfo)> {
    root.enumerate_bus(0)
}

pub fn bdf(df: &DeviceFunction) -> impl core::fmt::Display {
    struct B(u8, u8, u8);
    impl core::fmt::Display for B {
        fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
            write!(f, "{:02x}:{:02x}.{:x}", self.0, self.1, self.2)
        }
    }
    B(df.bus, df.device, df.function)
}

/// Gives every unassigned (zero) memory BAR of every bus-0 function an address from the
/// MMIO window (64-bit BARs from the `mmio64=` window if given; naturally aligned), keeps BARs that are already assigned, and enables memory
/// decoding and bus mastering. With `verbose`, prints one `bar ...` line per BAR.
pub fn assign_bars(root: &mut Root, verbose: bool) {
    let mut w32 = Window::new(mmio_window());
    let mut w64 = mmio64_window().map(Window::new);
    let devs: alloc::vec::Vec<_> = functions(root).collect();
    for (df, info) in devs {
        if info.header_type != HeaderType::Standard {
            continue;
        }
        let mut idx = 0u8;
        let mut any_mem = false;
        let mut any_io = false;
        while idx < 6 {
            let bar = match root.bar_info(df, idx) {
                Ok(b) => b,
                Err(e) => {
                    println!("bar {} index={} error={:?}", bdf(&df), idx, e);
                    idx += 1;
                    continue;
                }
            };
            let step = if bar.as_ref().is_some_and(|b| b.takes_two_entries()) {
                2
            } else {
                1
            };
            match bar {
                Some(BarInfo::Memory {
                    address_type,
                    address,
                    size,
                    prefetchable,
                }) => {
                    any_mem = true;
                    let kind = match address_type {
                        MemoryBarType::Width64 => "mem64",
                        _ => "mem32",
                    };
                    let (addr, by) = if address != 0 {
                        (address, "vmm")
                    } else {
                        let is64 = address_type == MemoryBarType::Width64;
                        let w = match w64.as_mut() {
                            Some(w) if is64 => w,
                            _ => &mut w32,
                        };
                        let Some(a) = (size != 0).then(|| w.alloc(size)).flatten() else {
                            crate::fail!(
                                "bar {} index={} size={:#x} does not fit window {:#x}..{:#x}",
                                bdf(&df),
                                idx,
                                size,
                                w.base,
                                w.end
                            );
                        };
                        if is64 {
                            root.set_bar_64(df, idx, a);
                        } else if a + size <= 1 << 32 {
                            root.set_bar_32(df, idx, a as u32);
                        } else {
                            crate::fail!(
                                "32-bit bar {} index={} cannot go at {:#x}",
                                bdf(&df),
                                idx,
                                a
                            );
                        }
                        (a, "guest")
                    };
                    if verbose {
                        println!(
                            "bar {} index={} kind={} prefetch={} addr={:#x} size={:#x} assigned={}",
                            bdf(&df),
                            idx,
                            kind,
                            prefetchable as u8,
                            addr,
                            size,
                            by
                        );
                    }
                }
                Some(BarInfo::IO { address, size }) => {
                    any_io |= address != 0;
                    if verbose {
                        println!(
                            "bar {} index={} kind=io addr={:#x} size={:#x} assigned={}",
                            bdf(&df),
                            idx,
                            address,
                            size,
                            if address != 0 { "vmm" } else { "none" }
                        );
                    }
                }
                None => {}
            }
            idx += step;
        }
        let (_, mut cmd) = root.get_status_command(df);
        if any_mem {
            cmd |= Command::MEMORY_SPACE;
        }
        if any_io {
            cmd |= Command::IO_SPACE;
        }
        cmd |= Command::BUS_MASTER;
        root.set_command(df, cmd);
    }
}
