//! vfio-user devices: a PCI function emulated by another process (the server) over a
//! unix socket. The VMM is the client: it shares guest memory with the server by fd
//! (DMA_MAP), forwards BAR accesses (REGION_READ/WRITE) and turns the server's
//! interrupt eventfds into MSI-X messages. See docs/vfio.md.

mod client;
mod device;
mod irq;
mod wire;

#[cfg(test)]
mod tests;

pub use client::ClientError;
pub use device::{UserDeviceError, UserDeviceStatus, UserPciDevice};
