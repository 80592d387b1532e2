//! Application processors: started the standard way (INIT-SIPI-SIPI, MP specification and
//! Intel SDM 8.4.4), each given its own GDT, TSS and stacks, then run at CPL3 like the boot
//! CPU.
//!
//! The SIPI vector points the APs at a real-mode trampoline copied to [`TRAMPOLINE`]. It
//! loads the boot GDT, turns on protected mode, then paging with long mode (the boot CPU's
//! page tables), and jumps to `ap_long_entry`. There each AP takes a ticket (its index),
//! loads its own GDT (a copy whose TSS descriptor points at its own TSS) and the shared
//! IDT, records what CPUID tells it at CPL0 (APIC IDs, which CPL3 might not see from the
//! VMM on a PVM-style KVM) and drops to CPL3 in [`ap_entry`].
//!
//! Everything an AP runs at CPL3 is allocation-free and does not print: the serial writer
//! and the heap belong to the boot CPU.

use crate::io::rdtsc;
use crate::timer;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Where the real-mode trampoline runs (SIPI vector 0x08). Below 1 MiB, page-aligned, and
/// not used by the PVH boot structures (start info at 0x6000, memory map at 0x7000).
const TRAMPOLINE: u64 = 0x8000;
/// Offsets in the trampoline page of what the boot CPU fills in: the GDT descriptor
/// (limit, 32-bit base) and CR3.
const TRAMPOLINE_GDTR: u64 = 0x1f0;
const TRAMPOLINE_CR3: u64 = 0x1f8;

const LAPIC: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_ICR_LOW: u64 = 0x300;
const LAPIC_ICR_HIGH: u64 = 0x310;
/// ICR: destination shorthand "all excluding self", level assert.
const ICR_ALL_BUT_SELF: u32 = 0b11 << 18 | 1 << 14;
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;

/// The most APs this guest starts (xAPIC IDs are 8 bits).
pub const MAX_APS: usize = 255;

/// Per-AP data, 128 bytes. The assembly in `ap_long_entry` reads the first 32 bytes and
/// writes the CPUID words: keep the offsets in step with it.
#[repr(C, align(128))]
pub struct ApSlot {
    /// GDTR for `lgdt`: limit (u16) and base (u64), packed as the instruction reads it.
    gdtr: [u8; 10],
    _pad: [u8; 6],
    /// Offset 16: top of the CPL0 stack (also in the TSS's RSP0).
    kstack_top: u64,
    /// Offset 24: top of the CPL3 stack.
    ustack_top: u64,
    /// Offset 32: CPUID.1:EBX as the AP saw it at CPL0 (initial APIC ID in 31:24).
    pub cpuid1_ebx: u32,
    /// Offset 36: CPUID.0xB.0:EDX (x2APIC ID).
    pub cpuid_b_edx: u32,
    /// Offsets 40..56: CPUID.0xB subleaf 0 EAX, EBX (SMT level: APIC ID shift, threads per
    /// core) and subleaf 1 EAX, EBX (core level: shift to the package ID, logical CPUs
    /// per package).
    pub topology: [u32; 4],
    /// Set by the AP at CPL3: its LAPIC ID register (bits 31:24) + 1, so 0 = not yet.
    pub online: AtomicU32,
    /// Work the AP reports (see [`ap_entry`]).
    pub result: AtomicU64,
    pub iterations: AtomicU64,
}

/// What an AP does once at CPL3 (set before the APs start).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Work {
    /// Compute [`work_result`] for its APIC ID, publish it, then halt.
    Checksum = 1,
    /// Count iterations forever (for pause/snapshot/migration with every vCPU busy).
    Spin = 2,
}

#[no_mangle]
static AP_TICKET: AtomicU32 = AtomicU32::new(0);
#[no_mangle]
static AP_TABLE: AtomicU64 = AtomicU64::new(0);
#[no_mangle]
static AP_MAX: AtomicU32 = AtomicU32::new(0);
static AP_WORK: AtomicU64 = AtomicU64::new(0);
/// Iterations for [`Work::Checksum`].
static AP_ROUNDS: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .code16
    .global ap_trampoline
    .global ap_trampoline_end
