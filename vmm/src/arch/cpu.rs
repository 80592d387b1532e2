//! vCPU state at power-on for a PVH entry: 32-bit protected mode, flat segments,
//! paging off, EBX pointing at the start info (PVH boot protocol, Xen's pvh.html).

use api::config::CpuTopology;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vireo_util::cpu_features::CpuFeatures;
use vm_memory::{Bytes, GuestAddress};

use devices::virtio::GuestMemoryMmap;

use crate::kvm::KvmError;
use crate::layout;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// GDT entries (flat 4 GiB): null, null, code32 (0x10), data (0x18), TSS (0x20),
/// code64 (0x28).
const GDT: [u64; 6] = [
    0,
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
    gdt_entry(0xa09b, 0, 0xfffff),
];
const CODE64_SELECTOR: u16 = 0x28;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
/// Stack for the Linux 64-bit entry (below the zero page, as Firecracker does).
const BOOT_STACK: u64 = 0x8ff0;
const CODE_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x20;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

/// Hypervisor leaf with the TSC and LAPIC timer frequencies in kHz (the leaf VMware
/// defined and Linux, QEMU and Cloud Hypervisor use): guests need no PIT to calibrate.
const CPUID_TSC_LEAF: u32 = 0x4000_0010;
/// KVM's LAPIC timer counts at 1 GHz.
const LAPIC_TIMER_KHZ: u32 = 1_000_000;

/// The feature leaves of the CPUID this host gives vCPUs (registers that hold no
/// feature bits zeroed: `CpuidLeaf::feature_part`), masked to `features` when the VM
/// has a processor compatibility set.
pub fn feature_leaves(
    kvm: &Kvm,
    features: Option<&CpuFeatures>,
) -> Result<Vec<migration::protocol::CpuidLeaf>, KvmError> {
    let mut entries = supported(kvm)?;
    mask(&mut entries, features);
    Ok(vireo_util::cpu_features::feature_leaves_of(&entries))
}

fn supported(kvm: &Kvm) -> Result<Vec<kvm_cpuid_entry2>, KvmError> {
    Ok(kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("GET_SUPPORTED_CPUID"))?
        .as_slice()
        .to_vec())
}

/// Masks every feature leaf (and the XSAVE components of leaf 0xd.0) to `features`.
fn mask(entries: &mut [kvm_cpuid_entry2], features: Option<&CpuFeatures>) {
    let Some(f) = features else { return };
    for e in entries.iter_mut() {
        let mut regs = [e.eax, e.ebx, e.ecx, e.edx];
        f.mask_entry(e.function, e.index, &mut regs);
        [e.eax, e.ebx, e.ecx, e.edx] = regs;
    }
}

/// The CPUID a vCPU sees: KVM's supported set (masked to the VM's `features`, if
/// any), with this vCPU's APIC ID, its place in the topology (leaves 1, 4, 0xB, 0x1F,
/// 0x8000_0008), the hypervisor bit and (when known) the TSC frequency leaf.
pub fn cpuid_for(
    kvm: &Kvm,
    apic: u8,
    topology: &CpuTopology,
    features: Option<&CpuFeatures>,
    tsc_khz: Option<u32>,
) -> Result<CpuId, KvmError> {
    let mut entries = supported(kvm)?;
    mask(&mut entries, features);
    if let Some(khz) = tsc_khz {
        let mut has_leaf = false;
        for e in entries.iter_mut() {
            if e.function == 0x4000_0000 {
                e.eax = e.eax.max(CPUID_TSC_LEAF);
            }
            has_leaf |= e.function == CPUID_TSC_LEAF;
        }
        if !has_leaf {
            entries.push(kvm_cpuid_entry2 {
                function: CPUID_TSC_LEAF,
                eax: khz,
                ebx: LAPIC_TIMER_KHZ,
                ..Default::default()
            });
        }
    }
    apply_topology(&mut entries, apic, topology);
    CpuId::from_entries(&entries).map_err(|_| KvmError::MissingCap("CPUID table size"))
}

