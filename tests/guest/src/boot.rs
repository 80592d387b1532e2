//! CPL0 part of the guest, all in assembly (CPL0 code is emulated on PVM-style KVM, so it
//! must be short and must not use SSE arithmetic).
//!
//! Entry points:
//! * `pvh_entry32` (the PVH `XEN_ELFNOTE_PHYS32_ENTRY`): 32-bit protected mode, paging off,
//!   EBX = physical address of `hvm_start_info`. This is what QEMU and linux-loader use.
//! * `_start64` (ELF `e_entry`): 64-bit long mode with paging on and at least the image
//!   identity-mapped, RBX = physical address of `hvm_start_info` (same register as PVH).
//!
//! Both load our own page tables, GDT, TSS and IDT and `iretq` to `user_entry` at CPL3 with
//! IOPL=3 and IF=0. Page tables (static, in `.data`, no CPL0 loop needed) map 0 .. 4 GiB
//! with 2 MiB pages; the CPL3 code extends the map above 4 GiB (paging.rs: the tables are
//! user-accessible memory like everything else). All entries are present, writable and
//! user-accessible.
//!
//! Exceptions (vectors 0..31) go to `isr_common`, which prints the vector, error code, RIP,
//! CS, RSP (and CR2 for #PF), then `vireo-guest: result fail exception` and writes 0x7f to
//! the isa-debug-exit port 0xf4. Vectors 32..255 have no gate, so a stray interrupt shows
//! up as #GP with error code (vector << 3) | 2. Vector 0x40 is the one interrupt gate used
//! by `test=irq` (LAPIC timer probe): it counts, EOIs and returns. CPL3 cannot use STI/CLI
//! here (PVM forces IOPL=0, so they #GP) nor INT n (it raises #UD under PVM), so
//! `guest_sti`/`guest_cli` execute a UD2 that the #UD path of `isr_common` recognises by
//! its address: it flips IF in the return frame and skips the UD2.
//!
//! Port I/O at CPL3: IOPL=3 is requested in RFLAGS, but PVM forces IOPL=0 for CPL3, so the
//! TSS carries a full I/O permission bitmap allowing every port; that is what makes CPL3
//! port I/O work here.

