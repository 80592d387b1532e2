//! `vireo --jail cgroup=NAME` on a cgroup v2 host: `vireo` runs in a mount namespace of
//! its own where /sys/fs/cgroup is a cgroup2 mount (this project's machines mount
//! cgroup v1 there). The cpu, memory and pids controllers are bound to v1 hierarchies
//! here, so a cgroup2 mount cannot offer them: what can be checked is the placement
//! (the VMM in NAME below its cgroup) and that a limit whose controller is missing
//! stops the start with an error naming it; where the parent does offer the
//! controller (a v2-only host), the test checks the limit's value instead.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vireo_e2e::Vireo;

const T: Duration = Duration::from_secs(60);

/// This test's own mount of the cgroup v2 hierarchy (one per kernel, wherever mounted).
struct Cgroup2 {
    dir: tempfile::TempDir,
}

impl Cgroup2 {
    fn mount() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount -t cgroup2 (the tests run as root)");
        Self { dir }
    }

    /// The cgroup v2 directory of this test process.
    fn own(&self) -> std::path::PathBuf {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        self.dir.path().join(rel.trim_start_matches('/'))
    }
}

impl Drop for Cgroup2 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// `vm`'s command, run in a new mount namespace with cgroup2 at /sys/fs/cgroup.
fn on_cgroup2(vm: &mut Vireo) {
    let mut w = Command::new("unshare");
    w.args([
        "-m",
        "sh",
        "-c",
        "mount --make-rprivate / && mount -t cgroup2 none /sys/fs/cgroup && exec \"$0\" \"$@\"",
    ])
    .arg(vm.cmd.get_program())
    .args(vm.cmd.get_args())
    .stdin(Stdio::null());
    for (k, v) in vm.cmd.get_envs() {
        if let Some(v) = v {
            w.env(k, v);
        }
    }
    vm.cmd = w;
}

fn jailed(dir: &Path, jail_extra: &str) -> Vireo {
    let jail = format!(
        "uid=100102,gid=100102,root={}{jail_extra}",
        dir.join("root").display()
    );
    let mut vm = Vireo::guest("test=counter period_ms=20", &["--jail", &jail]);
    on_cgroup2(&mut vm);
    vm
}

#[test]
fn a_jailed_vmm_on_cgroup_v2_runs_in_its_own_child_cgroup() {
    let host = Cgroup2::mount();
    let dir = tempfile::tempdir().unwrap();
    let name = format!("vireo-e2e-v2-{}", std::process::id());
    let vm = jailed(dir.path(), &format!(",cgroup={name}")).spawn();
    vm.wait_serial("tick 2 ", T);
    let pid = vm.child.as_ref().unwrap().id();
    let cg = host.own().join(&name);
    assert_eq!(
        std::fs::read_to_string(cg.join("cgroup.procs"))
            .unwrap()
            .trim(),
        pid.to_string()
    );
    drop(vm);
    let _ = std::fs::remove_dir(&cg);
}

#[test]
fn a_limit_whose_controller_cgroup_v2_does_not_offer_stops_the_jail_with_its_name() {
    let host = Cgroup2::mount();
    let dir = tempfile::tempdir().unwrap();
    let name = format!("vireo-e2e-v2-lim-{}", std::process::id());
    let offered = std::fs::read_to_string(host.own().join("cgroup.controllers")).unwrap();
    let memory = offered.split_whitespace().any(|c| c == "memory");
    let vm = jailed(dir.path(), &format!(",cgroup={name},memory_max=1073741824"));
    let cg = host.own().join(&name);
    if memory {
        // A v2-only host: the limit is applied.
        let vm = vm.spawn();
        vm.wait_serial("tick 2 ", T);
        assert_eq!(
            std::fs::read_to_string(cg.join("memory.max"))
                .unwrap()
                .trim(),
            "1073741824"
        );
        drop(vm);
    } else {
        let (out, _) = vm.run(T);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("jail: cgroup v2: memory_max needs the memory controller"),
            "{err}"
        );
        assert!(!cg.join("memory.max").exists());
    }
    let _ = std::fs::remove_dir(&cg);
}
