//! A vCPU's whole architectural state, as KVM exposes it: what a snapshot saves and a
//! restore (or a migration destination) puts back, in the order KVM needs.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::kvm::KvmError;

/// One vCPU. MSRs are (index, value) pairs: every MSR KVM lists that reads back.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

/// The MSRs worth saving: KVM's index list (which covers the TSC, syscall MSRs, PAT,
/// kvmclock, ...), minus what reads fail on; computed once per VM.
pub fn msr_list(kvm: &Kvm) -> Result<Vec<u32>, KvmError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(ioctl("GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}

fn msr_entries(indices: &[u32]) -> Result<Msrs, KvmError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| KvmError::MissingCap("MSR list too long"))
}

/// Reads every MSR of `indices` that KVM lets us read. KVM_GET_MSRS stops at the first
/// MSR it cannot read, so the one at the stopping point is skipped and reading goes on.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, KvmError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let mut msrs = msr_entries(rest)?;
        let n = vcpu.get_msrs(&mut msrs).map_err(ioctl("GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n < rest.len() {
            tracing::trace!(
                msr = format_args!("{:#x}", rest[n]),
                "MSR not readable; skipped"
            );
            rest = &rest[n + 1..];
        } else {
            break;
        }
    }
    Ok(out)
}

impl VcpuState {
    /// Saves the state of a vCPU that is not running (paused or never started).
    pub fn save(
        id: u8,
        vcpu: &VcpuFd,
        msr_indices: &[u32],
        has_xcrs: bool,
    ) -> Result<Self, KvmError> {
        Ok(Self {
            id,
            mp_state: vcpu.get_mp_state().map_err(ioctl("GET_MP_STATE"))?,
            regs: vcpu.get_regs().map_err(ioctl("GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(ioctl("GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(ioctl("GET_XSAVE"))?,
            xcrs: if has_xcrs {
                Some(vcpu.get_xcrs().map_err(ioctl("GET_XCRS"))?)
            } else {
                None
            },
            debugregs: vcpu.get_debug_regs().map_err(ioctl("GET_DEBUGREGS"))?,
            lapic: vcpu.get_lapic().map_err(ioctl("GET_LAPIC"))?,
            msrs: read_msrs(vcpu, msr_indices)?,
            events: vcpu.get_vcpu_events().map_err(ioctl("GET_VCPU_EVENTS"))?,
        })
    }

    /// Puts the state into a new vCPU whose CPUID is already set (Firecracker's and
    /// Cloud Hypervisor's order: MSRs after the LAPIC, events last).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), KvmError> {
        vcpu.set_mp_state(self.mp_state)
            .map_err(ioctl("SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(ioctl("SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(ioctl("SET_SREGS"))?;
        // SAFETY: the buffer is a kvm_xsave that KVM_GET_XSAVE filled (or its serde
        // copy): exactly the legacy 4 KiB layout KVM_SET_XSAVE reads.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(ioctl("SET_XSAVE"))?;
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(ioctl("SET_XCRS"))?;
        }
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(ioctl("SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(ioctl("SET_LAPIC"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs =
            Msrs::from_entries(&entries).map_err(|_| KvmError::MissingCap("MSR list too long"))?;
        let n = vcpu.set_msrs(&msrs).map_err(ioctl("SET_MSRS"))?;
        if n != entries.len() {
            return Err(KvmError::MsrRestore {
                index: entries[n].index,
            });
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(ioctl("SET_VCPU_EVENTS"))?;
        Ok(())
    }
}
