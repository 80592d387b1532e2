//! The VMMs on cgroup v2 (the unified hierarchy), under a subtree delegated to vireod
//! (its own cgroup, e.g. `vireod.service` with `Delegate=yes`, or `--cgroup-root`):
//!
//! ```text
//! <root>              subtree_control: +cpu +memory +pids (those the parent gives)
//! ├── vireod          vireod itself (moved here also when --cgroup-root names a
//! │                   subtree it was not in) and whatever else was in <root>: v2's
//! │                   "no internal processes" rule lets only leaves hold processes
//! │                   once controllers are enabled below <root>
//! └── vms             cpu.weight from --vms-cpu-shares; subtree_control as <root>
//!     └── NAME        one VMM, from exec (the launcher writes `0` to its
//!                     cgroup.procs before exec) to its end: memory.max = guest RAM +
//!                     VMM_MEMORY_OVERHEAD + RAM/64, pids.max = --vm-pids-max,
//!                     cpu.weight = the boot weight (--boot-cpu-shares) until the VM
//!                     runs, then the VM's weight (shares → weight as systemd maps
//!                     them: relative weight 100 → cpu.weight 100)
//! ```
//!
//! The VMM starts in its own cgroup (not in a shared `boot` one) because cgroup v2
//! charges memory to the cgroup a page was first touched in and never moves the
//! charge: a VMM moved later would keep its boot memory outside its limit. Unlike v1,
//! a VM's API threads run at the VM's weight (whole processes move; threaded subtrees
//! are not used). A controller the parent does not offer (cgroup.controllers) is
//! reported once with a warning naming what is not enforced; placement goes on.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};

use super::{cpu_weight_for_shares, shares_for_weight, CgroupConfig};

/// Memory a VMM needs besides guest RAM (its code and heap, virtio queues and
/// buffers, the API and migration threads' stacks, page cache of its disk I/O that
/// is charged to it); a further 1/64 of guest RAM covers the page tables and dirty
/// bitmaps that grow with it.
pub const VMM_MEMORY_OVERHEAD: u64 = 128 << 20;

/// memory.max of a VM with `guest` bytes of RAM.
pub fn memory_max_for(guest: u64) -> u64 {
    guest
        .saturating_add(guest / 64)
        .saturating_add(VMM_MEMORY_OVERHEAD)
}

/// The controllers vireod uses.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

#[derive(Clone, Debug)]
pub struct V2 {
    /// Where the hierarchy is mounted (paths in /proc/PID/cgroup are relative to it).
    mount: PathBuf,
    root: PathBuf,
    /// Controllers enabled for the VMs (a subset of [`CONTROLLERS`]).
    enabled: Vec<&'static str>,
    boot_weight: u64,
    pids_max: u64,
    /// Each placed VM's cpu.weight (for unboost).
    weights: Arc<Mutex<HashMap<String, u64>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
struct SetupError {
    path: PathBuf,
    source: std::io::Error,
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> SetupError + '_ {
    move |source| SetupError {
        path: path.to_path_buf(),
        source,
    }
}

fn mkdir(dir: &Path) -> Result<(), SetupError> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(at(dir)(e)),
        _ => Ok(()),
    }
}

fn write(path: &Path, value: &str) -> Result<(), SetupError> {
    std::fs::write(path, value).map_err(at(path))
}

