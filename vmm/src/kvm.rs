//! The thin layer over KVM: the rest of the VMM reads as VM logic, not ioctls.

use std::sync::Arc;

use kvm_bindings::{kvm_enable_cap, kvm_msi, kvm_userspace_memory_region, KVM_CAP_SPLIT_IRQCHIP};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use devices::interrupt::{MsiMessage, MsiSink};
use devices::legacy::IOAPIC_PINS;
use devices::virtio::GuestMemoryMmap;

use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("this host's KVM runs at most {max} vCPUs (KVM_CAP_MAX_VCPUS) and vCPU IDs below {max_id}; the VM asks for {count} with IDs up to {highest}")]
    TooManyVcpus {
        count: usize,
        highest: u8,
        max: usize,
        max_id: usize,
    },
    #[error("KVM refused to restore MSR {index:#x}")]
    MsrRestore { index: u32 },
    #[error("KVM {op} failed: {source}")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

/// The hypervisor handle of one VM.
pub struct Hypervisor {
    pub kvm: Kvm,
    pub vm: Arc<VmFd>,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is on: KVM_GET_DIRTY_LOG only reads the
    /// log, and pages are write-protected again by KVM_CLEAR_DIRTY_LOG.
    pub manual_dirty_log: bool,
}

/// `/dev/kvm`, opened on the file thread (read-write, close-on-exec, as `Kvm::new`).
fn open_kvm() -> Result<Kvm, KvmError> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::os::unix::fs::OpenOptionsExt;
    let dev = crate::file_broker::run(crate::file_broker::FileOp::OpenKvm, || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/kvm")
    })
    .map_err(|e| {
        KvmError::Open(kvm_ioctls::Error::new(
            e.raw_os_error().unwrap_or(libc::EIO),
        ))
    })?;
    // SAFETY: `dev` is an open /dev/kvm this function owns; its descriptor passes to the
    // `Kvm`, which closes it.
    Ok(unsafe { Kvm::from_raw_fd(dev.into_raw_fd()) })
}

impl Hypervisor {
    /// Creates the VM with a split irqchip: LAPICs in the kernel, the IOAPIC in user
    /// space (devices::legacy::Ioapic), no PIC and no PIT, as Cloud Hypervisor does.
    /// (A full in-kernel irqchip also costs ~7 ms to map memory and ~16 ms to destroy
    /// the VM here, in RCU grace periods; see docs/benchmarks.md.)
    pub fn new() -> Result<Self, KvmError> {
        let kvm = open_kvm()?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(KvmError::ApiVersion(v));
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::SplitIrqchip, "SPLIT_IRQCHIP"),
            (kvm_ioctls::Cap::Ioeventfd, "IOEVENTFD"),
            (kvm_ioctls::Cap::SignalMsi, "SIGNAL_MSI"),
            (kvm_ioctls::Cap::UserMemory, "USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(name));
            }
        }
        let vm = kvm.create_vm().map_err(ioctl("CREATE_VM"))?;
        vm.set_tss_address(layout::KVM_TSS_ADDRESS)
            .map_err(ioctl("SET_TSS_ADDR"))?;
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl("SET_IDENTITY_MAP_ADDR"))?;
        let split = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            args: [IOAPIC_PINS as u64, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&split)
            .map_err(ioctl("ENABLE_CAP(SPLIT_IRQCHIP)"))?;
        let manual_dirty_log = enable_manual_dirty_log(&vm);
        Ok(Self {
            kvm,
            vm: Arc::new(vm),
            manual_dirty_log,
        })
    }

    /// Registers every region of guest memory as a KVM memory slot.
    pub fn map_memory(&self, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), KvmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|_| KvmError::MissingCap("host mapping of guest memory"))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if log_dirty {
                    kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which outlives the VM
            // (the Vm struct holds both and drops the VM first).
            unsafe { self.vm.set_user_memory_region(r) }
                .map_err(ioctl("SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Refuses, before anything is created, a vCPU set this host's KVM cannot run.
    pub fn check_vcpus(&self, apic_ids: &[u8]) -> Result<(), KvmError> {
        let max = self.kvm.get_max_vcpus();
        let max_id = self.kvm.get_max_vcpu_id();
        let highest = apic_ids.iter().copied().max().unwrap_or(0);
        if apic_ids.len() > max || usize::from(highest) >= max_id {
            return Err(KvmError::TooManyVcpus {
                count: apic_ids.len(),
                highest,
                max,
                max_id,
            });
        }
        Ok(())
    }

    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, KvmError> {
        self.vm
            .create_vcpu(u64::from(id))
            .map_err(ioctl("CREATE_VCPU"))
    }

    /// Makes guest writes to `addr` signal `fd` inside KVM (no exit to user space).
    pub fn register_ioevent(&self, fd: &EventFd, addr: u64) -> Result<(), KvmError> {
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(ioctl("IOEVENTFD"))
    }

    /// Whether KVM queues writes to registered zones in the coalesced MMIO ring.
    pub fn has_coalesced_mmio(&self) -> bool {
        self.kvm.check_extension_int(kvm_ioctls::Cap::CoalescedMmio) > 0
    }

    /// Queues guest writes to `addr..addr+len` in the coalesced MMIO ring instead of
    /// exiting (see crate::coalesced).
    pub fn register_coalesced_mmio(&self, addr: u64, len: u32) -> Result<(), KvmError> {
        self.vm
            .register_coalesced_mmio(IoEventAddress::Mmio(addr), len)
            .map_err(ioctl("REGISTER_COALESCED_MMIO"))
    }

    pub fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> Result<(), KvmError> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(ioctl("IOEVENTFD deassign"))
    }

    pub fn msi_sink(&self) -> Arc<KvmMsi> {
        Arc::new(KvmMsi {
            vm: self.vm.clone(),
        })
    }
}

/// MSI delivery through KVM_SIGNAL_MSI.
pub struct KvmMsi {
    vm: Arc<VmFd>,
}

impl MsiSink for KvmMsi {
    fn deliver(&self, msg: MsiMessage) -> std::io::Result<()> {
        let msi = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        self.vm
            .signal_msi(msi)
            .map(|_| ())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// Turns on manual dirty-log protection where KVM has it (KVM_CAP_MANUAL_DIRTY_LOG_
/// PROTECT2, without INITIALLY_SET): reading the log then no longer write-protects
/// every dirty page at once under KVM's MMU lock; the reader clears what it took
/// (`live::dirty`). Returns whether it is on.
fn enable_manual_dirty_log(vm: &VmFd) -> bool {
    use kvm_bindings::{KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE};
    let supported = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if supported < 0 || (supported as u64) & u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) == 0 {
        return false;
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
        ..Default::default()
    };
    match vm.enable_cap(&cap) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "manual dirty-log protection not enabled");
            false
        }
    }
}
