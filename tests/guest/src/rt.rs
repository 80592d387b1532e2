//! Freestanding runtime: mem* functions, panic handler, bump allocator.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;

// The mem* functions use `rep movsb`/`rep stosb` so the optimiser cannot turn them back into
// calls to themselves.

#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    core::arch::asm!(
        "rep movsb",
        inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
        options(nostack, preserves_flags)
    );
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // No harmful overlap for a forward copy.
        core::arch::asm!(
            "rep movsb",
            inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    } else {
        core::arch::asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dst.add(n).wrapping_sub(1) => _,
            inout("rsi") src.add(n).wrapping_sub(1) => _,
            options(nostack)
        );
    }
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    core::arch::asm!(
        "rep stosb",
        inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
        options(nostack, preserves_flags)
    );
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let x = core::ptr::read_volatile(a.add(i));
        let y = core::ptr::read_volatile(b.add(i));
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}

#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    crate::io::exit(2)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::println!("vireo-guest: result fail panic: {}", info);
    crate::io::exit(2)
}

/// A bump allocator over one region of RAM (set up from the PVH memory map). Frees nothing;
/// the guest allocates its buffers once per test.
pub struct Bump {
    inner: UnsafeCell<(usize, usize)>, // (next, end)
}

// SAFETY: the guest is single-threaded.
unsafe impl Sync for Bump {}

impl Bump {
    pub const fn new() -> Self {
        Self {
            inner: UnsafeCell::new((0, 0)),
        }
    }

    /// # Safety
    /// `[start, end)` must be unused, identity-mapped RAM.
    pub unsafe fn init(&self, start: usize, end: usize) {
        *self.inner.get() = (start, end);
    }

    pub fn remaining(&self) -> usize {
        let (next, end) = unsafe { *self.inner.get() };
        end.saturating_sub(next)
    }

    pub fn alloc_raw(&self, size: usize, align: usize) -> *mut u8 {
        let st = unsafe { &mut *self.inner.get() };
        let start = (st.0 + align - 1) & !(align - 1);
        match start.checked_add(size) {
            Some(e) if e <= st.1 => {
                st.0 = e;
                start as *mut u8
            }
            _ => core::ptr::null_mut(),
        }
    }
}

unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.alloc_raw(layout.size(), layout.align())
    }
    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
pub static HEAP: Bump = Bump::new();