ap_trampoline:
    cli
    cld
    mov ax, cs
    mov ds, ax
    .byte 0x66                      /* o32 lgdt: 32-bit base */
    lgdt [0x1f0]
    mov eax, 0x620                  /* CR4 = PAE | OSFXSR | OSXMMEXCPT */
    mov cr4, eax
    mov eax, dword ptr [0x1f8]
    mov cr3, eax
    mov ecx, 0xc0000080             /* EFER.LME */
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, 0x00000001             /* protected mode first (SDM 9.8.5) ... */
    mov cr0, eax
    mov eax, 0x80000023             /* ... then paging: IA-32e, PG | NE | MP | PE */
    mov cr0, eax
    .byte 0x66, 0xea                /* o32 ljmp 0x08:ap_long_entry */
    .long ap_long_entry
    .word 0x08
ap_trampoline_end:

    .section .text.boot, "ax"
    .code64
ap_long_entry:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov eax, 1
    lock xadd dword ptr [rip + AP_TICKET], eax
    cmp eax, dword ptr [rip + AP_MAX]
    jae 9f                          /* more APs than slots: park */
    shl eax, 7                      /* 128-byte slots */
    mov r12, qword ptr [rip + AP_TABLE]
    add r12, rax
    lgdt [r12]
    mov rsp, qword ptr [r12 + 16]
    mov ax, 0x28
    ltr ax
    lidt [rip + idt_desc]
    mov eax, 1
    xor ecx, ecx
    cpuid
    mov dword ptr [r12 + 32], ebx
    mov eax, 0xb
    xor ecx, ecx
    cpuid
    mov dword ptr [r12 + 36], edx
    mov dword ptr [r12 + 40], eax
    mov dword ptr [r12 + 44], ebx
    mov eax, 0xb
    mov ecx, 1
    cpuid
    mov dword ptr [r12 + 48], eax
    mov dword ptr [r12 + 52], ebx
    push 0x1b
    push qword ptr [r12 + 24]
    push 0x3002
    push 0x23
    lea rax, [rip + ap_user_entry]
    push rax
    mov rdi, r12
    iretq
9:
    cli
    hlt
    jmp 9b

    .section .text, "ax"
ap_user_entry:
    and rsp, -16
    fninit
    push 0x1f80
    ldmxcsr [rsp]
    add rsp, 8
    xor ebp, ebp
    call ap_entry
    ud2
    "#
);

extern "C" {
    static ap_trampoline: u8;
    static ap_trampoline_end: u8;
    static gdt: u8;
    static gdt_desc: u8;
    static tss: u8;
    static pml4: u8;
    /// Parks this CPU at CPL0 with interrupts off (boot.rs: a UD2 the #UD path knows).
    fn guest_park() -> !;
}

const GDT_BYTES: usize = 56;
const GDT_TSS_OFFSET: usize = 0x28;
/// The TSS (0x68 bytes) and its I/O permission bitmap (8192 bytes + the closing 0xff).
const TSS_BYTES: usize = 0x68 + 8192 + 1;
const KSTACK: usize = 16 << 10;
const DFSTACK: usize = 4 << 10;
const USTACK: usize = 64 << 10;

fn lapic_read(off: u64) -> u32 {
    // SAFETY: the LAPIC page is identity-mapped and user-accessible (boot.rs page tables).
    unsafe { core::ptr::read_volatile((LAPIC + off) as *const u32) }
}

fn lapic_write(off: u64, v: u32) {
    // SAFETY: as in `lapic_read`.
    unsafe { core::ptr::write_volatile((LAPIC + off) as *mut u32, v) }
}

/// This CPU's APIC ID (LAPIC ID register, xAPIC mode).
pub fn apic_id() -> u32 {
    lapic_read(LAPIC_ID) >> 24
}

