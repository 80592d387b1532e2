//! The VHDX engine's integration tests, one module per subject: hand-built and hostile
//! images, differencing chains, crash consistency, O_DIRECT, and interoperation with
//! qemu-img. One test binary for all of them: the crate is linked once.

mod common;

mod badinput;
mod chain;
mod crash;
mod direct;
mod handbuilt;
mod hostile;
mod interop;
