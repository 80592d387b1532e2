//! CPU isolation of the VMMs with the cgroup v1 `cpu` controller (cpu.shares), so that
//! a host full of busy guests does not starve vireod's API or the VMs still booting:
//!
//! ```text
//! <root>              e.g. /sys/fs/cgroup/cpu/vireo (--cpu-cgroup-shares: all of it
//! │                   against the rest of the host)
//! ├── boot            VMMs from exec until their VM runs (and receivers of incoming
//! │                   migrations until the VM arrived): --boot-cpu-shares (high)
//! ├── vmm             the running VMMs' own threads — control loop, API server,
//! │                   migration — which answer vireod: --vmm-cpu-shares (high)
//! └── vms             every running VM's guest work together: --vms-cpu-shares (low)
//!     └── NAME        one VM's vCPU threads and device workers: its relative CPU
//!                     weight (Hyper-V's "relative weight", 1..=10000, default 100 →
//!                     cpu.shares 1024)
//! ```
//!
//! vireod itself stays where it was started (root cgroup, or its systemd unit): it
//! competes with the whole `vireo` group as one entity, whatever the number of VMs.
//! A new VMM joins `boot` before it executes `vireo` (the launcher writes `0` to
//! `boot/cgroup.procs` in the child); once its VM runs, vireod moves the process (all
//! threads) to `vmm` and then its guest threads (by name: `vireo-vcpu*`, `vireo-blk*`,
//! `vireo-console`, `vireo-rng`; workers started later inherit their vCPU's group) to
//! `vms/NAME` — cgroup v1 places threads one by one. So a VM's API answers at the
//! VMMs' share while its guest spins at the VM's. Where the hierarchy cannot be
//! created or written (no cgroup v1 cpu controller, not root), placement is off with
//! one warning and nothing fails.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use super::{is_guest_thread, shares_for_weight, CgroupConfig};

/// (tid, name) of every thread of `pid`.
fn threads(pid: i32) -> Vec<(i32, String)> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|t| {
            let tid: i32 = t.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            Some((tid, comm.trim().to_string()))
        })
        .collect()
}

/// The live hierarchy (or nothing, when placement is off or impossible).
#[derive(Clone, Debug)]
pub struct V1 {
    root: Option<PathBuf>,
    /// `<root>/boot/cgroup.procs` as a C string, for the launcher's pre-exec hook.
    boot_procs: Option<CString>,
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value)
}

impl V1 {
    /// No placement.
    pub fn off() -> Self {
        Self {
            root: None,
            boot_procs: None,
        }
    }

