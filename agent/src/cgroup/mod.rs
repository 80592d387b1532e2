//! Placement of the VMMs in cgroups (direct launcher; the systemd launcher leaves it to
//! systemd and `vireo.slice`), on whichever hierarchy the host mounts at
//! /sys/fs/cgroup:
//!
//! - cgroup v1 ([`v1`]): CPU isolation with the `cpu` controller (cpu.shares), threads
//!   placed one by one (boot / vmm / vms/NAME);
//! - cgroup v2 ([`v2`], the unified hierarchy of Debian 12, Ubuntu 22.04+, RHEL 9):
//!   under a delegated subtree, vireod in a leaf of its own and each VMM, from exec
//!   on, in `vms/NAME` with cpu.weight, memory.max and pids.max.
//!
//! Which one is used: `--cgroup-version auto` (the default) asks statfs whether
//! /sys/fs/cgroup is a cgroup2 file system. Wherever placement cannot be set up, it is
//! off with one warning and nothing fails.

mod v1;
mod v2;

use std::ffi::CString;
use std::path::{Path, PathBuf};

pub use v1::{cpu_cgroup_of, RT_RUNTIME_US};
pub use v2::{memory_max_for, VMM_MEMORY_OVERHEAD};

/// The default relative weight of a VM (as Hyper-V's).
pub const DEFAULT_WEIGHT: u32 = api::host::DEFAULT_CPU_WEIGHT;
/// The allowed range of a VM's relative weight.
pub const WEIGHTS: std::ops::RangeInclusive<u32> = api::host::CPU_WEIGHTS;
/// Where the host mounts its cgroup hierarchy (or hierarchies).
pub const CGROUP_MOUNT: &str = "/sys/fs/cgroup";

/// Which cgroup hierarchy to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Version {
    /// v2 when /sys/fs/cgroup is a cgroup2 file system, else v1.
    #[default]
    Auto,
    V1,
    V2,
}

impl std::str::FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "v1" | "1" => Ok(Self::V1),
            "v2" | "2" => Ok(Self::V2),
            _ => Err(format!("expected auto, v1 or v2, got {s:?}")),
        }
    }
}

/// How to lay out the hierarchy.
#[derive(Clone, Debug)]
pub struct CgroupConfig {
    /// Placement at all (false: `--no-cpu-cgroups`).
    pub enabled: bool,
    pub version: Version,
    /// v1: the `vireo` directory in the cpu hierarchy.
    pub v1_root: Option<PathBuf>,
    /// v2: the delegated subtree; None: vireod's own cgroup (or
    /// `/sys/fs/cgroup/vireo` when vireod runs in the root cgroup).
    pub v2_root: Option<PathBuf>,
    /// cpu.shares of the root itself (all VMs together against the rest of the host);
    /// None: as created (1024, like one nice-0 process). v1 only.
    pub root_shares: Option<u64>,
    pub boot_shares: u64,
    pub vmm_shares: u64,
    pub vms_shares: u64,
    /// v2: pids.max of each VM's cgroup (threads count).
    pub vm_pids_max: u64,
}

impl CgroupConfig {
    /// vireod's defaults, for tests.
    #[cfg(test)]
    pub fn test_default() -> Self {
        Self {
            enabled: true,
            version: Version::Auto,
            v1_root: None,
            v2_root: None,
            root_shares: None,
            boot_shares: 4096,
            vmm_shares: 2048,
            vms_shares: 256,
            vm_pids_max: 1024,
        }
    }
}

/// Threads that do the guest's work (named by the VMM).
pub fn is_guest_thread(comm: &str) -> bool {
    comm.starts_with("vireo-vcpu")
        || comm.starts_with("vireo-blk")
        || comm == "vireo-console"
        || comm == "vireo-rng"
}

/// cpu.shares for a relative weight: 100 → 1024, linear, at least 2 (the kernel's
/// minimum).
pub fn shares_for_weight(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / u64::from(DEFAULT_WEIGHT)).max(2)
}

/// cgroup v2 cpu.weight for v1 cpu.shares, as systemd maps CPUShares= to CPUWeight=:
/// weight = shares × 100 / 1024, within 1..=10000.
pub fn cpu_weight_for_shares(shares: u64) -> u64 {
    (shares.saturating_mul(100) / 1024).clamp(1, 10_000)
}