fn words(path: &Path) -> Result<Vec<String>, SetupError> {
    Ok(std::fs::read_to_string(path)
        .map_err(at(path))?
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

/// This process's cgroup v2 path (`0::PATH` of /proc/self/cgroup).
fn own_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
}

/// The cgroup v2 path of process `pid`.
fn cgroup_of(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
}

impl V2 {
    /// Sets up the tree under `cfg.v2_root` (default: vireod's own cgroup in the
    /// hierarchy mounted at `mount`). None (with a warning) when it cannot be.
    pub fn setup(mount: &Path, cfg: &CgroupConfig) -> Option<Self> {
        let root = match &cfg.v2_root {
            Some(r) => r.clone(),
            None => match own_cgroup().as_deref() {
                Some("/") | None => mount.join("vireo"),
                Some(own) => mount.join(own.trim_start_matches('/')),
            },
        };
        match Self::make(mount, root.clone(), cfg) {
            Ok(t) => Some(t),
            Err(e) => {
                warn!(
                    root = %root.display(),
                    error = %e,
                    "cgroup v2 placement unavailable: VMMs are not placed in cgroups (no CPU weights, memory or pids limits per VM)"
                );
                None
            }
        }
    }

    fn make(mount: &Path, root: PathBuf, cfg: &CgroupConfig) -> Result<Self, SetupError> {
        std::fs::create_dir_all(&root).map_err(at(&root))?;
        let available = words(&root.join("cgroup.controllers"))?;
        // Every process of <root> (vireod, and anything else the unit holds) into a
        // leaf, so that controllers can be enabled below <root>.
        let leaf = root.join("vireod");
        mkdir(&leaf)?;
        // vireod too, when --cgroup-root named a subtree it was not in.
        let mut procs = words(&root.join("cgroup.procs"))?;
        procs.push(std::process::id().to_string());
        for pid in procs {
            if let Err(e) = write(&leaf.join("cgroup.procs"), &pid) {
                // A process that just ended.
                debug!(pid, error = %e, "process not moved to the vireod leaf");
            }
        }
        let enabled: Vec<&'static str> = CONTROLLERS
            .into_iter()
            .filter(|c| available.iter().any(|a| a == c))
            .collect();
        let vms = root.join("vms");
        mkdir(&vms)?;
        for dir in [&root, &vms] {
            for c in &enabled {
                write(&dir.join("cgroup.subtree_control"), &format!("+{c}"))?;
            }
        }
        let missing: Vec<&str> = CONTROLLERS
            .into_iter()
            .filter(|c| !enabled.contains(c))
            .collect();
        if !missing.is_empty() {
            warn!(
                root = %root.display(),
                missing = %missing.join(","),
                available = %available.join(","),
                "cgroup v2 controllers not available here (bound to a cgroup v1 hierarchy, or not delegated): what they limit is not enforced per VM (cpu: CPU weight; memory: memory.max; pids: pids.max)"
            );
        }
        if enabled.contains(&"cpu") {
            write(
                &vms.join("cpu.weight"),
                &cpu_weight_for_shares(cfg.vms_shares).to_string(),
            )?;
        }
        let t = Self {
            mount: mount.to_path_buf(),
            root,
            enabled,
            boot_weight: cpu_weight_for_shares(cfg.boot_shares),
            pids_max: cfg.vm_pids_max,
            weights: Arc::default(),
        };
        info!(root = %t.root.display(), controllers = %t.enabled.join(","), "VMMs placed in cgroup v2");
        t.sweep();
        Ok(t)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.root.join("vms").join(name)
    }

    fn has(&self, controller: &str) -> bool {
        self.enabled.contains(&controller)
    }

    /// Makes `vms/NAME` with its limits; its `cgroup.procs` for the launcher.
    pub fn prepare_vm(&self, name: &str, memory: Option<u64>) -> Option<CString> {
        let dir = self.vm_dir(name);
        let made = (|| {
            mkdir(&dir)?;
            if self.has("cpu") {
                write(&dir.join("cpu.weight"), &self.boot_weight.to_string())?;
            }
            if let (true, Some(m)) = (self.has("memory"), memory) {
                write(&dir.join("memory.max"), &memory_max_for(m).to_string())?;
            }
            if self.has("pids") {
                write(&dir.join("pids.max"), &self.pids_max.to_string())?;
            }
            Ok::<(), SetupError>(())
        })();
        match made {
            Ok(()) => CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).ok(),
            Err(e) => {
                warn!(vm = name, error = %e, "cannot make the VM's cgroup: the VMM starts where vireod is");
                None
            }
        }
    }

    fn set_weight(&self, name: &str, weight: u64) -> Result<(), SetupError> {
        if self.has("cpu") {
            write(&self.vm_dir(name).join("cpu.weight"), &weight.to_string())?;
        }
        Ok(())
    }

    /// The VM runs: the VMM into its cgroup (a re-adopted one may be elsewhere) at
    /// the VM's weight.
    pub fn place_running(&self, name: &str, pid: i32, weight: u32) -> bool {
        let w = cpu_weight_for_shares(shares_for_weight(weight));
        let dir = self.vm_dir(name);
        let r = mkdir(&dir)
            .and_then(|()| write(&dir.join("cgroup.procs"), &pid.to_string()))
            .and_then(|()| self.set_weight(name, w));
        match r {
            Ok(()) => {
                if let Ok(mut m) = self.weights.lock() {
                    m.insert(name.to_string(), w);
                }
                debug!(vm = name, pid, cpu_weight = w, "VMM placed in its cgroup");
                true
            }
            Err(e) => {
                warn!(vm = name, pid, error = %e, "cannot place VMM in its cgroup");
                false
            }
        }
    }

    /// A VMM found waiting for its VM (re-adopted receiver): its cgroup at the boot
    /// weight.
    pub fn place_booting(&self, pid: i32) {
        let Some(path) = cgroup_of(pid) else { return };
        let full = self.mount.join(path.trim_start_matches('/'));
        let vms = self.root.join("vms");
        if let Some(name) = full.strip_prefix(&vms).ok().and_then(|n| n.to_str()) {
            if let Err(e) = self.set_weight(name, self.boot_weight) {
                warn!(pid, error = %e, "cannot give the receiving VMM the boot weight");
            }
        }
    }

    pub fn boost(&self, name: &str) {
        let _ = self.set_weight(name, self.boot_weight);
    }

    pub fn unboost(&self, name: &str) {
        let w = self.weights.lock().ok().and_then(|m| m.get(name).copied());
        if let Some(w) = w {
            let _ = self.set_weight(name, w);
        }
    }

    /// Removes `vms/NAME` (and cgroups a jailed VMM made below it).
    pub fn remove(&self, name: &str) -> bool {
        if let Ok(mut m) = self.weights.lock() {
            m.remove(name);
        }
        remove_tree(&self.vm_dir(name))
    }

    /// Removes the cgroups of VMs whose VMMs are gone; busy ones stay.
    fn sweep(&self) {
        if let Ok(rd) = std::fs::read_dir(self.root.join("vms")) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&e.path());
                }
            }
        }
    }
}

