//! virtio-net (virtio 1.2, section 5.1): one receive and one transmit queue over a
//! host [`NetBackend`] (a tap). Features: VERSION_1, MAC, STATUS, MRG_RXBUF; no
//! offloads, no control queue, no multiqueue.

mod chain;
mod device;
mod worker;

#[cfg(test)]
mod tests;

pub use device::{Net, NetBackend, NetConfig, NetCounters, ReopenNet};