core::arch::global_asm!(
    r#"
    /* ---------------------------------------------------------------- PVH note */
    .section .note.Xen, "a"
    .p2align 2
    .long 4                 /* namesz */
    .long 8                 /* descsz: QEMU reads 8 bytes, the upper 4 stay zero */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    .long pvh_entry32
    .long 0

    /* ---------------------------------------------------------------- entries */
    .section .text.boot, "ax"
    .code32
    .global pvh_entry32
pvh_entry32:
    cli
    cld
    mov esi, ebx
    mov esp, offset kstack_top
    lgdt [gdt_desc]
    mov eax, 0x620          /* CR4 = PAE | OSFXSR | OSXMMEXCPT (no SMEP/SMAP: CPL0 code */
    mov cr4, eax            /* and data live in user pages) */
    mov eax, offset pml4
    mov cr3, eax
    mov ecx, 0xc0000080     /* EFER */
    rdmsr
    or eax, 0x100           /* LME */
    wrmsr
    mov eax, cr0
    and eax, 0xfffffff3     /* clear EM, TS */
    or eax, 0x80000023      /* PG | NE | MP | PE */
    mov cr0, eax
    push 0x08
    .byte 0x68              /* push imm32 (long_entry) */
    .long long_entry
    retf

    .code64
    .global _start64
_start64:
    cli
    cld
    mov esi, ebx
    mov esp, offset kstack_top
    mov eax, offset pml4
    mov cr3, rax
    lgdt [gdt_desc]
    mov eax, 0x620          /* as above; clears SMEP/SMAP/PGE/PCIDE a VMM may have set */
    mov cr4, rax
    mov rax, cr0
    and eax, 0xfffffff3
    or eax, 0x80000023
    mov cr0, rax
    push 0x08
    push offset long_entry
    retfq

long_entry:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov esp, offset kstack_top
    mov r15d, esi           /* hvm_start_info, zero-extended */

    /* TSS descriptor base */
    mov eax, offset tss
    mov word ptr [gdt_tss + 2], ax
    shr eax, 16
    mov byte ptr [gdt_tss + 4], al
    mov byte ptr [gdt_tss + 7], ah
    mov ax, 0x28
    ltr ax

    /* IDT gates 0..31: stubs are 16 bytes apart */
    mov edi, offset idt
    mov esi, offset isr_stubs
    mov ecx, 32
1:
    mov eax, esi
    mov word ptr [rdi], ax
    mov dword ptr [rdi + 2], 0x8e000008   /* selector 0x08, IST 0, interrupt gate, P, DPL0 */
    shr eax, 16
    mov word ptr [rdi + 6], ax
    add esi, 16
    add edi, 16
    dec ecx
    jnz 1b
    mov byte ptr [idt + 8 * 16 + 4], 1    /* #DF on IST1 */
    /* vector 0x40: irq probe */
    mov eax, offset irq_probe_isr
    mov word ptr [idt + 0x40 * 16], ax
    mov dword ptr [idt + 0x40 * 16 + 2], 0x8e000008
    shr eax, 16
    mov word ptr [idt + 0x40 * 16 + 6], ax
    lidt [idt_desc]

    /* CPUID at CPL0, into CPUID_TABLE (cpuid.rs): where a PVM-style KVM lets CPL3 code
       run CPUID natively, CPL3 would see the host's values instead of the VMM's. */
    mov r8d, offset CPUID_TABLE
2:
    mov eax, dword ptr [r8]
    cmp eax, 0xffffffff
    je 3f
    mov ecx, dword ptr [r8 + 4]
    cpuid
    mov dword ptr [r8 + 8], eax
    mov dword ptr [r8 + 12], ebx
    mov dword ptr [r8 + 16], ecx
    mov dword ptr [r8 + 20], edx
    add r8d, 24
    jmp 2b
3:

    /* drop to CPL3: SS, RSP, RFLAGS (IOPL=3, IF=0), CS, RIP */
    push 0x1b
    push offset ustack_top
    push 0x3002
    push 0x23
    push offset user_entry
    mov rdi, r15
    iretq

    /* ---------------------------------------------------------------- CPL3 entry */
    .section .text, "ax"
user_entry:
    and rsp, -16
    fninit
    push 0x1f80
    ldmxcsr [rsp]
    add rsp, 8
    xor ebp, ebp
    call guest_main
    ud2

    /* ---------------------------------------------------------------- exceptions */
    .macro ISR vec
    .p2align 4
    .if ((0x60227d00 >> \vec) & 1) == 0
    push 0
    .endif
    push \vec
    jmp isr_common
    .endm

    .p2align 4
isr_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    ISR \v
    .endr

    /* stack: [rsp] vector, +8 error, +16 rip, +24 cs, +32 rflags, +40 rsp, +48 ss */
isr_common:
    cmp qword ptr [rsp], 6
    jne 1f
    push rax
    mov rax, [rsp + 24]             /* faulting rip */
    cmp rax, offset ud_sti
    je 2f
    cmp rax, offset ud_cli
    je 3f
    cmp rax, offset ud_park
    je park_forever
    pop rax
    jmp 1f
2:
    or qword ptr [rsp + 40], 0x200  /* rflags.IF = 1 */
    jmp 4f
3:
    and qword ptr [rsp + 40], -0x201
4:
    add qword ptr [rsp + 24], 2     /* skip the ud2 */
    pop rax
    add rsp, 16                     /* vector, error code */
    iretq
1:
    cld
    mov rbx, rsp
    lea rsi, [rip + msg_exc]
    call k_puts
    mov rax, [rbx]
    mov ecx, 2
    call k_puthex
    lea rsi, [rip + msg_err]
    call k_puts
    mov rax, [rbx + 8]
    mov ecx, 16
    call k_puthex
    lea rsi, [rip + msg_rip]
    call k_puts
    mov rax, [rbx + 16]
    mov ecx, 16
    call k_puthex
    lea rsi, [rip + msg_cs]
    call k_puts
    mov rax, [rbx + 24]
    mov ecx, 4
    call k_puthex
    lea rsi, [rip + msg_rfl]
    call k_puts
    mov rax, [rbx + 32]
    mov ecx, 8
    call k_puthex
    lea rsi, [rip + msg_rsp]
    call k_puts
    mov rax, [rbx + 40]
    mov ecx, 16
    call k_puthex
    cmp qword ptr [rbx], 14
    jne 2f
    lea rsi, [rip + msg_cr2]
    call k_puts
    mov rax, cr2
    mov ecx, 16
    call k_puthex
2:
    lea rsi, [rip + msg_fail]
    call k_puts
    mov dx, 0xf4
    mov eax, 0x7f
    out dx, eax
3:
    cli
    hlt
    jmp 3b

    /* k_putc: al = byte (clobbers rdx, r8) */
k_putc:
    mov r8d, 256
    mov dx, 0x3fd
4:
    push rax
    in al, dx
    test al, 0x20
    pop rax
    jnz 5f
    dec r8d
    jnz 4b
5:
    mov dx, 0x3f8
    out dx, al
    ret

    /* k_puts: rsi = NUL-terminated string */
k_puts:
    lodsb
    test al, al
    jz 6f
    call k_putc
    jmp k_puts
6:
    ret

    /* k_puthex: rax = value, ecx = number of hex digits (from the low end) */
k_puthex:
    mov r9, rax
    mov r10d, ecx
7:
    dec r10d
    lea ecx, [r10d * 4]
    mov rax, r9
    shr rax, cl
    and eax, 15
    cmp al, 10
    jb 8f
    add al, 0x57            /* 'a' - 10 */
    jmp 9f
8:
    add al, 0x30
9:
    call k_putc
    test r10d, r10d
    jnz 7b
    ret

    /* LAPIC timer probe interrupt (vector 0x40) */
irq_probe_isr:
    push rax
    lock inc qword ptr [rip + IRQ_PROBE_COUNT]
    mov eax, 0xfee000b0
    mov dword ptr [rax], 0  /* EOI */
    pop rax
    iretq

    /* guest_park: a CPU that has nothing more to do stops at CPL0 with interrupts off. */
park_forever:
    cli
    hlt
    jmp park_forever

    /* CPL3 "STI"/"CLI": a UD2 at these two addresses is handled by isr_common, which
       sets/clears IF in the return frame and skips the UD2. */
    .section .text, "ax"
    .global guest_sti
guest_sti:
ud_sti:
    ud2
    ret
    .global guest_cli
guest_cli:
ud_cli:
    ud2
    ret
    .global guest_park
guest_park:
ud_park:
    ud2

    .section .rodata
msg_exc:  .asciz "\nvireo-guest: exception vector=0x"
msg_err:  .asciz " error=0x"
msg_rip:  .asciz " rip=0x"
msg_cs:   .asciz " cs=0x"
msg_rfl:  .asciz " rflags=0x"
msg_rsp:  .asciz " rsp=0x"
msg_cr2:  .asciz " cr2=0x"
msg_fail: .asciz "\nvireo-guest: result fail exception\n"

    /* ---------------------------------------------------------------- tables */
    .section .data.pagetables, "aw"
    .p2align 12
    .global pml4
pml4:                           /* entries 1.. are filled at CPL3 (paging.rs) */
    .quad pdpt0 + 0x7
    .fill 511, 8, 0
pdpt0:                          /* 0..512 GiB; entries 4.. are filled at CPL3 (paging.rs) */
    .quad pd0 + 0x0007
    .quad pd0 + 0x1007
    .quad pd0 + 0x2007
    .quad pd0 + 0x3007
    .fill 508, 8, 0
pd0:                            /* four consecutive page directories */
    .set mib2, 0
    .rept 2048
    .quad (mib2 << 21) + 0x87
    .set mib2, mib2 + 1
    .endr

    .section .data, "aw"
    .p2align 4
    .global gdt
gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff    /* 0x10 kernel data */
    .quad 0x00cff2000000ffff    /* 0x18 user data (0x1b) */
    .quad 0x00affa000000ffff    /* 0x20 user code, 64-bit (0x23) */
gdt_tss:
    .quad 0x0000890000002068    /* 0x28 TSS + I/O bitmap (base filled in at boot) */
    .quad 0
gdt_end:
    .p2align 3
    .word 0
    .word 0
    .word 0
    .global gdt_desc
gdt_desc:
    .word gdt_end - gdt - 1
    .quad gdt

    .p2align 3
    .word 0
    .word 0
    .word 0
    .global idt_desc
idt_desc:
    .word 256 * 16 - 1
    .quad idt

    .p2align 4
    .global tss
tss:
    .long 0
    .quad kstack_top            /* rsp0 */
    .quad 0, 0                  /* rsp1, rsp2 */
    .quad 0
    .quad dfstack_top           /* ist1 */
    .quad 0, 0, 0, 0, 0, 0      /* ist2..ist7 */
    .quad 0
    .word 0
    .word 0x68                  /* I/O permission bitmap right after the TSS */
iobitmap:
    .fill 8192, 1, 0            /* every port allowed (in case IOPL=3 is not honoured) */
    .byte 0xff

    .section .bss.boot, "aw", @nobits
    .p2align 12
idt:
    .skip 4096
kstack:
    .skip 16384
kstack_top:
dfstack:
    .skip 4096
dfstack_top:
    .p2align 12
ustack:
    .skip 1048576
ustack_top:
    "#
);

/// Incremented by the vector 0x40 interrupt handler (LAPIC timer probe).
#[no_mangle]
pub static IRQ_PROBE_COUNT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

extern "C" {
    /// Sets RFLAGS.IF for CPL3 (through the #UD handler).
    pub fn guest_sti();
    /// Clears RFLAGS.IF for CPL3 (through the #UD handler).
    pub fn guest_cli();
}
