#!/usr/bin/env python3
"""Minimal KVM runner for the Vireo test guest (Python stdlib only, no device model).

Loads the guest ELF, writes a PVH hvm_start_info (+ memory map and command line) and runs
one vCPU, either at the PVH entry (32-bit protected mode, paging off: what QEMU and
linux-loader do) or at the ELF entry in 64-bit mode (--entry 64: long mode, identity-mapped
first 1 GiB, RBX = hvm_start_info). It emulates only the serial THR/LSR (0x3f8/0x3fd) and
isa-debug-exit (0xf4); other port reads return 0xff, MMIO reads 0xff.. (no PCI, no ACPI),
so it is enough for test=boot, test=fault, test=counter (no PIT: TSC freq "guess" unless
tsc_khz= is given) and test=unknown. It shows what a VMM must set up to enter the guest.

Usage: kvm-run.py [--entry pvh|64] [--mem MIB] GUEST_ELF "CMDLINE"
Exit status: the guest's debug-exit code; 125 on HLT/shutdown/internal error.
"""
import argparse
import ctypes
import fcntl
import mmap
import os
import struct
import sys
import time

KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_SET_CPUID2 = 0x4008AE90

EXIT_NAMES = {2: "IO", 5: "HLT", 6: "MMIO", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 17: "INTERNAL_ERROR"}

START_INFO = 0x6000
MEMMAP = 0x6100
CMDLINE = 0x7000
PAGE_TABLES = 0x9000  # PML4, PDPT, PD for --entry 64


