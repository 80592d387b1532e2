//! `vireo-test-vfio-user`: the vfio-user server the e2e tests give a VM (the
//! `vfio_user` crate's `Server`). One PCI function, 5652:0001, with BAR0 of 8 KiB:
//! registers at 0 (see [`regs`]), the MSI-X table (one vector) at 0x1000 and its PBA
//! at 0x1800, both emulated by the VMM.
//!
//! A command (`CMD` = 1) writes `DMA_LEN` bytes of the pattern seeded by `DMA_SEED`
//! (byte i = seed + 3 i, mod 256; `vireo_e2e::vfio_user_pattern`) at guest-physical
//! `DMA_ADDR` through the memory the VMM mapped (DMA_MAP), then sets `STATUS`, counts
//! it in `COUNTER` and fires MSI-X vector 0. When the client goes, the server prints
//! its counts on stdout (`vfio-user-server: ...`) and exits.
//!
//! `--mode garbage` answers the first message with bytes that are no vfio-user reply;
//! `--mode close` closes every connection at once: the VMM must refuse both.

// No unwrap()/expect(): a protocol error from the VMM under test is reported, never a panic.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use clap::Parser;
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

/// BAR0's registers.
mod regs {
    pub const ID: u64 = 0x00;
    pub const SCRATCH: u64 = 0x04;
    pub const DMA_ADDR_LO: u64 = 0x08;
    pub const DMA_ADDR_HI: u64 = 0x0c;
    pub const DMA_LEN: u64 = 0x10;
    pub const DMA_SEED: u64 = 0x14;
    pub const CMD: u64 = 0x18;
    pub const STATUS: u64 = 0x1c;
    pub const COUNTER: u64 = 0x20;
    /// What `ID` reads.
    pub const ID_VALUE: u32 = 0x5652_5546;
    pub const STATUS_DONE: u32 = 1;
    pub const STATUS_ERROR: u32 = 2;
}

const BAR0_SIZE: u64 = 0x2000;
const CONFIG_SIZE: u64 = 256;
/// The most one command writes.
const MAX_DMA: u64 = 1 << 20;

#[derive(Parser)]
struct Args {
    /// The unix socket to listen on (must not exist).
    #[arg(long)]
    socket: PathBuf,
    /// normal, garbage or close.
    #[arg(long, default_value = "normal")]
    mode: String,
}

/// One guest memory range the VMM mapped for DMA, mapped here.
struct Mapping {
    address: u64,
    size: u64,
    ptr: *mut u8,
}

#[derive(Default)]
struct Device {
    config: Vec<u8>,
    scratch: u32,
    dma_addr: u64,
    dma_len: u32,
    dma_seed: u32,
    status: u32,
    counter: u32,
    maps: Vec<Mapping>,
    irqs: Vec<Option<File>>,
    scratch_writes: u64,
    dma_bytes: u64,
    irqs_fired: u64,
}

fn config_space() -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_SIZE as usize];
    c[0..2].copy_from_slice(&0x5652u16.to_le_bytes());
    c[2..4].copy_from_slice(&0x0001u16.to_le_bytes());
    c[6..8].copy_from_slice(&(1u16 << 4).to_le_bytes()); // capability list
    c[0x0b] = 0xff; // class: unassigned
    c[0x10..0x14].copy_from_slice(&0u32.to_le_bytes()); // BAR0: 32-bit memory
    c[0x34] = 0x40;
    // MSI-X: one vector, table at BAR0 + 0x1000, PBA at BAR0 + 0x1800.
    c[0x40] = 0x11;
    c[0x41] = 0;
    c[0x42..0x44].copy_from_slice(&0u16.to_le_bytes());
    c[0x44..0x48].copy_from_slice(&0x1000u32.to_le_bytes());
    c[0x48..0x4c].copy_from_slice(&0x1800u32.to_le_bytes());
    c
}

fn pattern_byte(seed: u32, i: u64) -> u8 {
    (seed as u8).wrapping_add((i as u8).wrapping_mul(3))
}

impl Device {
    fn dma(&mut self) -> Result<(), String> {
        let len = u64::from(self.dma_len);
        if len == 0 || len > MAX_DMA {
            return Err(format!("DMA length {len}"));
        }
        let end = self.dma_addr.checked_add(len).ok_or("DMA range wraps")?;
        let m = self
            .maps
            .iter()
            .find(|m| self.dma_addr >= m.address && end <= m.address + m.size)
            .ok_or_else(|| format!("{:#x}+{len} is not in one mapped range", self.dma_addr))?;
        let at = (self.dma_addr - m.address) as usize;
        for i in 0..len {
            // SAFETY: at + i < m.size: the range lies inside the mapping (checked above).
            unsafe {
                m.ptr
                    .add(at + i as usize)
                    .write_volatile(pattern_byte(self.dma_seed, i))
            };
        }
        self.dma_bytes += len;
        Ok(())
    }

