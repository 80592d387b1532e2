//! The ioctl request numbers `vireo` makes, by what they act on. A filter allows
//! `ioctl` only with one of the numbers its thread kind needs (compared on the 32-bit
//! request argument, as the kernel reads it); any other request ends the process.
//!
//! The list was made from the code (kvm-ioctls calls, net/src/tap.rs,
//! vmm/src/live/dirty.rs) and checked against every request a `vireo` made during the
//! whole e2e suite (`perf record -e syscalls:sys_enter_ioctl`).

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clock_data, kvm_coalesced_mmio_zone, kvm_cpuid2, kvm_debugregs,
    kvm_dirty_log, kvm_enable_cap, kvm_fpu, kvm_ioeventfd, kvm_lapic_state, kvm_mp_state, kvm_msi,
    kvm_msr_list, kvm_msrs, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, KVMIO,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

const fn size<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}
const fn kvm_io(nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, KVMIO, nr, 0) as u64
}
const fn kvm_ior(nr: u32, size: u32) -> u64 {
    ioctl_expr(_IOC_READ, KVMIO, nr, size) as u64
}
const fn kvm_iow(nr: u32, size: u32) -> u64 {
    ioctl_expr(_IOC_WRITE, KVMIO, nr, size) as u64
}
const fn kvm_iowr(nr: u32, size: u32) -> u64 {
    ioctl_expr(_IOC_READ | _IOC_WRITE, KVMIO, nr, size) as u64
}
/// On /proc/self/pagemap: which pages of guest RAM hold anything (migration's round 0,
/// `live::dirty::populated_pages`).
pub const PAGEMAP_SCAN: u64 = crate::live::dirty::scan::PAGEMAP_SCAN;

/// `'T'`: the TUN/TAP driver's ioctl type.
const TUNTAP: u32 = 0x54;
const fn tun_iow_int(nr: u32) -> u64 {
    ioctl_expr(_IOC_WRITE, TUNTAP, nr, size::<libc::c_int>()) as u64
}

pub const KVM_RUN: u64 = kvm_io(0x80);
pub const KVM_GET_REGS: u64 = kvm_ior(0x81, size::<kvm_regs>());
pub const KVM_SIGNAL_MSI: u64 = kvm_iow(0xa5, size::<kvm_msi>());
pub const KVM_CREATE_VM: u64 = kvm_io(0x01);

/// On /dev/kvm: the API version, capabilities, CPUID and MSRs of this host, a new VM.
pub const KVM_SYSTEM: [u64; 6] = [
    kvm_io(0x00), // KVM_GET_API_VERSION
    KVM_CREATE_VM,
    kvm_iowr(0x02, size::<kvm_msr_list>()), // KVM_GET_MSR_INDEX_LIST
    kvm_io(0x03),                           // KVM_CHECK_EXTENSION
    kvm_io(0x04),                           // KVM_GET_VCPU_MMAP_SIZE
    kvm_iowr(0x05, size::<kvm_cpuid2>()),   // KVM_GET_SUPPORTED_CPUID
];

/// On a VM: building it (vCPUs, memory, ioeventfds, coalesced MMIO), its clock
/// (snapshot, restore, migration), the dirty log (migration), MSIs (devices).
pub const KVM_VM: [u64; 12] = [
    kvm_io(0x41),                                         // KVM_CREATE_VCPU
    kvm_iow(0x42, size::<kvm_dirty_log>()),               // KVM_GET_DIRTY_LOG
    kvm_iow(0x46, size::<kvm_userspace_memory_region>()), // KVM_SET_USER_MEMORY_REGION
    kvm_io(0x47),                                         // KVM_SET_TSS_ADDR
    kvm_iow(0x48, size::<u64>()),                         // KVM_SET_IDENTITY_MAP_ADDR
    kvm_iow(0x67, size::<kvm_coalesced_mmio_zone>()),     // KVM_REGISTER_COALESCED_MMIO
    kvm_iow(0x79, size::<kvm_ioeventfd>()),               // KVM_IOEVENTFD
    kvm_iow(0x7b, size::<kvm_clock_data>()),              // KVM_SET_CLOCK
    kvm_ior(0x7c, size::<kvm_clock_data>()),              // KVM_GET_CLOCK
    kvm_iow(0xa3, size::<kvm_enable_cap>()),              // KVM_ENABLE_CAP
    KVM_SIGNAL_MSI,                                       // KVM_SIGNAL_MSI
    kvm_iowr(0xc0, size::<kvm_clear_dirty_log>()),        // KVM_CLEAR_DIRTY_LOG
];

