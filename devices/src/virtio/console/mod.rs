//! virtio-console (virtio 1.2, section 5.3), single port: guest output to a file or
//! the terminal, terminal input to the guest.

mod device;
mod worker;

pub use device::{Console, ConsoleInput, ConsoleOutput};