    fn fire(&mut self, vector: usize) {
        if let Some(Some(f)) = self.irqs.get_mut(vector) {
            if f.write_all(&1u64.to_le_bytes()).is_ok() {
                self.irqs_fired += 1;
            }
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            regs::ID => regs::ID_VALUE,
            regs::SCRATCH => self.scratch,
            regs::DMA_ADDR_LO => self.dma_addr as u32,
            regs::DMA_ADDR_HI => (self.dma_addr >> 32) as u32,
            regs::DMA_LEN => self.dma_len,
            regs::DMA_SEED => self.dma_seed,
            regs::STATUS => self.status,
            regs::COUNTER => self.counter,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            regs::SCRATCH => {
                self.scratch = v;
                self.scratch_writes += 1;
            }
            regs::DMA_ADDR_LO => self.dma_addr = (self.dma_addr & !0xffff_ffff) | u64::from(v),
            regs::DMA_ADDR_HI => {
                self.dma_addr = (self.dma_addr & 0xffff_ffff) | (u64::from(v) << 32)
            }
            regs::DMA_LEN => self.dma_len = v,
            regs::DMA_SEED => self.dma_seed = v,
            regs::CMD if v == 1 => {
                self.status = match self.dma() {
                    Ok(()) => regs::STATUS_DONE,
                    Err(e) => {
                        eprintln!("vfio-user-server: DMA refused: {e}");
                        regs::STATUS_ERROR
                    }
                };
                self.counter += 1;
                self.fire(0);
            }
            _ => {}
        }
    }
}

fn bad(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg.to_string())
}

impl ServerBackend for Device {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        if region == VFIO_PCI_CONFIG_REGION_INDEX {
            let src = offset
                .try_into()
                .ok()
                .and_then(|o: usize| self.config.get(o..o + data.len()))
                .ok_or_else(|| bad("config read out of range"))?;
            data.copy_from_slice(src);
            return Ok(());
        }
        if region != 0 || data.len() != 4 {
            data.fill(0xff);
            return Ok(());
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if region == 0 {
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                self.write_reg(offset, u32::from_le_bytes(b));
            }
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        _flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        let fd = fd.ok_or_else(|| bad("DMA_MAP without an fd"))?;
        // SAFETY: a new shared mapping of the fd the VMM sent; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        self.maps.push(Mapping {
            address,
            size,
            ptr: ptr.cast(),
        });
        Ok(())
    }

    fn dma_unmap(
        &mut self,
        _flags: DmaUnmapFlags,
        address: u64,
        _size: u64,
    ) -> std::io::Result<()> {
        self.maps.retain(|m| m.address != address);
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        _flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        if index != VFIO_PCI_MSIX_IRQ_INDEX {
            return Ok(());
        }
        let end = (start + count) as usize;
        if self.irqs.len() < end {
            self.irqs.resize_with(end, || None);
        }
        for (i, f) in fds.into_iter().enumerate() {
            self.irqs[start as usize + i] = Some(f);
        }
        Ok(())
    }
}

fn region(index: u32, size: u64) -> ServerRegion {
    ServerRegion {
        region_info: vfio_region_info {
            argsz: std::mem::size_of::<vfio_region_info>() as u32,
            flags: if size > 0 {
                VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
            } else {
                0
            },
            index,
            cap_offset: 0,
            size,
            offset: 0,
        },
        sparse_areas: Vec::new(),
        mmap_fd: None,
    }
}

fn rogue(args: &Args) -> std::io::Result<()> {
    let listener = UnixListener::bind(&args.socket)?;
    for stream in listener.incoming() {
        let mut s = stream?;
        if args.mode == "garbage" {
            let mut first = [0u8; 16];
            let _ = s.read(&mut first);
            let _ = s.write_all(&[0xab; 64]);
        }
        eprintln!("vfio-user-server: {} connection", args.mode);
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.mode != "normal" {
        return match rogue(&args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vfio-user-server: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let regions = (0..VFIO_PCI_NUM_REGIONS)
        .map(|i| match i {
            0 => region(i, BAR0_SIZE),
            VFIO_PCI_CONFIG_REGION_INDEX => region(i, CONFIG_SIZE),
            _ => region(i, 0),
        })
        .collect();
    let irqs = (0..VFIO_PCI_NUM_IRQS)
        .map(|index| IrqInfo {
            index,
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: u32::from(index == VFIO_PCI_MSIX_IRQ_INDEX),
        })
        .collect();
    let server = match Server::new(&args.socket, false, irqs, regions) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vfio-user-server: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("vfio-user-server: listening");
    let mut dev = Device {
        config: config_space(),
        ..Default::default()
    };
    let r = server.run(&mut dev);
    println!(
        "vfio-user-server: done scratch={:#x} scratch_writes={} commands={} dma_bytes={} irqs={} result={:?}",
        dev.scratch, dev.scratch_writes, dev.counter, dev.dma_bytes, dev.irqs_fired, r.err().map(|e| e.to_string())
    );
    std::process::ExitCode::SUCCESS
}