fn send_ipi(icr: u32) {
    lapic_write(LAPIC_ICR_HIGH, 0);
    lapic_write(LAPIC_ICR_LOW, icr);
    while lapic_read(LAPIC_ICR_LOW) & ICR_DELIVERY_PENDING != 0 {
        core::hint::spin_loop();
    }
}

fn delay_us(us: u64, khz: u64) {
    let t0 = rdtsc();
    while rdtsc() - t0 < us * khz / 1000 {
        core::hint::spin_loop();
    }
}

/// Per-AP memory, carved from the heap: its slot, GDT copy, TSS copy and stacks.
fn prepare(aps: usize) -> &'static mut [ApSlot] {
    use alloc::alloc::{alloc_zeroed, Layout};
    let slot_layout =
        Layout::array::<ApSlot>(aps.max(1)).unwrap_or_else(|_| crate::fail!("smp: too many APs"));
    // SAFETY: a fresh zeroed allocation of `aps` slots (all-zero is a valid ApSlot).
    let slots = unsafe {
        let p = alloc_zeroed(slot_layout) as *mut ApSlot;
        if p.is_null() {
            crate::fail!("smp: out of memory for {} AP slots", aps);
        }
        core::slice::from_raw_parts_mut(p, aps)
    };
    for slot in slots.iter_mut() {
        let per_cpu = GDT_BYTES.next_multiple_of(64)
            + TSS_BYTES.next_multiple_of(64)
            + KSTACK
            + DFSTACK
            + USTACK;
        let layout =
            Layout::from_size_align(per_cpu, 4096).unwrap_or_else(|_| crate::fail!("smp: layout"));
        // SAFETY: zeroed memory for this AP alone; it is never freed.
        let base = unsafe { alloc_zeroed(layout) };
        if base.is_null() {
            crate::fail!("smp: out of memory for AP stacks");
        }
        let gdt_copy = base;
        // SAFETY: offsets stay within the `per_cpu` bytes allocated above.
        let (tss_copy, kstack_top, dfstack_top, ustack_top) = unsafe {
            let tss_copy = gdt_copy.add(GDT_BYTES.next_multiple_of(64));
            let kstack = tss_copy.add(TSS_BYTES.next_multiple_of(64));
            let dfstack = kstack.add(KSTACK);
            let ustack = dfstack.add(DFSTACK);
            (
                tss_copy,
                dfstack as u64,
                ustack as u64,
                ustack.add(USTACK) as u64,
            )
        };
        // SAFETY: `gdt` and `tss` are the boot CPU's tables (boot.rs), GDT_BYTES and
        // TSS_BYTES long; the copies do not overlap them.
        unsafe {
            core::ptr::copy_nonoverlapping(&gdt as *const u8, gdt_copy, GDT_BYTES);
            core::ptr::copy_nonoverlapping(&tss as *const u8, tss_copy, TSS_BYTES);
            // TSS: RSP0 at 4, IST1 at 36.
            (tss_copy.add(4) as *mut u64).write_unaligned(kstack_top);
            (tss_copy.add(36) as *mut u64).write_unaligned(dfstack_top);
            // The TSS descriptor: base 15:0 at 2, 23:16 at 4, 31:24 at 7, 63:32 at 8; type
            // "available" (the boot CPU's copy is marked busy by its own LTR).
            let d = gdt_copy.add(GDT_TSS_OFFSET);
            let b = tss_copy as u64;
            (d.add(2) as *mut u16).write_unaligned(b as u16);
            *d.add(4) = (b >> 16) as u8;
            *d.add(5) = 0x89;
            *d.add(7) = (b >> 24) as u8;
            (d.add(8) as *mut u32).write_unaligned((b >> 32) as u32);
        }
        slot.gdtr[..2].copy_from_slice(&((GDT_BYTES - 1) as u16).to_le_bytes());
        slot.gdtr[2..].copy_from_slice(&(gdt_copy as u64).to_le_bytes());
        slot.kstack_top = kstack_top;
        slot.ustack_top = ustack_top;
    }
    slots
}