/// Leaf types of CPUID 0xB/0x1F's ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;
const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

/// Writes the topology into the CPUID entries: what Linux and the test guest read to
/// learn which logical CPUs share a core and a package.
fn apply_topology(entries: &mut Vec<kvm_cpuid_entry2>, apic: u8, t: &CpuTopology) {
    let apic = u32::from(apic);
    let (thread_bits, package_bits) = (t.thread_bits(), t.package_bits());
    let per_package = u32::from(t.cores) * u32::from(t.threads);
    let has_1f = entries.iter().any(|e| e.function == 0x1f);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC ID, [23:16] addressable IDs per package; EDX.HTT
                // says that field is valid; ECX[31] hypervisor present.
                let ids = (1u32 << package_bits).min(255);
                e.ebx = (e.ebx & 0x0000_ffff) | apic << 24 | ids << 16;
                e.edx |= 1 << 28;
                e.ecx |= 1 << 31;
            }
            4 => {
                // EAX[31:26]: addressable core IDs per package - 1; [25:14]: IDs sharing
                // this cache - 1 (L1/L2 per core, L3 and up per package).
                let cores = (1u32 << (package_bits - thread_bits)) - 1;
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 {
                    (1u32 << package_bits) - 1
                } else {
                    (1u32 << thread_bits) - 1
                };
                e.eax = (e.eax & 0x3fff) | (cores & 0x3f) << 26 | (sharing & 0xfff) << 14;
            }
            0x8000_0008 => {
                // ECX[7:0] logical CPUs per package - 1, [15:12] APIC ID bits for them.
                e.ecx = (e.ecx & !0xf0ff) | (per_package - 1).min(255) | (package_bits & 0xf) << 12;
            }
            _ => {}
        }
    }
    entries.retain(|e| e.function != 0xb && e.function != 0x1f);
    let levels = [
        (thread_bits, u32::from(t.threads), LEVEL_SMT),
        (package_bits, per_package, LEVEL_CORE),
    ];
    for function in [0xb, 0x1f] {
        if function == 0x1f && !has_1f {
            continue;
        }
        for index in 0..=levels.len() as u32 {
            let (eax, ebx, ecx) = match levels.get(index as usize) {
                Some(&(shift, count, kind)) => (shift, count, kind << 8 | index),
                // The terminating subleaf: level type 0 ("invalid").
                None => (0, 0, index),
            };
            entries.push(kvm_cpuid_entry2 {
                function,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax,
                ebx,
                ecx,
                edx: apic,
                ..Default::default()
            });
        }
    }
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, EBX = start info.
    Pvh32 { entry: u64 },
    /// Linux 64-bit boot protocol: long mode with identity paging, RSI = zero page.
    Long64 { entry: u64, cr3: u64 },
}

