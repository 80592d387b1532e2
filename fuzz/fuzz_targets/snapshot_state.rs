//! Snapshot files from a hostile directory: manifest.json, config.json and
//! state.json parsed as the VMM does on restore (`Snapshot<VmConfig,
//! SavedVm>::open`), then the configuration validated.
#![no_main]

use api::config::VmConfig;
use libfuzzer_sys::fuzz_target;
use migration::Snapshot;
use std::sync::OnceLock;
use vireo_fuzz::Input;
use vmm::vm::SavedVm;

fn dir() -> &'static std::path::Path {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| {
        tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("temp dir")
    })
    .path()
}

fuzz_target!(|data: &[u8]| {
    // Three files, each prefixed by its length (u16).
    let mut inp = Input(data);
    let d = dir();
    for name in ["manifest.json", "config.json", "state.json"] {
        let n = usize::from(inp.u16());
        std::fs::write(d.join(name), inp.bytes(n)).expect("write");
    }
    if let Ok(s) = Snapshot::<VmConfig, SavedVm>::open(d) {
        let _ = s.config.validate();
    }
    // The state file alone, as the migration State frame carries it.
    let _ = serde_json::from_slice::<SavedVm>(data);
});