/// Copies the trampoline to [`TRAMPOLINE`] with the boot GDT and page tables filled in.
fn install_trampoline() {
    // SAFETY: linker symbols of this image; the trampoline page is unused RAM below 1 MiB.
    unsafe {
        let start = &ap_trampoline as *const u8;
        let len = (&ap_trampoline_end as *const u8).offset_from(start) as usize;
        if len > TRAMPOLINE_GDTR as usize {
            crate::fail!("smp: trampoline is {} bytes, too long", len);
        }
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
        // gdt_desc: limit (u16) then base (u64); the trampoline loads a 32-bit base.
        let gdtr = &gdt_desc as *const u8;
        core::ptr::copy_nonoverlapping(gdtr, (TRAMPOLINE + TRAMPOLINE_GDTR) as *mut u8, 6);
        let cr3 = &pml4 as *const u8 as u64;
        ((TRAMPOLINE + TRAMPOLINE_CR3) as *mut u32).write_volatile(cr3 as u32);
    }
}

pub struct Started {
    pub slots: &'static [ApSlot],
    /// TSC cycles from the first INIT until every AP ran at CPL3.
    pub cycles: u64,
}

/// Starts `aps` application processors with INIT-SIPI-SIPI to all but this CPU, and
/// waits until each runs `work` at CPL3 (or `timeout_ms` passed: then fails naming how
/// many came up).
pub fn start_aps(aps: usize, work: Work, rounds: u64, init_us: u64, timeout_ms: u64) -> Started {
    let aps = aps.min(MAX_APS);
    let khz = timer::tsc_khz().khz;
    let slots = prepare(aps);
    install_trampoline();
    AP_TABLE.store(slots.as_ptr() as u64, Ordering::SeqCst);
    AP_MAX.store(aps as u32, Ordering::SeqCst);
    AP_WORK.store(work as u64, Ordering::SeqCst);
    AP_ROUNDS.store(rounds, Ordering::SeqCst);
    AP_TICKET.store(0, Ordering::SeqCst);

    let t0 = rdtsc();
    send_ipi(ICR_ALL_BUT_SELF | ICR_INIT);
    delay_us(init_us, khz);
    let vector = (TRAMPOLINE >> 12) as u32;
    send_ipi(ICR_ALL_BUT_SELF | ICR_STARTUP | vector);
    delay_us(200, khz);
    if AP_TICKET.load(Ordering::SeqCst) < aps as u32 {
        send_ipi(ICR_ALL_BUT_SELF | ICR_STARTUP | vector);
    }
    let deadline = timeout_ms * khz;
    let mut next_report = 5_000 * khz;
    loop {
        let online = slots
            .iter()
            .filter(|s| s.online.load(Ordering::Acquire) != 0)
            .count();
        if online == aps {
            break;
        }
        let waited = rdtsc() - t0;
        if waited > next_report {
            // A slow start (a loaded host) shows how far it got.
            crate::println!(
                "smp waiting ms={} online={} of {} tickets={}",
                waited / khz,
                online,
                aps,
                AP_TICKET.load(Ordering::SeqCst)
            );
            next_report += 5_000 * khz;
        }
        if waited > deadline {
            crate::fail!(
                "smp: {} of {} APs online after {} ms (tickets taken {})",
                online,
                aps,
                timeout_ms,
                AP_TICKET.load(Ordering::SeqCst)
            );
        }
        core::hint::spin_loop();
    }
    Started {
        slots,
        cycles: rdtsc() - t0,
    }
}

/// The value [`Work::Checksum`] computes on the CPU with this APIC ID (the boot CPU checks
/// every AP's against its own computation).
pub fn work_result(apic: u32, rounds: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(apic).wrapping_mul(0x1000_0000_01b3);
    let mut sum = 0u64;
    for _ in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        sum = sum.wrapping_add(x);
    }
    sum
}

