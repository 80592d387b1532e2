//! REST bodies of both APIs, as their handlers take them: serde (with
//! `deny_unknown_fields`) then validation. The VMM API's request types and
//! `VmConfig`; vireod's `VmDefinition`, `MigrateRequest`, `IncomingRequest`;
//! and the `--disk/--net/--cpus/--memory` flag parsers. A body that parses
//! and validates must survive a serialise/parse round trip unchanged.
#![no_main]

use api::config::{self, VmConfig};
use api::host::{IncomingRequest, MigrateRequest, VmDefinition};
use api::{
    MigrateDiskRequest, ReceiveMigrationRequest, ResizeRequest, RestoreRequest,
    SendMigrationRequest, SnapshotRequest,
};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(v: &T) {
    let j = serde_json::to_vec(v).expect("serialise");
    let back: T = serde_json::from_slice(&j).expect("re-parse what we wrote");
    assert_eq!(&back, v, "round trip changed the value");
}

fn body<T: Serialize + DeserializeOwned + PartialEq + Debug>(b: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(b).ok()?;
    round_trip(&v);
    Some(v)
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, b)) = data.split_first() else {
        return;
    };
    match which % 10 {
        0 => {
            if let Some(c) = body::<VmConfig>(b) {
                let _ = c.validate();
            }
        }
        1 => {
            if let Some(mut d) = body::<VmDefinition>(b) {
                let _ = d.validate();
                // What vireod does with it: derive (Dynamic Memory), then check.
                if d.normalize().is_ok() {
                    let _ = d.validate();
                }
            }
        }
        2 => {
            if let Some(m) = body::<MigrateRequest>(b) {
                let _ = m.validate();
            }
        }
        3 => {
            let _ = body::<IncomingRequest>(b);
        }
        4 => {
            if let Some(r) = body::<SnapshotRequest>(b) {
                let _ = api::file_url_path(&r.destination_url);
            }
        }
        5 => {
            let _ = body::<RestoreRequest>(b);
        }
        6 => {
            let _ = body::<SendMigrationRequest>(b);
            let _ = body::<ReceiveMigrationRequest>(b);
        }
        7 => {
            let _ = body::<MigrateDiskRequest>(b);
            let _ = body::<ResizeRequest>(b);
        }
        8 => {
            if let Ok(s) = std::str::from_utf8(b) {
                if let Ok(d) = config::parse_disk(s) {
                    round_trip(&d);
                }
                if let Ok(n) = config::parse_net(s) {
                    round_trip(&n);
                }
                let _ = config::parse_cpus(s);
                let _ = config::parse_memory(s);
                let _ = config::parse_size(s);
            }
        }
        _ => {
            let _ = api::host::validate_name(&String::from_utf8_lossy(b));
        }
    }
});
