//! The cluster crate's integration tests, one module per subject (most on a real etcd
//! started by the test). One test binary for all of them: the crate is linked once.

mod bulk;
mod drain;
mod etcd;
mod history;
mod inventory;
mod model;
mod saved;
mod scale;
mod update;
