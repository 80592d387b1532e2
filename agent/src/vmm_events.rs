//! The VMMs' own events (`GET vm.events`, see vmm/src/events.rs), read on every
//! metering round, become vireod's events: a disk that stopped its VM (on_error=stop,
//! e.g. ENOSPC) is a `disk-stopped` event with the VM's name and, as detail, a JSON
//! object with the disk's id, the operation, the errno and its text; the VM's state
//! becomes `Paused` with the same reason. Only events newer than the last one seen
//! from the same VMM process count.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::client;
use crate::supervisor::Supervisor;

/// One entry of `vm.events`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct VmmEvent {
    pub seq: u64,
    pub event: String,
    #[serde(default)]
    pub disk: String,
    #[serde(default)]
    pub op: String,
    #[serde(default)]
    pub errno: i32,
    #[serde(default)]
    pub error: String,
}

impl VmmEvent {
    /// The detail of vireod's event: `{"disk":..,"op":..,"errno":..,"error":..}`.
    pub fn detail(&self) -> String {
        serde_json::json!({
            "disk": self.disk,
            "op": self.op,
            "errno": self.errno,
            "error": self.error,
        })
        .to_string()
    }
}

/// Reads VM `name`'s VMM events and hands the new ones to the supervisor.
pub async fn poll(sup: &Arc<Supervisor>, name: &str, pid: i32, socket: &Path) {
    let Ok(r) = client::request(
        socket,
        "GET",
        "/api/v1/vm.events",
        None,
        Duration::from_secs(2),
    )
    .await
    else {
        return;
    };
    if !r.ok() {
        return;
    }
    let Some(list) = r
        .json()
        .and_then(|v| serde_json::from_value::<Vec<VmmEvent>>(v).ok())
    else {
        return;
    };
    for e in sup.new_vmm_events(name, pid, list) {
        if e.event == "disk-stopped" {
            sup.disk_stopped(name, &e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_detail_names_disk_operation_and_errno() {
        let e: VmmEvent = serde_json::from_str(
            r#"{"seq":1,"at_ms":5,"event":"disk-stopped","disk":"disk0","op":"write","errno":28,"error":"No space left on device (os error 28)"}"#,
        )
        .unwrap();
        let d: serde_json::Value = serde_json::from_str(&e.detail()).unwrap();
        assert_eq!(d["disk"], "disk0");
        assert_eq!(d["op"], "write");
        assert_eq!(d["errno"], 28);
    }
}