    /// Creates `<root>`, `boot` and `vms` with their shares. Any failure: a warning and
    /// no placement.
    pub fn setup(cfg: &CgroupConfig) -> Self {
        let Some(root) = &cfg.v1_root else {
            return Self::off();
        };
        let made = (|| -> Result<(), (PathBuf, std::io::Error)> {
            for (dir, shares) in [
                (root.clone(), cfg.root_shares),
                (root.join("boot"), Some(cfg.boot_shares)),
                (root.join("vmm"), Some(cfg.vmm_shares)),
                (root.join("vms"), Some(cfg.vms_shares)),
            ] {
                std::fs::create_dir_all(&dir).map_err(|e| (dir.clone(), e))?;
                let file = dir.join("cpu.shares");
                if !file.exists() {
                    return Err((
                        file,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "not a cgroup v1 cpu hierarchy",
                        ),
                    ));
                }
                if let Some(s) = shares {
                    write(&file, &s.max(2).to_string()).map_err(|e| (file, e))?;
                }
            }
            Ok(())
        })();
        match made {
            Ok(()) => {
                grant_realtime(root);
                let procs = root.join("boot/cgroup.procs");
                let c = Self {
                    boot_procs: CString::new(procs.as_os_str().as_bytes()).ok(),
                    root: Some(root.clone()),
                };
                c.sweep();
                c
            }
            Err((path, e)) => {
                warn!(
                    path = %path.display(),
                    error = %e,
                    "CPU cgroups unavailable: VMMs are not placed in cgroups (the API and new boots may be starved by busy guests)"
                );
                Self::off()
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.root.is_some()
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// `<root>/boot/cgroup.procs`, which a new VMM joins before exec.
    pub fn boot_procs(&self) -> Option<&CString> {
        self.boot_procs.as_ref()
    }

    pub fn vm_dir(&self, name: &str) -> Option<PathBuf> {
        self.root.as_ref().map(|r| r.join("vms").join(name))
    }

    /// Moves process `pid` (all its threads) to `<root>/boot`: a receiver whose VM is
    /// still to arrive, or a VMM that re-adoption found booting.
    pub fn place_booting(&self, pid: i32) {
        if let Some(r) = &self.root {
            let procs = r.join("boot/cgroup.procs");
            if let Err(e) = write(&procs, &pid.to_string()) {
                warn!(pid, path = %procs.display(), error = %e, "cannot move VMM into the boot cgroup");
            }
        }
    }

    /// The VM runs: process `pid` to `<root>/vmm`, its guest threads to
    /// `<root>/vms/NAME` with the VM's weight. Returns how many vCPU threads were
    /// placed (None: placement is off or failed).
    pub fn place_running(&self, name: &str, pid: i32, weight: u32) -> Option<usize> {
        let (Some(root), Some(dir)) = (&self.root, self.vm_dir(name)) else {
            return None;
        };
        let shares = shares_for_weight(weight).to_string();
        let r = std::fs::create_dir_all(&dir)
            .and_then(|()| write(&dir.join("cpu.shares"), &shares))
            .and_then(|()| write(&root.join("vmm/cgroup.procs"), &pid.to_string()));
        if let Err(e) = r {
            warn!(vm = name, pid, dir = %dir.display(), error = %e, "cannot place VMM in its cgroup");
            return None;
        }
        let (guest, vcpus) = self.move_guest_threads(name, pid, &dir);
        debug!(
            vm = name,
            pid,
            weight,
            guest_threads = guest,
            "VMM placed in its cgroups"
        );
        Some(vcpus)
    }

    /// Moves the guest threads of `pid` into `dir`; how many moved, and how many of
    /// them are vCPUs.
    fn move_guest_threads(&self, name: &str, pid: i32, dir: &Path) -> (usize, usize) {
        let (mut moved, mut vcpus) = (0, 0);
        for (tid, comm) in threads(pid) {
            if !is_guest_thread(&comm) {
                continue;
            }
            match write(&dir.join("tasks"), &tid.to_string()) {
                Ok(()) => {
                    moved += 1;
                    vcpus += usize::from(comm.starts_with("vireo-vcpu"));
                }
                // A thread that just ended.
                Err(e) => debug!(vm = name, tid, error = %e, "thread not moved"),
            }
        }
        (moved, vcpus)
    }

    /// The VM's guest threads to `<root>/vmm` for a moment: a pause or a stop needs
    /// every vCPU to run once to leave the guest, which at the VM's own share takes a
    /// scheduling round of all busy guests.
    pub fn boost(&self, name: &str, pid: i32) {
        if let Some(r) = &self.root {
            self.move_guest_threads(name, pid, &r.join("vmm"));
        }
    }

    /// The VM's guest threads back to `<root>/vms/NAME`.
    pub fn unboost(&self, name: &str, pid: i32) {
        if let Some(dir) = self.vm_dir(name) {
            if dir.is_dir() {
                self.move_guest_threads(name, pid, &dir);
            }
        }
    }

    /// Removes a VM's cgroup once its VMM has ended (a cgroup with tasks stays).
    /// False while a task is still in it (an ended VMM that nobody has reaped yet
    /// still counts): try again later.
    pub fn remove(&self, name: &str) -> bool {
        let Some(dir) = self.vm_dir(name) else {
            return true;
        };
        match std::fs::remove_dir(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                debug!(vm = name, dir = %dir.display(), error = %e, "cgroup not removed (yet)");
                false
            }
        }
    }

    /// Removes the cgroups of VMs whose VMMs are gone (left by a vireod that was
    /// killed); those with tasks stay.
    fn sweep(&self) {
        let Some(root) = &self.root else {
            return;
        };
        if let Ok(rd) = std::fs::read_dir(root.join("vms")) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }
}

/// The real-time budget (`cpu.rt_runtime_us` of each 1 s period) of `boot` and `vmm`,
/// and twice it for `<root>`: a kernel with RT group scheduling refuses a real-time
/// thread in a group without one, and a clustered VM's API thread runs at `SCHED_RR`
/// (`crate::vmm_priority`) in `boot` while its VM arrives, then in `vmm`. API threads
/// need microseconds per request; the budget only caps them.
pub const RT_RUNTIME_US: u64 = 50_000;

/// Grants `boot` and `vmm` their real-time budget (see [`RT_RUNTIME_US`]). Without RT
/// group scheduling (no `cpu.rt_runtime_us`) there is nothing to grant; a refusal is a
/// warning (renewals then run at normal priority).
fn grant_realtime(root: &Path) {
    for (dir, us) in [
        (root.to_path_buf(), 2 * RT_RUNTIME_US),
        (root.join("boot"), RT_RUNTIME_US),
        (root.join("vmm"), RT_RUNTIME_US),
    ] {
        let file = dir.join("cpu.rt_runtime_us");
        if !file.exists() {
            return;
        }
        if let Err(e) = write(&file, &us.to_string()) {
            warn!(
                path = %file.display(),
                error = %e,
                "no real-time budget for the VMMs' API threads: under CPU saturation a clustered VM's lease renewals can come late"
            );
            return;
        }
    }
}

/// The cpu-controller cgroup of a process, from /proc/PID/cgroup (v1: the line whose
/// controllers include `cpu`).
pub fn cpu_cgroup_of(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls
            .split(',')
            .any(|c| c == "cpu")
            .then(|| path.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_threads_are_told_by_name() {
        for g in [
            "vireo-vcpu0",
            "vireo-vcpu12",
            "vireo-blk-q0",
            "vireo-console",
            "vireo-rng",
        ] {
            assert!(is_guest_thread(g), "{g}");
        }
        for v in [
            "vireo",
            "vireo-api",
            "vireo-migrate-s",
            "vireo-throttle",
            "kvm-nx-lpage-re",
        ] {
            assert!(!is_guest_thread(v), "{v}");
        }
    }

    #[test]
    fn weights_map_to_shares() {
        assert_eq!(shares_for_weight(100), 1024);
        assert_eq!(shares_for_weight(200), 2048);
        assert_eq!(shares_for_weight(1), 10);
        assert_eq!(shares_for_weight(10_000), 102_400);
    }

    #[test]
    fn a_directory_that_is_no_cgroup_turns_placement_off() {
        let dir = tempfile::tempdir().unwrap();
        let c = V1::setup(&CgroupConfig {
            v1_root: Some(dir.path().join("vireo")),
            ..CgroupConfig::test_default()
        });
        assert!(!c.enabled());
        // Nothing panics or fails when placement is off.
        c.place_running("x", std::process::id() as i32, 100);
        c.remove("x");
        assert!(c.boot_procs().is_none());
    }
}