def seg(base, limit, sel, typ, dpl=0, db=0, s=1, l=0, g=1, present=1):
    # struct kvm_segment: base u64, limit u32, selector u16, type, present, dpl, db, s, l,
    # g, avl, unusable, padding (u8 each)
    return struct.pack("<QIHBBBBBBBBBB", base, limit, sel, typ, present, dpl, db, s, l, g, 0, 0, 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--entry", choices=["pvh", "64"], default="pvh")
    ap.add_argument("--mem", type=int, default=256)
    ap.add_argument("elf")
    ap.add_argument("cmdline")
    a = ap.parse_args()
    t_start = time.monotonic()

    kvm = os.open("/dev/kvm", os.O_RDWR)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    size = a.mem << 20
    mem = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("<IIQQQ", 0, 0, 0, size, addr))

    # ELF: load PT_LOAD segments, find the PVH note.
    elf = open(a.elf, "rb").read()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2, "not an ELF64"
    e_entry, e_phoff = struct.unpack_from("<QQ", elf, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 54)
    pvh_entry = None
    for i in range(e_phnum):
        p_type, _, p_off, _, p_paddr, p_filesz, p_memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", elf, e_phoff + i * e_phentsize)
        if p_type == 1:
            mem[p_paddr:p_paddr + p_filesz] = elf[p_off:p_off + p_filesz]
        elif p_type == 4:
            off = p_off
            while off < p_off + p_filesz:
                namesz, descsz, ntype = struct.unpack_from("<III", elf, off)
                name_off = off + 12
                desc_off = name_off + ((namesz + 3) & ~3)
                if elf[name_off:name_off + namesz].rstrip(b"\0") == b"Xen" and ntype == 18:
                    pvh_entry = struct.unpack_from("<I", elf, desc_off)[0]
                off = desc_off + ((descsz + 3) & ~3)

    # hvm_start_info (version 1), memory map, command line.
    cmd = a.cmdline.encode() + b"\0"
    mem[CMDLINE:CMDLINE + len(cmd)] = cmd
    e820 = [(0, 0x9FC00, 1), (0x100000, size - 0x100000, 1)]
    for i, (b, l, t) in enumerate(e820):
        struct.pack_into("<QQII", mem, MEMMAP + 24 * i, b, l, t, 0)
    struct.pack_into("<IIIIQQQQII", mem, START_INFO, 0x336EC578, 1, 0, 0, 0, CMDLINE, 0,
                     MEMMAP, len(e820), 0)

    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    # CPUID: what KVM supports (long mode needs CPUID.80000001h:EDX.LM).
    n = 256
    buf = bytearray(struct.pack("<II", n, 0) + b"\0" * (40 * n))
    fcntl.ioctl(kvm, KVM_GET_SUPPORTED_CPUID, buf)
    nent = struct.unpack_from("<I", buf, 0)[0]
    fcntl.ioctl(vcpu, KVM_SET_CPUID2, bytearray(buf[:8 + 40 * nent]))
    run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
    run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    sregs = bytearray(312)
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
    if a.entry == "pvh":
        assert pvh_entry is not None, "no PVH note"
        rip = pvh_entry
        code = seg(0, 0xFFFFFFFF, 0x10, 0xB, db=1)
        data = seg(0, 0xFFFFFFFF, 0x18, 0x3, db=1)
        cr0, cr3, cr4, efer = 0x1, 0, 0, 0
    else:
        rip = e_entry
        # Identity map of the first 1 GiB with 2 MiB pages (supervisor-only, as a VMM would).
        struct.pack_into("<Q", mem, PAGE_TABLES, (PAGE_TABLES + 0x1000) | 3)
        struct.pack_into("<Q", mem, PAGE_TABLES + 0x1000, (PAGE_TABLES + 0x2000) | 3)
        for i in range(512):
            struct.pack_into("<Q", mem, PAGE_TABLES + 0x2000 + 8 * i, (i << 21) | 0x83)
        code = seg(0, 0xFFFFFFFF, 0x10, 0xB, l=1)
        data = seg(0, 0xFFFFFFFF, 0x18, 0x3, db=1)
        cr0, cr3, cr4, efer = 0x80000011, PAGE_TABLES, 0x20, 0x500
    sregs[0:24] = code
    for i in range(1, 6):  # ds es fs gs ss
        sregs[24 * i:24 * i + 24] = data
    # cr0, cr2, cr3, cr4, cr8, efer at offset 8*24 + 2*16
    struct.pack_into("<QQQQQQ", sregs, 224, cr0, 0, cr3, cr4, 0, efer)
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    regs = bytearray(144)
    # rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags
    struct.pack_into("<Q", regs, 8, START_INFO)
    struct.pack_into("<QQ", regs, 128, rip, 2)
    fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))

    out = sys.stdout.buffer
    exits = 0
    while True:
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        exits += 1
        reason = struct.unpack_from("<I", run, 8)[0]
        if reason == 2:  # IO
            direction, sz, port, count, doff = struct.unpack_from("<BBHIQ", run, 32)
            for k in range(count):
                o = doff + k * sz
                if direction == 1:  # out
                    val = int.from_bytes(run[o:o + sz], "little")
                    if port == 0x3F8:
                        out.write(bytes([val & 0xFF]))
                    elif port == 0xF4:
                        out.flush()
                        ms = (time.monotonic() - t_start) * 1000
                        print(f"kvm-run: debug-exit code={val} exits={exits} wall_ms={ms:.1f}",
                              file=sys.stderr)
                        sys.exit(val & 0xFF)
                else:
                    v = 0x60 if port == 0x3FD else 0xFF
                    run[o:o + sz] = (v * (0x01010101 if sz == 4 else 0x0101 if sz == 2 else 1)
                                     ).to_bytes(sz, "little")
        elif reason == 6:  # MMIO
            phys, = struct.unpack_from("<Q", run, 32)
            ln, is_write = struct.unpack_from("<IB", run, 48)
            if not is_write:
                run[40:40 + ln] = b"\xff" * ln
        else:
            out.flush()
            regs = bytearray(144)
            fcntl.ioctl(vcpu, KVM_GET_REGS, regs)
            rip = struct.unpack_from("<Q", regs, 128)[0]
            print(f"kvm-run: exit {EXIT_NAMES.get(reason, reason)} at rip={rip:#x}",
                  file=sys.stderr)
            sys.exit(125)


if __name__ == "__main__":
    main()
