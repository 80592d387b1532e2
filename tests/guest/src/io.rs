//! Port I/O (allowed at CPL3 because IOPL=3), 16550 serial at 0x3f8, isa-debug-exit at 0xf4.

use core::arch::asm;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};

pub const COM1: u16 = 0x3f8;
pub const DEBUG_EXIT: u16 = 0xf4;

#[inline]
pub fn outb(port: u16, v: u8) {
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

#[inline]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

#[inline]
pub fn outl(port: u16, v: u32) {
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

#[inline]
pub fn rdtsc() -> u64 {
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn serial_init() {
    outb(COM1 + 1, 0x00); // IER: no interrupts
    outb(COM1 + 3, 0x80); // LCR: DLAB
    outb(COM1, 0x01); // DLL: 115200
    outb(COM1 + 1, 0x00); // DLM
    outb(COM1 + 3, 0x03); // LCR: 8N1
    outb(COM1 + 2, 0x07); // FCR: enable + clear FIFOs
}

static LSR_BROKEN: AtomicBool = AtomicBool::new(false);
/// Bytes written since THR-empty was last seen; the FIFO (enabled in `serial_init`) holds 16.
static IN_FIFO: AtomicU32 = AtomicU32::new(16);

pub fn putc(b: u8) {
    // THRE set means the transmit FIFO is empty, so one LSR read allows 16 bytes (halves the
    // port exits of a line). Polling is bounded: if THR never shows empty (a VMM without
    // LSR), stop polling for good rather than crawl.
    if IN_FIFO.load(Relaxed) >= 16 && !LSR_BROKEN.load(Relaxed) {
        let mut spins = 0u32;
        while inb(COM1 + 5) & 0x20 == 0 {
            spins += 1;
            if spins > 10_000 {
                LSR_BROKEN.store(true, Relaxed);
                break;
            }
            core::hint::spin_loop();
        }
        IN_FIFO.store(0, Relaxed);
    }
    outb(COM1, b);
    IN_FIFO.store(IN_FIFO.load(Relaxed) + 1, Relaxed);
}

pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            putc(b);
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::io::Serial, $($arg)*);
    }};
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::io::Serial, $($arg)*);
    }};
}

/// Power off through isa-debug-exit. QEMU exits with status (code << 1) | 1; Vireo treats the
/// write as power-off with `code`.
pub fn exit(code: u32) -> ! {
    outl(DEBUG_EXIT, code);
    // Nobody listens on 0xf4: spin (HLT would #GP at CPL3).
    loop {
        core::hint::spin_loop();
    }
}

pub fn result_ok() -> ! {
    crate::println!("vireo-guest: result ok");
    exit(0)
}

pub fn result_fail(reason: fmt::Arguments) -> ! {
    crate::println!("vireo-guest: result fail {}", reason);
    exit(1)
}

#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => { $crate::io::result_fail(format_args!($($arg)*)) };
}