/// True when `path` is the root of a mounted cgroup2 file system.
pub fn is_cgroup2(path: &Path) -> bool {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

/// The hierarchy in use (or nothing, when placement is off or impossible).
#[derive(Clone, Debug)]
pub struct CpuCgroups {
    tree: Tree,
}

#[derive(Clone, Debug)]
enum Tree {
    Off,
    V1(v1::V1),
    V2(v2::V2),
}

impl CpuCgroups {
    /// No placement.
    pub fn off() -> Self {
        Self { tree: Tree::Off }
    }

    /// Detects the hierarchy and sets it up; any failure: a warning and no placement.
    pub fn setup(cfg: &CgroupConfig) -> Self {
        if !cfg.enabled {
            return Self::off();
        }
        let v2 = match cfg.version {
            Version::Auto => is_cgroup2(Path::new(CGROUP_MOUNT)),
            Version::V1 => false,
            Version::V2 => true,
        };
        let tree = if v2 {
            v2::V2::setup(Path::new(CGROUP_MOUNT), cfg).map_or(Tree::Off, Tree::V2)
        } else {
            let t = v1::V1::setup(cfg);
            if t.enabled() {
                Tree::V1(t)
            } else {
                Tree::Off
            }
        };
        Self { tree }
    }

    pub fn enabled(&self) -> bool {
        !matches!(self.tree, Tree::Off)
    }

    /// "v1" or "v2" (None: off).
    pub fn version(&self) -> Option<&'static str> {
        match &self.tree {
            Tree::Off => None,
            Tree::V1(_) => Some("v1"),
            Tree::V2(_) => Some("v2"),
        }
    }

    /// The root of the VMMs' hierarchy.
    pub fn root(&self) -> Option<&Path> {
        match &self.tree {
            Tree::Off => None,
            Tree::V1(t) => t.root(),
            Tree::V2(t) => Some(t.root()),
        }
    }

    /// The `cgroup.procs` a new VMM for VM `name` joins before it executes `vireo`
    /// (v1: `boot`; v2: the VM's own cgroup, made now with its limits; `memory`: the
    /// guest's RAM, when known).
    pub fn spawn_procs(&self, name: &str, memory: Option<u64>) -> Option<CString> {
        match &self.tree {
            Tree::Off => None,
            Tree::V1(t) => t.boot_procs().cloned(),
            Tree::V2(t) => t.prepare_vm(name, memory),
        }
    }

    /// The cgroup directory of VM `name`.
    pub fn vm_dir(&self, name: &str) -> Option<PathBuf> {
        match &self.tree {
            Tree::Off => None,
            Tree::V1(t) => t.vm_dir(name),
            Tree::V2(t) => Some(t.vm_dir(name)),
        }
    }

    /// A VMM whose VM is still to arrive (re-adopted receiver): the boot share.
    pub fn place_booting(&self, pid: i32) {
        match &self.tree {
            Tree::Off => {}
            Tree::V1(t) => t.place_booting(pid),
            Tree::V2(t) => t.place_booting(pid),
        }
    }

    /// The VM runs: the VM's weight. Returns how many vCPU threads were placed (v2
    /// moves whole processes: every one; None: placement is off or failed).
    pub fn place_running(&self, name: &str, pid: i32, weight: u32) -> Option<usize> {
        match &self.tree {
            Tree::Off => None,
            Tree::V1(t) => t.place_running(name, pid, weight),
            Tree::V2(t) => t.place_running(name, pid, weight).then_some(usize::MAX),
        }
    }

    /// The VM's guest work at the boot share for a moment (a pause or a stop waits
    /// for every vCPU to leave the guest).
    pub fn boost(&self, name: &str, pid: i32) {
        match &self.tree {
            Tree::Off => {}
            Tree::V1(t) => t.boost(name, pid),
            Tree::V2(t) => t.boost(name),
        }
    }

    /// Back to the VM's own weight after [`CpuCgroups::boost`].
    pub fn unboost(&self, name: &str, pid: i32) {
        match &self.tree {
            Tree::Off => {}
            Tree::V1(t) => t.unboost(name, pid),
            Tree::V2(t) => t.unboost(name),
        }
    }

    /// Removes a VM's cgroup once its VMM has ended; false while a task is still in
    /// it (try again later).
    pub fn remove(&self, name: &str) -> bool {
        match &self.tree {
            Tree::Off => true,
            Tree::V1(t) => t.remove(name),
            Tree::V2(t) => t.remove(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_map_to_weights_as_systemd_maps_them() {
        // systemd: CPUShares=1024 ↔ CPUWeight=100, linear, clamped to 1..=10000.
        assert_eq!(cpu_weight_for_shares(1024), 100);
        assert_eq!(cpu_weight_for_shares(4096), 400);
        assert_eq!(cpu_weight_for_shares(256), 25);
        assert_eq!(cpu_weight_for_shares(2), 1);
        assert_eq!(cpu_weight_for_shares(262_144), 10_000);
        // A VM's relative weight goes through its shares: the same number again.
        for w in [1, 50, 100, 300, 10_000] {
            assert_eq!(cpu_weight_for_shares(shares_for_weight(w)), u64::from(w));
        }
    }

    #[test]
    fn versions_parse() {
        assert_eq!("auto".parse::<Version>(), Ok(Version::Auto));
        assert_eq!("v2".parse::<Version>(), Ok(Version::V2));
        assert!("v3".parse::<Version>().is_err());
    }

    #[test]
    fn a_tmpfs_is_no_cgroup2_and_placement_off_does_nothing() {
        assert!(!is_cgroup2(Path::new("/tmp")));
        let c = CpuCgroups::setup(&CgroupConfig {
            enabled: false,
            ..CgroupConfig::test_default()
        });
        assert!(!c.enabled());
        assert!(c.spawn_procs("x", Some(1 << 30)).is_none());
        assert!(c.remove("x"));
    }
}