/// Puts the vCPU with APIC ID `cpu` in its power-on state; the boot vCPU (APIC ID 0)
/// starts at `boot`.
pub fn setup_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    cpu: u8,
    topology: &CpuTopology,
    features: Option<&CpuFeatures>,
    boot: BootEntry,
) -> Result<(), KvmError> {
    let tsc_khz = vcpu.get_tsc_khz().ok().filter(|&k| k > 0);
    vcpu.set_cpuid2(&cpuid_for(kvm, cpu, topology, features, tsc_khz)?)
        .map_err(ioctl("SET_CPUID2"))?;

    let msrs = Msrs::from_entries(&[
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ])
    .map_err(|_| KvmError::MissingCap("MSR list"))?;
    vcpu.set_msrs(&msrs).map_err(ioctl("SET_MSRS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl("SET_FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(ioctl("GET_LAPIC"))?;
    set_lapic_lvt(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lapic_lvt(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(ioctl("SET_LAPIC"))?;

    if cpu != 0 {
        // Application processors wait for INIT/SIPI, as on hardware.
        return Ok(());
    }

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(ioctl("GET_SREGS"))?;
    let (entry, long_mode) = match boot {
        BootEntry::Pvh32 { entry } => (entry, None),
        BootEntry::Long64 { entry, cr3 } => (entry, Some(cr3)),
    };
    let code = match long_mode {
        None => segment_from_gdt(GDT[2], CODE_SELECTOR),
        Some(_) => segment_from_gdt(GDT[5], CODE64_SELECTOR),
    };
    let data = segment_from_gdt(GDT[3], DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(GDT[4], TSS_SELECTOR);
    sregs.gdt.base = layout::BOOT_GDT;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if let Some(cr3) = long_mode {
        sregs.cr0 |= X86_CR0_PG;
        sregs.cr3 = cr3;
        sregs.cr4 = X86_CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
    }
    vcpu.set_sregs(&sregs).map_err(ioctl("SET_SREGS"))?;

    let regs = match long_mode {
        None => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: layout::PVH_START_INFO,
            ..Default::default()
        },
        Some(_) => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rsi: layout::ZERO_PAGE,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs).map_err(ioctl("SET_REGS"))?;
    Ok(())
}

/// Writes the boot GDT into guest memory (PVH leaves GDTR to the VMM's choice).
pub fn write_boot_gdt(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT + (i * 8) as u64))?;
    }
    Ok(())
}

fn msr(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

fn set_lapic_lvt(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = u32::from_le_bytes(b);
    let v = (v & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn topology_leaves_describe_sockets_cores_and_threads() {
        let t = CpuTopology {
            sockets: 2,
            cores: 3,
            threads: 4,
        };
        let mut e = vec![
            entry(1, 0),
            entry(4, 0),
            entry(0xb, 0),
            entry(0x1f, 0),
            entry(0x8000_0008, 0),
        ];
        e[1].eax = 3 << 5; // an L3 cache
        apply_topology(&mut e, 27, &t);
        let find = |f: u32, i: u32| *e.iter().find(|x| x.function == f && x.index == i).unwrap();
        assert_eq!(find(1, 0).ebx >> 24, 27);
        assert_eq!((find(1, 0).ebx >> 16) & 0xff, 16);
        for f in [0xb, 0x1f] {
            let smt = find(f, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (2, 4, 1 << 8, 27));
            let core = find(f, 1);
            assert_eq!(
                (core.eax, core.ebx, core.ecx, core.edx),
                (4, 12, 2 << 8 | 1, 27)
            );
            let end = find(f, 2);
            assert_eq!((end.eax, end.ebx, end.ecx >> 8), (0, 0, 0));
            assert_eq!(smt.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        }
        // L3 shared by the package's 16 IDs; 4 core IDs per package.
        assert_eq!(find(4, 0).eax >> 26, 3);
        assert_eq!((find(4, 0).eax >> 14) & 0xfff, 15);
        assert_eq!(find(0x8000_0008, 0).ecx & 0xff, 11);
        assert_eq!((find(0x8000_0008, 0).ecx >> 12) & 0xf, 4);
        // No 0x1F from the host: none added.
        let mut e = vec![entry(1, 0), entry(0xb, 0)];
        apply_topology(&mut e, 0, &t);
        assert!(e.iter().all(|x| x.function != 0x1f));
        assert_eq!(e.iter().filter(|x| x.function == 0xb).count(), 3);
    }
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let cs = segment_from_gdt(GDT[2], CODE_SELECTOR);
        assert_eq!(
            (cs.base, cs.limit, cs.type_, cs.db, cs.l, cs.g),
            (0, 0xffff_ffff, 0xb, 1, 0, 1)
        );
        let ds = segment_from_gdt(GDT[3], DATA_SELECTOR);
        assert_eq!((ds.type_, ds.present, ds.s), (0x3, 1, 1));
        let tr = segment_from_gdt(GDT[4], TSS_SELECTOR);
        assert_eq!((tr.type_, tr.limit, tr.s), (0xb, 0x67, 0));
        let cs64 = segment_from_gdt(GDT[5], CODE64_SELECTOR);
        assert_eq!((cs64.l, cs64.db, cs64.type_), (1, 0, 0xb));
    }
}
