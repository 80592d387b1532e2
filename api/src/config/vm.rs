//! The whole VM description ([`VmConfig`]) and its boot payload, with the helpers
//! that fill in defaults the VMM settles once (MACs, device ids).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{
    BalloonConfig, CpusConfig, DiskConfig, MemoryConfig, NetConfig, OutputConfig, UserDeviceConfig,
};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(
    expecting = "payload: an object with kernel (a path), and optionally cmdline and initramfs"
)]
pub struct PayloadConfig {
    pub kernel: PathBuf,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(
    expecting = "a VM configuration: an object with payload, and optionally cpus, memory, disks, nets, serial, console, ..."
)]
pub struct VmConfig {
    pub payload: PayloadConfig,
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default = "serial_default")]
    pub serial: OutputConfig,
    /// virtio-console: off (no device), null, tty (stdout, input from stdin) or file.
    #[serde(default)]
    pub console: OutputConfig,
    /// Most bytes a serial output file holds before it rotates to `PATH.1`
    /// (default [`DEFAULT_OUTPUT_MAX_SIZE`](super::DEFAULT_OUTPUT_MAX_SIZE)).
    #[serde(
        default,
        deserialize_with = "crate::json::size::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub serial_max_size: Option<u64>,
    /// The same for the console's output file.
    #[serde(
        default,
        deserialize_with = "crate::json::size::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub console_max_size: Option<u64>,
    #[serde(default)]
    pub rng: bool,
    /// A guest agent channel: the console becomes multiport and its port 1,
    /// `org.qemu.guest_agent.0`, is served by the VMM (`vm.guest-command`); a console
    /// device is added (output discarded) when `console` is off. Omitted when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guest_agent: bool,
    /// virtio-net devices, each on a tap (omitted when empty, so configurations
    /// without networking read as before).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    /// vfio-user devices (PCI functions served by other processes; omitted when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_devices: Vec<UserDeviceConfig>,
    /// A clustered VM's write lease: its disks take writes only before this deadline
    /// (see [`crate::WriteLease`]); none for a VM outside a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_lease: Option<crate::WriteLease>,
    /// Virtual NUMA nodes (SRAT/SLIT); none: one node, no SRAT.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub numa: Vec<crate::numa::NumaNode>,
    /// A virtio-balloon device; none: no balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
}

fn serial_default() -> OutputConfig {
    OutputConfig::Tty
}

impl VmConfig {
    /// Gives every network device without a MAC one from `pick` (the VMM does this
    /// once, when it creates the VM; the address then travels with the config).
    pub fn assign_missing_macs(&mut self, mut pick: impl FnMut() -> net::MacAddr) {
        for n in &mut self.nets {
            n.mac.get_or_insert_with(&mut pick);
        }
    }

    /// Every device's API id, with the defaults filled in (disk0.., net0.., user0..).
    pub fn device_ids(&self) -> Vec<String> {
        let disks = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| d.id.clone().unwrap_or_else(|| format!("disk{i}")));
        let nets = self
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| n.id.clone().unwrap_or_else(|| format!("net{i}")));
        let users = self
            .user_devices
            .iter()
            .enumerate()
            .map(|(i, u)| u.id.clone().unwrap_or_else(|| format!("user{i}")));
        disks.chain(nets).chain(users).collect()
    }
}
