//! VHDX disks as block backends (adapter over the `vhdx` crate).

use std::path::Path;
use std::sync::Arc;

use devices::block::{BlockBackend, OpenError};

pub fn open(path: &Path, _read_only: bool) -> Result<Arc<dyn BlockBackend>, OpenError> {
    Err(OpenError::Format {
        path: path.display().to_string(),
        reason: "VHDX backend not wired yet".into(),
    })
}
