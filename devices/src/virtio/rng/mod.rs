//! virtio-rng (virtio 1.2, section 5.4): entropy from the host's getrandom(2).

mod device;
mod worker;

pub use device::Rng;