/// On a vCPU, reading its state: what a paused vCPU thread does for a snapshot or a
/// migration.
pub const KVM_VCPU_SAVE: [u64; 8] = [
    kvm_ior(0x83, size::<kvm_sregs>()),       // KVM_GET_SREGS
    kvm_iowr(0x88, size::<kvm_msrs>()),       // KVM_GET_MSRS
    kvm_ior(0x8e, size::<kvm_lapic_state>()), // KVM_GET_LAPIC
    kvm_ior(0x98, size::<kvm_mp_state>()),    // KVM_GET_MP_STATE
    kvm_ior(0x9f, size::<kvm_vcpu_events>()), // KVM_GET_VCPU_EVENTS
    kvm_ior(0xa1, size::<kvm_debugregs>()),   // KVM_GET_DEBUGREGS
    kvm_ior(0xa4, size::<kvm_xsave>()),       // KVM_GET_XSAVE
    kvm_ior(0xa6, size::<kvm_xcrs>()),        // KVM_GET_XCRS
];

/// On a vCPU, setting it up or restoring it (boot, restore, migration).
pub const KVM_VCPU_SETUP: [u64; 12] = [
    kvm_iow(0x82, size::<kvm_regs>()),        // KVM_SET_REGS
    kvm_iow(0x84, size::<kvm_sregs>()),       // KVM_SET_SREGS
    kvm_iow(0x89, size::<kvm_msrs>()),        // KVM_SET_MSRS
    kvm_iow(0x8d, size::<kvm_fpu>()),         // KVM_SET_FPU
    kvm_iow(0x8f, size::<kvm_lapic_state>()), // KVM_SET_LAPIC
    kvm_iow(0x90, size::<kvm_cpuid2>()),      // KVM_SET_CPUID2
    kvm_iow(0x99, size::<kvm_mp_state>()),    // KVM_SET_MP_STATE
    kvm_iow(0xa0, size::<kvm_vcpu_events>()), // KVM_SET_VCPU_EVENTS
    kvm_iow(0xa2, size::<kvm_debugregs>()),   // KVM_SET_DEBUGREGS
    kvm_io(0xa3),                             // KVM_GET_TSC_KHZ
    kvm_iow(0xa5, size::<kvm_xsave>()),       // KVM_SET_XSAVE
    kvm_iow(0xa7, size::<kvm_xcrs>()),        // KVM_SET_XCRS
];

/// A tap (net/src/tap.rs): attach, offloads, header size; and bringing its link up
/// on a socket.
pub const TAP: [u64; 5] = [
    tun_iow_int(202),                                                   // TUNSETIFF
    ioctl_expr(_IOC_WRITE, TUNTAP, 208, size::<libc::c_uint>()) as u64, // TUNSETOFFLOAD
    tun_iow_int(216),                                                   // TUNSETVNETHDRSZ
    libc::SIOCGIFFLAGS,
    libc::SIOCSIFFLAGS,
];

/// Terminals (is it one, its size: std and tracing ask) and non-blocking sockets.
pub const TCGETS: u64 = libc::TCGETS;
pub const TIOCGWINSZ: u64 = libc::TIOCGWINSZ;
pub const FIONBIO: u64 = libc::FIONBIO;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computed_numbers_match_the_kernel_headers() {
        // From <linux/kvm.h>, <linux/if_tun.h> and <asm-generic/ioctls.h> on x86_64,
        // and what the kernel saw `vireo` make (perf, the e2e suite).
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_SIGNAL_MSI, 0x4020_aea5);
        assert_eq!(
            KVM_SYSTEM,
            [0xae00, 0xae01, 0xc004_ae02, 0xae03, 0xae04, 0xc008_ae05]
        );
        assert_eq!(KVM_VM[2], 0x4020_ae46); // KVM_SET_USER_MEMORY_REGION
        assert_eq!(KVM_VM[9], 0x4068_aea3); // KVM_ENABLE_CAP
        assert_eq!(KVM_VM[11], 0xc018_aec0); // KVM_CLEAR_DIRTY_LOG
        assert_eq!(KVM_VCPU_SAVE[0], 0x8138_ae83); // KVM_GET_SREGS
        assert_eq!(KVM_VCPU_SAVE[1], 0xc008_ae88); // KVM_GET_MSRS
        assert_eq!(KVM_VCPU_SAVE[6], 0x9000_aea4); // KVM_GET_XSAVE
        assert_eq!(KVM_VCPU_SETUP[3], 0x41a0_ae8d); // KVM_SET_FPU
        assert_eq!(KVM_VCPU_SETUP[10], 0x5000_aea5); // KVM_SET_XSAVE
        assert_eq!(TAP, [0x4004_54ca, 0x4004_54d0, 0x4004_54d8, 0x8913, 0x8914]);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610); // <linux/fs.h>, struct pm_scan_arg: 96 bytes
    }
}
