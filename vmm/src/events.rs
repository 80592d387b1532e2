//! What the VMM tells its manager happened without being asked (`GET vm.events`): for
//! now, a disk that stopped the VM on a host I/O error (`on_error=stop`). vireod reads
//! the list on its metering round and turns new entries into its own events (SSE).
//! Kept in memory, numbered from 1, the last [`KEEP`] only.

use std::collections::VecDeque;

use serde::Serialize;

/// How many events are kept.
pub const KEEP: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmmEvent {
    /// 1, 2, ...: a reader asks for what came after the last one it saw.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// "disk-stopped".
    pub event: &'static str,
    /// The disk's id (as in vm.counters).
    pub disk: String,
    /// "read", "write", "flush", ...
    pub op: &'static str,
    pub errno: i32,
    /// The errno's text.
    pub error: String,
}

#[derive(Debug, Default)]
pub struct EventLog {
    next: u64,
    items: VecDeque<VmmEvent>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EventLog {
    /// Records that disk `disk` stopped the VM.
    pub fn disk_stopped(&mut self, disk: &str, op: &'static str, errno: i32) {
        self.next += 1;
        if self.items.len() == KEEP {
            self.items.pop_front();
        }
        self.items.push_back(VmmEvent {
            seq: self.next,
            at_ms: now_ms(),
            event: "disk-stopped",
            disk: disk.to_string(),
            op,
            errno,
            error: std::io::Error::from_raw_os_error(errno).to_string(),
        });
    }

    /// Every kept event, oldest first.
    pub fn list(&self) -> Vec<VmmEvent> {
        self.items.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_numbered_and_only_the_last_are_kept() {
        let mut log = EventLog::default();
        for _ in 0..KEEP + 2 {
            log.disk_stopped("disk0", "write", libc::ENOSPC);
        }
        let l = log.list();
        assert_eq!(l.len(), KEEP);
        assert_eq!(l[0].seq, 3);
        assert_eq!(l.last().unwrap().seq, KEEP as u64 + 2);
        assert_eq!(l[0].event, "disk-stopped");
        assert_eq!(l[0].errno, 28);
        assert_eq!(
            l[0].error,
            std::io::Error::from_raw_os_error(28).to_string()
        );
    }
}
