//! How devices raise interrupts without knowing the hypervisor.
//!
//! The VMM implements these traits (MSI through KVM, legacy lines through irqfd).

/// One MSI message as a PCI function writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Delivers MSI messages to the guest's interrupt controller.
pub trait MsiSink: Send + Sync {
    fn deliver(&self, msg: MsiMessage) -> std::io::Result<()>;
}

/// Raises a legacy (edge) interrupt line.
pub trait LineSink: Send + Sync {
    fn trigger(&self) -> std::io::Result<()>;
}

/// A device's view of its interrupts: "signal vector N" (virtio: per queue, config).
pub trait VectorSink: Send + Sync {
    fn signal(&self, vector: u16) -> std::io::Result<()>;
}