/// CPL3 entry of every AP (from `ap_user_entry`).
#[no_mangle]
extern "C" fn ap_entry(slot: &'static ApSlot) -> ! {
    let id = apic_id();
    slot.online.store(id + 1, Ordering::Release);
    if AP_WORK.load(Ordering::Acquire) == Work::Spin as u64 {
        loop {
            slot.iterations.fetch_add(1, Ordering::Relaxed);
            for _ in 0..1000 {
                core::hint::spin_loop();
            }
        }
    }
    let r = work_result(id, AP_ROUNDS.load(Ordering::Acquire));
    slot.result.store(r, Ordering::Release);
    slot.iterations.store(1, Ordering::Release);
    // SAFETY: parks this CPU for good; nothing of it is used afterwards.
    unsafe { guest_park() }
}

const _: () = assert!(core::mem::size_of::<ApSlot>() == 128);
const _: () = assert!(core::mem::offset_of!(ApSlot, kstack_top) == 16);
const _: () = assert!(core::mem::offset_of!(ApSlot, ustack_top) == 24);
const _: () = assert!(core::mem::offset_of!(ApSlot, cpuid1_ebx) == 32);
const _: () = assert!(core::mem::offset_of!(ApSlot, topology) == 40);

/// Where one CPU sits: its x2APIC ID and CPUID 0xB's [SMT shift, threads per core, package
/// shift, logical CPUs per package].
pub struct CpuPlace {
    pub id: u32,
    pub topology: [u32; 4],
}

pub struct Topology {
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
}

/// The topology the CPUs' IDs and CPUID describe, checked for consistency: every CPU
/// reports the same shifts and counts, and the IDs fill exactly sockets x cores x threads
/// places with the counts CPUID gives.
pub fn topology_of(cpus: &[CpuPlace]) -> Result<Topology, alloc::string::String> {
    use alloc::collections::BTreeSet;
    use alloc::format;
    let Some(first) = cpus.first() else {
        return Err("no CPUs".into());
    };
    let [smt_shift, threads_per_core, pkg_shift, per_package] = first.topology.map(|v| v & 0xffff);
    let (smt_shift, pkg_shift) = (smt_shift & 0x1f, pkg_shift & 0x1f);
    if pkg_shift < smt_shift || pkg_shift > 8 {
        return Err(format!(
            "CPUID 0xB shifts {} and {} make no sense",
            smt_shift, pkg_shift
        ));
    }
    let mut sockets = BTreeSet::new();
    let mut cores = BTreeSet::new();
    let mut threads = BTreeSet::new();
    for c in cpus {
        if c.topology.map(|v| v & 0xffff) != first.topology.map(|v| v & 0xffff) {
            return Err(format!(
                "CPU {} reports CPUID 0xB {:?}, CPU {} {:?}",
                c.id, c.topology, first.id, first.topology
            ));
        }
        sockets.insert(c.id >> pkg_shift);
        cores.insert((c.id >> pkg_shift, c.id >> smt_shift));
        threads.insert(c.id);
    }
    let t = Topology {
        sockets: sockets.len() as u32,
        cores: (cores.len() / sockets.len()) as u32,
        threads: (threads.len() / cores.len()) as u32,
    };
    if t.sockets * t.cores * t.threads != cpus.len() as u32 {
        return Err(format!(
            "{} CPUs do not fill {} sockets x {} cores x {} threads evenly",
            cpus.len(),
            t.sockets,
            t.cores,
            t.threads
        ));
    }
    if threads_per_core != t.threads || per_package != t.cores * t.threads {
        return Err(format!(
            "CPUID 0xB says {} threads per core and {} per package; the APIC IDs say {} and {}",
            threads_per_core,
            per_package,
            t.threads,
            t.cores * t.threads
        ));
    }
    Ok(t)
}