/// rmdir of a cgroup and its children, deepest first; true when it is gone.
fn remove_tree(dir: &Path) -> bool {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            debug!(dir = %dir.display(), error = %e, "cgroup not removed (yet)");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory laid out like a cgroup v2 directory whose parent offers `ctrls`
    /// (regular files: what vireod writes can be read back; the kernel's own
    /// behaviour is tested in agent/tests/isolation.rs).
    fn fake_root(ctrls: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cgroup.controllers"), ctrls).unwrap();
        std::fs::write(d.path().join("cgroup.procs"), "").unwrap();
        d
    }

    fn read(p: PathBuf) -> String {
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_string()
    }

    #[test]
    fn each_vm_gets_its_weight_memory_and_pids_limits() {
        let d = fake_root("cpuset cpu io memory pids");
        let cfg = CgroupConfig {
            v2_root: Some(d.path().to_path_buf()),
            ..CgroupConfig::test_default()
        };
        let t = V2::setup(Path::new("/nonexistent"), &cfg).unwrap();
        assert_eq!(t.enabled, ["cpu", "memory", "pids"]);
        // Controllers enabled one by one, on the root and on vms.
        assert_eq!(read(d.path().join("cgroup.subtree_control")), "+pids");
        assert_eq!(read(d.path().join("vms/cgroup.subtree_control")), "+pids");
        assert_eq!(read(d.path().join("vms/cpu.weight")), "25");
        let procs = t.prepare_vm("web", Some(1 << 30)).unwrap();
        assert_eq!(
            procs.to_str().unwrap(),
            d.path().join("vms/web/cgroup.procs").to_str().unwrap()
        );
        let vm = d.path().join("vms/web");
        assert_eq!(read(vm.join("cpu.weight")), "400");
        assert_eq!(
            read(vm.join("memory.max")),
            ((1u64 << 30) + (1 << 24) + (128 << 20)).to_string()
        );
        assert_eq!(read(vm.join("pids.max")), "1024");
        assert!(t.place_running("web", 4242, 300));
        assert_eq!(read(vm.join("cpu.weight")), "300");
        assert_eq!(read(vm.join("cgroup.procs")), "4242");
        t.boost("web");
        assert_eq!(read(vm.join("cpu.weight")), "400");
        t.unboost("web");
        assert_eq!(read(vm.join("cpu.weight")), "300");
    }

    #[test]
    fn controllers_the_parent_does_not_offer_are_not_written() {
        let d = fake_root("hugetlb");
        let cfg = CgroupConfig {
            v2_root: Some(d.path().to_path_buf()),
            ..CgroupConfig::test_default()
        };
        let t = V2::setup(Path::new("/nonexistent"), &cfg).unwrap();
        assert!(t.enabled.is_empty());
        assert!(t.prepare_vm("a", Some(1 << 30)).is_some());
        for f in ["cpu.weight", "memory.max", "pids.max"] {
            assert!(!d.path().join("vms/a").join(f).exists(), "{f}");
        }
        assert!(!d.path().join("cgroup.subtree_control").exists());
    }

    #[test]
    fn a_directory_that_is_no_cgroup_turns_placement_off() {
        let d = tempfile::tempdir().unwrap();
        let cfg = CgroupConfig {
            v2_root: Some(d.path().join("vireo")),
            ..CgroupConfig::test_default()
        };
        assert!(V2::setup(Path::new("/nonexistent"), &cfg).is_none());
    }

    #[test]
    fn memory_max_is_ram_plus_the_documented_overhead() {
        assert_eq!(memory_max_for(0), VMM_MEMORY_OVERHEAD);
        assert_eq!(
            memory_max_for(64 << 20),
            (64 << 20) + (1 << 20) + (128 << 20)
        );
        assert_eq!(memory_max_for(u64::MAX), u64::MAX);
    }
}
